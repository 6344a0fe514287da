"""Model section: virtual layer order, XSA, partial RoPE, block formulas, skips, head."""
import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from tiny import tiny_hparams


@pytest.fixture(scope="module")
def default_model():
    """The default (record) model on the meta device: shapes and roles without the slow init."""
    with torch.device("meta"):
        return tg.GPT(tg.Hyperparameters())


def test_default_config_builds_the_record_model(default_model):
    model = default_model
    n = sum(p.numel() for p in model.parameters())
    assert 35.5e6 < n < 36.5e6, n  # SPEC §3: about 36.0M
    assert [b.mode for b in model.blocks] == ["sequential"] * 8 + ["lanes"] * 3
    assert all(b.attn.use_xsa for b in model.blocks)


def test_virtual_layer_order_with_and_without_looping():
    assert tg.loop_schedule(11, 3, 5, 2, looping=False) == list(range(11))
    assert tg.loop_schedule(11, 3, 5, 2, looping=True) == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]
    assert tg.loop_schedule(11, 3, 5, 0, looping=True) == list(range(11))
    with torch.device("meta"):
        model = tg.GPT(tg.Hyperparameters())
    model.looping = True
    assert len(model.virtual_order()) == 17


def test_looping_changes_the_computation(monkeypatch):
    h = tiny_hparams(monkeypatch)
    torch.manual_seed(0)
    model = tg.GPT(h)
    for p in model.parameters():  # zero-init projections would hide the extra layers
        p.data.add_(0.05 * torch.randn_like(p))
    x = torch.randint(0, h.vocab_size, (2, 16))
    off = model(x, x).item()
    model.looping = True
    assert model(x, x).item() != off


