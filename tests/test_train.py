"""Training loop and main(): warm-up reset is exact, runs are deterministic, real text gets learned, the whole
script on 2-4 ranks follows one process, and a failing or hung rank ends the job with one line."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_gpt as tg
from tiny import TINY_ENV, free_port, tiny_hparams, write_shards, write_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _setup(monkeypatch, tmp_path, **overrides):
    data = tmp_path / "data"
    write_shards(data / "datasets" / "fineweb10B_sp256", 256)
    h = tiny_hparams(monkeypatch, DATA_DIR=str(data), TRAIN_BATCH_TOKENS=256, MICRO_BATCH_SEQS=4, **overrides)
    runtime = tg.Runtime()
    model = tg.build_model(h, runtime, "sdpa")
    micro, accum = tg.batch_layout(h, runtime)
    loader = tg.TrainLoader(tg.list_shards(h.dataset_dir, "train"), h.train_seq_len, micro, accum, runtime, h.seed, h.vocab_size)
    return h, runtime, model, tg.Optimizers(model, h, runtime), loader, accum


def test_warm_up_restores_weights_optimizer_and_loader_exactly(monkeypatch, tmp_path):
    h, runtime, model, opt, loader, accum = _setup(monkeypatch, tmp_path, WARMUP_STEPS=2)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    steps = []
    real_step = opt.step
    opt.step = lambda *a: steps.append(model.looping) or real_step(*a)
    tg.warm_up_and_reset(model, opt, loader, h, accum)
    assert steps == [False, False, True, True]  # both graph variants ran
    assert model.looping is False
    for k, v in model.state_dict().items():
        assert torch.equal(v, initial[k]), k
    assert len(opt.adam.state) == 0 and all(torch.count_nonzero(b.momentum) == 0 for b in opt.banks)
    # The next batch is the very first batch of a fresh loader.
    fresh = tg.TrainLoader(loader.files, h.train_seq_len, loader.micro_batch_seqs, accum, runtime, h.seed, h.vocab_size)
    for _ in range(3):
        assert all(torch.equal(a, b) for a, b in zip(loader.next_batch(), fresh.next_batch()))
    # And training from here equals training a model that never warmed up.
    opt.step = real_step
    other_h, _, other, other_opt, other_loader, _ = _setup(monkeypatch, tmp_path / "b", WARMUP_STEPS=2)
    loader.load_state_dict(other_loader.state_dict())
    for _ in range(2):
        a = tg.train_step(model, opt, loader, accum, 1.0, 0.95)
        b = tg.train_step(other, other_opt, other_loader, accum, 1.0, 0.95)
        assert torch.equal(a, b)
    for loader_ in (loader, fresh, other_loader):
        loader_.close()


def _run_steps(monkeypatch, tmp_path, name):
    h, runtime, model, opt, loader, accum = _setup(monkeypatch, tmp_path / name, ITERATIONS=6, MAX_WALLCLOCK_SECONDS=0,
                                                    WARMUP_STEPS=1, TRAIN_LOG_EVERY=1, LOG_DIR=str(tmp_path / name / "logs"))
    loader.close()
    log = tg.Logger(runtime, h.log_dir, "run")
    tg.train(model, h, runtime, log, val_tokens=None, val_target_bytes=None)
    lines = [json.loads(l) for l in open(Path(h.log_dir) / "run.jsonl")]
    return [l["train_loss"] for l in lines if l["event"] == "step"], model.state_dict()


def test_same_seed_gives_identical_losses(monkeypatch, tmp_path):
    losses_a, state_a = _run_steps(monkeypatch, tmp_path, "a")
    losses_b, state_b = _run_steps(monkeypatch, tmp_path, "b")
    assert len(losses_a) == 6 and losses_a == losses_b
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_nan_loss_stops_the_run_with_the_step(monkeypatch, tmp_path):
    h, runtime, model, opt, loader, accum = _setup(monkeypatch, tmp_path, ITERATIONS=5, MAX_WALLCLOCK_SECONDS=0,
                                                    WARMUP_STEPS=0, MATRIX_LR=1e30, TIED_EMBED_LR=1e30, SCALAR_LR=1e30)
    loader.close()
    with pytest.raises(tg.TrainingDiverged, match=r"at step \d"):
        tg.train(model, h, runtime, tg.Logger(runtime, None, "x"), val_tokens=None, val_target_bytes=None)


def _mean_val_loss(model, tokens, seq_len):
    n = (tokens.numel() - 1) // seq_len
    x = tokens[: n * seq_len].view(n, seq_len)
    y = tokens[1 : n * seq_len + 1].view(n, seq_len)
    with torch.no_grad():
        return model(x, y).item()


def test_tiny_model_learns_real_text(monkeypatch, tmp_path, corpus_path, sp1024_model_path):
    import lzma

    docs = tmp_path / "docs.jsonl"
    with lzma.open(corpus_path, "rt", encoding="utf-8") as f, open(docs, "w", encoding="utf-8") as out:
        for i, line in enumerate(f):
            if i == 1200:
                break
            out.write(line)
    data = tmp_path / "data"
    subprocess.run([sys.executable, str(ROOT / "data" / "prepare_docs.py"), "--docs", str(docs), "--vocab-size", "1024",
                    "--val-docs", "50", "--out", str(data), "--tokenizer", str(sp1024_model_path), "--workers", "1"],
                   check=True, capture_output=True)
    h = tiny_hparams(monkeypatch, DATA_DIR=str(data), DATASET="docs_sp1024", VOCAB_SIZE=1024, TRAIN_SEQ_LEN=128, EVAL_SEQ_LEN=128,
                     TRAIN_BATCH_TOKENS=2048, MICRO_BATCH_SEQS=16, MAX_WALLCLOCK_SECONDS=0, ITERATIONS=120,
                     WARMUP_STEPS=1, MUON_MOMENTUM_WARMUP_STEPS=20, TRAIN_LOG_EVERY=50)
    runtime = tg.Runtime()
    model = tg.build_model(h, runtime, "sdpa")
    val = tg.load_validation_tokens(h.dataset_dir, h.vocab_size)[:20_000]
    model.looping = True
    before = _mean_val_loss(model, val, 128)
    model.looping = False
    tg.train(model, h, runtime, tg.Logger(runtime, None, "x"), val_tokens=None, val_target_bytes=None)
    model.looping = True
    after = _mean_val_loss(model, val, 128)
    assert before > 6.5  # about ln(1024): an untrained model
    assert after < before - 1.0, (before, after)  # a step count, not a time budget: the same on any machine


class FakeTime:
    """train_gpt's `time` module with a clock that advances 1 s per reading, so that schedule
    tests do not depend on how fast (or loaded) the machine is."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        self.now += 1.0
        return self.now

    def __getattr__(self, name):
        import time
        return getattr(time, name)


