"""Quantization and packing (SPEC §6): GPTQ quality, int ranges, byte shuffle, compressors, artifact
round trip, budget search, distributed Hessians and the self-extracting shipped copy. CPU, tiny configs."""
import inspect
import os
import re
import runpy
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402
from tiny import end_gloo_rank, write_shards  # noqa: E402

# Tiny tensors: one torch thread avoids thread-pool overhead that dominates at these sizes.
torch.set_num_threads(1)

TINY = dict(NUM_LAYERS="2", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2", VOCAB_SIZE="256", LOOP_START="0",
            LOOP_END="0", PARALLEL_START="1", TRAIN_SEQ_LEN="32", EVAL_SEQ_LEN="32", TTT_CHUNK_SIZE="8")


@pytest.fixture
def tiny(monkeypatch):
    """Tiny config: its 64x64 block matrices are GPTQ'd (roles, not sizes, decide what is quantized)."""
    for key, value in TINY.items():
        monkeypatch.setenv(key, value)
    return tg.Hyperparameters()


def synthetic_batches(n: int, seed: int, batch: int = 4, seq: int = 32, vocab: int = 256):
    """Learnable tokens: a noisy affine recurrence t[i+1] = 5*t[i] + 3 (mod V)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = torch.randint(0, vocab, (batch, 1), generator=g)
        steps = torch.arange(seq + 1)
        tokens = (start * pow(5, 1) + 3 * steps) % vocab
        noise = torch.rand(batch, seq + 1, generator=g) < 0.1
        tokens = torch.where(noise, torch.randint(0, vocab, (batch, seq + 1), generator=g), tokens)
        out.append((tokens[:, :-1], tokens[:, 1:]))
    return out


_TRAINED: dict = {}


def trained_model(h) -> tg.GPT:
    """A tiny GPT trained 40 Adam steps (looping on), cached across tests."""
    if "state" not in _TRAINED:
        torch.manual_seed(0)
        model = tg.GPT(h)
        model.looping = True
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for x, y in synthetic_batches(40, seed=1):
            opt.zero_grad()
            model(x, y).backward()
            opt.step()
        _TRAINED["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model = tg.GPT(h)
    model.load_state_dict(_TRAINED["state"])
    return model


def output_error(weight, deq, hessian) -> float:
    """||(W - Q) X^T||_F^2 = trace((W-Q) H (W-Q)^T) with H = X^T X."""
    diff = (weight - deq).double()
    return float(torch.einsum("ij,jk,ik->", diff, hessian.double(), diff))


def gptq_and_rtn(weight, hessian, bits, clip):
    w, perm, upper = tg.plan_gptq(weight, hessian, 0.01)
    scale = tg.sdclip_scales(weight, bits, clip)
    q = tg.gptq_quantize(w, perm, upper, scale, bits, block_size=32)
    return q.float() * scale[:, None], tg.quantize_rtn(weight, scale, bits) * scale[:, None]


def test_gptq_beats_rtn_on_random_weights():
    torch.manual_seed(0)
    d = 128
    # Correlated, non-isotropic activations: mixed Gaussian features with scales over two decades.
    mix = torch.randn(d, d) / d ** 0.5 + 0.3 * torch.eye(d)
    col_scale = torch.logspace(-1, 1, d)
    calib, held_back = ((torch.randn(4096, d) @ mix) * col_scale for _ in range(2))
    weight = torch.randn(96, d) * 0.02
    for bits, clip in ((6, 12.85), (8, 20.0)):
        gptq, rtn = gptq_and_rtn(weight, calib.T @ calib, bits, clip)
        h_test = held_back.T @ held_back
        assert output_error(weight, gptq, h_test) < 0.6 * output_error(weight, rtn, h_test)


def test_gptq_beats_rtn_on_trained_model(tiny):
    model = trained_model(tiny)
    calib = tg.collect_hessians(model, synthetic_batches(8, seed=2), tg.Runtime())
    held_back = tg.collect_hessians(model, synthetic_batches(8, seed=3), tg.Runtime())
    state = model.state_dict()
    total_gptq = total_rtn = 0.0
    for name, hessian in calib.items():
        bits, clip = (8, 20.0) if name == "tok_emb.weight" else (6, 12.85)
        gptq, rtn = gptq_and_rtn(state[name], hessian, bits, clip)
        total_gptq += output_error(state[name], gptq, held_back[name])
        total_rtn += output_error(state[name], rtn, held_back[name])
    assert total_gptq < 0.9 * total_rtn


def test_int_values_stay_in_range(tiny):
    model = trained_model(tiny)
    hessians = tg.collect_hessians(model, synthetic_batches(2, seed=2), tg.Runtime())
    state = model.state_dict()
    roles = model.parameter_roles()
    plans = tg.plan_quantization(state, roles, hessians, tiny, torch.device("cpu"))
    # Clip sigmas of ~1 (scale 0.05) clip hard, so the extremes are reached and must clamp.
    quantized = tg.quantize_state(state, roles, plans, 0.05, tiny.gptq_block_size)
    for name, entry in quantized.items():
        if "q" in entry:
            quant = roles[name].quant
            bits = tiny.embed_bits if quant == "embed" else 8 if quant == "gate" else tiny.matrix_bits
            assert entry["q"].dtype == torch.int8
            assert entry["q"].abs().max() == 2 ** (bits - 1) - 1, name  # gates: absmax rows reach +-127
        else:
            assert roles[name].quant == "fp16" and entry["fp16"].dtype == torch.float16


def test_byte_shuffle_round_trips_and_groups_bytes():
    values = np.random.default_rng(0).standard_normal(1001)
    for dtype in (np.float16, np.float32):
        array = values.astype(dtype)
        shuffled = tg.byte_shuffle(array)
        assert np.array_equal(tg.byte_unshuffle(shuffled, dtype), array)
        low_bytes = array.view(np.uint8)[:: array.itemsize]
        assert shuffled[: array.size] == low_bytes.tobytes()


@pytest.mark.parametrize("compressor", ["brotli", "zstd", "lzma"])
def test_compressor_round_trips(compressor, monkeypatch):
    monkeypatch.setattr(tg, "COMPRESS_CHUNK_BYTES", 4096)  # several chunks
    data = np.random.default_rng(0).integers(-5, 6, 20_000).astype(np.int8).tobytes()
    blob = tg.compress(data, compressor)
    assert tg.decompress(blob) == data
    assert len(blob) < len(data)


def laplace_ints(shape, spread, qmax, seed):
    """Rounded Laplacian ints clipped to +-qmax: the shape of SDClip-quantized weights."""
    values = np.random.default_rng(seed).laplace(0.0, spread, shape)
    return torch.from_numpy(np.clip(np.round(values), -qmax, qmax).astype(np.int8))


def test_rans_round_trips_edge_cases():
    mixed = laplace_ints((40, 64), 2.5, 31, 0)
    mixed[3] = 0  # an all-zero row
    mixed[:, :8] = laplace_ints((40, 8), 12.0, 31, 1)  # wide columns: a second class
    tensors = {
        "mixed": mixed, "rows_differ": torch.cat([laplace_ints((30, 50), 1.0, 31, 2), laplace_ints((30, 50), 9.0, 31, 3)]),
        "one_symbol": torch.full((17, 5), -7, dtype=torch.int8), "zeros": torch.zeros(9, 9, dtype=torch.int8),
        "extremes": torch.tensor([[-31, 31, 0], [31, -31, 31]], dtype=torch.int8),
        "int8_extremes": torch.tensor([[-128, 127], [127, -127]], dtype=torch.int8),
        "empty": torch.zeros(0, 6, dtype=torch.int8), "single": torch.tensor([[5]], dtype=torch.int8),
        "int8": laplace_ints((64, 48), 6.0, 127, 4),
    }
    quantized = {name: {"q": q, "scale": torch.rand(q.shape[0]).half()} for name, q in tensors.items()}
    quantized["gain"] = {"fp16": torch.randn(3, 4).half()}
    data = tg.serialize(quantized)
    blob = tg.compress(data, "rans")
    assert blob[:1] == b"R" and tg.decompress(blob) == data
    back = tg.deserialize(tg.decompress(blob))
    for name, q in tensors.items():
        assert torch.equal(back[name]["q"], q), name
    assert tg.decompress(tg.compress(tg.serialize({"gain": quantized["gain"]}), "rans")) == tg.serialize({"gain": quantized["gain"]})


def test_rans_classes_follow_the_data():
    """Two column populations of different spread get two classes; iid ints keep one table."""
    iid = laplace_ints((256, 64), 3.0, 31, 5).numpy().astype(np.int64) + 31
    axis, labels, codes = tg.fit_classes(iid, 63)
    assert len(codes) == 1
    two = iid.copy()
    wide = np.random.default_rng(6).permutation(64)[:24]
    two[:, wide] = laplace_ints((256, 24), 10.0, 31, 7).numpy() + 31
    axis, labels, codes = tg.fit_classes(two, 63)
    assert axis == 1 and len(codes) >= 2
    assert len(set(labels[wide])) == 1 and labels[wide[0]] not in set(np.delete(labels, wide))


def test_rans_size_is_near_order0_entropy_and_beats_brotli():
    """iid Laplacian int6 ints: the coded size is within 0.4% (+ the fixed tables, lanes and header) of
    n*H/8, H the empirical order-0 entropy, and well under brotli-11 on the same payload."""
    q = laplace_ints((512, 512), 2.4, 31, 8)
    _, counts = np.unique(q.numpy(), return_counts=True)
    entropy_bytes = -(counts * np.log2(counts / q.numel())).sum() / 8
    data = tg.serialize({"w": {"q": q, "scale": torch.ones(512).half()}})
    size = len(tg.compress(data, "rans"))
    assert entropy_bytes * 0.999 < size < entropy_bytes * 1.004 + 400
    assert size < 0.992 * len(tg.compress(data, "brotli"))


def test_missing_compressor_package_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "zstandard", None)
    with pytest.raises(RuntimeError, match="pip install zstandard"):
        tg.compress(b"x", "zstd")


def with_awq_lite_and_lqer(h, monkeypatch, on=True):
    """AWQ-lite and LQER on (the defaults) for the tiny model: its tensors have fewer than 65,536 values,
    and 16-column groups; on=False switches both off (the plain GPTQ arm)."""
    monkeypatch.setattr(tg, "AWQ_MIN_VALUES", 0)
    h.awq_lite_enabled, h.awq_lite_group_size, h.lqer_enabled = on, 16, on


@pytest.mark.parametrize("extras", [False, True], ids=["plain", "awq_lqer"])
@pytest.mark.parametrize("compressor", ["brotli", "rans"])
def test_reloaded_artifact_matches_in_memory_quantized_model(tiny, compressor, extras, monkeypatch):
    model = trained_model(tiny)
    hessians = tg.collect_hessians(model, synthetic_batches(4, seed=2), tg.Runtime())
    tiny.artifact_target_bytes, tiny.compressor = 1_000_000, compressor  # loose: one attempt
    with_awq_lite_and_lqer(tiny, monkeypatch, on=extras)
    blob, report = tg.quantize_and_pack(model, hessians, tiny, reserved_bytes=0)
    assert (len(report["lqer"]), len(report["awq_lite"])) == ((3, 1) if extras else (0, 0))
    reloaded = tg.GPT(tiny)
    tg.load_artifact(blob, reloaded)
    state = model.state_dict()
    roles = model.parameter_roles()
    plans = tg.plan_quantization(state, roles, hessians, tiny, torch.device("cpu"))
    quantized = tg.quantize_state(state, roles, plans, report["clip_scale"], tiny.gptq_block_size)
    if extras:
        assert tg.lqer_correct(quantized, plans, tiny) == report["lqer"]
    in_memory = tg.GPT(tiny)
    in_memory.load_state_dict(tg.dequantize_state(quantized))
    x, _ = synthetic_batches(1, seed=5)[0]
    with torch.no_grad():
        assert torch.equal(reloaded(x), in_memory(x))
        assert not torch.equal(reloaded(x), model(x))  # it really was quantized
    partial = tg.serialize({k: v for k, v in tg.deserialize(tg.decompress(blob)).items() if k != "skip_gates"})
    with pytest.raises(RuntimeError, match="skip_gates"):
        tg.load_artifact(tg.compress(partial, "lzma"), tg.GPT(tiny))


def test_over_budget_target_raises(tiny):
    model = trained_model(tiny)
    hessians = tg.collect_hessians(model, synthetic_batches(2, seed=2), tg.Runtime())
    tiny.artifact_target_bytes, tiny.compressor = 20_000, "zstd"
    with pytest.raises(tg.ArtifactBudgetError, match="even at"):
        tg.quantize_and_pack(model, hessians, tiny, reserved_bytes=1_000)


@pytest.mark.parametrize("extras", [False, True], ids=["plain", "awq_lqer"])
@pytest.mark.parametrize("compressor", ["brotli", "rans"])
def test_budget_search_lands_just_under_target(tiny, compressor, extras, monkeypatch):
    """Lands in [1 - tolerance, 1] x target in few rounds. The size model counts AWQ-lite's 8-bit columns
    (in the RTN entropy) and LQER's factors (an additive term). With both on, one more round is allowed
    here: LQER's ~1 KB is ~2% of this 60 KB blob and moves by ~0.1% when another tensor wins the top-K at
    another scale, a third of the window (at 16 MB its ~20 KB is ~0.15%, and a 10M-value model lands in
    2 rounds with either coder, docs/BENCHMARKS.md §6)."""
    model = trained_model(tiny)
    hessians = tg.collect_hessians(model, synthetic_batches(4, seed=2), tg.Runtime())
    tiny.artifact_target_bytes, tiny.compressor = 61_000, compressor
    with_awq_lite_and_lqer(tiny, monkeypatch, on=extras)
    blob, report = tg.quantize_and_pack(model, hessians, tiny, reserved_bytes=1_000)
    assert report["target_bytes"] == 60_000 and report["model_bytes"] == len(blob)
    assert (1 - tg.BUDGET_TOLERANCE) * 60_000 <= len(blob) <= 60_000
    assert len(report["attempts"]) <= (2 if compressor == "rans" else 3) + extras
    groups = report["groups"]  # where the bytes went: every value counted once, per quant group (LQER's factors apart)
    roles = model.parameter_roles()
    assert set(groups) - {"lqer"} == {role.quant for role in roles.values()} and ("lqer" in groups) == extras
    assert sum(g["values"] for n, g in groups.items() if n != "lqer") == sum(t.numel() for t in model.state_dict().values())
    q = tg.deserialize(tg.decompress(blob))["tok_emb.weight"]["q"]
    _, counts = np.unique(q.numpy(), return_counts=True)
    assert roles["tok_emb.weight"].quant == "embed" and [n for n in roles if roles[n].quant == "embed"] == ["tok_emb.weight"]
    assert groups["embed"]["entropy_bytes"] == pytest.approx(-(counts * np.log2(counts / q.numel())).sum() / 8)
    assert report["bits"]["tok_emb.weight"] == 7 and report["bits"]["blocks.0.mlp.up.weight"] == 6
    assert report["bits"]["skip_gates"] == 16


def unpack_int2(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Reference unpacking of LQER's A: byte i holds codes 4i..4i+3, code + 2 in bits 2k..2k+1."""
    flat = [((int(b) & 255) >> (2 * k) & 3) - 2 for b in packed.reshape(-1) for k in range(4)]
    return torch.tensor(flat[:count], dtype=torch.float32)


