"""Evaluation: the online causal n-gram tilt (FRONTIER §1), against a plain-Python state machine."""
import math

import pytest
import torch
import torch.multiprocessing as mp

import train_gpt as tg
from test_eval import CPU, distributed_worker, free_port, make_hparams, make_model, make_target_bytes, one_thread  # noqa: F401


def reference_hints(tokens: list[int], order: int, threshold: float) -> tuple[list[int], list[bool]]:
    """FRONTIER §1's state machine, one position at a time: per context (the order-1 tokens ending at
    position i), total, per-follower counts and the top (token, count); target i = tokens[i+1] first
    READS the state of its context (hint = top token, gate = top/total >= threshold), THEN updates it
    with its own token; the top moves only when a count strictly exceeds it (ties keep the earlier)."""
    k = order - 1
    state: dict[tuple, dict] = {}
    hints, gates = [0] * (len(tokens) - 1), [False] * (len(tokens) - 1)
    for i in range(len(tokens) - 1):
        if i < k - 1:
            continue  # no full context yet
        entry = state.setdefault(tuple(tokens[i - k + 1 : i + 1]), {"total": 0, "counts": {}, "top": 0, "token": 0})
        if entry["total"]:
            hints[i], gates[i] = entry["token"], entry["top"] / entry["total"] >= threshold
        follower = tokens[i + 1]
        entry["total"] += 1
        entry["counts"][follower] = entry["counts"].get(follower, 0) + 1
        if entry["counts"][follower] > entry["top"]:
            entry["top"], entry["token"] = entry["counts"][follower], follower
    return hints, gates