def test_xsa_output_is_orthogonal_to_the_self_value(monkeypatch):
    h = tiny_hparams(monkeypatch)
    torch.manual_seed(0)
    attn = tg.Attention(h, use_xsa=True, backend="sdpa")
    with torch.no_grad():
        attn.proj.weight.copy_(torch.eye(h.model_dim))  # expose the per-head outputs
    x = torch.randn(2, 10, h.model_dim)
    cos, sin = tg.rotary_tables(10, h.rope_dims, h.rope_base)
    y = attn(x, cos, sin).view(2, 10, h.num_kv_heads, h.num_heads // h.num_kv_heads, h.head_dim)
    v_hat = F.normalize(attn.c_v(x).view(2, 10, h.num_kv_heads, 1, h.head_dim), dim=-1)
    dots = (y * v_hat).sum(-1)
    assert dots.abs().max() < 1e-5
    # Without XSA the same output does have a component along v (so the check above is not vacuous).
    attn.use_xsa = False
    y_plain = attn(x, cos, sin).view_as(y)
    assert (y_plain * v_hat).sum(-1).abs().max() > 1e-2


def test_partial_rope_keeps_other_dims_and_is_relative(monkeypatch):
    rope_dims, head_dim, T = 16, 64, 40
    cos, sin = tg.rotary_tables(T, rope_dims, 10000.0)
    q = torch.randn(1, T, 2, head_dim, dtype=torch.float64)
    k = torch.randn(1, T, 2, head_dim, dtype=torch.float64)
    rq = tg.apply_partial_rope(q, cos.double(), sin.double())
    assert torch.equal(rq[..., rope_dims:], q[..., rope_dims:])
    assert not torch.allclose(rq[:, 1:, :, :rope_dims], q[:, 1:, :, :rope_dims])
    # Same vector at every position: rotary-part dot products depend only on the distance i - j.
    qs = q[:, :1].expand(1, T, 2, head_dim)
    ks = k[:, :1].expand(1, T, 2, head_dim)
    rq, rk = tg.apply_partial_rope(qs, cos.double(), sin.double()), tg.apply_partial_rope(ks, cos.double(), sin.double())
    dot = lambda i, j: (rq[0, i, :, :rope_dims] * rk[0, j, :, :rope_dims]).sum(-1)
    for i, j, shift in [(5, 2, 7), (10, 10, 20), (3, 9, 30)]:
        assert torch.allclose(dot(i, j), dot(i + shift, j + shift), atol=1e-10)
    assert not torch.allclose(dot(5, 2), dot(5, 4))


def _randomize(module, scale=0.3):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


def test_two_lane_block_matches_its_formula(monkeypatch):
    h = tiny_hparams(monkeypatch, PARALLEL_MODE="lanes")
    block = tg.Block(h, layer=3, backend="sdpa")
    assert block.mode == "lanes"
    _randomize(block)
    x, x0, lane1 = (torch.randn(2, 8, h.model_dim) for _ in range(3))
    cos, sin = tg.rotary_tables(8, h.rope_dims, h.rope_base)
    out0, out1 = block(x, x0, cos, sin, lane1)
    s = 1 / math.sqrt(4)
    m0, m1 = block.resid_mix
    a = block.attn_scale * block.attn(tg.rms_norm(m0 * x + m1 * x0) * s, cos, sin)
    m = block.mlp_scale * block.mlp(tg.rms_norm(lane1) * s)
    r, wa, wm = block.lane_resid, block.lane_attn, block.lane_mlp
    assert torch.allclose(out0, r[0] * x + wa[0] * a + wm[0] * m, atol=1e-5)
    assert torch.allclose(out1, r[1] * lane1 + wa[1] * a + wm[1] * m, atol=1e-5)


def test_single_stream_parallel_and_sequential_blocks_match_their_formulas(monkeypatch):
    h = tiny_hparams(monkeypatch, PARALLEL_MODE="single")
    x, x0 = torch.randn(2, 8, h.model_dim), torch.randn(2, 8, h.model_dim)
    cos, sin = tg.rotary_tables(8, h.rope_dims, h.rope_base)
    for layer, mode in [(3, "single"), (1, "sequential")]:
        block = tg.Block(h, layer=layer, backend="sdpa")
        assert block.mode == mode
        _randomize(block)
        s = 1 / math.sqrt(layer + 1)
        m0, m1 = block.resid_mix
        u = m0 * x + m1 * x0
        attn = lambda t: block.attn_scale * block.attn(tg.rms_norm(t) * s, cos, sin)
        mlp = lambda t: block.mlp_scale * block.mlp(tg.rms_norm(t) * s)
        if mode == "single":
            expected = u + attn(u) + mlp(u)
        else:
            mid = u + attn(u)
            expected = mid + mlp(mid)
        assert torch.allclose(block(x, x0, cos, sin), expected, atol=1e-5)


def test_unet_skip_gates(monkeypatch):
    """x = s + sigmoid(g)*(x - s): a wide-open gate ignores the skip, a closed one takes it."""
    h = tiny_hparams(monkeypatch)
    model = tg.GPT(h)
    _randomize(model, 0.1)
    x = torch.randint(0, h.vocab_size, (1, 12))
    with torch.no_grad():
        model.skip_gates.fill_(50.0)
        ref = model(x)
        model.skip_weights.mul_(3.0)
        assert torch.allclose(model(x), ref, atol=1e-5)
        model.skip_gates.fill_(0.0)
        assert not torch.allclose(model(x), ref, atol=1e-3)


def test_head_softcap_and_reductions(monkeypatch):
    h = tiny_hparams(monkeypatch, LOGIT_SOFTCAP="2.0")
    model = tg.GPT(h)
    with torch.no_grad():
        model.tok_emb.weight.mul_(1000)
    x = torch.randint(0, h.vocab_size, (2, 12))
    logits = model(x)
    assert logits.dtype == torch.float32 and logits.abs().max() <= 2.0
    per_token = model(x, x, reduction="none")
    assert per_token.shape == x.shape
    assert torch.allclose(per_token.mean(), model(x, x), atol=1e-6)
    assert torch.allclose(per_token, F.cross_entropy(logits.flatten(0, 1), x.flatten(), reduction="none").view_as(x))


def test_attention_backend_chain_says_why_each_is_skipped():
    assert tg.select_attention_backend(torch.device("cpu")) == "sdpa"
    if importlib.util.find_spec("flash_attn_interface"):
        pytest.skip("FA3 installed here: the CUDA chain would pick it")
    unavailable = []
    assert tg.select_attention_backend(torch.device("cuda"), unavailable) == "sdpa_cudnn"
    assert [reason.split(":")[0] for reason in unavailable] == ["fa3"]
    assert tg.select_attention_backend(torch.device("cuda"), doc_masked=True) == "flex"


def test_config_errors_name_the_variable(monkeypatch):
    for name, value in [("NUM_LAYERS", "abc"), ("MATRIX_LR", "-0.1"), ("COMPRESSOR", "gzip"), ("TTT_ENABLED", "maybe")]:
        monkeypatch.setenv(name, value)
        with pytest.raises(tg.ConfigError, match=name):
            tg.Hyperparameters()
        monkeypatch.delenv(name)


def test_softcap_cross_entropy_matches_log_softmax_of_capped_logits():
    torch.manual_seed(0)
    z = torch.randn(12, 50, dtype=torch.float64) * 40
    targets, hints = torch.randint(0, 50, (12,)), torch.randint(0, 50, (12,))
    cap_pos = torch.tensor(30.0, dtype=torch.float64, requires_grad=True)
    cap_neg = torch.tensor(20.0, dtype=torch.float64, requires_grad=True)
    nll, hint_nll = tg.softcap_cross_entropy(z, targets, cap_pos, cap_neg, hints)
    # Reference written from the formula, element by element.
    capped = torch.where(z > 0, 30.0 * torch.tanh(z / 30.0), 20.0 * torch.tanh(z / 20.0))
    logp = torch.log_softmax(capped, dim=-1)
    assert torch.allclose(nll, -logp[torch.arange(12), targets], atol=1e-6)
    assert torch.allclose(hint_nll, -logp[torch.arange(12), hints], atol=1e-6)
    nll.sum().backward()
    assert cap_pos.grad.abs() > 0 and cap_neg.grad.abs() > 0
    # Equal caps: the symmetric softcap's cross-entropy.
    c = torch.tensor(30.0, dtype=torch.float64)
    sym, _ = tg.softcap_cross_entropy(z, targets, c, c)
    assert torch.allclose(sym, F.cross_entropy(30.0 * torch.tanh(z / 30.0), targets, reduction="none"), atol=1e-9)


# Every parameter of the default model and the role it must have: (optimizer, quant group, Hessian
# source). Written out by hand from SPEC §3-§6 and FRONTIER, not read from the code.
EXPECTED_ROLES = {
    "tok_emb.weight": ("embed", "embed", "head"),
    "skip_weights": ("scalar", "fp16", ""), "skip_gates": ("scalar", "fp16", ""),
    "softcap_caps": ("scalar", "fp16", ""), "smear_w": ("scalar", "fp16", ""), "smear_lambda": ("scalar", "fp16", ""),
    "loop_embeddings": ("scalar", "fp16", ""),
    **{f"blocks.{i}.attn.gate_w": ("scalar", "gate", "") for i in range(11)},  # int8 per row in the artifact
    **{f"blocks.{i}.{name}": ("muon", "attn", "input") for i in range(11) for name in
       ("attn.c_q.weight", "attn.c_k.weight", "attn.c_v.weight", "attn.proj.weight")},
    **{f"blocks.{i}.{name}": ("muon", "mlp", "input") for i in range(11) for name in ("mlp.up.weight", "mlp.down.weight")},
    **{f"blocks.{i}.{name}": ("scalar", "fp16", "") for i in range(11) for name in
       ("attn.q_gain", "attn_scale", "mlp_scale", "resid_mix")},
    **{f"blocks.{i}.{name}": ("scalar", "fp16", "") for i in range(8, 11) for name in ("lane_resid", "lane_attn", "lane_mlp")},
}


def test_every_parameter_of_the_default_model_has_its_role(default_model):
    model = default_model
    roles = {name: (r.optimizer, r.quant, r.hessian) for name, r in model.parameter_roles().items()}
    assert roles == EXPECTED_ROLES
    # The optimizers take exactly the declared groups, each parameter once.
    opt = tg.Optimizers(model, tg.Hyperparameters(), tg.Runtime())
    muon = [p for bank in opt.banks for p in bank.params]
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in muon) == sorted(n for n, r in roles.items() if r[0] == "muon")
    assert sorted(names[id(p)] for p in opt.adam_params) == sorted(n for n, r in roles.items() if r[0] != "muon")