def test_lqer_lowers_reconstruction_error_on_trained_weights(tiny):
    """On the trained tiny model: LQER corrects the top-K tensors by ||W - Q||_F; A's codes are -2..1 and B's
    -8..7 (groups of LQER_ASYM_GROUP); W = Q + A B rebuilt here from the codes matches dequantize_state;
    its error is below GPTQ's alone by at least a quarter of what the exact rank-r truncation removes."""
    model = trained_model(tiny)
    hessians = tg.collect_hessians(model, synthetic_batches(4, seed=2), tg.Runtime())
    state, roles = model.state_dict(), model.parameter_roles()
    plans = tg.plan_quantization(state, roles, hessians, tiny, torch.device("cpu"))
    quantized = tg.quantize_state(state, roles, plans, 1.0, tiny.gptq_block_size)
    gptq = {n: e["q"].float() * e["scale"].float()[:, None] for n, e in quantized.items() if "q" in e and roles[n].quant != "gate"}
    errors = {n: (state[n] - w) for n, w in gptq.items()}
    top = sorted(errors, key=lambda n: -errors[n].norm())[: tiny.lqer_top_k]
    chosen = tg.lqer_correct(quantized, plans, tiny)
    assert chosen == top and len(chosen) == 3
    deq = tg.dequantize_state(quantized)
    assert deq.keys() == state.keys()
    for name in chosen:
        rows, cols = state[name].shape
        a_entry, b_entry = quantized[f"{name}.lqer_a"], quantized[f"{name}.lqer_b"]
        a = unpack_int2(a_entry["q"], rows * tiny.lqer_rank)
        assert a.min() >= -2 and a.max() <= 1 and a.abs().max() > 0
        assert b_entry["q"].shape[1] == tiny.lqer_asym_group and -8 <= b_entry["q"].min() and b_entry["q"].max() <= 7
        b = (b_entry["q"].float() * b_entry["scale"].float()[:, None]).reshape(tiny.lqer_rank, cols)
        rebuilt = gptq[name] + (a * a_entry["scale"].float()).reshape(rows, tiny.lqer_rank) @ b
        torch.testing.assert_close(deq[name], rebuilt, rtol=0, atol=1e-6)
        e = errors[name].double().numpy()
        sv = np.linalg.svd(e, compute_uv=False)
        exact_gain = (sv[: tiny.lqer_rank] ** 2).sum()
        assert float((state[name] - rebuilt).norm()) ** 2 < (e ** 2).sum() - 0.25 * exact_gain, name
    for name in set(gptq) - set(chosen):
        assert torch.equal(deq[name], gptq[name])


