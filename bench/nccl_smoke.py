"""NCCL smoke test on one GPU: train_gpt.py's distributed code path (a one-rank process group, the real
NCCL calls through `Comm`) gives the same results as its non-distributed path.

    torchrun --standalone --nproc_per_node=1 bench/nccl_smoke.py

Each check runs once through `plain` (a Comm that does not use the process group: every collective is
the identity, as in a plain `python` run) and once through `nccl` (setup_distributed's process group:
reduce-scatter with AVG, all-gather into one tensor, all-reduce, broadcast), on the same inputs:
  optimizer_step  one Optimizers.step on injected gradients (Muon banks, AdamW's packed all-reduce, grad norm)
  hessians        collect_hessians' all-reduce
  eval_plain      eval_plain's float64 sums
  eval_ttt        score-first TTT (its gradient all-reduce; attention on the deterministic math kernel)
  broadcast       the artifact broadcast (broadcast_object of a 16 MB blob)
With one rank every collective returns its input, so the results must be bit-identical (TTT within
1e-6: its backward may not be bit-deterministic). Prints one line per check, the optimizer step's time
on both paths, and `nccl_smoke: PASS` (exit 0) or `nccl_smoke: FAIL <checks>` (exit 1). The model is
the record config (any train_gpt.py env var applies). Without a GPU it runs the same checks on gloo.
"""
import copy
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel

os.environ.setdefault("TTT_CHUNK_TOKENS", "8192")  # two short chunks: the first is trained on
os.environ.setdefault("VAL_BATCH_TOKENS", "32768")  # small forwards: TTT runs on the math attention kernel
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def max_rel_diff(a, b) -> float:
    """max |a - b| / max |a| over tensors, floats, dicts of tensors or EvalResults; bytes: 0 or 1."""
    if isinstance(a, tg.EvalResult):
        return max(max_rel_diff(a.loss, b.loss), max_rel_diff(a.bpb, b.bpb), float(a.tokens != b.tokens or a.bytes != b.bytes))
    if isinstance(a, bytes):
        return float(a != b)
    if isinstance(a, dict):
        return max(max_rel_diff(a[k], b[k]) for k in a) if a.keys() == b.keys() else float("inf")
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))


def timed_step(model, grads, h, runtime, sync):
    """One Optimizers.step on a copy of `model` with the given gradients; returns (grad norm, weights, ms)."""
    model = copy.deepcopy(model)
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    opt = tg.Optimizers(model, h, runtime)
    sync()
    t = time.perf_counter()
    norm = opt.step(1.0, 0.95)
    sync()
    return norm, {k: v.detach().clone() for k, v in model.state_dict().items()}, (time.perf_counter() - t) * 1000


def main():
    h = tg.Hyperparameters()
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        sys.exit("nccl_smoke: run it under torchrun: torchrun --standalone --nproc_per_node=1 bench/nccl_smoke.py")
    nccl = tg.setup_distributed(h.dist_timeout_seconds)
    if nccl.world_size != 1:
        sys.exit(f"nccl_smoke: needs exactly one rank (got {nccl.world_size}): it compares with the one-process path")
    plain = tg.Runtime(device=nccl.device, comm=tg.Comm())
    device = nccl.device
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    print(f"nccl_smoke: torch {torch.__version__} backend {dist.get_backend()} device {device} "
          f"comm active: plain={plain.comm.active} nccl={nccl.comm.active}", flush=True)

    model = tg.build_model(h, plain, "sdpa")
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, h.vocab_size, (4, h.train_seq_len + 1), generator=g).to(device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    model(x, y).backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    val_tokens = torch.randint(0, h.vocab_size, (2 * h.ttt_chunk_tokens + 1,), generator=g)
    target_bytes = torch.randint(0, 7, (val_tokens.numel() - 1,), dtype=torch.int32, generator=g)
    blob = os.urandom(16_000_000)

    def ttt(runtime):
        with sdpa_kernel(SDPBackend.MATH):
            return tg.eval_ttt(copy.deepcopy(model), val_tokens, target_bytes, h, runtime)

    checks = {
        "optimizer_step": lambda rt: timed_step(model, grads, h, rt, sync)[:2],
        "hessians": lambda rt: tg.collect_hessians(model, [(x, y)], rt),
        "eval_plain": lambda rt: tg.eval_plain(model, val_tokens, target_bytes, h, rt),
        "eval_ttt": ttt,
        "broadcast": lambda rt: rt.comm.broadcast_object(blob if rt.is_main else None),
    }
    tolerance = {"eval_ttt": 1e-6}
    failed = []
    for name, check in checks.items():
        expected, got = check(plain), check(nccl)
        pairs = list(zip(expected, got)) if isinstance(expected, tuple) else [(expected, got)]
        diff = max(max_rel_diff(a, b) for a, b in pairs)
        ok = diff <= tolerance.get(name, 0.0)
        failed += [] if ok else [name]
        print(f"check {name:<15} max rel diff {diff:.3g}  {'PASS' if ok else 'FAIL'}", flush=True)
    times = {name: min(timed_step(model, grads, h, rt, sync)[2] for _ in range(5)) for name, rt in (("plain", plain), ("nccl", nccl))}
    print(f"optimizer step: plain {times['plain']:.1f} ms, nccl {times['nccl']:.1f} ms (best of 5, incl. state allocation)")
    dist.destroy_process_group()
    print(f"nccl_smoke: {'FAIL ' + ', '.join(failed) if failed else 'PASS'}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
