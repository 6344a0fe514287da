"""The product shell: records helper, significance test, README env table, run.sh."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures import SHIPPED_CODE, write_run

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "records"))
sys.path.insert(0, str(REPO / "tools"))

import env_table  # noqa: E402
import make_record  # noqa: E402
import significance  # noqa: E402


def record(tmp_path: Path, *logs: Path, name: str = "Stack", extra: tuple[str, ...] = ()) -> tuple[int, Path]:
    out = tmp_path / "records" / "track_10min_16mb"
    argv = [a for log in logs for a in ("--log", str(log))] + ["--name", name, "--out", str(out),
                                                               "--author", "Ada", "--github-id", "ada", *extra]
    return make_record.main(argv), out


def only_folder(out: Path) -> Path:
    folders = [p for p in out.iterdir() if not p.name.startswith(".")]
    assert len(folders) == 1, folders
    return folders[0]


# ---- records/make_record.py ------------------------------------------------------------------------


def test_record_fields_match_the_logs(tmp_path):
    logs = [write_run(tmp_path, f"s{seed}", seed=seed, val_loss=2.5 + 0.01 * i, val_bpb=1.1 + 0.004 * i)
            for i, seed in enumerate((1, 2, 3))]
    rc, out = record(tmp_path, *logs, extra=("--blurb", "three seeds"))
    assert rc == 0
    folder = only_folder(out)
    assert folder.name.endswith("_Stack")
    sub = json.loads((folder / "submission.json").read_text())
    assert (sub["author"], sub["github_id"], sub["name"], sub["blurb"], sub["track"]) == ("Ada", "ada", "Stack", "three seeds", "10min_16mb")
    assert sub["val_loss"] == pytest.approx(2.51) and sub["val_bpb"] == pytest.approx(1.104)
    assert [s["seed"] for s in sub["seeds"]] == [1, 2, 3]
    assert [s["val_bpb"] for s in sub["seeds"]] == pytest.approx([1.1, 1.104, 1.108])
    assert sub["seeds"][0]["stages"]["quantized"]["val_bpb"] == pytest.approx(1.11)
    assert sub["bytes_code"] == len(SHIPPED_CODE)
    assert sub["bytes_total"] == 15_900_000 + len(SHIPPED_CODE)
    assert sub["hardware"] == "8x NVIDIA H100 80GB HBM3"
    assert sub["versions"]["torch_version"] == "2.13.0"
    assert sub["compliant"] is True and sub["problems"] == []
    assert sub["checks"]["train_time_s"] == {"value": 598.0, "limit": 600.0, "ok": True}
    assert (folder / "train_gpt.py").read_bytes() == SHIPPED_CODE
    assert {p.name for p in folder.iterdir()} >= {"README.md", "s1.jsonl", "s1.txt", "s3.jsonl", "s3.txt"}
    readme = (folder / "README.md").read_text()
    assert "Compliant with the 10min_16mb track" in readme and "1.10400" in readme
    assert "SEED=2 RUN_ID=s2 torchrun --standalone --nproc_per_node=8 train_gpt.py" in readme


def test_record_lists_non_default_knobs_in_reproduce_command(tmp_path):
    log = write_run(tmp_path, "lr", config={"matrix_lr": 0.03, "num_layers": 11})
    rc, out = record(tmp_path, log)
    readme = (only_folder(out) / "README.md").read_text()
    assert rc == 0 and "MATRIX_LR=0.03 SEED=1337" in readme and "NUM_LAYERS=" not in readme


@pytest.mark.parametrize("kwargs, reason", [
    ({"status": "failed"}, "the run failed (RuntimeError: boom)"),
    ({"with_final": False}, "no final event"),
    ({"model_bytes": 16_000_000}, "over the 16,000,000 limit"),
])
def test_record_refuses_bad_runs_and_writes_nothing(tmp_path, capsys, kwargs, reason):
    rc, out = record(tmp_path, write_run(tmp_path, "bad", **kwargs))
    assert rc == 1
    assert reason in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_record_refuses_seeds_of_different_configs(tmp_path, capsys):
    a = write_run(tmp_path, "a", seed=1)
    b = write_run(tmp_path, "b", seed=2, config={"num_layers": 12})
    rc, _ = record(tmp_path, a, b)
    err = capsys.readouterr().err
    assert rc == 1 and "config differs" in err and "num_layers" in err


def test_record_refuses_a_log_of_two_runs(tmp_path, capsys):
    log = write_run(tmp_path, "twice")
    log.write_text(log.read_text() * 2)
    rc, _ = record(tmp_path, log)
    assert rc == 1 and "two runs share this RUN_ID" in capsys.readouterr().err


def test_record_refuses_changed_shipped_code(tmp_path, capsys):
    log = write_run(tmp_path, "edited")
    (tmp_path / "submission_edited.py").write_bytes(SHIPPED_CODE + b"# edited\n")
    rc, _ = record(tmp_path, log)
    assert rc == 1 and "changed after the run" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, problem", [
    ({"world_size": 1, "device_name": "cpu"}, "hardware_8xH100 = 1x cpu"),
    ({"train_time_s": 612.5}, "train_time_s = 612.5"),
    ({"eval_time_s": 640.0}, "eval_time_s = 640.0"),
    ({"config": {"val_max_tokens": 5000}}, "full_validation_set = 5000"),
])
def test_record_flags_non_compliant_runs(tmp_path, kwargs, problem):
    rc, out = record(tmp_path, write_run(tmp_path, "slow", **kwargs))
    folder = only_folder(out)
    sub = json.loads((folder / "submission.json").read_text())
    assert rc == 0 and sub["compliant"] is False
    assert any(p.startswith(problem) for p in sub["problems"])
    assert (folder / "README.md").read_text().splitlines()[4].startswith("**NOT a compliant record.**")


# ---- records/significance.py -----------------------------------------------------------------------


# Student t upper-tail table values: P(T > t) for (t, df).
T_TABLE = [(1.0, 1, 0.25), (6.965, 2, 0.01), (3.747, 4, 0.01), (2.015, 5, 0.05), (2.764, 10, 0.01), (1.96, 1e6, 0.025)]


@pytest.mark.parametrize("t, df, p", T_TABLE)
def test_t_distribution_matches_table(t, df, p):
    assert significance.t_sf(t, df) == pytest.approx(p, rel=2e-3)
    assert significance.t_sf(-t, df) == pytest.approx(1 - p, rel=2e-3)


def test_t_distribution_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for t in (-4.0, -0.3, 0.0, 0.7, 2.5, 9.0):
        for df in (0.5, 1, 2.7, 4, 30.2, 500):
            assert significance.t_sf(t, df) == pytest.approx(stats.t.sf(t, df), rel=1e-9, abs=1e-14)


def test_welch_known_example():
    # Reference values from scipy.stats.ttest_ind(c, b, equal_var=False, alternative="less").
    t, df, p = significance.welch_one_sided([2.500, 2.502, 2.499], [2.510, 2.513, 2.509])
    assert (t, df, p) == pytest.approx((6.931810730249703, 3.669724770641982, 0.0015534932229375922), rel=1e-9)
    t, df, p = significance.welch_one_sided([2.500, 2.503, 2.499], [2.504, 2.508, 2.503])
    assert (t, df, p) == pytest.approx((2.22948160685261, 3.7901639344262676, 0.04669557088124261), rel=1e-9)


def test_significance_cli_on_logs_and_submission(tmp_path, capsys):
    cand = [write_run(tmp_path, f"c{s}", seed=s, val_loss=v, val_bpb=v / 2) for s, v in ((1, 2.490), (2, 2.491), (3, 2.4895))]
    base = [write_run(tmp_path, f"b{s}", seed=s, val_loss=v, val_bpb=v / 2) for s, v in ((1, 2.500), (2, 2.5012), (3, 2.4998))]
    assert significance.main(["--candidate", *map(str, cand), "--baseline", *map(str, base)]) == 0
    out = capsys.readouterr().out
    assert "improvement: +0.01017 nats, +0.00508 bpb" in out and "CLEARS the bar" in out

    rc, records = record(tmp_path, *base, name="Base")
    submission = only_folder(records) / "submission.json"
    near = [write_run(tmp_path, f"n{s}", seed=s, val_loss=v) for s, v in ((1, 2.497), (2, 2.4985), (3, 2.4960))]
    assert significance.main(["--candidate", *map(str, near), "--baseline", str(submission)]) == 0
    assert "does NOT clear the bar" in capsys.readouterr().out


def test_significance_needs_two_seeds(tmp_path, capsys):
    one = write_run(tmp_path, "one")
    assert significance.main(["--candidate", str(one), "--baseline", str(one), str(one)]) == 1
    assert "needs at least 2" in capsys.readouterr().err


# ---- README env-var table ----------------------------------------------------------------------------


def test_readme_env_table_matches_config_registry():
    registry = env_table.load_registry()
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert env_table.render_table(registry) in readme, "README env table is stale: run python tools/env_table.py"
    for name in ("DATA_DIR", "VOCAB_SIZE", "TTT_ENABLED", "EVAL_STRIDE"):
        assert f"| `{name}` |" in readme


def test_env_table_check_detects_drift(tmp_path):
    stale = tmp_path / "README.md"
    stale.write_text((REPO / "README.md").read_text(encoding="utf-8").replace("| `SEED` |", "| `SEED_OLD` |"))
    assert env_table.main(["--check", "--readme", str(stale)]) == 1
    assert env_table.main(["--readme", str(stale)]) == 0
    assert env_table.main(["--check", "--readme", str(stale)]) == 0
    assert stale.read_text(encoding="utf-8") == (REPO / "README.md").read_text(encoding="utf-8")


# ---- run.sh ------------------------------------------------------------------------------------------

STUB_DOWNLOADER = 'import sys\nprint("cached_challenge_fineweb: cannot reach huggingface.co; check your network")\nsys.exit(1)\n'

# Builds a tiny dataset layout and records its arguments, as data/prepare_docs.py would.
STUB_PREPARE_DOCS = """
import argparse, json, os, sys
p = argparse.ArgumentParser()
for a in ("--docs", "--vocab-size", "--val-docs", "--out", "--tokenizer-docs", "--workers", "--tokenizer"):
    p.add_argument(a)