def massive_channel_layers(seed: int, rows: int = 192, cols: int = 512):
    """Three [rows, cols] weights and their calibration / held-back Hessians X^T X. Input channels have
    log-normal RMS and correlated mixes; the first layer's input has one channel 50x larger (the
    'massive activation' that real residual streams carry)."""
    g = torch.Generator().manual_seed(seed)
    state, calib, held = {}, {}, {}
    for i in range(3):
        rms = torch.exp(0.5 * torch.randn(cols, generator=g))
        if i == 0:
            rms[int(torch.randint(cols, (1,), generator=g))] *= 50.0
        mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols)
        x_calib, x_held = ((torch.randn(2048, cols, generator=g) @ mix) * rms for _ in range(2))
        state[f"w{i}"] = torch.randn(rows, cols, generator=g) * 0.02 * torch.exp(0.3 * torch.randn(rows, 1, generator=g))
        calib[f"w{i}"], held[f"w{i}"] = x_calib.T @ x_calib, x_held.T @ x_held
    return state, calib, held


@pytest.mark.parametrize("seed", [0, 1])
def test_awq_lite_lowers_held_back_output_error_at_equal_bytes(seed):
    """AWQ-lite spends its bytes better than a finer step everywhere. Equal bytes, made fair: the plain
    GPTQ model gets a smaller clip scale (finer steps in every column) until its rans-coded payload is at
    least as large as AWQ-lite's (8-bit codes, per-row fp16 scales and header included); then the summed
    ||(W - Q) X||^2 on held-back activations is lower with AWQ-lite. The protected group holds the massive
    channel, keeps the clip range (|codes| past the 6-bit 31) and nothing else leaves +-31."""
    state, calib, held = massive_channel_layers(seed)
    massive = int(calib["w0"].diagonal().argmax())
    roles = {name: tg.Role("muon", "mlp", "input") for name in state}
    h = tg.Hyperparameters()
    results = {}
    for awq in (True, False):
        h.awq_lite_enabled = awq
        plans = tg.plan_quantization(state, roles, calib, h, torch.device("cpu"))

        def pack(clip_scale):
            quantized = tg.quantize_state(state, roles, plans, clip_scale, h.gptq_block_size)
            return len(tg.compress(tg.serialize(quantized), "rans")), quantized

        size, quantized = pack(1.0)
        if awq:
            awq_size, (start, end) = size, quantized["w0"]["awq"][0]
            assert [e.get("awq") for e in quantized.values()] == [[[start, end]], None, None]
            assert start <= massive < end and end - start == h.awq_lite_group_size
            q, columns = quantized["w0"]["q"], torch.arange(quantized["w0"]["q"].size(1))
            protected = (columns >= start) & (columns < end)
            assert q[:, protected].abs().max() > 31 and q[:, ~protected].abs().max() <= 31
        # First guess for the plain model: halving every step costs ~1 bit per value.
        clip_scale = 2.0 ** (-8 * max(awq_size - size, 0) / sum(w.numel() for w in state.values()))
        while size < awq_size:
            size, quantized = pack(clip_scale)
            clip_scale *= 0.995
        deq = tg.dequantize_state(quantized)
        results[awq] = sum(output_error(state[n], deq[n], held[n]) for n in state), size
    assert results[False][1] >= results[True][1]
    assert results[True][0] < 0.9 * results[False][0]


