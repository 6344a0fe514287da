"""Which causal GQA attention kernels work on this GPU, how fast, and whether torch.compile takes them.

For each candidate: forward and forward+backward at the training shape (one micro-batch: 64 x 2048
tokens, 8 query / 4 KV heads, head dim 64, bf16), errors of out/dq/dk/dv against an fp32 reference
(SDPA math), median ms and TFLOP/s (CUDA events), the first call's time (FA4 JIT-compiles its kernels
then), and whether a fullgraph torch.compile of it works. Then document-masked (varlen) attention over
packed documents, the lead's next step. One table; each candidate that fails prints its error in one
line. Run after installing FA3/FA4 wheels (for the offline GPU box, bench/fa4_carry.py packs FA4); FA4's
figures on H100 are in docs/BENCHMARKS.md §5.11.

    python bench/attention_probe.py
    AP_BATCH=8 python bench/attention_probe.py   # smaller batch
"""
import importlib
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402
from kernel_check import median_ms  # noqa: E402

B, T, H, KV, D = int(os.environ.get("AP_BATCH", "64")), 2048, 8, 4, 64
REPS = int(os.environ.get("AP_REPS", "10"))
DEV = torch.device("cuda")
FLOPS_FWD = 4 * B * H * T * T * D / 2  # causal: half of QK^T and PV


def sdpa(backends, q, k, v):
    with sdpa_kernel(backends):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=True, enable_gqa=True).transpose(1, 2)


def fa3(q, k, v):
    out = importlib.import_module("flash_attn_interface").flash_attn_func(q, k, v, causal=True)
    return out[0] if isinstance(out, tuple) else out


def fa4(q, k, v):
    out = importlib.import_module("flash_attn.cute").flash_attn_func(q, k, v, causal=True)
    return out[0] if isinstance(out, tuple) else out


def inputs(seed, batch):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return [torch.randn(batch, T, n, D, device=DEV, generator=g, dtype=torch.bfloat16).requires_grad_()
            for n in (H, KV, KV)]


def errors(fn) -> str:
    """max|x - ref| / max|ref| of out, dq, dk, dv on 2 sequences, ref = fp32 SDPA math."""
    q, k, v = inputs(1, 2)
    grad = torch.randn(2, T, H, D, device=DEV, dtype=torch.bfloat16)
    out = fn(q, k, v)
    got = [out.detach(), *torch.autograd.grad(out, (q, k, v), grad)]
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref_out = sdpa([SDPBackend.MATH], q32, k32, v32)
    ref = [ref_out.detach(), *torch.autograd.grad(ref_out, (q32, k32, v32), grad.float())]
    return " ".join(f"{((a.float() - b).abs().max() / b.abs().max()).item():.1e}" for a, b in zip(got, ref))


def compiles(fn) -> str:
    import torch._dynamo
    torch._dynamo.reset()
    q, k, v = inputs(2, 2)
    try:
        out = torch.compile(fn, fullgraph=True, dynamic=False)(q, k, v)
        out.float().sum().backward()
        return "yes"
    except Exception as e:
        return f"no ({type(e).__name__})"


def probe(name, fn) -> str:
    try:
        q, k, v = inputs(0, B)
        grad = torch.randn_like(q)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(q, k, v).backward(grad)
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        fwd = median_ms(lambda: torch.no_grad()(fn)(q, k, v), REPS)
        both = median_ms(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), grad), REPS)
        return (f"{name:<11}{fwd:>8.2f}{FLOPS_FWD / fwd / 1e9:>7.0f}{both:>9.2f}{3.5 * FLOPS_FWD / both / 1e9:>7.0f}"
                f"{first:>8.1f}  {errors(fn):<32}{compiles(fn)}")
    except Exception as e:
        return f"{name:<11}FAILED {type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}"


def varlen_probe() -> list[str]:
    """Packed documents in one row (cu_seqlens), as FA3/FA4 varlen and torch's varlen_attn take them,
    checked against dense causal SDPA per document."""
    g = torch.Generator().manual_seed(3)
    lengths = []
    while sum(lengths) < 32768:
        lengths.append(int(torch.randint(16, 3000, (1,), generator=g)))
    lengths[-1] -= sum(lengths) - 32768
    cu = torch.tensor([0] + lengths, device=DEV).cumsum(0).to(torch.int32)
    total, longest = 32768, max(lengths)
    q, k, v = (torch.randn(total, n, D, device=DEV, dtype=torch.bfloat16) for n in (H, KV, KV))
    starts = cu.tolist()
    ref = torch.cat([sdpa([SDPBackend.MATH], q[None, a:b].float(), k[None, a:b].float(), v[None, a:b].float())[0]
                     for a, b in zip(starts[:-1], starts[1:])])
    candidates = {
        "fa3 varlen": lambda: importlib.import_module("flash_attn_interface").flash_attn_varlen_func(
            q, k, v, cu, cu, longest, longest, causal=True),
        "fa4 varlen": lambda: importlib.import_module("flash_attn.cute").flash_attn_varlen_func(
            q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest, max_seqlen_k=longest, causal=True),
        "torch varlen_attn": lambda: importlib.import_module("torch.nn.attention.varlen").varlen_attn(
            q, k, v, cu, cu, longest, longest, window_size=(-1, 0), enable_gqa=True),
    }
    lines = [f"varlen: {len(lengths)} documents, {total} tokens, longest {longest}"]
    for name, fn in candidates.items():
        try:
            out = fn()
            out = out[0] if isinstance(out, tuple) else out
            err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
            lines.append(f"  {name:<18} fwd {median_ms(fn, REPS):7.3f} ms  rel err {err:.1e}")
        except Exception as e:
            lines.append(f"  {name:<18} FAILED {type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}")
    return lines


def main() -> None:
    print(f"torch {torch.__version__} cuda {torch.version.cuda} {torch.cuda.get_device_name()} "
          f"sm_{''.join(map(str, torch.cuda.get_device_capability()))}")
    for module in ("flash_attn_interface", "flash_attn.cute", "cutlass", "cutlass.cute", "quack", "tvm_ffi"):
        try:
            m = importlib.import_module(module)
            print(f"  import {module}: ok {getattr(m, '__version__', '')} {getattr(m, '__file__', '')}")
        except Exception as e:
            print(f"  import {module}: {type(e).__name__}: {e}")
    registry = importlib.import_module("torch.nn.attention")
    print(f"  torch flash-attention registry: "
          f"{registry.list_flash_attention_impls() if hasattr(registry, 'list_flash_attention_impls') else 'absent'}")
    print(f"{'backend':<11}{'fwd ms':>8}{'TF/s':>7}{'f+b ms':>9}{'TF/s':>7}{'first s':>8}  "
          f"{'rel err out dq dk dv':<32}compile")
    for name, fn in {"sdpa_flash": lambda q, k, v: sdpa([SDPBackend.FLASH_ATTENTION], q, k, v),
                     "cudnn": lambda q, k, v: sdpa([SDPBackend.CUDNN_ATTENTION], q, k, v),
                     "fa3": fa3, "fa4": fa4}.items():
        print(probe(name, fn), flush=True)
    for masked in (False, True):
        unavailable = []
        backend = tg.select_attention_backend(DEV, unavailable, doc_masked=masked)
        print(f"train_gpt selects {backend} ({'document-masked' if masked else 'plain causal'})"
              + "".join(f"; {reason}" for reason in unavailable))
    try:
        print("\n".join(varlen_probe()))
    except Exception:
        traceback.print_exc(limit=2)


if __name__ == "__main__":
    main()
