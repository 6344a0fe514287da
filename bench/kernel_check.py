"""GPU check of train_gpt.py's Triton kernels against the plain PyTorch expressions they replace, at the
real shapes: forward and backward, outputs poisoned (NaN) before every kernel run, fresh random inputs
per trial; then median timings (CUDA events) of kernel vs plain (eager and torch.compile'd), and a
compiled Block and head with the kernels on vs off (inductor, counting graph breaks).

    python bench/kernel_check.py        # one table; exit code 1 when a check fails
    KC_ROWS=131072 KC_TRIALS=3 KC_REPS=20 python bench/kernel_check.py

Pass rule per tensor: err(kernel) <= 2 * err(plain bf16) + tol, where err = max|t - ref| / max|ref| and
ref is the plain expression in fp32 (MLP) or float64 (cross-entropy), as FlashAttention's tests do.
"""
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

ROWS = int(os.environ.get("KC_ROWS", "131072"))  # one micro-batch: 64 sequences of 2048 (786,432 / 6)
TRIALS = int(os.environ.get("KC_TRIALS", "3"))
REPS = int(os.environ.get("KC_REPS", "20"))
DIM, HIDDEN, VOCAB = 512, 2048, 8192
DEV = torch.device("cuda")
failures = []


def poison() -> None:
    """Fill free allocator memory with NaN, so an output element a kernel forgets to write shows up."""
    torch.cuda.empty_cache()  # cached blocks hold old (valid-looking) results: return them first
    block = torch.empty(int(torch.cuda.mem_get_info()[0] * 0.8) // 4, device=DEV)
    block.fill_(float("nan"))
    del block


def rel_err(t, ref) -> float:
    t, ref = t.double(), ref.double()
    if torch.isnan(t).any():
        return float("inf")
    return ((t - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def check(name: str, kernel, plain, ref, tol: float) -> None:
    k, p = rel_err(kernel, ref), rel_err(plain, ref)
    ok = k <= 2 * p + tol
    print(f"{name:<30}{k:>12.2e}{p:>12.2e}   {'ok' if ok else 'FAIL'}", flush=True)
    if not ok:
        failures.append(name)


def plain_mlp(x, w_up, w_down):
    return F.linear(F.leaky_relu(F.linear(x, w_up), 0.5).square(), w_down)


def mlp_inputs(seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(ROWS, DIM, device=DEV, generator=g).bfloat16()
    w_up = (torch.randn(HIDDEN, DIM, device=DEV, generator=g) / DIM**0.5).bfloat16()
    w_down = (torch.randn(DIM, HIDDEN, device=DEV, generator=g) * 0.02).bfloat16()
    grad = torch.randn(ROWS, DIM, device=DEV, generator=g).bfloat16()
    return x, w_up, w_down, grad


def run_mlp(fn, x, w_up, w_down, grad):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w_up, w_down)]
    y = fn(*leaves)
    y.backward(grad.to(y.dtype))
    return [y.detach()] + [t.grad for t in leaves]


def check_mlp() -> None:
    names = ("y", "dx", "dw_up", "dw_down")
    for trial in range(TRIALS):
        x, w_up, w_down, grad = mlp_inputs(trial)
        ref = run_mlp(plain_mlp, x.float(), w_up.float(), w_down.float(), grad.float())
        plain = run_mlp(plain_mlp, x, w_up, w_down, grad)
        poison()
        kernel = run_mlp(tg.fused_leaky_relu_square_mlp, x, w_up, w_down, grad)
        for name, k, p, r in zip(names, kernel, plain, ref):
            check(f"mlp {name} (trial {trial})", k, p, r, 1e-3)
        poison()
        with torch.no_grad():
            check(f"mlp no-grad y (trial {trial})", tg.fused_leaky_relu_square_mlp(x, w_up, w_down), plain[0], ref[0], 1e-3)


def ce_inputs(seed, rows):
    g = torch.Generator(device=DEV).manual_seed(seed)
    z = torch.randn(rows, VOCAB, device=DEV, generator=g) * 8
    z[:, :64] *= 10  # some logits far past the caps, both signs
    targets = torch.randint(0, VOCAB, (rows,), device=DEV, generator=g)
    hints = torch.randint(0, VOCAB, (rows,), device=DEV, generator=g)
    return z.bfloat16(), targets, hints


def run_ce(z, targets, hints, fused, dtype=None):
    z = z.detach().to(dtype or z.dtype).requires_grad_()
    caps = [torch.tensor(c, device=DEV, dtype=dtype or torch.float32, requires_grad=True) for c in (30.0, 25.0)]
    nll, hint_nll = tg.softcap_cross_entropy(z, targets, *caps, hints, fused=fused)
    nll.mean().backward()
    return [nll.detach(), hint_nll, z.grad, caps[0].grad, caps[1].grad]


def check_ce() -> None:
    names = ("nll", "hint_nll", "dz", "dcap_pos", "dcap_neg")
    for trial in range(TRIALS):
        rows = 65536 if trial == 0 else ROWS
        z, targets, hints = ce_inputs(100 + trial, rows)
        ref = run_ce(z, targets, hints, False, torch.float64)
        plain = run_ce(z, targets, hints, False)
        poison()
        kernel = run_ce(z, targets, hints, True)
        for name, k, p, r in zip(names, kernel, plain, ref):
            check(f"ce {name} ({rows} rows)", k, p, r, {"nll": 1e-4, "hint_nll": 1e-4, "dz": 1e-2}.get(name, 1e-3))
        del ref
        torch.cuda.empty_cache()


def median_ms(fn, reps: int = REPS) -> float:
    """Median of `reps` timed calls (CUDA events) after 3 untimed ones."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def peak_gib(fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def timings() -> None:
    x, w_up, w_down, grad = mlp_inputs(7)
    leaves = [t.clone().requires_grad_() for t in (x, w_up, w_down)]
    compiled_mlp = torch.compile(plain_mlp, dynamic=False)
    z, targets, _ = ce_inputs(8, ROWS)
    zl = z.clone().requires_grad_()
    caps = [torch.tensor(c, device=DEV, requires_grad=True) for c in (30.0, 25.0)]
    compiled_ce = torch.compile(lambda z, t, a, b: tg.softcap_cross_entropy(z, t, a, b)[0], dynamic=False)
    fused_ce = lambda z, t, a, b: tg.softcap_cross_entropy(z, t, a, b, fused=True)[0]  # noqa: E731
    plain_ce = lambda z, t, a, b: tg.softcap_cross_entropy(z, t, a, b)[0]  # noqa: E731

    def train(mlp=None, ce=None):  # forward + backward, gradients returned (not accumulated)
        if mlp is not None:
            return lambda: torch.autograd.grad(mlp(*leaves), leaves, grad)
        return lambda: torch.autograd.grad(ce(zl, targets, *caps).mean(), [zl, *caps])

    def infer(fn, *args):
        return lambda: torch.no_grad()(fn)(*args)

    cases = {
        f"mlp fwd+bwd [{ROWS}x{DIM}x{HIDDEN}]": [train(mlp=m) for m in (tg.fused_leaky_relu_square_mlp, compiled_mlp, plain_mlp)],
        "mlp fwd, no grad": [infer(m, x, w_up, w_down) for m in (tg.fused_leaky_relu_square_mlp, compiled_mlp, plain_mlp)],
        f"ce fwd+bwd [{ROWS}x{VOCAB}]": [train(ce=c) for c in (fused_ce, compiled_ce, plain_ce)],
        "ce fwd, no grad (eval)": [infer(c, z, targets, *caps) for c in (fused_ce, compiled_ce, plain_ce)],
    }
    print(f"{'timing (median ms)':<34}{'kernel':>9}{'compiled':>10}{'eager':>9}{'speedup':>9}"
          f"{'GiB kernel':>12}{'compiled':>10}")
    for name, (kernel, compiled, eager) in cases.items():
        ms = [median_ms(f) for f in (kernel, compiled, eager)]
        mem = [peak_gib(f) for f in (kernel, compiled)]
        print(f"{name:<34}{ms[0]:>9.3f}{ms[1]:>10.3f}{ms[2]:>9.3f}{ms[1] / ms[0]:>8.2f}x{mem[0]:>12.2f}{mem[1]:>10.2f}",
              flush=True)


def compiled_modules() -> list[str]:
    """A real Block and the head, regionally compiled with inductor as in training, kernels on vs off."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    h = tg.Hyperparameters()
    torch.manual_seed(0)
    block = tg.Block(h, layer=h.parallel_start, backend=tg.select_attention_backend(DEV)).to(DEV)
    with torch.no_grad():
        block.mlp.down.weight.normal_(0, 0.02)
        block.attn.proj.weight.normal_(0, 0.02)
    x = torch.randn(8, h.train_seq_len, h.model_dim, device=DEV, dtype=torch.bfloat16)
    cos, sin = (t.to(DEV) for t in tg.rotary_tables(h.train_seq_len, h.rope_dims, h.rope_base))
    emb = (torch.randn(h.vocab_size, h.model_dim, device=DEV) * 0.05).requires_grad_()
    hidden = torch.randn(8, h.train_seq_len, h.model_dim, device=DEV, dtype=torch.bfloat16)
    targets = torch.randint(0, h.vocab_size, (8, h.train_seq_len), device=DEV)
    head = tg.SoftcapHead().to(DEV)
    caps = torch.full((2,), h.logit_softcap, device=DEV)
    results = {}
    for fused in (False, True):
        torch._dynamo.reset()
        counters.clear()
        block.mlp.fused = head.fused = fused
        compiled_block, compiled_head = torch.compile(block, dynamic=False), torch.compile(head, dynamic=False)
        block.zero_grad()
        emb.grad = None
        t0 = time.perf_counter()
        lanes = compiled_block(x, x, cos, sin)
        (lanes[0].float().square().mean() + lanes[1].float().square().mean()).backward()
        loss = compiled_head(hidden, emb, caps, targets, "mean")
        loss.backward()
        torch.cuda.synchronize()
        breaks = sum(counters["graph_break"].values())
        grads = [p.grad.clone() for p in block.parameters() if p.grad is not None] + [emb.grad.clone()]
        results[fused] = (lanes, loss.detach(), grads,
                          time.perf_counter() - t0, breaks)
    (lanes_p, loss_p, grads_p, s_p, _), (lanes_k, loss_k, grads_k, s_k, breaks) = results[False], results[True]
    worst = max(rel_err(k, p) for k, p in zip([*lanes_k, *grads_k], [*lanes_p, *grads_p]))
    ok = breaks == 0 and worst < 5e-2 and abs(loss_k - loss_p).item() < 1e-3
    if not ok:
        failures.append("compiled block/head")
    return [f"compiled Block(lanes)+head, kernels vs plain: graph breaks {breaks}, loss diff "
            f"{abs(loss_k - loss_p).item():.1e}, worst rel err {worst:.1e}, first call {s_k:.1f}s vs {s_p:.1f}s  "
            f"{'ok' if ok else 'FAIL'}"]


def main() -> None:
    assert torch.cuda.is_available(), "kernel_check needs a CUDA GPU"
    print(f"device {torch.cuda.get_device_name()} torch {torch.__version__} "
          f"triton {__import__('triton').__version__}; {TRIALS} trials, {ROWS} rows")
    print(f"{'check (rel. max err)':<30}{'kernel':>12}{'plain bf16':>12}")
    check_mlp()
    check_ce()
    timings()
    print("\n".join(compiled_modules()))
    kernels = tg.triton_kernels()
    for name in ("mlp_matmul", "ce_forward", "ce_backward"):
        print(f"autotuned {name}: {getattr(kernels[name], 'best_config', None)}")
    print("ALL OK" if not failures else f"FAILED: {', '.join(failures)}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