@pytest.mark.parametrize("overrides", [{}, dict(PARALLEL_MODE="single"), dict(NUM_LOOPS="0", PARALLEL_START="2")])
def test_no_vector_like_tensor_is_trained_by_muon(monkeypatch, default_model, overrides):
    """Muon orthogonalises matrices; a tensor with a dimension < 16 (a 2 x d mix, a gate) must go to AdamW."""
    for model in (tg.GPT(tiny_hparams(monkeypatch, **overrides)), default_model):
        for name, p in model.named_parameters():
            if p.ndim < 2 or min(p.shape) < 16:
                assert model.parameter_roles()[name].optimizer != "muon", name


def test_a_parameter_without_a_role_is_refused(monkeypatch):
    model = tg.GPT(tiny_hparams(monkeypatch))
    model.blocks[0].extra = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(TypeError, match="blocks.0.extra has no declared Role"):
        model.parameter_roles()


# ---- The frontier model (issue 12) ---------------------------------------------------------------------


def perturbed_model(h, seed=0, scale=0.05):
    """A tiny model whose zero-initialised parameters (projections, gates) are moved off zero."""
    torch.manual_seed(seed)
    model = tg.GPT(h)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def same_weights(model, h):
    """A model built from h with model's weights wherever the names agree (features off: fewer params)."""
    other = tg.GPT(h)
    state = model.state_dict()
    other.load_state_dict({k: v for k, v in state.items() if k in other.state_dict()}, strict=False)
    return other


