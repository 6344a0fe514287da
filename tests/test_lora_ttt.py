"""Evaluation: per-document LoRA test-time training (TTT_MODE=lora / lora_phased, FRONTIER §5). The adapters
enter the one forward path; the documents partition the targets; at LR 0 the stage equals each document
scored on its own; and it is legal on 1 and 2 gloo processes: every target scored exactly once, before
any update (adapter step or global SGD) that has seen it."""
import functools
import itertools

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import train_gpt as tg
from test_eval import CPU, distributed_worker, free_port, make_hparams, make_model, make_target_bytes, one_thread  # noqa: F401

# Tiny chunks and batches: documents span several chunks, batches, windows (some longer than the
# 32-token window) and, in lora_phased, the 4 longest documents are cut into 2 phases of 2.
LORA_ENV = dict(TTT_MODE="lora", TTT_CHUNK_SIZE=5, TTT_BATCH_DOCS=3, TTT_LORA_RANK=4, TTT_LORA_LR=0.01,
                PHASED_TTT_NUM_PHASES=2, PHASED_TTT_PREFIX_DOCS=4, PHASED_TTT_LR=0.05)
DOC_LENGTHS = (40, 3, 17, 61, 9, 25, 1, 33, 12, 50, 6)  # targets per document; distinct, so "longest" is unambiguous
PREFIX = (3, 9, 0, 7)  # the 4 longest, longest first
CPU_DEVICE = torch.device("cpu")


def doc_stream(lengths, vocab_size: int | None, seed: int = 0, low: int = 4):
    """(tokens, spans): documents of the given target counts, each a BOS and its tokens (its last target is
    the next BOS; the last one's is a plain token). Random ids in [low, vocab_size), or with vocab_size None
    distinct ids (token i is i + 1, so an id names its position)."""
    starts = [0] + list(itertools.accumulate(lengths))[:-1]
    num_tokens = sum(lengths) + 1
    if vocab_size is None:
        tokens = torch.arange(1, num_tokens + 1)
    else:
        tokens = torch.randint(low, vocab_size, (num_tokens,), generator=torch.Generator().manual_seed(seed))
    tokens[starts] = tg.BOS_ID
    return tokens, [(s, s + n) for s, n in zip(starts, lengths)]


def lora_hparams(monkeypatch=None, **overrides) -> tg.Hyperparameters:
    return make_hparams(monkeypatch, **{**LORA_ENV, **overrides})


def num_virtual_layers(h) -> int:
    return len(tg.loop_schedule(h.num_layers, h.loop_start, h.loop_end, h.num_loops, True))


# ------------------------------------------------------------------ documents, chunks and the schedule

@pytest.mark.parametrize("lengths", [DOC_LENGTHS, (1, 1, 5), (7,)])
def test_documents_partition_the_targets(lengths):
    tokens, spans = doc_stream(lengths, 64)
    assert tg.document_spans(tokens).tolist() == [list(s) for s in spans]
    tokens[0], tokens[-1] = 9, tg.BOS_ID  # a head without BOS is a document too; a final BOS is only a target
    assert tg.document_spans(tokens).tolist() == [list(s) for s in spans]
    assert [t for s, e in spans for t in range(s, e)] == list(range(tokens.numel() - 1))  # = plain/sliding's targets