args = p.parse_args()
d = os.path.join(args.out, "datasets", f"fineweb10B_sp{args.vocab_size}")
os.makedirs(d); os.makedirs(os.path.join(args.out, "tokenizers"))
for split in ("train", "val"):
    open(os.path.join(d, f"fineweb_{split}_000000.bin"), "wb").write(bytes(1024 + 2 * 100))
open(os.path.join(args.out, "tokenizers", f"fineweb_{args.vocab_size}_bpe.model"), "wb").write(b"m")
json.dump(vars(args), open("prepare_args.json", "w"))
"""

# Stands in for train_gpt.py: run as a script it records its env and writes a finished run's logs;
# imported (by the records helper, for the config defaults) it is the real module.
STUB_TRAIN = """
import json, os, sys
from pathlib import Path
if __name__ == "__main__":
    sys.path.insert(0, {tests!r})
    from fixtures import write_run
    json.dump(dict(os.environ), open("train_env.json", "w"))
    write_run(Path("."), os.environ["RUN_ID"], world_size=1, device_name="cpu", train_time_s=90.0, eval_time_s=60.0)
else:
    from real_train_gpt import *
"""


@pytest.fixture
def shell_copy(tmp_path):
    """A copy of the repo's shell (run.sh, records/, tools/) with stub data tools and no data."""
    for name in ("run.sh", "requirements.txt"):
        shutil.copy(REPO / name, tmp_path / name)
    for folder in ("records", "tools"):
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__", "track_*"))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "cached_challenge_fineweb.py").write_text(STUB_DOWNLOADER)
    (tmp_path / "train_gpt.py").write_text("raise SystemExit('train_gpt.py must not run without data')\n")
    return tmp_path