def test_smear_gate_is_the_identity_at_init_and_never_crosses_a_bos(monkeypatch):
    h = tiny_hparams(monkeypatch)
    model = tg.GPT(h)
    e = torch.randn(2, 12, h.model_dim)
    ids = torch.randint(4, h.vocab_size, (2, 12))
    assert torch.equal(model.smear(e, ids), e)  # lambda = 0 at init
    with torch.no_grad():
        model.smear_lambda.fill_(0.7)
        model.smear_w.normal_()
    ids[:, 6] = tg.BOS_ID
    out = model.smear(e, ids)
    # Written from the formula: e_t + lambda*sigmoid(w.e_t[:window])*e_{t-1}, except t=0 and BOS.
    gate = 0.7 * torch.sigmoid(e[..., : h.gate_window] @ model.smear_w)
    expected = e.clone()
    expected[:, 1:] += gate[:, 1:, None] * e[:, :-1]
    expected[:, 6] = e[:, 6]
    assert torch.allclose(out, expected, atol=1e-6)
    # Perturbing the token before the BOS leaves the BOS position unchanged (and does change position 5).
    e2 = e.clone()
    e2[:, 5] += 1.0
    out2 = model.smear(e2, ids)
    assert torch.equal(out2[:, 6], out[:, 6]) and not torch.allclose(out2[:, 5], out[:, 5])


def test_a_documents_logits_do_not_depend_on_what_precedes_it(monkeypatch):
    """Document masking (and the SmearGate's BOS rule): a document's logits are the same whether or
    not another document precedes it in the window."""
    h = tiny_hparams(monkeypatch, TRAIN_SEQ_LEN=48, EVAL_SEQ_LEN=48)
    model = perturbed_model(h)
    model.looping = True
    g = torch.Generator().manual_seed(1)
    first, second = torch.randint(4, h.vocab_size, (20,), generator=g), torch.randint(4, h.vocab_size, (15,), generator=g)
    bos = torch.tensor([tg.BOS_ID])
    packed = torch.cat((bos, first, bos, second))[None]
    alone = torch.cat((bos, second))[None]
    with torch.no_grad():
        assert torch.allclose(model(packed)[0, 21:], model(alone)[0], atol=1e-5)
        model.h.doc_masked_attention_enabled = False  # without the mask the earlier document leaks in
        assert not torch.allclose(model(packed)[0, 21:], model(alone)[0], atol=1e-3)