def test_chunk_size_and_window_lengths(monkeypatch):
    bad_configs = (dict(TTT_SHORT_CHUNKS="45"), dict(TTT_SHORT_CHUNKS="20:0"), dict(TTT_SHORT_CHUNKS="20:33"),
                   dict(TTT_LORA_TARGETS="q,x"), dict(TTT_CHUNK_SIZE=33))  # the window is 32
    for bad in bad_configs:
        with monkeypatch.context() as m, pytest.raises(tg.ConfigError):
            lora_hparams(m, **bad)
    assert lora_hparams(monkeypatch, TTT_CHUNK_SIZE=33, TTT_MODE="sgd").ttt_chunk_size == 33  # sgd does not read it
    h = lora_hparams(monkeypatch, EVAL_SEQ_LEN=128, TTT_EVAL_SEQ_LEN=200, TTT_SHORT_CHUNKS="45:3,20:2")
    for longest, chunk in ((17, 2), (20, 2), (21, 3), (45, 3), (46, 5)):
        assert tg.lora_plan(torch.tensor([[0, longest], [0, 0]]), h)[0] == chunk
    chunk, plan = tg.lora_plan(torch.tensor([[3, 7], [10, 10 + 460]]), h)
    lengths = [seq_len for _, seq_len in plan]
    # chunk c's window holds min((c+1)*5, 200) tokens, padded to a power of two >= 128, at most 200
    assert chunk == 5 and len(lengths) == 92
    assert lengths == [min(200, max(128, 1 << (min(5 * (c + 1), 200) - 1).bit_length())) for c in range(92)]
    assert sorted(set(lengths)) == [128, 200] and lengths.count(128) == 25
    assert [rows for rows, _ in plan] == [2] * 92  # one document left, at full windows: still MIN_ROWS = 2 rows


def test_rows_shrink_at_full_windows_to_the_documents_still_scored(monkeypatch):
    h = lora_hparams(monkeypatch, TTT_BATCH_DOCS=20, EVAL_SEQ_LEN=128, TTT_CHUNK_SIZE=8)
    lengths = [700, 500, 300, 260, 250, 240, 200, 100, 90, 64] + [30] * 7 + [0] * 3  # 3 padding rows
    docs = torch.tensor([[1000 * i, 1000 * i + n] for i, n in enumerate(lengths)])
    chunk, plan = tg.lora_plan(docs[torch.randperm(20, generator=torch.Generator().manual_seed(0))], h)
    assert chunk == 8 and len(plan) == 700 // 8 + 1
    for c, (rows, seq_len) in enumerate(plan):
        live = sum(n > 8 * c for n in lengths)
        if seq_len < 128:  # windows still growing: every row
            assert rows == 20
        else:  # the fewest of 20, 5, 2 rows (never one: a second graph per block) that hold the documents still scored
            assert rows == min(r for r in (20, 5, 2) if r >= live)
    assert {rows for rows, _ in plan} == {20, 5, 2}


