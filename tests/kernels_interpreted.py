"""The Triton kernels against the plain PyTorch paths, on CPU tensors through Triton's interpreter at tiny
shapes. Run by tests/test_kernels.py in a fresh process with TRITON_INTERPRET=1 (Triton's own jit
helpers are interpreted only when Triton is first imported in that mode). The interpreter's bf16
matmul is broken, so these run in fp32; bench/kernel_check.py checks bf16 on a GPU."""
import os
import runpy
from pathlib import Path

import torch
import torch.nn.functional as F

import train_gpt as tg
from test_kernels import softcap_inputs
from tiny import tiny_hparams

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_kernels.py (TRITON_INTERPRET=1 from the start)"


def test_softcap_kernel_matches_plain_forward_and_backward():
    # 2,500 columns: three chunks of the kernel's 1,024, the last one partial.
    z, targets, (cap_pos, cap_neg), weights = softcap_inputs(rows=4, vocab=2500)
    hints = torch.randint(0, 2500, (4,))
    results = []
    for fused in (False, True):
        z.grad = cap_pos.grad = cap_neg.grad = None
        nll, hint_nll = tg.softcap_cross_entropy(z, targets, cap_pos, cap_neg, hints, fused=fused)
        (nll * weights).sum().backward()
        results.append((nll, hint_nll, z.grad, cap_pos.grad, cap_neg.grad))
    for plain, kernel in zip(*results):
        assert torch.allclose(kernel, plain, rtol=1e-4, atol=1e-5), (kernel, plain)
    assert not results[1][1].requires_grad  # hint nll carries no gradient
    assert tg.softcap_cross_entropy(z, targets, cap_pos, cap_neg, fused=True)[1] is None


def plain_mlp(x, w_up, w_down):
    return F.linear(F.leaky_relu(F.linear(x, w_up), 0.5).square(), w_down)


def test_mlp_kernel_matches_plain_forward_and_backward():
    # 1,100 rows: nine 128-row tiles in two GROUP_M bands, the last tile partial; two column tiles.
    # Then the zero-initialised down weight (on fewer rows): only it gets a gradient, as in plain.
    torch.manual_seed(0)
    w_up = (torch.randn(256, 64) / 8).requires_grad_()
    for rows, w_down in ((1100, torch.randn(64, 256) / 16), (200, torch.zeros(64, 256))):
        x, grad_y = torch.randn(rows, 64, requires_grad=True), torch.randn(rows, 64)
        w_down.requires_grad_()
        results = []
        for mlp in (plain_mlp, tg.fused_leaky_relu_square_mlp):
            x.grad = w_up.grad = w_down.grad = None
            y = mlp(x, w_up, w_down)
            y.backward(grad_y)
            results.append((y, x.grad, w_up.grad, w_down.grad))
        for plain, kernel in zip(*results):
            assert torch.allclose(kernel, plain, rtol=1e-4, atol=1e-4)
        assert results[1][3].abs().max() > 0
    x.grad, frozen = None, (w_up.detach(), torch.randn(64, 256) / 16)  # LoRA TTT: weights without gradients
    grads = [torch.autograd.grad(mlp(x, *frozen), x, grad_y)[0] for mlp in (plain_mlp, tg.fused_leaky_relu_square_mlp)]
    assert torch.allclose(grads[1], grads[0], rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # the forward-only variant (pre not written)
        w_down = torch.randn(64, 256) / 16
        assert torch.allclose(tg.fused_leaky_relu_square_mlp(x, w_up, w_down), plain_mlp(x, w_up, w_down), atol=1e-4)


def test_compiled_model_with_kernels_matches_plain_path_without_graph_breaks(monkeypatch):
    h = tiny_hparams(monkeypatch, NUM_LAYERS="1", NUM_LOOPS="0", PARALLEL_START="1", MODEL_DIM="32",
                     NUM_HEADS="2", NUM_KV_HEADS="1", VOCAB_SIZE="64", TRAIN_SEQ_LEN="16", EVAL_SEQ_LEN="16")
    torch.manual_seed(0)
    model = tg.GPT(h)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    model.head.fused = model.blocks[0].mlp.fused = False
    model(x, y).backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    graphs = []

    def recording_backend(gm, example_inputs):  # AOT autograd traces forward and backward, as inductor would
        graphs.append(gm.print_readable(print_output=False))
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    model.head.fused = model.blocks[0].mlp.fused = True
    for module in (model.blocks[0], model.head):
        module.compile(backend=recording_backend, fullgraph=True, dynamic=False)  # a graph break would raise
    model(x, y).backward()
    for name, p in model.named_parameters():
        assert (p.grad is None) == (name not in plain) and (name not in plain or torch.allclose(p.grad, plain[name], atol=1e-5)), name
    assert len(graphs) == 2 and "pgolf.mlp_up" in graphs[0] and "pgolf.softcap_ce" in graphs[1]


def test_gptq_calibration_sees_the_mlp_inputs_with_kernels_on(monkeypatch):
    h = tiny_hparams(monkeypatch)
    model = tg.GPT(h)
    assert model.blocks[0].mlp.fused
    x = torch.randint(0, h.vocab_size, (1, 8))
    hessians = tg.collect_hessians(model, [(x, x)], tg.Runtime())
    assert hessians["blocks.0.mlp.up.weight"].abs().sum() > 0 and hessians["blocks.0.mlp.down.weight"].abs().sum() > 0


def test_shipped_copy_runs_the_kernels(tmp_path):
    # The shipped copy runs exec'd source: Triton must still be able to read the kernels' source.
    path = tmp_path / "train_gpt_shipped.py"
    path.write_bytes(tg.build_submission_code((Path(tg.__file__)).read_text(encoding="utf-8")))
    shipped = runpy.run_path(str(path), run_name="shipped_copy")
    z, targets, (cap_pos, cap_neg), _ = softcap_inputs()
    got, _ = shipped["softcap_cross_entropy"](z, targets, cap_pos, cap_neg, fused=True)
    assert shipped["triton_kernels"].cache_info().currsize == 1  # its own kernels ran
    assert torch.allclose(got, tg.softcap_cross_entropy(z, targets, cap_pos, cap_neg)[0], atol=1e-4)
