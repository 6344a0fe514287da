"""Kernels section: the plain paths (what runs on CPU) against independent float64 references; the
Triton kernels against the plain paths under Triton's interpreter (kernels_interpreted.py, run in a
fresh process: Triton must be imported with TRITON_INTERPRET=1). bench/kernel_check.py checks the
kernels in bf16 at the real shapes on a GPU."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_gpt as tg
from tiny import tiny_hparams


def reference_softcap_nll(z, targets, cap_pos, cap_neg):
    """nll written from the formula in float64: zc = c tanh(z/c) with c by the sign of z."""
    z64 = z.detach().double().requires_grad_(z.requires_grad)
    cp, cn = (c.detach().double().requires_grad_() for c in (cap_pos, cap_neg))
    zc = torch.where(z64 > 0, cp * torch.tanh(z64 / cp), cn * torch.tanh(z64 / cn))
    nll = torch.logsumexp(zc, dim=1) - zc[torch.arange(len(targets)), targets]
    return nll, (z64, cp, cn)


def softcap_inputs(rows=5, vocab=37, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, vocab, generator=g, dtype=dtype) * 40
    z[0, :5] = 0.0  # the sign boundary: zc = 0 there, cap_neg's side
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[1] = vocab - 1  # the last column (a partial chunk in the kernel)
    caps = [torch.tensor(v, dtype=dtype, requires_grad=True) for v in (30.0, 17.0)]
    return z.requires_grad_(), targets, caps, torch.randn(rows, generator=g, dtype=dtype)


def test_plain_softcap_cross_entropy_matches_float64_reference_and_gradients():
    z, targets, (cap_pos, cap_neg), weights = softcap_inputs()
    nll, _ = tg.softcap_cross_entropy(z, targets, cap_pos, cap_neg)
    (nll * weights).sum().backward()
    ref, (z64, cp, cn) = reference_softcap_nll(z, targets, cap_pos, cap_neg)
    (ref * weights.double()).sum().backward()
    assert torch.allclose(nll.double(), ref, atol=1e-4)
    assert torch.allclose(z.grad.double(), z64.grad, atol=1e-6)
    assert torch.allclose(cap_pos.grad.double(), cp.grad, rtol=1e-4) and cp.grad.abs() > 1e-3
    assert torch.allclose(cap_neg.grad.double(), cn.grad, rtol=1e-4) and cn.grad.abs() > 1e-3
    # And against finite differences (independent of autograd) in float64.
    z, targets, (cap_pos, cap_neg), _ = softcap_inputs(rows=3, vocab=7, seed=1, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *a: tg.softcap_cross_entropy(*a)[0], (z, targets, cap_pos, cap_neg))


def test_plain_mlp_matches_float64_formula(monkeypatch):
    h = tiny_hparams(monkeypatch)
    torch.manual_seed(0)
    mlp = tg.MLP(h)
    with torch.no_grad():
        mlp.down.weight.normal_(0, 0.05)  # zero init would hide the up weight's gradient
    x = torch.randn(2, 5, h.model_dim, requires_grad=True)
    grad_y = torch.randn(2, 5, h.model_dim)
    mlp(x).backward(grad_y)
    w_up, w_down, x64 = (t.detach().double().requires_grad_() for t in (mlp.up.weight, mlp.down.weight, x))
    pre = x64 @ w_up.T
    y64 = torch.where(pre > 0, pre, 0.5 * pre).pow(2) @ w_down.T
    y64.backward(grad_y.double())
    assert torch.allclose(mlp(x).double(), y64, atol=1e-5)
    for got, want in ((x.grad, x64.grad), (mlp.up.weight.grad, w_up.grad), (mlp.down.weight.grad, w_down.grad)):
        assert torch.allclose(got.double(), want, atol=1e-5)


def test_kernel_path_names_what_runs(monkeypatch):
    h = tiny_hparams(monkeypatch)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert tg.kernel_path(h, torch.device("cpu")).startswith("torch")
    off = tiny_hparams(monkeypatch, FUSED_KERNELS="off")
    assert tg.kernel_path(off, torch.device("cuda")) == "torch (FUSED_KERNELS=off)"
    model = tg.GPT(off)
    assert not model.head.fused and not any(b.mlp.fused for b in model.blocks)
    if tg.triton_available():
        assert tg.kernel_path(h, torch.device("cuda")) == "triton"


def test_triton_kernels_match_the_plain_paths_in_the_interpreter():
    if not tg.triton_available():
        pytest.skip("triton >= 3.4 is not installed (CI): the kernels cannot be interpreted")
    checks = Path(__file__).with_name("kernels_interpreted.py")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(checks)],
                            env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "5 passed" in result.stdout, result.stdout[-2000:]