def test_dropping_finished_rows_changes_no_score_and_no_adapter(monkeypatch):
    """The same run with the plan's rows kept at TTT_BATCH_DOCS: the scores, and A carried to later
    batches, agree (only the finished rows are dropped; weight decay on, so it acts on dropped rows too)."""
    h = lora_hparams(monkeypatch, TTT_LORA_WD=0.5)
    tokens, _ = doc_stream(DOC_LENGTHS, h.vocab_size)
    target_bytes = make_target_bytes(tokens)
    plan = tg.lora_plan
    outcomes = []
    for narrow in (True, False):
        if not narrow:
            monkeypatch.setattr(tg, "lora_plan", lambda docs, h: (plan(docs, h)[0], [(len(docs), s) for _, s in plan(docs, h)[1]]))
        lora = tg.DocumentLoRA(h, 6, CPU_DEVICE, seed=0)
        model, totals = make_model(h), torch.zeros(5, dtype=torch.float64)
        model.requires_grad_(False)
        with tg.looping_enabled(model):
            for batch in tg.lora_ttt_schedule(tg.document_spans(tokens), h, 1)[0][0]:
                tg.lora_ttt_batch(model, tokens, target_bytes, batch, lora, h, totals, None)
        outcomes.append((totals, [f.detach().clone() for f in lora.parameters()]))
    (narrowed, a_narrowed), (kept, a_kept) = outcomes
    assert narrowed[1:3].tolist() == kept[1:3].tolist() == [int(target_bytes.sum()), sum(DOC_LENGTHS)]
    assert narrowed[0].item() == pytest.approx(kept[0].item(), rel=1e-6)
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(a_narrowed, a_kept))
    assert not torch.equal(a_kept[0], tg.DocumentLoRA(h, 6, CPU_DEVICE, seed=0).parameters()[0])  # A did train


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_schedule_is_longest_first_static_and_balanced(monkeypatch, world_size):
    h = lora_hparams(monkeypatch, TTT_MODE="lora_phased", PHASED_TTT_PREFIX_DOCS=0.4)  # 0.4 * 11 -> 4 documents
    _, spans = doc_stream(DOC_LENGTHS, 64)
    docs = torch.tensor(spans)
    segments = tg.lora_ttt_schedule(docs, h, world_size)
    ranked = [spans[i] for i in PREFIX] + sorted((s for i, s in enumerate(spans) if i not in PREFIX), key=lambda s: s[0] - s[1])
    assert len(segments) == 3
    for segment, expected in zip(segments, (ranked[:2], ranked[2:4], ranked[4:])):
        assert len(segment) == world_size
        rows = [tuple(row) for batches in segment for batch in batches for row in batch.tolist() if row[1] > row[0]]
        assert sorted(rows) == sorted(expected)  # each document once, in its phase
        assert all(batch.shape == (h.ttt_batch_docs, 2) for batches in segment for batch in batches)
        costs = [[sum(r * s for r, s in tg.lora_plan(batch, h)[1]) for batch in batches] for batches in segment]
        loads = [sum(c) for c in costs]
        assert max(loads) - min(loads) <= max(itertools.chain([0], *costs))  # greedy least-loaded split
        for batches in segment:  # each rank runs its batches longest first
            longest = [int((b[:, 1] - b[:, 0]).max()) for b in batches]
            assert longest == sorted(longest, reverse=True)
    again = tg.lora_ttt_schedule(docs, h, world_size)
    assert [[[b.tolist() for b in r] for r in s] for s in again] == [[[b.tolist() for b in r] for r in s] for s in segments]
    assert len(tg.lora_ttt_schedule(docs, lora_hparams(monkeypatch), world_size)) == 1  # lora: no phases


# ------------------------------------------------------------------ adapters in the one forward path

def test_adapters_enter_every_virtual_layer_and_placement_one_document_per_row(monkeypatch):
    h = lora_hparams(monkeypatch)
    model = make_model(h)
    model.looping = True
    lora = tg.DocumentLoRA(h, num_virtual_layers(h), CPU_DEVICE, seed=0)
    assert len(lora.layers) == len(model.virtual_order()) == 6  # 0,1,2,1,2,3: a slot per layer application
    assert set(lora.layers[0].factors) == {"q", "k", "v", "o", "mlp"} and set(lora.head.factors) == {"head"}
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(4, h.vocab_size, (h.ttt_batch_docs, 16), generator=g) for _ in range(2))
    with torch.no_grad():
        base = model(x, y, reduction="none")
        assert torch.equal(model(x, y, reduction="none", lora=lora), base)  # B = 0: the adapters add nothing
        for terms, name in [(t, n) for t in lora.layers for n in t.factors] + [(lora.head, "head")]:
            b = terms.factors[name][1]
            b[1].normal_(generator=g)  # this slot and placement, document row 1 only
            out = model(x, y, reduction="none", lora=lora)
            b.zero_()
            assert torch.equal(out[0], base[0]) and torch.equal(out[2], base[2])  # the other documents' rows
            assert not torch.allclose(out[1], base[1], atol=1e-4)  # the adapter acts (slot i of the loop too)
    some = tg.DocumentLoRA(lora_hparams(monkeypatch, TTT_LORA_TARGETS="k,mlp"), 6, CPU_DEVICE, seed=0)
    assert set(some.layers[3].factors) == {"k", "mlp"} and not some.head.factors