@pytest.mark.parametrize("compressor", ["brotli", "rans"])
def test_awq_lite_and_lqer_entries_round_trip(tiny, compressor, monkeypatch):
    """serialize -> compress -> decompress -> deserialize gives back every entry exactly: AWQ-lite's column
    ranges and per-row scales, and LQER's factor entries."""
    model = trained_model(tiny)
    hessians = tg.collect_hessians(model, synthetic_batches(2, seed=2), tg.Runtime())
    with_awq_lite_and_lqer(tiny, monkeypatch)
    tiny.awq_lite_top_k = 2
    state, roles = model.state_dict(), model.parameter_roles()
    plans = tg.plan_quantization(state, roles, hessians, tiny, torch.device("cpu"))
    quantized = tg.quantize_state(state, roles, plans, 1.0, tiny.gptq_block_size)
    tg.lqer_correct(quantized, plans, tiny)
    back = tg.deserialize(tg.decompress(tg.compress(tg.serialize(quantized), compressor)))
    assert list(back) == list(quantized)
    assert sum(len(e.get("awq", [])) for e in back.values()) == 2 and sum(n.endswith(".lqer_b") for n in back) == 3
    for name, entry in quantized.items():
        assert back[name].keys() == entry.keys(), name
        for key, value in entry.items():
            assert torch.equal(back[name][key], value) if torch.is_tensor(value) else back[name][key] == value, (name, key)


