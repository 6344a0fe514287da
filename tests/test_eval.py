"""Evaluation section: plain, sliding-window and legal score-first TTT evaluation (SPEC §7)."""
import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import train_gpt as tg
from tiny import end_gloo_rank, tiny_hparams

# Small windows, stride, batches and chunks, so that every plan has several of each.
EVAL_ENV = dict(EVAL_SEQ_LEN=32, EVAL_STRIDE=8, VAL_BATCH_TOKENS=128, TTT_CHUNK_TOKENS=64, TTT_LR=0.05,
                TTT_EPOCHS=2, MICRO_BATCH_SEQS=2)
NUM_TARGETS = 300  # not a multiple of the window or the chunk: the tails must be scored too


def make_hparams(monkeypatch=None, **overrides) -> tg.Hyperparameters:
    return tiny_hparams(monkeypatch, **{**EVAL_ENV, **overrides})


def make_model(h: tg.Hyperparameters, seed: int = 0) -> tg.GPT:
    """A tiny GPT with every parameter perturbed, so that context actually changes the loss
    (zero-initialised projections would make every block a no-op)."""
    torch.manual_seed(seed)
    model = tg.GPT(h)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def make_target_bytes(val_tokens: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Random byte counts, one per target val_tokens[i+1], so a target counted at the wrong position shows."""
    return torch.randint(0, 7, (val_tokens.numel() - 1,), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)


def make_stream(num_targets: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    """BOS, then random tokens with a few BOS document starts."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, vocab_size, (num_targets + 1,), generator=g)
    tokens[::97] = tg.BOS_ID
    return tokens


CPU = tg.Runtime()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: extra CPU threads only contend (and the 2-process test runs two of them)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ------------------------------------------------------------------ scoring plans (pure functions)

@pytest.mark.parametrize("num_targets,seq_len,stride", [(300, 32, 8), (20, 32, 8), (32, 32, 8), (33, 32, 8),
                                                        (101, 32, 32), (100, 16, 7), (1, 4, 1)])
def test_sliding_plan_scores_every_target_once_with_enough_context(num_targets, seq_len, stride):
    windows = tg.sliding_windows(num_targets, seq_len, stride).tolist()
    scored = [t for _, score_from, score_to in windows for t in range(score_from, score_to)]
    assert scored == list(range(num_targets))
    for start, score_from, score_to in windows:
        assert score_to - start <= seq_len  # fits one window
        assert start == 0 or score_from - start >= seq_len - stride  # context of the first scored target


def test_stride_longer_than_the_window_scores_whole_windows():
    assert tg.sliding_windows(70, 32, 64).tolist() == [[0, 0, 32], [32, 32, 64], [38, 64, 70]]


def test_plain_plan_covers_the_tail():
    windows = tg.plain_windows(70, 32).tolist()
    assert windows == [[0, 0, 32], [32, 32, 64], [64, 64, 70]]


def test_chunk_split_keeps_each_window_inside_one_chunk():
    windows = tg.sliding_windows(300, 32, 8)
    pieces = tg.split_at_chunks(windows, 20, 32).tolist()  # 20 is not a multiple of the stride
    assert [t for _, a, b in pieces for t in range(a, b)] == list(range(300))
    for start, score_from, score_to in pieces:
        assert score_from // 20 == (score_to - 1) // 20
        assert 0 <= score_to - start <= 32 and (start == 0 or score_from - start >= 32 - 8)
    # Chunks that the stride divides leave the plan unchanged.
    assert torch.equal(tg.split_at_chunks(windows, 64, 32), windows)


def test_window_batch_never_reads_past_the_scored_span():
    tokens = torch.arange(100, 200)
    inputs, targets, scored = tg.window_batch(tokens, torch.tensor([[10, 15, 20], [0, 0, 0]]), 16)
    assert inputs[0, :10].tolist() == list(range(110, 120)) and (inputs[0, 10:] == tg.PAD_ID).all()
    assert targets[0, :10].tolist() == list(range(111, 121)) and (targets[0, 10:] == tg.PAD_ID).all()
    assert scored[0].nonzero().flatten().tolist() == list(range(5, 10))
    assert not scored[1].any() and (inputs[1] == tg.PAD_ID).all()


# ------------------------------------------------------------------ real model, one process

def test_sliding_equals_full_context_when_stream_fits_one_window(monkeypatch):
    h = make_hparams(monkeypatch)
    model, val = make_model(h), make_stream(20, h.vocab_size)
    target_bytes = make_target_bytes(val)
    model.looping = True
    with torch.no_grad():
        full = model(val[None, :-1], val[None, 1:], reduction="none").double().sum().item() / 20
    model.looping = False
    for result in (tg.eval_sliding(model, val, target_bytes, h, CPU), tg.eval_plain(model, val, target_bytes, h, CPU)):
        assert result.tokens == 20
        assert result.loss == pytest.approx(full, rel=1e-5)
    assert model.looping is False  # restored


def test_sliding_with_stride_equal_to_window_is_plain(monkeypatch):
    # A whole number of windows: otherwise sliding gives the tail more context than plain does.
    h = make_hparams(monkeypatch, EVAL_STRIDE=32)
    model, val = make_model(h), make_stream(9 * 32, h.vocab_size)
    target_bytes = make_target_bytes(val)
    plain, sliding = tg.eval_plain(model, val, target_bytes, h, CPU), tg.eval_sliding(model, val, target_bytes, h, CPU)
    assert sliding.loss == pytest.approx(plain.loss, rel=1e-6)
    assert sliding.bpb == pytest.approx(plain.bpb, rel=1e-6)


def test_counts_and_bytes_match_the_validation_stream(monkeypatch):
    h = make_hparams(monkeypatch)
    model, val = make_model(h), make_stream(NUM_TARGETS, h.vocab_size)
    target_bytes = make_target_bytes(val)
    expected_bytes = int(target_bytes.sum())
    results = [tg.eval_plain(model, val, target_bytes, h, CPU), tg.eval_sliding(model, val, target_bytes, h, CPU),
               tg.eval_ttt(model, val, target_bytes, h, CPU)]
    for r in results:
        assert (r.tokens, r.bytes) == (NUM_TARGETS, expected_bytes), r.stage
        assert r.bpb == pytest.approx(r.loss * r.tokens / (math.log(2) * r.bytes), rel=1e-12)
        assert r.seconds > 0
    assert results[1].loss != pytest.approx(results[0].loss, rel=1e-4)  # context matters in this model


def test_ttt_with_zero_lr_equals_sliding_and_with_lr_changes_weights(monkeypatch):
    h = make_hparams(monkeypatch, TTT_LR=0)
    model, val = make_model(h), make_stream(NUM_TARGETS, h.vocab_size)
    target_bytes = make_target_bytes(val)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sliding = tg.eval_sliding(model, val, target_bytes, h, CPU)
    frozen = tg.eval_ttt(model, val, target_bytes, h, CPU)
    assert frozen.loss == pytest.approx(sliding.loss, rel=1e-12, abs=0)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())

    trained = tg.eval_ttt(model, val, target_bytes, make_hparams(monkeypatch, TTT_LR=0.05), CPU)
    assert trained.loss != pytest.approx(sliding.loss, rel=1e-6)
    assert not all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # in place