def repetitive_stream(length: int, vocab_size: int, seed: int) -> torch.Tensor:
    """Random tokens in which earlier spans are copied again and again (with a changed token now and
    then), so long contexts recur with several different followers."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (length,), generator=g)
    for _ in range(length // 20):
        span = int(torch.randint(16, 40, (1,), generator=g))
        src, dst = torch.randint(0, length - span, (2,), generator=g).tolist()
        if src < dst:
            tokens[dst : dst + span] = tokens[src : src + span].clone()
            tokens[dst + int(torch.randint(0, span, (1,), generator=g))] = int(torch.randint(0, vocab_size, (1,), generator=g))
    return tokens


def hints_of(tokens, order=16, threshold=0.8) -> tuple[list[int], list[bool]]:
    hints, gates = tg.ngram_hints(torch.as_tensor(tokens), order, threshold)
    return hints.tolist(), gates.tolist()


# ------------------------------------------------------------------ the hint pass

@pytest.mark.parametrize("vocab_size,order,threshold,seed", [
    (2, 3, 0.0, 0), (3, 4, 0.5, 1), (2, 16, 0.8, 2), (5, 2, 0.8, 3), (4, 5, 1.0, 4), (7, 3, 0.6, 5),
    (300, 16, 0.8, 6)])
@pytest.mark.parametrize("sort_targets", [4_000_000, 97], ids=["one_sort", "sorted_by_class"])
def test_vectorised_hints_equal_the_state_machine(vocab_size, order, threshold, seed, sort_targets, monkeypatch):
    # 97 keys per sort splits the 3,000 windows into 32 residue classes, each sorted alone (FineWeb's 47.9M: 16);
    # vocabulary 300 also re-ranks per class inside window_ids (smaller vocabularies never pass 2**31 there)
    monkeypatch.setattr(tg, "HINT_SORT_TARGETS", sort_targets)
    tokens = repetitive_stream(3000, vocab_size, seed)
    expected = reference_hints(tokens.tolist(), order, threshold)
    got = hints_of(tokens, order, threshold)
    assert got == expected
    assert any(expected[1]) and not all(expected[1][order:])  # the gate both fires and holds back


def test_hints_of_every_seen_context_with_ties_keep_the_earlier_token():
    # Threshold 0 gates every seen context, so every hint is compared. After token 0 come 1, 2, 2, 1,
    # 1: at target 8 both have count 2 and 2 got there first (neither the smallest id nor the first
    # seen); at target 10, 1 leads with 3.
    tokens = [0, 1, 0, 2, 0, 2, 0, 1, 0, 1, 0, 2]
    expected = reference_hints(tokens, 2, 0.0)
    assert hints_of(tokens, 2, 0.0) == expected
    assert [expected[0][i] for i in (2, 4, 6, 8, 10)] == [1, 1, 2, 2, 1]


def test_exact_fifteen_token_repeat_fires_once_at_the_repeat():
    g = torch.Generator().manual_seed(0)
    distinct = torch.randperm(1000, generator=g)  # no token repeats outside the planted copy
    repeat, follower = distinct[:15], int(distinct[15])
    tokens = torch.cat((distinct[16:100], repeat, torch.tensor([follower]), distinct[100:200], repeat, distinct[200:260]))
    hints, gates = hints_of(tokens)
    second_end = 84 + 16 + 100 + 14  # index of the last token of the second copy = its target's index
    assert [i for i, g in enumerate(gates) if g] == [second_end]
    assert hints[second_end] == follower
    # One token shorter (a 14-token repeat) is no full context: nothing fires.
    shorter = torch.cat((distinct[16:100], repeat, torch.tensor([follower]), distinct[100:200], repeat[1:], distinct[200:260]))
    assert not any(hints_of(shorter)[1])
    # A 20-token repeat: the 15-token context recurs at 6 consecutive targets, each hinting the next token.
    long_repeat = distinct[300:320]
    tokens = torch.cat((long_repeat, distinct[400:450], long_repeat, distinct[500:510]))
    hints, gates = hints_of(tokens)
    fired = [i for i, g in enumerate(gates) if g]
    assert fired == list(range(70 + 14, 70 + 20))
    assert [hints[i] for i in fired[:-1]] == long_repeat[15:20].tolist()
    assert hints[fired[-1]] == int(distinct[400])  # after the first copy came distinct[400]


def test_hint_depends_only_on_tokens_up_to_its_position():
    tokens = repetitive_stream(2000, 3, seed=7)
    hints, gates = tg.ngram_hints(tokens, 6, 0.8)
    g = torch.Generator().manual_seed(8)
    moved = 0
    for j in (6, 100, 777, 1500, 1999):
        changed = tokens.clone()
        changed[j:] = torch.randint(0, 3, (2000 - j,), generator=g)  # target j-1 is tokens[j]: only targets >= j may move
        hints2, gates2 = tg.ngram_hints(changed, 6, 0.8)
        assert torch.equal(hints2[:j], hints[:j]) and torch.equal(gates2[:j], gates[:j]), j
        single = tokens.clone()
        single[j] = (single[j] + 1) % 3
        hints3, gates3 = tg.ngram_hints(single, 6, 0.8)
        assert torch.equal(hints3[:j], hints[:j]) and torch.equal(gates3[:j], gates[:j]), j
        moved += int(not torch.equal(gates2, gates)) + int(not torch.equal(gates3[j : j + 6], gates[j : j + 6]))
    assert moved >= 4  # the perturbations do reach the later gates (from target j on)


@pytest.mark.parametrize("sort_targets", [4_000_000, 5], ids=["one_sort", "sorted_by_class"])
def test_contexts_that_a_hash_could_confuse_never_share_statistics(sort_targets, monkeypatch):
    # The pass ranks contexts exactly (window_ids), it does not hash them; this checks the property a
    # hash collision would break. The stream holds, each with its own follower, every variant of a
    # 15-token context A with ONE position changed (so any bug in the window length shows), and
    # permutations of A (equal under every symmetric hash: sum, XOR, multiset); then A itself,
    # which must be new: no hint, no gate. A second A then fires with the first A's follower.
    monkeypatch.setattr(tg, "HINT_SORT_TARGETS", sort_targets)
    g = torch.Generator().manual_seed(1)
    context = torch.randperm(50, generator=g)[:15] + 100
    pieces, follower = [], 1000
    variants = [context.clone() for _ in range(15)] + [context[torch.randperm(15, generator=g)] for _ in range(5)]
    for j in range(15):
        variants[j][j] = 99
    for v in variants:
        pieces += [v, torch.tensor([follower, 2000 + follower])]  # a separator breaks accidental contexts
        follower += 1
    stream = torch.cat(pieces + [context, torch.tensor([7777, 5000]), context, torch.tensor([8888])])
    hints, gates = hints_of(stream)
    first_a = stream.numel() - 2 * 15 - 3 - 1 + 14 - 1  # index of the last token of the first A
    assert hints == reference_hints(stream.tolist(), 16, 0.8)[0]
    assert not any(gates[: first_a + 1]) and hints[first_a] == 0
    second_a = stream.numel() - 2
    assert [i for i, g in enumerate(gates) if g] == [second_a] and hints[second_a] == 7777
    # Dense ranks are exact at any length: equal ids <=> equal windows.
    ids = tg.window_ids(stream, 15)
    windows = [tuple(stream[p : p + 15].tolist()) for p in range(ids.numel())]
    for p in range(0, ids.numel(), 7):
        for q in range(ids.numel()):
            assert (ids[p] == ids[q]) == (windows[p] == windows[q])


def test_short_streams_have_no_hints():
    for n in (1, 2, 15, 16):
        hints, gates = tg.ngram_hints(torch.arange(n), 16, 0.8)
        assert hints.numel() == n - 1 and not gates.any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the pass runs on the GPU at evaluation)")
@pytest.mark.parametrize("sort_targets", [4_000_000, 10_000], ids=["one_sort", "sorted_by_class"])
def test_hints_on_the_gpu_equal_the_cpu(sort_targets, monkeypatch):
    monkeypatch.setattr(tg, "HINT_SORT_TARGETS", sort_targets)
    tokens = repetitive_stream(200_000, 50, seed=9)
    cpu, gpu = tg.ngram_hints(tokens, 16, 0.8), tg.ngram_hints(tokens.cuda(), 16, 0.8)
    assert torch.equal(cpu[0], gpu[0].cpu()) and torch.equal(cpu[1], gpu[1].cpu()) and cpu[1].any()


# ------------------------------------------------------------------ the tilt

def test_tilted_distribution_sums_to_one_over_the_vocabulary(monkeypatch):
    h = make_hparams(monkeypatch)
    model = make_model(h)
    g = torch.Generator().manual_seed(0)
    inputs = torch.randint(0, h.vocab_size, (2, 32), generator=g)
    targets = torch.randint(0, h.vocab_size, (2, 32), generator=g)
    hint_ids = torch.randint(0, h.vocab_size, (2, 32), generator=g)
    gates = torch.rand(2, 32, generator=g) < 0.5
    with torch.no_grad():
        log_p = torch.log_softmax(model(inputs).double(), dim=-1)  # softcapped logits -> full distribution
        nll, hint_nll = model(inputs, targets, reduction="none", hint_ids=hint_ids)
    # The head returns -log p(target) and -log p(hint) of that same distribution.
    assert torch.allclose(nll.double(), -log_p.gather(2, targets[..., None])[..., 0], atol=1e-5)
    assert torch.allclose(hint_nll.double(), -log_p.gather(2, hint_ids[..., None])[..., 0], atol=1e-5)
    tilt = tg.NgramTilt(torch.zeros(0), torch.zeros(0), boost=2.625)
    vocab = torch.arange(h.vocab_size)
    every = tilt.apply(-log_p, hint_nll.double()[..., None], vocab, hint_ids[..., None], gates[..., None])
    p_tilted = torch.exp(-every)
    assert torch.allclose(p_tilted.sum(-1), torch.ones(2, 32, dtype=torch.float64), atol=1e-6)
    # Gated rows: the hint gains exactly e^boost over every other token, which all scale by the same
    # 1/Z, Z = 1 + p(h)(e^boost - 1); rows without a gate are unchanged.
    ratio = p_tilted / log_p.exp()
    is_hint = vocab == hint_ids[..., None]
    z = 1 + torch.exp(-hint_nll.double()) * math.expm1(2.625)
    expected = torch.where(is_hint, math.exp(2.625), 1.0) / z[..., None]
    assert torch.allclose(ratio[gates], expected[gates], rtol=1e-5)
    assert torch.allclose(ratio[~gates], torch.ones_like(ratio[~gates]), rtol=1e-9)


def test_hint_ids_need_per_token_losses(monkeypatch):
    h = make_hparams(monkeypatch)
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="reduction='none'"):
        make_model(h)(ids, ids, reduction="sum", hint_ids=ids)


def repeating_validation(num_targets: int, vocab_size: int) -> torch.Tensor:
    """BOS-separated documents made of quotes (20-40 tokens) of one 80-token text, so that 15-token
    contexts recur, mostly with the same follower."""
    g = torch.Generator().manual_seed(11)
    text = torch.randint(4, vocab_size, (80,), generator=g)
    quotes = [tg.BOS_ID]
    while len(quotes) <= num_targets:
        start, length = int(torch.randint(0, 40, (1,), generator=g)), int(torch.randint(20, 41, (1,), generator=g))
        quotes += text[start : start + length].tolist() + ([tg.BOS_ID] if torch.rand(1, generator=g) < 0.2 else [])
    return torch.tensor(quotes[: num_targets + 1])


def reference_tilted_bpb(model, val: torch.Tensor, target_bytes, h) -> tuple[float, float, int]:
    """(tilted bpb, untilted bpb, gated) the slow way: every sliding window through the model on its
    own, full softmax in float64, the Python state machine's hints, p'(y) = p(y)e^(b[y=h])/Z."""
    hints, gates = reference_hints(val.tolist(), h.ngram_tilt_order, h.ngram_tilt_threshold)
    boost, tilted, plain, gated = h.ngram_tilt_boost, 0.0, 0.0, 0
    model.looping = True
    with torch.no_grad():
        for start, first, end in tg.sliding_windows(val.numel() - 1, h.eval_seq_len, h.eval_stride).tolist():
            log_p = torch.log_softmax(model(val[None, start:end])[0].double(), dim=-1)
            for i in range(first, end):
                p = log_p[i - start].exp()
                y = int(val[i + 1])
                plain -= math.log(p[y])
                if gates[i]:
                    gated += 1
                    q = p * torch.where(torch.arange(p.numel()) == hints[i], math.exp(boost), 1.0)
                    p = q / q.sum()
                tilted -= math.log(p[y])
    model.looping = False
    num_bytes = int(target_bytes.sum())
    return tilted / (math.log(2) * num_bytes), plain / (math.log(2) * num_bytes), gated


def test_scored_bpb_with_the_tilt_equals_a_slow_reference(monkeypatch):
    h = make_hparams(monkeypatch, NGRAM_TILT_ENABLED=1)
    model, val = make_model(h), repeating_validation(400, h.vocab_size)
    target_bytes = make_target_bytes(val)
    tilted, plain, gated = reference_tilted_bpb(model, val, target_bytes, h)
    assert gated > 10
    result = tg.eval_sliding(model, val, target_bytes, h, CPU)
    assert result.bpb == pytest.approx(tilted, rel=1e-6)
    assert result.untilted.bpb == pytest.approx(plain, rel=1e-6)
    assert result.gated == gated and result.untilted.stage == "sliding_untilted"
    assert abs(tilted - plain) > 1e-4  # the tilt changed the score
    # TTT with LR 0 scores the same windows through the same path.
    frozen = tg.eval_ttt(model, val, target_bytes, make_hparams(monkeypatch, NGRAM_TILT_ENABLED=1, TTT_LR=0), CPU)
    assert frozen.bpb == pytest.approx(tilted, rel=1e-6) and frozen.gated == gated


def test_ttt_trains_on_the_untilted_loss(monkeypatch):
    val = repeating_validation(300, 256)
    results, weights = [], []
    for enabled in (0, 1):
        h = make_hparams(monkeypatch, NGRAM_TILT_ENABLED=enabled)
        model = make_model(h)
        results.append(tg.eval_ttt(model, val, make_target_bytes(val), h, CPU))
        weights.append(model.state_dict())
    off, on = results
    assert on.gated > 0 and off.untilted is None
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # identical updates
    assert on.untilted.loss == pytest.approx(off.loss, rel=1e-12)
    assert on.loss != pytest.approx(off.loss, rel=1e-6)


# ------------------------------------------------------------------ two gloo processes

def tilted_evals(runtime: tg.Runtime, state_path: str) -> list:
    h = make_hparams(NGRAM_TILT_ENABLED=1)
    model, val = make_model(h), repeating_validation(300, h.vocab_size)
    target_bytes = make_target_bytes(val)
    model.load_state_dict(torch.load(state_path))
    results = [tg.eval_plain(model, val, target_bytes, h, runtime), tg.eval_sliding(model, val, target_bytes, h, runtime),
               tg.eval_ttt(model, val, target_bytes, h, runtime)]
    return [(r.loss, r.bpb, r.untilted.loss, r.gated, r.tokens, r.bytes) for r in results]


def test_two_processes_give_the_same_tilted_totals(tmp_path):
    state_path, out_path = str(tmp_path / "state.pt"), str(tmp_path / "out.pt")
    torch.save(make_model(make_hparams(), seed=3).state_dict(), state_path)
    single = tilted_evals(CPU, state_path)
    mp.spawn(distributed_worker, args=(2, free_port(), state_path, out_path, tilted_evals), nprocs=2, join=True)
    for one, two in zip(single, torch.load(out_path)):
        assert one[3:] == two[3:] and one[3] > 0  # same gated count, tokens, bytes
        assert two[:3] == pytest.approx(one[:3], rel=1e-5)