def test_hessians_count_every_looped_call(tiny):
    """Rows entering c_q of layer 0 (ln scale 1) are RMS-normalised, so each adds d to trace(H): a layer
    run 3 times (looping on) must give 3*tokens*d; the head's input gives tokens*d."""
    model = tg.GPT(tiny)
    batches = synthetic_batches(2, seed=2)
    hessians = tg.collect_hessians(model, batches, tg.Runtime())
    tokens, d = 2 * 4 * 32, tiny.model_dim
    assert model.looping is False
    assert torch.isclose(hessians["blocks.0.attn.c_q.weight"].trace(), torch.tensor(3.0 * tokens * d), rtol=1e-4)
    assert torch.isclose(hessians["tok_emb.weight"].trace(), torch.tensor(1.0 * tokens * d), rtol=1e-4)
    assert len(hessians) == 6 * tiny.num_layers + 1


def _hessian_worker(rank: int, world_size: int, port: int, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    model = tg.GPT(tg.Hyperparameters())
    batches = synthetic_batches(4, seed=2)[rank::world_size]
    hessians = tg.collect_hessians(model, batches, tg.Runtime(rank=rank, world_size=world_size))
    if rank == 0:
        torch.save(hessians, out_path)
    end_gloo_rank()


def test_hessians_on_two_gloo_processes_equal_single_process(tiny, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out_path = str(tmp_path / "hessians.pt")
    mp.spawn(_hessian_worker, args=(2, port, out_path), nprocs=2, join=True)
    torch.manual_seed(0)
    single = tg.collect_hessians(tg.GPT(tiny), synthetic_batches(4, seed=2), tg.Runtime())
    summed = torch.load(out_path)
    assert summed.keys() == single.keys()
    for name in single:
        torch.testing.assert_close(summed[name], single[name], rtol=1e-5, atol=1e-3)


def test_latin1_literal_holds_every_byte(tmp_path):
    data = bytes(range(256)) * 3 + b"\\0\\x00\r\n\"'"
    path = tmp_path / "literal.py"
    path.write_bytes(f'# coding: latin-1\nDATA="{tg.latin1_literal(data)}".encode("latin-1")\n'.encode("latin-1"))
    assert runpy.run_path(str(path))["DATA"] == data


def test_shipped_stub_runs_as_main_with_file(tmp_path):
    source = '"""doc"""\nimport sys\nif __name__ == "__main__":\n    print(__name__, __file__, len(SHIPPED_SOURCE.splitlines()))\n'
    path = tmp_path / "shipped.py"  # not copy.py: that would shadow the stdlib module
    path.write_bytes(tg.build_submission_code(source))
    out = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["__main__", str(path), "3"]  # docstring dropped: 3 lines of code remain


def test_shipped_copy_defines_the_same_model(tiny, tmp_path):
    source = (ROOT / "train_gpt.py").read_text(encoding="utf-8")
    code = tg.build_submission_code(source)
    assert len(code) < len(source.encode()) / 3
    path = tmp_path / "train_gpt_shipped.py"
    path.write_bytes(code)
    shipped = runpy.run_path(str(path), run_name="shipped_copy")
    # The copy rebuilds itself byte for byte, so code bytes are the same from either file.
    assert shipped["build_submission_code"](shipped["read_script_source"]()) == code
    h_copy = shipped["Hyperparameters"]()
    assert h_copy.as_dict() == tiny.as_dict()
    torch.manual_seed(3)
    original = tg.GPT(tiny)
    torch.manual_seed(3)
    copied = shipped["GPT"](h_copy)
    x, y = synthetic_batches(1, seed=4)[0]
    for looping in (False, True):
        original.looping = copied.looping = looping
        with torch.no_grad():
            assert torch.equal(original(x, y, reduction="none"), copied(x, y, reduction="none"))


def _pipeline_is_implemented() -> bool:
    return not any("NotImplementedError" in inspect.getsource(f) for f in (tg.main, tg.eval_plain))


@pytest.mark.skipif(not _pipeline_is_implemented(), reason="main() or evaluation not written yet")
def test_shipped_copy_trains_like_the_original(tmp_path, sp1024_model_path):
    """Full tiny CPU run of the readable script and of its shipped copy (synthetic shards):
    the same final log lines, and the same code bytes measured by both."""
    data_dir = tmp_path / "data"
    dataset = data_dir / "datasets" / "fineweb10B_sp1024"
    (data_dir / "tokenizers").mkdir(parents=True)
    (data_dir / "tokenizers" / "fineweb_1024_bpe.model").write_bytes(sp1024_model_path.read_bytes())
    write_shards(dataset, 1024, train_tokens=100_000, val_tokens=4_096)
    shipped = tmp_path / "shipped_train_gpt.py"
    shipped.write_bytes(tg.build_submission_code((ROOT / "train_gpt.py").read_text(encoding="utf-8")))
    # MODEL_DIM 128, MLP_MULT 8: the embedding and MLP matrices exceed 65,536 values, so GPTQ runs.
    env = {**os.environ, **TINY, "VOCAB_SIZE": "1024", "MODEL_DIM": "128", "MLP_MULT": "8",
           "DATA_DIR": str(data_dir), "ITERATIONS": "3", "WARMUP_STEPS": "1", "TRAIN_BATCH_TOKENS": "256",
           "MICRO_BATCH_SEQS": "8", "VAL_BATCH_TOKENS": "1024", "TTT_ENABLED": "0", "SLIDING_WINDOW_ENABLED": "0",
           "GPTQ_CALIBRATION_BATCHES": "2", "MAX_WALLCLOCK_SECONDS": "0", "COMPRESSOR": "lzma", "SEED": "1"}
    finals = []
    for script in (ROOT / "train_gpt.py", shipped):
        run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env={**env, "RUN_ID": script.stem},
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        finals.append([re.sub(r"\S*(time|step_avg|tok/s):\S+", "", line) for line in run.stdout.splitlines()
                       if any(key in line for key in ("train_loss", "val_bpb", "Total submission"))])
    assert finals[0] == finals[1] and any("Total submission" in line for line in finals[0])