def test_head_on_columns_equals_the_full_forward_there(monkeypatch):
    """LoRA TTT's head reads only the chunk's columns (GPT.forward(columns=...)): the nll, the hint nll and every
    gradient (adapters, base weights, caps) equal the full forward's at those columns."""
    h = lora_hparams(monkeypatch)
    model = make_model(h)
    model.looping = True
    lora = tg.DocumentLoRA(h, num_virtual_layers(h), CPU_DEVICE, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for b in lora.parameters()[1::2]:
            b.normal_(generator=g)  # B != 0: every adapter, the head's too, acts
    x, y, hints = (torch.randint(4, h.vocab_size, (h.ttt_batch_docs, 16), generator=g) for _ in range(3))
    columns = torch.tensor([[0, 1, 2, 3, 4], [11, 12, 13, 14, 15], [6, 7, 8, 9, 10]])
    at = lambda t: t.gather(1, columns)  # noqa: E731
    params = list(model.parameters()) + lora.parameters()
    full, full_hint = model(x, y, reduction="none", hint_ids=hints, lora=lora)
    part, part_hint = model(x, at(y), reduction="none", hint_ids=at(hints), lora=lora, columns=columns)
    torch.testing.assert_close(part, at(full), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(part_hint, at(full_hint), rtol=1e-5, atol=1e-6)
    weights = torch.rand(columns.shape, generator=g)
    for expected, got in zip(torch.autograd.grad((at(full) * weights).sum(), params, allow_unused=True),
                             torch.autograd.grad((part * weights).sum(), params, allow_unused=True)):
        if expected is None:
            assert got is None
        else:
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_lora_ttt_scores_and_trains_alike_with_the_head_on_every_position(monkeypatch):
    """The whole stage (adapter steps on, two phases of global SGD) gives the same score and the same weights
    whether the head reads the chunk's columns (the default) or every position (span=None forced)."""
    h = lora_hparams(monkeypatch, TTT_MODE="lora_phased")
    tokens, _ = doc_stream(DOC_LENGTHS, h.vocab_size)
    target_bytes = make_target_bytes(tokens)
    results, states = [], []
    for narrow in (True, False):
        if not narrow:
            full = tg.score_batch
            monkeypatch.setattr(tg, "score_batch", lambda *args, span=None, **kwargs: full(*args, **kwargs))
        model = make_model(h)
        results.append(tg.eval_lora_ttt(model, tokens, target_bytes, h, CPU))
        states.append(model.state_dict())
    assert results[0].loss == pytest.approx(results[1].loss, rel=1e-6) and results[0].tokens == results[1].tokens
    for name in states[0]:
        torch.testing.assert_close(states[0][name], states[1][name], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ scores against an independent reference

def reference_scores(model, tokens, target_bytes, spans, chunk: int, window: int, tilt=None) -> tuple[float, int, int]:
    """(nats, bytes, count) of every document scored on its own with the base model: chunk by chunk, the
    chunk ending at local target c from the document's tokens [max(0, c - window), c); nothing batched,
    padded or bucketed; with a tilt, the hints of the stream positions."""
    nats, num_bytes, count = 0.0, 0, 0
    with torch.no_grad(), tg.looping_enabled(model):
        for s, e in spans:
            for begin in range(0, e - s, chunk):
                end = min(begin + chunk, e - s)
                first = max(0, end - window)
                inputs, targets = tokens[s + first : s + end], tokens[s + first + 1 : s + end + 1]
                if tilt is None:
                    nll = model(inputs[None], targets[None], reduction="none")[0]
                else:
                    hints, gates = tilt.hints[s + first : s + end].long(), tilt.gates[s + first : s + end]
                    untilted, hint_nll = model(inputs[None], targets[None], reduction="none", hint_ids=hints[None])
                    nll = tilt.apply(untilted[0], hint_nll[0], targets, hints, gates)
                nats += nll[begin - first :].double().sum().item()
                num_bytes += int(target_bytes[s + begin : s + end].sum())
                count += end - begin
    return nats, num_bytes, count


@pytest.mark.parametrize("tilted", [False, True])
def test_zero_lr_equals_each_document_scored_on_its_own(monkeypatch, tilted):
    tilt_env = dict(NGRAM_TILT_ENABLED=1, NGRAM_TILT_ORDER=3, NGRAM_TILT_THRESHOLD=0.3) if tilted else {}
    h = lora_hparams(monkeypatch, TTT_LORA_LR=0, **tilt_env)
    model = make_model(h)
    tokens, spans = doc_stream(DOC_LENGTHS, 12 if tilted else h.vocab_size)  # 8 token ids: contexts recur
    target_bytes = make_target_bytes(tokens)
    result = tg.eval_lora_ttt(model, tokens, target_bytes, h, CPU)
    nats, num_bytes, count = reference_scores(model, tokens, target_bytes, spans, 5, 32, tg.ngram_tilt(tokens, h))
    assert (result.tokens, result.bytes) == (count, num_bytes) == (sum(DOC_LENGTHS), int(target_bytes.sum()))
    assert result.loss * result.tokens == pytest.approx(nats, rel=1e-6)
    if tilted:
        assert result.gated > 10
        untilted = reference_scores(model, tokens, target_bytes, spans, 5, 32)[0]
        assert result.untilted.loss * count == pytest.approx(untilted, rel=1e-6)
        assert abs(untilted - nats) > 1e-3 * abs(nats)  # the tilt does change the score


def test_lora_trains_only_the_adapters_and_phases_train_the_base(monkeypatch):
    h = lora_hparams(monkeypatch)
    model = make_model(h)
    tokens, spans = doc_stream(DOC_LENGTHS, h.vocab_size)
    target_bytes = make_target_bytes(tokens)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = reference_scores(model, tokens, target_bytes, spans, 5, 32)[0]
    adapted = tg.eval_lora_ttt(model, tokens, target_bytes, h, CPU)
    assert adapted.loss * adapted.tokens != pytest.approx(frozen, rel=1e-4)  # the adapters learn within documents
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the base model is untouched
    tg.eval_lora_ttt(model, tokens, target_bytes, lora_hparams(monkeypatch, TTT_MODE="lora_phased"), CPU)
    assert not all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # global SGD, in place
    assert all(p.requires_grad for p in model.parameters())  # restored for whatever runs next


def test_each_batch_resets_b_and_the_optimizer_but_keeps_a(monkeypatch):
    h = lora_hparams(monkeypatch)
    model = make_model(h)
    tokens, spans = doc_stream(DOC_LENGTHS, h.vocab_size)
    target_bytes = make_target_bytes(tokens)
    first, other = torch.tensor([spans[0], spans[5], spans[2]]), torch.tensor([spans[3], spans[9], spans[7]])
    lora = tg.DocumentLoRA(h, num_virtual_layers(h), CPU_DEVICE, seed=0)
    initial_a = [a.detach().clone() for a, _ in (f for t in (*lora.layers, lora.head) for f in t.factors.values())]

    def run(docs):
        totals = torch.zeros(5, dtype=torch.float64)
        with tg.looping_enabled(model):
            tg.lora_ttt_batch(model, tokens, target_bytes, docs, lora, h, totals, None)
        return totals

    for p in model.parameters():
        p.requires_grad_(False)
    scored_first = run(first)
    run(other)  # trains A, B and AdamW's state further
    trained_a = [a for a, _ in (f for t in (*lora.layers, lora.head) for f in t.factors.values())]
    assert not any(torch.equal(a, a0) for a, a0 in zip(trained_a, initial_a))  # A carries over (warm start)
    with torch.no_grad():
        for a, a0 in zip(trained_a, initial_a):
            a.copy_(a0)
    assert torch.equal(run(first), scored_first)  # nothing else carried over: B and the optimizer state restart
    assert scored_first[0].item() != pytest.approx(reference_scores(model, tokens, target_bytes, [spans[i] for i in (0, 5, 2)], 5, 32)[0], rel=1e-4)


# ------------------------------------------------------------------ legality, with an instrumented model

class LoRARecorder(nn.Module):
    """Stands in for GPT on a stream of distinct ids (an id names its position; BOS is 1). The nll of
    target y is a random weight w[y], plus 1000 if an update has already seen y; the backward marks
    what an update sees: the targets with gradient and every input of their rows (BOS aside: the
    document boundaries structure the evaluation). Adapter steps and global SGD (lora=None) are
    marked apart; global SGD counts how often it trained on each target. `seen` may be shared memory."""

    def __init__(self, vocab_size: int, seen: torch.Tensor | None = None) -> None:
        super().__init__()
        self.looping = False
        self.unused = nn.Parameter(torch.zeros(()))
        self.weights = torch.rand(vocab_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        self.seen = torch.zeros(3, vocab_size, dtype=torch.int32) if seen is None else seen  # adapters, SGD, SGD target count
        self.shapes: set[tuple[int, int]] = set()

    def forward(self, input_ids, target_ids, reduction="none", hint_ids=None, lora=None, columns=None):
        self.shapes.add(tuple(input_ids.shape))
        nll = self.weights[target_ids] + 1000.0 * (self.seen[:2].sum(0) > 0)[target_ids]
        hint = None if hint_ids is None else self.weights[hint_ids]  # the tilt (default on) never fires on distinct ids
        if not torch.is_grad_enabled():
            return nll if hint is None else (nll, hint)
        nll = nll + 0.0 * (self.unused if lora is None else sum(f.sum() for f in lora.parameters()))

        def record(grad):
            trained = grad != 0
            marks = torch.cat((target_ids[trained], input_ids[trained.any(1)].flatten()))
            self.seen[0 if lora is not None else 1, marks[marks > tg.BOS_ID]] = 1
            if lora is None:
                self.seen[2, target_ids[trained & (target_ids > tg.BOS_ID)]] += 1
        nll.register_hook(record)
        return nll if hint is None else (nll, hint)


def check_recorded_run(result, recorder, tokens, spans, mode: str) -> None:
    """Every target scored once and none after an update saw it; the adapters saw exactly the documents'
    non-final chunks; global SGD trained on the 4 longest documents only, the 2 longest in both phases."""
    assert result.tokens == tokens.numel() - 1
    assert result.loss * result.tokens == pytest.approx(recorder.weights[tokens[1:]].sum().item(), rel=1e-12)
    ids = lambda targets: {int(tokens[t + 1]) for t in targets if tokens[t + 1] != tg.BOS_ID}  # noqa: E731
    adapted = ids(t for s, e in spans for t in range(s, s + (e - s - 1) // 5 * 5))
    assert set(recorder.seen[0].nonzero().flatten().tolist()) == adapted
    expected_sgd = {i: 0 for i in range(recorder.weights.numel())}
    if mode == "lora_phased":
        expected_sgd.update({i: 1 for i in ids(t for d in PREFIX[2:] for t in range(*spans[d]))})
        expected_sgd.update({i: 2 for i in ids(t for d in PREFIX[:2] for t in range(*spans[d]))})
    assert dict(enumerate(recorder.seen[2].tolist())) == expected_sgd
    assert set(recorder.seen[1].nonzero().flatten().tolist()) == {i for i, n in expected_sgd.items() if n}


@pytest.mark.parametrize("mode,env", [("lora", {}), ("lora_phased", {}), ("lora", dict(TTT_MODE="lora_phased", PHASED_TTT_PREFIX_DOCS=0.01))])
def test_every_target_scored_once_before_any_update_sees_it(monkeypatch, mode, env):
    h = lora_hparams(monkeypatch, **{"TTT_MODE": mode, **env})  # the last: a prefix of 0 documents, phases without SGD
    tokens, spans = doc_stream(DOC_LENGTHS, None)
    recorder = LoRARecorder(tokens.numel() + 1)
    result = tg.eval_lora_ttt(recorder, tokens, make_target_bytes(tokens), h, CPU)
    check_recorded_run(result, recorder, tokens, spans, mode)
    assert recorder.shapes <= {(3, 32), (1, 32), (2, 32)}  # static: a batch of documents (or its last one), or of global SGD sequences


def test_short_chunks_and_long_windows_use_few_static_shapes(monkeypatch):
    h = lora_hparams(monkeypatch, EVAL_SEQ_LEN=256, TTT_CHUNK_SIZE=16, TTT_SHORT_CHUNKS="20:2,45:3")
    tokens, _ = doc_stream(DOC_LENGTHS + (300, 150), None)
    recorder = LoRARecorder(tokens.numel() + 1)
    result = tg.eval_lora_ttt(recorder, tokens, make_target_bytes(tokens), h, CPU)
    assert result.tokens == tokens.numel() - 1
    assert result.loss * result.tokens == pytest.approx(recorder.weights[tokens[1:]].sum().item(), rel=1e-12)
    assert recorder.shapes == {(3, 128), (2, 256)}  # two documents still scored at full windows: MIN_ROWS rows


def test_compiled_blocks_do_not_recompile_per_slot_or_batch(monkeypatch):
    """torch.compile (regional, as compile_model) with a counting backend that runs the graphs eagerly:
    adapters add no graph variant (one forward compiles as many graphs with the 6 slots' adapters as
    without), and a second run over the same documents compiles nothing new (new adapters per batch
    and phase, same window lengths)."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter
    h = lora_hparams(monkeypatch, EVAL_SEQ_LEN=128, TTT_CHUNK_SIZE=16, TTT_MODE="lora_phased")
    tokens, _ = doc_stream((150, 40, 20, 90, 70), h.vocab_size)
    monkeypatch.setattr(torch._dynamo.config, "cache_size_limit", 128)

    def compiled_model() -> tuple[tg.GPT, CompileCounter]:
        torch._dynamo.reset()
        model, counter = make_model(h), CompileCounter()
        for module in (*model.blocks, model.head):
            module.compile(backend=counter, dynamic=False)
        return model, counter

    try:
        x, y = tokens[None, :64].expand(3, 64), tokens[None, 1:65].expand(3, 64)
        frames = []
        for lora in (None, tg.DocumentLoRA(h, num_virtual_layers(h), CPU_DEVICE, seed=0)):
            model, counter = compiled_model()
            with torch.no_grad(), tg.looping_enabled(model):
                model(x, y, reduction="none", lora=lora)
            frames.append(counter.frame_count)
        assert frames[0] == frames[1] > 0
        model, counter = compiled_model()
        tg.eval_lora_ttt(model, tokens, make_target_bytes(tokens), h, CPU)
        compiled = counter.frame_count
        tg.eval_lora_ttt(model, tokens, make_target_bytes(tokens), h, CPU)
        assert 0 < compiled == counter.frame_count
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("compile_mode", ["regional", "full"])
@pytest.mark.parametrize("mode", ["sgd", "lora", "lora_phased"])
def test_warm_up_compiles_every_graph_the_evaluation_runs(monkeypatch, mode, compile_mode):
    """evaluate_artifact compiles (regional or whole-model, with a counting backend that runs the graphs eagerly) and
    warms up on random tokens before its clock: the evaluation that follows, on documents of other lengths (longer
    and shorter than the window, rows dropping at full windows), compiles nothing new. With the warm-up removed it would."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter
    h = lora_hparams(monkeypatch, COMPILE=compile_mode, TTT_MODE=mode, EVAL_SEQ_LEN=128, TTT_CHUNK_SIZE=16,
                     TTT_BATCH_DOCS=16, PHASED_TTT_PREFIX_DOCS=0.25, TTT_CHUNK_TOKENS=512)
    monkeypatch.setattr(torch._dynamo.config, "cache_size_limit", 128)
    counter, real_compile = CompileCounter(), torch.compile
    monkeypatch.setattr(torch, "compile", functools.partial(real_compile, backend=counter))
    state = make_model(h, seed=1).state_dict()
    frames_at_clock_start = []

    def load(blob, model):
        frames_at_clock_start.append(counter.frame_count)
        model.load_state_dict(state)
    monkeypatch.setattr(tg, "read_artifact", lambda path: ({}, b""))
    monkeypatch.setattr(tg, "load_artifact", load)
    monkeypatch.setattr(tg, "build_model", lambda h, runtime, backend: make_model(h))
    tokens, _ = doc_stream((400, 300, 150, 90, 70, 60, 40, 33, 20, 9, 3, 1) * 2, h.vocab_size)
    try:
        result, timing = tg.evaluate_artifact("x.ptz", h, CPU, tg.Logger(CPU, None, ""), "sdpa", tokens, make_target_bytes(tokens))
    finally:
        torch._dynamo.reset()
    assert result.stage == "quantized_ttt" and result.tokens == tokens.numel() - 1 and timing["eval_warmup_s"] > 0
    assert 0 < frames_at_clock_start[0] == counter.frame_count


# ------------------------------------------------------------------ two gloo processes

def lora_evals(runtime: tg.Runtime, state_path: str, seen: torch.Tensor) -> list:
    """lora at LR 0, lora_phased with frozen adapters (global SGD only: no per-rank state), and the recorder."""
    tokens, spans = doc_stream(DOC_LENGTHS, 256)
    target_bytes = make_target_bytes(tokens)
    outcome = []
    for env in (dict(TTT_LORA_LR=0), dict(TTT_LORA_LR=0, TTT_MODE="lora_phased")):
        h = lora_hparams(**env)
        model = make_model(h)
        model.load_state_dict(torch.load(state_path))
        result = tg.eval_lora_ttt(model, tokens, target_bytes, h, runtime)
        weights = torch.cat([p.detach().flatten() for p in model.parameters()])
        every_rank = [torch.empty_like(weights) for _ in range(runtime.world_size)]
        if runtime.comm.active:
            torch.distributed.all_gather(every_rank, weights)
        assert all(torch.equal(w, weights) for w in every_rank[1:])  # the ranks' models stay identical
        outcome.append((result.loss, result.bpb, result.tokens, result.bytes, weights))
    distinct, _ = doc_stream(DOC_LENGTHS, None)
    recorder = LoRARecorder(distinct.numel() + 1, seen)
    result = tg.eval_lora_ttt(recorder, distinct, make_target_bytes(distinct), lora_hparams(TTT_MODE="lora_phased"), runtime)
    return outcome + [result]


def test_two_processes_score_like_one(tmp_path):
    h = lora_hparams()
    state_path, out_path = str(tmp_path / "state.pt"), str(tmp_path / "out.pt")
    torch.save(make_model(h, seed=3).state_dict(), state_path)
    tokens, spans = doc_stream(DOC_LENGTHS, None)
    single_seen, shared_seen = (torch.zeros(3, tokens.numel() + 1, dtype=torch.int32) for _ in range(2))
    single = lora_evals(CPU, state_path, single_seen)
    shared_seen.share_memory_()  # both ranks' recorders mark one table: an update on either rank counts
    mp.spawn(distributed_worker, args=(2, free_port(), state_path, out_path, functools.partial(lora_evals, seen=shared_seen)),
             nprocs=2, join=True)
    double = torch.load(out_path, weights_only=False)
    for (loss1, bpb1, tokens1, bytes1, w1), (loss2, bpb2, tokens2, bytes2, w2) in zip(single[:2], double[:2]):
        assert (tokens1, bytes1) == (tokens2, bytes2) == (sum(DOC_LENGTHS), bytes1)
        assert loss2 == pytest.approx(loss1, rel=1e-5) and bpb2 == pytest.approx(bpb1, rel=1e-5)
        assert torch.allclose(w1, w2, atol=1e-5)  # the same global SGD on two ranks
    recorder = LoRARecorder(tokens.numel() + 1, shared_seen)
    check_recorded_run(double[2], recorder, tokens, spans, "lora_phased")