def test_document_segments_cut_pieces_no_longer_than_the_span():
    ids = torch.tensor([[5, 6, tg.BOS_ID, 7, 8, 9, 10, 11, tg.BOS_ID, 12, 13, 14]])
    assert tg.document_segments(ids, None).tolist() == [[0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2]]
    segments = tg.document_segments(ids, 2)[0].tolist()
    # Pieces of at most 2 tokens, counted from each document's start, never spanning two documents.
    pieces = [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]
    for piece in pieces:
        assert len({segments[i] for i in piece}) == 1
    assert len(set(segments)) == len(pieces)
    # The masked attention uses exactly these segments: a query never sees a key of another segment.
    q = torch.randn(1, 12, 2, 4)
    k, v = torch.randn(1, 12, 1, 4), torch.randn(1, 12, 1, 4)
    out = tg.causal_attention(q, k, v, "sdpa", tg.document_segments(ids, 2))
    v2 = v.clone()
    v2[0, 2] += 10.0  # a value in the piece [2, 3]: only queries of that piece may see it
    out2 = tg.causal_attention(q, k, v2, "sdpa", tg.document_segments(ids, 2))
    changed = (out2 - out).abs().amax(dim=(0, 2, 3)) > 1e-6
    assert changed.tolist() == [i in (2, 3) for i in range(12)]


def test_sparse_attention_gate_is_one_half_at_init_and_a_zeroed_gate_silences_its_head(monkeypatch):
    h = tiny_hparams(monkeypatch)
    torch.manual_seed(0)
    attn = tg.Attention(h, use_xsa=True, backend="sdpa")
    with torch.no_grad():
        attn.proj.weight.copy_(torch.eye(h.model_dim))  # expose the per-head outputs
    x = torch.randn(2, 10, h.model_dim)
    x[..., : h.gate_window] = x[..., : h.gate_window].abs() + 0.1  # the gate's input channels are positive
    cos, sin = tg.rotary_tables(10, h.rope_dims, h.rope_base)
    gated = attn(x, cos, sin)
    scale, attn.gate_scale = attn.gate_scale, None
    ungated = attn(x, cos, sin)
    assert torch.allclose(gated, 0.5 * ungated, atol=1e-6)  # sigmoid(0) at init
    attn.gate_scale = scale
    with torch.no_grad():
        attn.gate_w[1] = -1e4  # head 1's gate: sigmoid(-huge) = 0
    out = attn(x, cos, sin).view(2, 10, h.num_heads, h.head_dim)
    assert out[:, :, 1].abs().max() == 0
    assert torch.allclose(out[:, :, 0], 0.5 * ungated.view_as(out)[:, :, 0], atol=1e-6)


def test_asymmetric_softcap_equals_the_symmetric_one_with_equal_caps_and_trains_both(monkeypatch):
    h_sym = tiny_hparams(monkeypatch, ASYM_SOFTCAP_ENABLED=0)
    h_asym = tiny_hparams(monkeypatch, ASYM_SOFTCAP_ENABLED=1)
    model = perturbed_model(h_asym)
    with torch.no_grad():
        model.softcap_caps.fill_(h_asym.logit_softcap)
    sym = same_weights(model, h_sym)
    x = torch.randint(0, h_asym.vocab_size, (2, 16))
    y = torch.randint(0, h_asym.vocab_size, (2, 16))
    assert torch.allclose(model(x, y), sym(x, y), atol=1e-6)
    model(x, y).backward()
    assert (model.softcap_caps.grad.abs() > 0).all()  # both caps are in the graph of the training loss
    assert "softcap_caps" not in dict(sym.named_parameters())  # a constant when the feature is off