def _steps_and_budget(log_dir):
    events = [json.loads(l) for l in open(Path(log_dir) / "run.jsonl")]
    return [e for e in events if e["event"] == "step"], next((e for e in events if e["event"] == "budget"), None)


def test_loop_follows_the_wallclock_schedule(monkeypatch, tmp_path):
    """LR warmdown and the looping switch are driven by the elapsed training time, and training stops
    when the budget minus the measured calibration reserve is spent."""
    h, runtime, model, opt, loader, accum = _setup(monkeypatch, tmp_path, MAX_WALLCLOCK_SECONDS=20, GPTQ_RESERVE_SECONDS=1,
                                                    WARMUP_STEPS=0, TRAIN_LOG_EVERY=1, LOG_DIR=str(tmp_path / "logs"),
                                                    ENABLE_LOOPING_AT=0.3, WARMDOWN_FRAC=0.5, MIN_LR=0.0,
                                                    GPTQ_CALIBRATION_BATCHES=2, AVERAGE_CHECK_SEQS=8)
    loader.close()
    monkeypatch.setattr(tg, "time", FakeTime())
    tg.train(model, h, runtime, tg.Logger(runtime, h.log_dir, "run"), val_tokens=None, val_target_bytes=None)
    steps, budget = _steps_and_budget(h.log_dir)
    assert budget["reserve_s"] >= 1 and budget["train_budget_s"] == pytest.approx(20 - budget["reserve_s"])
    assert len(steps) >= 8
    times = [s["train_time_ms"] / 1000 for s in steps]
    # Stopped as late as possible without crossing the budget (the next step would have).
    assert times[-1] <= budget["train_budget_s"] < 2 * times[-1] - times[-2]
    # Each step's schedule uses the clock after the previous step.
    for prev_t, s in zip([0.0] + times, steps):
        frac = prev_t / budget["train_budget_s"]
        assert s["lr_mult"] == pytest.approx(tg.lr_multiplier(frac, 0.5, 0.0))
        assert s["looping"] == (frac >= 0.3)
    assert steps[0]["lr_mult"] == 1.0 and steps[-1]["lr_mult"] < 0.3
    assert not steps[0]["looping"] and steps[-1]["looping"]