def run_sh(cwd: Path, **env) -> subprocess.CompletedProcess:
    keep = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    return subprocess.run(["bash", "run.sh"], cwd=cwd, env={**keep, "HF_HUB_OFFLINE": "1", **env},
                          capture_output=True, text=True, timeout=120)


def test_run_sh_syntax():
    subprocess.run(["bash", "-n", str(REPO / "run.sh")], check=True)
    assert os.access(REPO / "run.sh", os.X_OK)


def test_run_sh_cpu_smoke_config_is_valid():
    """run.sh's CPU smoke defaults must pass train_gpt.py's config checks."""
    script = 'source run.sh && cpu_smoke_defaults && python -c "import train_gpt; h = train_gpt.Hyperparameters(); print(h.model_dim, h.vocab_size)"'
    keep = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    result = subprocess.run(["bash", "-c", script], cwd=REPO, env=keep, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["64", "1024"]


def test_run_sh_without_data_says_what_to_do(shell_copy):
    result = run_sh(shell_copy)
    assert result.returncode != 0
    assert "cannot reach huggingface.co" in result.stdout
    assert "run.sh: error: no training data" in result.stderr and "DOCS=path/to/docs.jsonl.xz bash run.sh" in result.stderr
    assert "pip install" not in result.stdout + result.stderr
    assert "must not run" not in result.stderr


def test_run_sh_rejects_missing_docs(shell_copy):
    result = run_sh(shell_copy, DOCS=str(shell_copy / "nope.jsonl.xz"))
    assert result.returncode != 0 and "nope.jsonl.xz does not exist" in result.stderr


def test_run_sh_cpu_pipeline_from_docs(shell_copy):
    """DOCS -> prepare_docs with the smoke split -> python train_gpt.py with the CPU config -> a flagged record."""
    (shell_copy / "data" / "prepare_docs.py").write_text(STUB_PREPARE_DOCS)
    shutil.copy(REPO / "train_gpt.py", shell_copy / "real_train_gpt.py")
    (shell_copy / "train_gpt.py").write_text(STUB_TRAIN.format(tests=str(REPO / "tests")))
    (shell_copy / "docs.jsonl").write_text('{"text": "hello"}\n')
    result = run_sh(shell_copy, DOCS="docs.jsonl", RUN_ID="smoke_test", NUM_LAYERS="3")
    assert result.returncode == 0, result.stderr
    prep = json.loads((shell_copy / "prepare_args.json").read_text())
    assert (prep["docs"], prep["vocab_size"], prep["val_docs"], prep["out"]) == ("docs.jsonl", "1024", "500", "./data")
    env = json.loads((shell_copy / "train_env.json").read_text())
    assert (env["VOCAB_SIZE"], env["MODEL_DIM"], env["NUM_LAYERS"], env["RUN_ID"]) == ("1024", "64", "3", "smoke_test")
    [folder] = (shell_copy / "records" / "track_10min_16mb").iterdir()
    assert folder.name.endswith("_smoke_test")
    assert json.loads((folder / "submission.json").read_text())["compliant"] is False
    assert "not a compliant record" in result.stderr


# ---- train_gpt.py's command line: help, refusals before any data is read ------------------------------


def run_train_gpt(*args, **env) -> subprocess.CompletedProcess:
    keep = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "PYTHONPATH") if k in os.environ}
    return subprocess.run([sys.executable, str(REPO / "train_gpt.py"), *args], env={**keep, "DATA_DIR": "/nonexistent", **env},
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_every_knob_and_exits(flag):
    done = run_train_gpt(flag, SEED="not-a-number")  # help never parses the environment
    assert done.returncode == 0, done.stderr
    for name in ("DATA_DIR", "MATRIX_LR", "EVAL_ONLY", "REQUANTIZE_FROM", "ATTN_CLIP_SIGMAS"):
        assert name in done.stdout
    assert "[model]" in done.stdout and "default 0.026" in done.stdout


def one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


def test_eval_only_missing_file_is_one_line(tmp_path):
    line = one_line_error(run_train_gpt(EVAL_ONLY=str(tmp_path / "nope.ptz")))
    assert line == f"artifact error: {tmp_path / 'nope.ptz'}: artifact not found; EVAL_ONLY takes the path of a final_model.<RUN_ID>.ptz written by train_gpt.py"


def test_eval_only_rejects_a_file_that_is_not_an_artifact(tmp_path):
    (tmp_path / "x.ptz").write_text("#!/bin/sh\n")
    line = one_line_error(run_train_gpt(EVAL_ONLY=str(tmp_path / "x.ptz")))
    assert line.startswith(f"artifact error: {tmp_path / 'x.ptz'}: not an artifact of train_gpt.py")


def test_eval_only_takes_model_knobs_from_the_artifact_and_refuses_conflicts(tmp_path):
    import train_gpt as tg

    path = tmp_path / "a.ptz"
    config = {"MODEL_DIM": 64, "NUM_HEADS": 4, "NUM_KV_HEADS": 2, "ROPE_DIMS": 8, "MLP_MULT": 3}
    path.write_bytes(tg.pack_artifact(config, b"B"))
    line = one_line_error(run_train_gpt(EVAL_ONLY=str(path), MODEL_DIM="128"))
    assert line.startswith("config error: MODEL_DIM=128 conflicts with the artifact's MODEL_DIM=64")
    # The knobs come from the artifact without any env var; the same value given again is fine.
    h = tg.Hyperparameters(fixed=tg.read_artifact(str(path))[0])
    assert (h.model_dim, h.num_heads, h.mlp_mult) == (64, 4, 3)
    os.environ["MODEL_DIM"] = "64"
    try:
        assert tg.Hyperparameters(fixed=config).model_dim == 64
    finally:
        del os.environ["MODEL_DIM"]


def test_record_config_without_a_gpu_is_refused_up_front():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    line = one_line_error(run_train_gpt())
    assert line.startswith("config error: no GPU, and one micro-batch of this config needs ~")
    assert "bash run.sh" in line
