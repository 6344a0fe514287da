"""GPU check of document-masked attention: FlexAttention with a document block mask (train_gpt.py's CUDA
path) against SDPA with the dense boolean mask (its CPU path and the reference), forward and backward,
on synthetic documents; then timings against cuDNN's plain causal kernel (no mask) at the training shape.

    python bench/doc_mask_check.py          # B=48 T=2048, 8/4 heads of 64; exit code 1 when a check fails
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

DEV = torch.device("cuda")


def documents(B, T, g, lengths=(50, 1500)):
    """Token ids [B,T] with BOS at random document starts (documents of 50-1,500 tokens)."""
    ids = torch.randint(4, 8192, (B, T), generator=g)
    for b in range(B):
        t = int(torch.randint(0, lengths[0], (1,), generator=g))
        while t < T:
            ids[b, t] = tg.BOS_ID
            t += int(torch.randint(*lengths, (1,), generator=g))
    return ids.to(DEV)


def run(backend, q, k, v, mask, grad):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    y = tg.causal_attention(q, k, v, backend, mask)
    y.backward(grad)
    return [y, q.grad, k.grad, v.grad]


def timed(fn, reps=20):
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main():
    g = torch.Generator().manual_seed(0)
    B, T, H, KV, D = 48, 2048, 8, 4, 64
    ok = True
    flex = torch.compile(lambda q, k, v, m: tg.causal_attention(q, k, v, "flex", m))
    for trial in range(2):
        ids = documents(B if trial else 4, T, g)
        segments = tg.document_segments(ids, None if trial == 0 else 512)
        q, k, v, grad = (torch.randn(ids.size(0), T, h, D, device=DEV, dtype=torch.bfloat16) for h in (H, KV, KV, H))
        got = run("flex", q, k, v, tg.attention_mask(segments, "flex"), grad)
        small = slice(0, 4)  # the dense reference materialises [B,H,T,T]: check 4 rows
        ref = run("sdpa", *(t[small].float() for t in (q, k, v)), segments[small], grad[small].float())
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
            err = float((a[small].float() - b).norm() / b.norm())
            ok &= err < 2e-2
            print(f"trial {trial} span {'none' if trial == 0 else 512:>4} {name}: rel err {err:.2e} {'ok' if err < 2e-2 else 'FAIL'}")
    ids = documents(B, T, g)
    q, k, v, grad = (torch.randn(B, T, h, D, device=DEV, dtype=torch.bfloat16, requires_grad=True) for h in (H, KV, KV, H))
    mask = tg.attention_mask(tg.document_segments(ids, None), "flex")
    rows = {
        "cuDNN causal, no mask": lambda: tg.causal_attention(q, k, v, "sdpa_cudnn"),
        "flex, document mask": lambda: flex(q, k, v, mask),
    }
    print(f"{'B=48 T=2048 8/4 heads d64 bf16':<34}{'fwd ms':>9}{'fwd+bwd ms':>12}")
    for label, fn in rows.items():
        fwd = timed(lambda: fn().detach())
        both = timed(lambda: fn().backward(grad))
        print(f"{label:<34}{fwd:>9.2f}{both:>12.2f}")
    build = timed(lambda: tg.attention_mask(tg.document_segments(ids, None), "flex"))
    print(f"block mask build per forward: {build:.2f} ms")
    print("ALL OK" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