# ------------------------------------------------------------------ legality, with an instrumented model

class RecordingModel(nn.Module):
    """Stands in for GPT in a stream whose token ids are distinct (id = target index + 2), so an id
    names its position. Scoring returns, per target, a random weight plus 1000 if the model had
    already trained on that target; training records the targets that receive gradient and checks
    that it never reads a token that was not scored yet."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.looping = False
        self.unused = nn.Parameter(torch.zeros(()))
        self.weights = torch.rand(vocab_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        self.trained = torch.zeros(vocab_size, dtype=torch.bool)
        self.frontier = 0  # highest target id seen by a scoring forward
        self.train_reads_ahead = False

    def forward(self, input_ids, target_ids, reduction="none", hint_ids=None, lora=None, columns=None):
        """The n-gram tilt (on by default) asks for -log p(hint) too: the hint's weight. A stream of distinct ids
        never repeats a context, so the tilt never fires and the checksum below holds with it on."""
        nll = self.nll(input_ids, target_ids)
        return nll if hint_ids is None else (nll, self.weights[hint_ids])

    def nll(self, input_ids, target_ids):
        if not torch.is_grad_enabled():
            self.frontier = max(self.frontier, int(target_ids.max()))
            return self.weights[target_ids] + 1000.0 * self.trained[target_ids]
        self.train_reads_ahead |= int(torch.cat((input_ids, target_ids)).max()) > self.frontier
        nll = self.weights[target_ids] + 0.0 * self.unused

        def record(grad):
            self.trained[target_ids[grad != 0]] = True
        nll.register_hook(record)
        return nll


def distinct_stream(num_targets: int) -> torch.Tensor:
    return torch.cat((torch.tensor([tg.BOS_ID]), torch.arange(2, num_targets + 2)))


def test_ttt_never_scores_a_target_after_training_on_it(monkeypatch):
    h = make_hparams(monkeypatch)
    val = distinct_stream(NUM_TARGETS)
    vocab = NUM_TARGETS + 2
    model = RecordingModel(vocab)
    result = tg.eval_ttt(model, val, make_target_bytes(val), h, CPU)
    # Weighted checksum: every target scored exactly once, none after it was trained on.
    assert result.tokens == NUM_TARGETS
    assert result.loss * result.tokens == pytest.approx(model.weights[val[1:]].sum().item(), rel=1e-12)
    assert not model.train_reads_ahead
    last_chunk_begin = (NUM_TARGETS - 1) // h.ttt_chunk_tokens * h.ttt_chunk_tokens
    trained_targets = (model.trained.nonzero().flatten() - 2).tolist()
    assert trained_targets == list(range(last_chunk_begin))  # every chunk but the last


# ------------------------------------------------------------------ two gloo processes

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_all_evals(runtime: tg.Runtime, state_path: str) -> list:
    h = make_hparams()
    model, val = make_model(h), make_stream(NUM_TARGETS, h.vocab_size)
    target_bytes = make_target_bytes(val)
    model.load_state_dict(torch.load(state_path))
    results = [tg.eval_plain(model, val, target_bytes, h, runtime), tg.eval_sliding(model, val, target_bytes, h, runtime),
               tg.eval_ttt(model, val, target_bytes, h, runtime)]
    recorder = RecordingModel(NUM_TARGETS + 2)
    recorder_val = distinct_stream(NUM_TARGETS)
    results.append(tg.eval_ttt(recorder, recorder_val, make_target_bytes(recorder_val), h, runtime))
    return [(r.loss, r.bpb, r.tokens, r.bytes) for r in results] + [model.state_dict()["tok_emb.weight"]]


def distributed_worker(rank: int, world_size: int, port: int, state_path: str, out_path: str, evals=run_all_evals) -> None:
    """One gloo rank: evals(runtime, state_path), rank 0 saves what it returns to out_path."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    outcome = evals(tg.Runtime(rank, world_size, rank, torch.device("cpu")), state_path)
    if rank == 0:
        torch.save(outcome, out_path)
    end_gloo_rank()


def test_two_processes_match_one(tmp_path):
    h = make_hparams()
    state_path, out_path = str(tmp_path / "state.pt"), str(tmp_path / "out.pt")
    torch.save(make_model(h, seed=3).state_dict(), state_path)
    single = run_all_evals(CPU, state_path)
    mp.spawn(distributed_worker, args=(2, free_port(), state_path, out_path), nprocs=2, join=True)
    double = torch.load(out_path)
    recorder_checksum = single[3][0]
    for (loss1, bpb1, tokens1, bytes1), (loss2, bpb2, tokens2, bytes2) in zip(single[:4], double[:4]):
        assert (tokens1, bytes1) == (tokens2, bytes2) and tokens1 == NUM_TARGETS
        assert loss2 == pytest.approx(loss1, rel=1e-5) and bpb2 == pytest.approx(bpb1, rel=1e-5)
    assert double[3][0] == pytest.approx(recorder_checksum, rel=1e-12)  # exactly once, on two ranks too
    assert torch.allclose(single[4], double[4], atol=1e-5)  # TTT applied the same updates