def test_without_a_time_limit_the_schedule_follows_the_step_count(monkeypatch, tmp_path):
    """MAX_WALLCLOCK_SECONDS=0 (step-matched A/B runs): warmdown and looping still happen, at step/ITERATIONS."""
    h, runtime, model, opt, loader, accum = _setup(monkeypatch, tmp_path, MAX_WALLCLOCK_SECONDS=0, ITERATIONS=40,
                                                    WARMUP_STEPS=0, TRAIN_LOG_EVERY=1, LOG_DIR=str(tmp_path / "logs"),
                                                    ENABLE_LOOPING_AT=0.35, WARMDOWN_FRAC=0.85, MIN_LR=0.1,
                                                    TRAIN_SEQ_LEN_SCHEDULE="8@0,16@0.1,32@0.5")
    loader.close()
    shapes = []
    real_forward = model.forward
    model.forward = lambda x, *a, **k: shapes.append(tuple(x.shape)) or real_forward(x, *a, **k)
    tg.train(model, h, runtime, tg.Logger(runtime, h.log_dir, "run"), val_tokens=None, val_target_bytes=None)
    steps, _ = _steps_and_budget(h.log_dir)
    assert len(steps) == 40
    for i, s in enumerate(steps):  # step i+1 is scheduled with the fraction i/40
        assert s["lr_mult"] == pytest.approx(1.0 if i / 40 < 0.15 else 0.1 + 0.9 * (1 - i / 40) / 0.85)
        assert s["looping"] == (i / 40 >= 0.35)
        assert s["attention_span"] == (8 if i / 40 < 0.1 else 16 if i / 40 < 0.5 else 32)
    assert steps[-1]["lr_mult"] < 0.2
    # The span changes the attention mask only: every step reads the same tokens in the same shapes.
    assert len(set(shapes)) == 1 and model.attention_span is None


@pytest.mark.parametrize("drift, expected", [(0.0, "ema"), (5.0, "raw")])
def test_averaged_weights_are_kept_only_when_they_do_better(monkeypatch, tmp_path, drift, expected):
    """The choice uses unseen training batches: an average equal to a trained model wins ties
    against a perturbed raw model; a badly perturbed average loses to the raw weights."""
    h, runtime, model, opt, loader, accum = _setup(monkeypatch, tmp_path, ITERATIONS=8, MAX_WALLCLOCK_SECONDS=0,
                                                    WARMUP_STEPS=0, EMA_DECAY=0.0)
    loader.close()
    loader, averager, _ = tg.train(model, h, runtime, tg.Logger(runtime, None, "x"), val_tokens=None, val_target_bytes=None)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # EMA_DECAY=0: the average equals the trained weights; now move one side
        if drift:
            for a in averager.average:
                a.add_(drift * torch.randn_like(a))
        else:
            for p in model.parameters():
                p.add_(0.5 * torch.randn_like(p))
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    tg.choose_averaged_weights(model, averager, loader, h, runtime, tg.Logger(runtime, None, "x"))
    loader.close()
    reference = trained if expected == "ema" else raw
    assert all(torch.equal(model.state_dict()[k], reference[k]) for k in reference)


def _pipeline_env(root, run_id):
    from tiny import TINY_ENV

    # 12 sequences per step: divisible by 1..4 ranks (micro-batches of 4, 3 or 4, 3).
    return {**TINY_ENV, "VOCAB_SIZE": "1024", "DATA_DIR": str(root / "data"), "TOKENIZER_PATH": str(root / "tok.model"),
            "RUN_ID": run_id, "LOG_DIR": str(root / "logs"), "ITERATIONS": "4", "MAX_WALLCLOCK_SECONDS": "0",
            "WARMUP_STEPS": "1", "TRAIN_BATCH_TOKENS": "384", "MICRO_BATCH_SEQS": "4", "TRAIN_LOG_EVERY": "1",
            "GPTQ_CALIBRATION_BATCHES": "2", "AVERAGE_CHECK_SEQS": "4", "SLIDING_WINDOW_ENABLED": "0",
            "TTT_ENABLED": "0", "OMP_NUM_THREADS": "1"}