def test_loop_embeddings_are_the_identity_at_init_and_enter_each_pass(monkeypatch):
    h_on, h_off = tiny_hparams(monkeypatch, LOOP_EMBEDDINGS_ENABLED=1), tiny_hparams(monkeypatch, LOOP_EMBEDDINGS_ENABLED=0)
    model = perturbed_model(h_on)
    with torch.no_grad():
        model.loop_embeddings.zero_()
    x = torch.randint(0, h_on.vocab_size, (2, 16))
    plain = same_weights(model, h_off)
    for looping in (False, True):
        model.looping = plain.looping = looping
        assert torch.equal(model(x, x), plain(x, x))
    with torch.no_grad():
        model.loop_embeddings[1].normal_()  # the second pass's vector: only runs with looping on
    model.looping = plain.looping = False
    assert torch.equal(model(x, x), plain(x, x))
    model.looping = plain.looping = True
    assert not torch.equal(model(x, x), plain(x, x))


def test_training_span_follows_its_schedule(monkeypatch):
    h = tiny_hparams(monkeypatch, TRAIN_SEQ_LEN_SCHEDULE="8@0,16@0.25,32@0.75")
    assert [h.attention_span_at(f) for f in (0.0, 0.2, 0.25, 0.7, 0.75, 1.0)] == [8, 8, 16, 16, None, None]
    with pytest.raises(tg.ConfigError, match="TRAIN_SEQ_LEN_SCHEDULE"):
        tiny_hparams(monkeypatch, TRAIN_SEQ_LEN_SCHEDULE="64@0")  # longer than TRAIN_SEQ_LEN
    with pytest.raises(tg.ConfigError, match="DOC_MASKED_ATTENTION_ENABLED=1"):
        tiny_hparams(monkeypatch, TRAIN_SEQ_LEN_SCHEDULE="8@0", DOC_MASKED_ATTENTION_ENABLED=0)


def test_flex_block_mask_from_segment_ranges_matches_the_pairwise_mask():
    """The BlockMask built from block-level segment ranges (the CUDA path) keeps exactly the pairs
    create_block_mask's pairwise scan keeps, and FlexAttention under it equals the dense masked SDPA."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 100, (3, 512), generator=g)
    ids[0, [0, 100, 101, 380]] = tg.BOS_ID
    ids[1, 200] = tg.BOS_ID  # one long document after a partial one
    for span in (None, 128, 96):
        segments = tg.document_segments(ids, span)
        mine = tg.attention_mask(segments, "flex")

        def same_segment_causal(b, h, q, kv):
            return (q >= kv) & (segments[b, q] == segments[b, kv])
        reference = create_block_mask(same_segment_causal, 3, None, 512, 512, device="cpu")
        assert torch.equal(mine.to_dense(), reference.to_dense())
        if span is None:  # whole blocks inside one document are recognised (and skip the element mask)
            assert int(mine.full_kv_num_blocks.sum()) > 0
        q, k, v = (torch.randn(3, heads, 512, 16, generator=g) for heads in (4, 2, 2))
        expected = tg.causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), "sdpa", segments)
        got = flex_attention(q, k, v, block_mask=mine, enable_gqa=True).transpose(1, 2)
        assert torch.allclose(got, expected, atol=1e-5)
        if span == 96:  # eager callers (GPTQ calibration, under force_eager) run the compiled, fused copy: same values
            from torch._dynamo import reset as dynamo_reset
            from torch._dynamo.utils import counters
            tg.compiled_flex_attention.cache_clear()
            dynamo_reset()
            compiled_before = counters["frames"]["ok"]
            with torch.compiler.set_stance("force_eager"):
                eager = tg.causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), "flex", mine)
            assert torch.allclose(eager, expected, atol=1e-5)
            assert counters["frames"]["ok"] > compiled_before  # dynamo compiled it despite force_eager