def _jsonl(path):
    return [json.loads(line) for line in open(path)]


def _torchrun(world):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]


def _run_script(root, run_id, launcher, script=ROOT / "train_gpt.py", timeout=600, **env):
    """Run the script (or a driver of it) on the pipeline's data; returns the completed process."""
    import os

    env = {**os.environ, **_pipeline_env(root, run_id), **env}
    return subprocess.run(launcher + [str(script)], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A synthetic dataset and tokenizer (no corpus needed), and one process's run on them (gradient
    accumulation 3): the reference every multi-process run must follow."""
    root = tmp_path_factory.mktemp("pipeline")
    write_shards(root / "data" / "datasets" / "fineweb10B_sp1024", 1024, train_tokens=60_000, val_tokens=3_000)
    write_tokenizer(root / "tok.model", 1024)
    done = _run_script(root, "one", [sys.executable])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return root, _jsonl(root / "logs" / "one.jsonl")


def _summary(events):
    config = next(e for e in events if e["event"] == "config")
    return ((config["world_size"], config["grad_accum_steps"]), [e["train_loss"] for e in events if e["event"] == "step"],
            next(e for e in events if e["event"] == "final"))


@pytest.mark.slow
@pytest.mark.parametrize("world, accum", [(2, 2), (3, 1), (4, 1)])
def test_torchrun_follows_one_process(pipeline, world, accum):
    """The whole script under torchrun (gloo, world ranks) follows the same loss curve as one process
    with gradient accumulation, and reaches the same final score."""
    root, one = pipeline
    done = _run_script(root, f"world{world}", _torchrun(world))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (layout_one, losses_one, final_one), (layout, losses, final) = _summary(one), _summary(_jsonl(root / "logs" / f"world{world}.jsonl"))
    assert layout_one == (1, 3) and layout == (world, accum)
    assert len(losses_one) == 4 and losses == pytest.approx(losses_one, rel=1e-4)
    assert final_one["status"] == final["status"] == "ok"
    assert final["val_bpb"] == pytest.approx(final_one["val_bpb"], rel=1e-3)


MODEL_KNOBS = {"VOCAB_SIZE", "NUM_LAYERS", "MODEL_DIM", "NUM_HEADS", "NUM_KV_HEADS", "MLP_MULT", "LOOP_START", "LOOP_END",
               "NUM_LOOPS", "PARALLEL_START", "XSA_LAST_N", "ROPE_DIMS"}


def test_eval_only_rescores_the_saved_artifact(pipeline):
    """EVAL_ONLY re-scores the saved artifact without training, to the same number, rebuilding the
    model from the artifact alone: no model knob is given."""
    import os

    root, one = pipeline
    final = _summary(one)[2]
    env = {k: v for k, v in {**os.environ, **_pipeline_env(root, "rescore")}.items() if k not in MODEL_KNOBS}
    done = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], env={**env, "EVAL_ONLY": final["artifact_path"]},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rescored = _jsonl(root / "logs" / "rescore.jsonl")
    assert not any(e["event"] == "step" for e in rescored)
    rescored_final = next(e for e in rescored if e["event"] == "final")
    assert rescored_final["val_bpb"] == final["val_bpb"]
    assert rescored_final["eval_time_s"] > 0 and rescored_final["eval_time_projected"] is True


def test_requantize_from_quantizes_the_saved_weights_without_training(pipeline):
    """REQUANTIZE_FROM: the run's saved averaged weights, quantized with other quantization knobs (LQER
    on: its factors go through the artifact file and the reload that is scored)."""
    root, one = pipeline
    final = _summary(one)[2]
    done = _run_script(root, "requant", [sys.executable], REQUANTIZE_FROM=final["weights_path"], MATRIX_BITS="4",
                       ARTIFACT_TARGET_BYTES="10000000", LQER_ENABLED="1")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    requant = _jsonl(root / "logs" / "requant.jsonl")
    assert not any(e["event"] == "step" for e in requant)
    report = next(e for e in requant if e["event"] == "artifact")["report"]
    assert report["bits"]["blocks.0.mlp.up.weight"] == 4 and len(report["lqer"]) == 3
    requant_final = next(e for e in requant if e["event"] == "final")
    assert requant_final["status"] == "ok" and requant_final["val_bpb"] != final["val_bpb"]
    # A model knob that disagrees with the saved weights is refused before any data is read.
    done = _run_script(root, "conflict", [sys.executable], REQUANTIZE_FROM=final["weights_path"], MODEL_DIM="32")
    assert done.returncode == 2 and "MODEL_DIM=32 conflicts with the artifact's MODEL_DIM=64" in done.stderr


# A driver that runs the real main() with a fault in rank 1's first optimizer step (test-only: the
# script itself has no fault hook).
FAULT_DRIVER = """import sys, time
sys.path.insert(0, {root!r})
import train_gpt as tg

real_step = tg.Optimizers.step


def step_with_fault(self, *args):
    if self.runtime.rank == 1:
        {fault}
    return real_step(self, *args)


tg.Optimizers.step = step_with_fault
tg.main()
"""


def _fault_driver(path, fault):
    path.write_text(FAULT_DRIVER.format(root=str(ROOT), fault=fault))
    return path


def _failure_lines(done):
    return [line for line in done.stderr.splitlines() if "FAILED: " in line]


@pytest.mark.slow
def test_a_raising_rank_ends_every_rank_with_its_error(pipeline, tmp_path):
    """Two ranks started directly (no torchrun to stop them): rank 1 raises in its first step while
    rank 0 waits in the step's collective. Both exit 1 with rank 1's one-line error at once (the
    timeout is an hour), and the run's log records the failure once."""
    import os

    root, _ = pipeline
    driver = _fault_driver(tmp_path / "raise.py", 'raise tg.DataError("injected fault")')
    env = {**os.environ, **_pipeline_env(root, "raise"), "DIST_TIMEOUT_SECONDS": "3600",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    ranks = [subprocess.Popen([sys.executable, str(driver)], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        outcomes = [rank.communicate(timeout=300) for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    for rank, (_, stderr) in zip(ranks, outcomes):
        assert rank.returncode == 1, stderr[-2000:]
        assert [l for l in stderr.splitlines() if "FAILED: " in l] == ["FAILED: rank 1: DataError: injected fault"], stderr[-2000:]
    finals = [e for e in _jsonl(root / "logs" / "raise.jsonl") if e["event"] == "final"]
    assert finals == [dict(event="final", status="failed", error="rank 1: DataError: injected fault", world_size=2)]
    log_lines = (root / "logs" / "raise.txt").read_text().splitlines()
    assert [l for l in log_lines if l.startswith("FAILED: ")] == ["FAILED: rank 1: DataError: injected fault"]


@pytest.mark.slow
def test_a_hung_rank_fails_the_job_after_the_timeout(pipeline, tmp_path):
    """Under torchrun, rank 1 hangs in its first step: rank 0's collective fails after
    DIST_TIMEOUT_SECONDS with a one-line error, and torchrun then stops rank 1."""
    root, _ = pipeline
    driver = _fault_driver(tmp_path / "hang.py", "time.sleep(3600)")
    done = _run_script(root, "hang", _torchrun(2), script=driver, timeout=300, DIST_TIMEOUT_SECONDS="20")
    assert done.returncode != 0
    lines = _failure_lines(done)
    assert len(lines) == 1 and lines[0].startswith("FAILED: rank 0: ") and "timed out" in lines[0].lower(), done.stderr[-3000:]
    final = next(e for e in _jsonl(root / "logs" / "hang.jsonl") if e["event"] == "final")
    assert final["status"] == "failed" and final["error"] == lines[0].removeprefix("FAILED: ")


@pytest.mark.parametrize("gloo_text", ["[../gloo/transport/tcp/pair.cc:534] Timed out waiting 20000ms for recv operation",
                                       "Application timeout caused pair closure"])
def test_a_collective_timeout_is_named_whatever_gloo_calls_it(monkeypatch, gloo_text):
    """Gloo words its timeouts several ways (the second failed CI once): the failure line names the timeout and
    the knob, and keeps gloo's own text; any other error passes through as 'Type: text'."""
    h = tiny_hparams(monkeypatch, DIST_TIMEOUT_SECONDS="20")
    line = tg.failure_text(RuntimeError(gloo_text), h)
    assert line.startswith("a collective timed out after DIST_TIMEOUT_SECONDS=20 s") and line.endswith(f"RuntimeError: {gloo_text}")
    assert tg.failure_text(ValueError("bad  shape\n here"), h) == "ValueError: bad shape here"
