"""The product shell: records helper, significance test, README env table, run.sh."""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures import FINEWEB_PROVENANCE, SHIPPED_CODE, write_run

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
    assert "python data/cached_challenge_fineweb.py --variant sp8192 --train-shards 80" in readme
    assert sub["dataset"]["source"] == "fineweb" and sub["checks"]["full_validation_set"]["ok"] is True


def test_record_numbers_are_rounded_as_people_read_them(tmp_path):
    log = write_run(tmp_path, "r", val_loss=2.512345678901, val_bpb=1.087654321987, train_time_s=598.04567891,
                    eval_time_s=353.49618530273438, final={"peak_memory_mib": 40123.456})
    rc, out = record(tmp_path, log)
    folder = only_folder(out)
    sub = json.loads((folder / "submission.json").read_text())
    seed = sub["seeds"][0]
    assert (seed["val_loss"], seed["val_bpb"], seed["train_time_s"], seed["eval_time_s"], seed["peak_memory_mib"]) == \
        (2.512346, 1.087654, 598.0, 353.5, 40123)
    assert (sub["val_loss"], sub["checks"]["eval_time_s"]["value"]) == (2.512346, 353.5)
    assert seed["stages"]["quantized_ttt"]["eval_time_s"] == 400.0
    readme = (folder / "README.md").read_text()
    assert "| train_time_s | 598.0 s | 600.0 s | yes |" in readme
    assert f"| total_bytes | {15_900_000 + len(SHIPPED_CODE):,} | 16,000,000 | yes |" in readme


LOCAL_DOCS = {"path": "./data/datasets/docs_sp1024_caseops", "source": "local_docs", "manifest_sha256": "cd" * 32,
              "val_documents": 300, "docs": "/corpus/docs.jsonl.xz", "docs_sha256": "ef" * 32, "tokenizer_train_docs": 5000,
              "caseops": True, "tokenizer_sha256": "12" * 32}


@pytest.mark.parametrize("world_size, launch", [(1, "python train_gpt.py"), (2, "torchrun --standalone --nproc_per_node=2 train_gpt.py")])
def test_record_reproduce_command_builds_the_data_and_launches_as_the_run_did(tmp_path, world_size, launch):
    config = {"data_provenance": LOCAL_DOCS, "dataset": "docs_sp1024_caseops", "vocab_size": 1024, "max_wallclock_seconds": 90.0}
    rc, out = record(tmp_path, write_run(tmp_path, "local", world_size=world_size, device_name="cpu", train_time_s=85.0,
                                         config=config))
    folder = only_folder(out)
    readme = (folder / "README.md").read_text()
    assert rc == 0
    assert ("python data/prepare_docs.py --docs /corpus/docs.jsonl.xz --vocab-size 1024 --val-docs 300 "
            "--tokenizer-docs 5000 --caseops --out ./data") in readme
    [command] = [line for line in readme.splitlines() if line.endswith(f" SEED=1337 RUN_ID=local {launch}")]
    assert {"DATASET=docs_sp1024_caseops", "VOCAB_SIZE=1024", "MAX_WALLCLOCK_SECONDS=90.0"} <= set(command.split())
    assert f"# expect docs sha256 {'ef' * 32}, tokenizer sha256 {'12' * 32}, dataset manifest sha256 {'cd' * 32}" in readme
    assert f"tokenizer sha256: `{'12' * 32}`" in readme and f"dataset manifest sha256: `{'cd' * 32}`" in readme
    assert "local documents `/corpus/docs.jsonl.xz` (not FineWeb)" in readme
    sub = json.loads((folder / "submission.json").read_text())
    assert sub["dataset"] == LOCAL_DOCS
    assert sub["checks"]["full_validation_set"] == {"value": "local_docs, 300 documents",
                                                    "limit": "fineweb, 50,000 documents, every token", "ok": False}


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
    ({"train_time_s": 612.5}, "train_time_s = 612.5 s (limit 600.0 s)"),
    ({"eval_time_s": 640.0}, "eval_time_s = 640.0 s (limit 600.0 s)"),
    # The run's own projection to 8 GPUs decides, not the time measured on fewer.
    ({"world_size": 1, "eval_time_s": 2400.0, "final": {"eval_time_8gpu_s": 640.04, "eval_time_projected": True}},
     "eval_time_s = 640.0 s (limit 600.0 s)"),
    # A smoke run over its own budget, from the run's verdict or (older logs) from MAX_WALLCLOCK_SECONDS.
    ({"train_time_s": 97.26, "config": {"max_wallclock_seconds": 90.0}}, "train_within_own_budget = 97.3 s (limit 90.0 s)"),
    ({"train_time_s": 89.0, "final": {"train_budget_s": 90.0, "train_over_budget": True}},
     "train_within_own_budget = 89.0 s (limit 90.0 s)"),
    ({"config": {"val_max_tokens": 5000}}, "full_validation_set = fineweb, 50,000 documents, first 5,000 tokens only"),
    ({"config": {"data_provenance": {**FINEWEB_PROVENANCE, "source": "local_docs", "docs": "d.jsonl"}}},
     "full_validation_set = local_docs, 50,000 documents (limit fineweb, 50,000 documents, every token)"),
    ({"config": {"data_provenance": {**FINEWEB_PROVENANCE, "val_documents": 2_000}}}, "full_validation_set = fineweb, 2,000 documents"),
    ({"config": {"data_provenance": None}}, "full_validation_set = unknown (the log predates data provenance)"),
])
def test_record_flags_non_compliant_runs(tmp_path, kwargs, problem):
    rc, out = record(tmp_path, write_run(tmp_path, "slow", **kwargs))
    folder = only_folder(out)
    sub = json.loads((folder / "submission.json").read_text())
    assert rc == 0 and sub["compliant"] is False
    assert any(p.startswith(problem) for p in sub["problems"])
    assert (folder / "README.md").read_text().splitlines()[4].startswith("**NOT a compliant record.**")


def script(name: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run records/<name> as a user would: a separate Python process."""
    return subprocess.run([sys.executable, str(REPO / "records" / name), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_make_record_skips_failed_runs_of_a_glob(tmp_path):
    """`--log logs/*.jsonl` over a logs/ folder that also holds a failed and an unfinished run."""
    write_run(tmp_path, "a_failed", seed=1, status="failed")
    write_run(tmp_path, "b_good", seed=2)
    write_run(tmp_path, "c_killed", seed=3, with_final=False)
    out = tmp_path / "records"
    result = script("make_record.py", "--log", *sorted(map(str, (tmp_path / "logs").glob("*.jsonl"))), "--out", str(out),
                    cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        f"make_record: skipped {tmp_path}/logs/a_failed.jsonl: the run failed (RuntimeError: boom)",
        f"make_record: skipped {tmp_path}/logs/c_killed.jsonl: no final event, the run did not finish (crashed, killed or still running)"]
    sub = json.loads((only_folder(out) / "submission.json").read_text())
    assert [s["run_id"] for s in sub["seeds"]] == ["b_good"]


def test_make_record_refuses_when_no_finished_run_remains(tmp_path):
    logs = [str(write_run(tmp_path, "a", status="failed")), str(write_run(tmp_path, "b", with_final=False))]
    result = script("make_record.py", "--log", *logs, "--out", str(tmp_path / "records"))
    assert result.returncode == 1 and not (tmp_path / "records").exists()
    assert result.stderr.splitlines()[-1] == ("make_record: refused: none of the 2 logs is a finished run (skipped above); "
                                              "pass the logs of finished runs")


def test_make_record_refuses_the_one_failed_run_it_was_given(tmp_path):
    log = write_run(tmp_path, "alone", status="failed")
    result = script("make_record.py", "--log", str(log), "--out", str(tmp_path / "records"))
    assert (result.returncode, result.stderr) == (1, f"make_record: refused: {log}: the run failed (RuntimeError: boom); fix it and rerun\n")


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


def test_ci_installs_every_optional_test_dependency():
    """Each pytest.importorskip(...) module is in requirements-dev.txt, which .ci/run installs: CI skips no test."""
    import re

    wanted = {m.split(".")[0] for f in (REPO / "tests").glob("*.py") for m in re.findall(r'importorskip\("([\w.]+)"\)', f.read_text())}
    listed = {re.split(r"[<>=~!\s]", line)[0].lower() for line in (REPO / "requirements-dev.txt").read_text().splitlines()
              if line.strip() and not line.startswith(("#", "-"))}
    assert wanted and wanted <= listed, f"add {sorted(wanted - listed)} to requirements-dev.txt"
    assert "-r requirements-dev.txt" in (REPO / ".ci" / "run").read_text()


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
    one, two, three = (write_run(tmp_path, name, seed=seed) for name, seed in (("one", 1), ("two", 1), ("three", 2)))
    assert significance.main(["--candidate", str(one), "--baseline", str(two), str(three)]) == 1
    assert "needs at least 2" in capsys.readouterr().err


def test_significance_refuses_duplicate_runs(tmp_path):
    a, b, c = (write_run(tmp_path, name, seed=seed) for name, seed in (("a", 1), ("b", 2), ("c", 2)))
    base = [str(write_run(tmp_path, f"base{seed}", seed=seed, val_loss=2.6)) for seed in (1, 2)]
    # The same log twice (here once on each side) counts one run as two samples.
    twice = script("significance.py", "--candidate", str(a), str(b), "--baseline", str(a), base[0])
    assert (twice.returncode, twice.stderr) == (1, f"significance: {a} is given twice (also as {a}); pass each run's log once\n")
    # Two logs of one seed on one side.
    seed = script("significance.py", "--candidate", str(a), str(b), str(c), "--baseline", *base)
    assert (seed.returncode, seed.stderr) == (1, f"significance: --candidate has seed 2 twice ({b} and {c}); "
                                                 "each seed must be a distinct run, so pass every run once\n")


def test_significance_help_states_the_bar():
    result = script("significance.py", "--help")
    text = " ".join(result.stdout.split())
    assert result.returncode == 0
    assert "the mean val_loss improves by at least 0.005 nats" in text and "Welch t-test on the per-seed val_loss gives p < 0.01" in text


# ---- data provenance (train_gpt.py's config event) -------------------------------------------------


def provenance_data(tmp_path, documents, manifest: dict | None):
    """A dataset of the given validation documents (BOS + ids each), with an optional manifest.json."""
    import train_gpt as tg
    from tiny import write_shard

    folder = tmp_path / "data" / "datasets" / "docs_sp1024"
    folder.mkdir(parents=True)
    write_shard(folder / "fineweb_val_000000.bin", [t for doc in documents for t in [tg.BOS_ID, *doc]])
    write_shard(folder / "fineweb_train_000000.bin", [tg.BOS_ID, *range(4, 900)] * 4)
    if manifest is not None:
        (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_dataset_provenance_reads_the_manifest_and_counts_documents(tmp_path, monkeypatch):
    import train_gpt as tg
    from tiny import tiny_hparams

    manifest = {"source": {"kind": "local documents", "path": "corpus/docs.jsonl.xz", "sha256": "ef" * 32}, "caseops": False,
                "tokenizer_docs": 5000, "tokenizer": {"file": "tokenizers/docs_sp1024.model"}}
    folder = provenance_data(tmp_path, [[5, 6, 7], [8], [9, 10]], manifest)
    tokenizer = tmp_path / "tok.model"
    tokenizer.write_bytes(b"some tokenizer bytes")
    h = tiny_hparams(monkeypatch, DATA_DIR=str(tmp_path / "data"), DATASET="docs_sp1024", VOCAB_SIZE=1024, TOKENIZER_PATH=str(tokenizer))
    got = tg.dataset_provenance(h, tg.load_validation_tokens(h.dataset_dir, h.vocab_size))
    assert got == {"path": str(folder), "source": "local_docs",
                   "manifest_sha256": hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest(), "val_documents": 3,
                   "docs": "corpus/docs.jsonl.xz", "docs_sha256": "ef" * 32, "tokenizer_train_docs": 5000, "caseops": False,
                   "tokenizer_sha256": hashlib.sha256(b"some tokenizer bytes").hexdigest()}
    # Without a manifest only a FineWeb download's folder name vouches for FineWeb.
    (folder / "manifest.json").unlink()
    assert tg.dataset_provenance(h, tg.load_validation_tokens(h.dataset_dir, h.vocab_size))["source"] == "unknown"
    fineweb = folder.rename(folder.with_name("fineweb10B_sp1024"))
    h = tiny_hparams(monkeypatch, DATA_DIR=str(tmp_path / "data"), DATASET="", VOCAB_SIZE=1024, TOKENIZER_PATH=str(tokenizer))
    assert tg.dataset_provenance(h, tg.load_validation_tokens(h.dataset_dir, h.vocab_size))["source"] == "fineweb"
    # A local build's manifest in a FineWeb-named folder: the manifest, not the name, decides.
    (fineweb / "manifest.json").write_text(json.dumps({"source": {"kind": "local documents", "path": "d.jsonl"}}))
    assert tg.dataset_provenance(h, tg.load_validation_tokens(h.dataset_dir, h.vocab_size))["source"] == "local_docs"


def test_config_event_names_the_data(tmp_path, monkeypatch, sp1024_model_path):
    """run() logs data_provenance in its config event, counting the split as built (before VAL_MAX_TOKENS)."""
    import train_gpt as tg
    from tiny import tiny_hparams

    provenance_data(tmp_path, [[5, 6], [7, 8, 9], [10], [11, 12]], {"source": {"kind": "local documents", "path": "d.jsonl"}})
    h = tiny_hparams(monkeypatch, DATA_DIR=str(tmp_path / "data"), DATASET="docs_sp1024", VOCAB_SIZE=1024, VAL_MAX_TOKENS=4,
                     TOKENIZER_PATH=str(sp1024_model_path), LOG_DIR=str(tmp_path / "logs"))

    class Stop(Exception):
        pass

    def stop(*args):
        raise Stop
    monkeypatch.setattr(tg, "compile_model", stop)  # the config event is written; training is not needed
    runtime = tg.Runtime()
    with pytest.raises(Stop):
        tg.run(h, runtime, tg.Logger(runtime, h.log_dir, "prov"), "prov")
    [config] = [e for e in map(json.loads, open(tmp_path / "logs" / "prov.jsonl")) if e["event"] == "config"]
    got = config["data_provenance"]
    assert (got["source"], got["val_documents"], got["docs"]) == ("local_docs", 4, "d.jsonl")
    assert got["tokenizer_sha256"] == hashlib.sha256(sp1024_model_path.read_bytes()).hexdigest()


# ---- README env-var table ----------------------------------------------------------------------------


def test_readme_env_table_matches_config_registry():
    registry = env_table.load_registry()
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert env_table.render_table(registry) in readme, "README env table is stale: run python tools/env_table.py"
    for name in ("DATA_DIR", "VOCAB_SIZE", "TTT_ENABLED", "EVAL_STRIDE"):
        assert f"| `{name}` |" in readme


def test_readme_quick_start_works_on_a_fresh_machine():
    """The quick start installs the test requirements before the test command, which run.sh provides."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = readme.split("## Quick start", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.splitlines()]
    assert commands[:2] == ["pip install -r requirements-dev.txt", "bash run.sh test"]
    assert "test) exec \"$PY\" -m pytest -q tests" in (REPO / "run.sh").read_text()


def test_docs_name_no_machine_specific_paths():
    import re

    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        found = re.findall(r"(?<![\w.])/(?:work|root|home|tmp|Users)/\S*", path.read_text(encoding="utf-8"))
        assert not found, f"{path.name} names paths of one machine: {found}"


def test_env_table_check_detects_drift(tmp_path):
    stale = tmp_path / "README.md"
    stale.write_text((REPO / "README.md").read_text(encoding="utf-8").replace("| `SEED` |", "| `SEED_OLD` |"))
    assert env_table.main(["--check", "--readme", str(stale)]) == 1
    assert env_table.main(["--readme", str(stale)]) == 0
    assert env_table.main(["--check", "--readme", str(stale)]) == 0
    assert stale.read_text(encoding="utf-8") == (REPO / "README.md").read_text(encoding="utf-8")


# ---- run.sh ------------------------------------------------------------------------------------------

STUB_DOWNLOADER = 'import sys\nprint("cached_challenge_fineweb: cannot reach huggingface.co; check your network")\nsys.exit(1)\n'

# Builds a tiny dataset in data/prepare_docs.py's layout (DATA_DIR/datasets/docs_sp{V}[_caseops]/ with its
# manifest.json, the tokenizer in DATA_DIR/tokenizers/) and appends its arguments to prepare_calls.jsonl.
STUB_PREPARE_DOCS = """
import argparse, hashlib, json, os
p = argparse.ArgumentParser()
for a in ("--docs", "--vocab-size", "--val-docs", "--out", "--tokenizer-docs", "--workers", "--tokenizer"):
    p.add_argument(a)
p.add_argument("--caseops", action="store_true")
args = p.parse_args()
name = f"docs_sp{args.vocab_size}" + ("_caseops" if args.caseops else "")
d = os.path.join(args.out, "datasets", name)
os.makedirs(d); os.makedirs(os.path.join(args.out, "tokenizers"), exist_ok=True)
for split in ("train", "val"):
    open(os.path.join(d, f"fineweb_{split}_000000.bin"), "wb").write(bytes(1024 + 2 * 100))
tokenizer = os.path.join(args.out, "tokenizers", name + ".model")
open(tokenizer, "wb").write(open(args.tokenizer, "rb").read() if args.tokenizer else b"m")
sha = lambda f: hashlib.sha256(open(f, "rb").read()).hexdigest()
manifest = {"name": name, "source": {"kind": "local documents", "path": args.docs, "sha256": sha(args.docs)},
            "val_docs": int(args.val_docs), "caseops": args.caseops,
            "tokenizer_docs": None if args.tokenizer else int(args.tokenizer_docs or 30000),
            "tokenizer": {"file": f"tokenizers/{name}.model", "sha256": sha(tokenizer)},
            "splits": {"val": {"documents": int(args.val_docs)}}}
json.dump(manifest, open(os.path.join(d, "manifest.json"), "w"))
open("prepare_calls.jsonl", "a").write(json.dumps(vars(args)) + "\\n")
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


@pytest.mark.parametrize("docs, val_max_tokens", [("", "150000"), ("docs.jsonl", "0")])
def test_run_sh_cpu_smoke_config_is_valid(docs, val_max_tokens):
    """run.sh's CPU smoke defaults pass train_gpt.py's config checks, keep room for the post-training work
    inside the budget, and score only a prefix of FineWeb's validation split (a DOCS split is small)."""
    script = ('source run.sh && cpu_smoke_defaults && python -c "import train_gpt; h = train_gpt.Hyperparameters(); '
              'print(h.model_dim, h.vocab_size, h.max_wallclock_seconds, h.gptq_reserve_seconds, h.val_max_tokens)"')
    keep = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    result = subprocess.run(["bash", "-c", script], cwd=REPO, env={**keep, "DOCS": docs}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["64", "1024", "90.0", "20.0", val_max_tokens]


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
    [prep] = prepare_calls(shell_copy)
    assert (prep["docs"], prep["vocab_size"], prep["val_docs"], prep["out"], prep["caseops"]) == ("docs.jsonl", "1024", "100", "./data", False)
    env = json.loads((shell_copy / "train_env.json").read_text())
    assert (env["VOCAB_SIZE"], env["MODEL_DIM"], env["NUM_LAYERS"], env["RUN_ID"]) == ("1024", "64", "3", "smoke_test")
    assert env["DATASET"] == "docs_sp1024"  # a local-docs dataset is not stored under a FineWeb name
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
def prepare_calls(root: Path) -> list[dict]:
    calls = root / "prepare_calls.jsonl"
    return [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []


def prepare_data(cwd: Path, **env) -> subprocess.CompletedProcess:
    """run.sh's data stage alone (sourced), with the settings main() would export; prints the DATASET it exported."""
    keep = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    settings = {"DATA_DIR": "./data", "VOCAB_SIZE": "1024", "VAL_DOCS": "500", "TOKENIZER_DOCS": "5000", **env}
    return subprocess.run(["bash", "-c", 'source run.sh && prepare_data && echo "DATASET=$DATASET"'], cwd=cwd,
                          env={**keep, **settings}, capture_output=True, text=True, timeout=120)


def test_run_sh_reuses_a_docs_dataset_only_when_its_manifest_matches(shell_copy):
    (shell_copy / "data" / "prepare_docs.py").write_text(STUB_PREPARE_DOCS)
    docs = shell_copy / "docs.jsonl"
    docs.write_text('{"text": "hello"}\n')
    folder = "./data/datasets/docs_sp1024"
    fix = f"delete it to rebuild it (rm -r {folder}), or use another DATA_DIR"

    built = prepare_data(shell_copy, DOCS="docs.jsonl")
    assert built.returncode == 0, built.stderr
    assert built.stdout.splitlines()[-1] == "DATASET=docs_sp1024" and len(prepare_calls(shell_copy)) == 1
    same = prepare_data(shell_copy, DOCS="docs.jsonl")
    assert f"==> data: using {folder} and ./data/tokenizers/docs_sp1024.model" in same.stdout
    assert same.returncode == 0 and len(prepare_calls(shell_copy)) == 1  # reused, not rebuilt

    other = prepare_data(shell_copy, DOCS="docs.jsonl", VAL_DOCS="300", TOKENIZER_DOCS="2000")
    assert (other.returncode, other.stderr) == (1, f"run.sh: error: {folder} was built with VAL_DOCS=500, TOKENIZER_DOCS=5000 "
                                                   f"(its manifest.json), not VAL_DOCS=300, TOKENIZER_DOCS=2000; "
                                                   f"rerun with the values it was built with, or {fix}\n")
    old_sha = hashlib.sha256(docs.read_bytes()).hexdigest()
    docs.write_text('{"text": "hello again"}\n')
    new_sha = hashlib.sha256(docs.read_bytes()).hexdigest()
    edited = prepare_data(shell_copy, DOCS="docs.jsonl")
    assert (edited.returncode, edited.stderr) == (1, f"run.sh: error: {folder} was built with DOCS=docs.jsonl (sha256 {old_sha[:12]}) "
                                                     f"(its manifest.json), not DOCS=docs.jsonl (sha256 {new_sha[:12]}); "
                                                     f"rerun with the values it was built with, or {fix}\n")
    tokenizer = shell_copy / "other.model"
    tokenizer.write_bytes(b"another tokenizer")
    given = prepare_data(shell_copy, DOCS="docs.jsonl", TOKENIZER_PATH="other.model")
    assert given.returncode == 1 and "TOKENIZER_PATH=a tokenizer with sha256 " in given.stderr
    assert len(prepare_calls(shell_copy)) == 1  # nothing was rebuilt behind the user's back

    # The case-operator variant is another dataset, built beside the plain one.
    caseops = prepare_data(shell_copy, DOCS="docs.jsonl", CASEOPS="1")
    assert caseops.returncode == 0, caseops.stderr
    assert caseops.stdout.splitlines()[-1] == "DATASET=docs_sp1024_caseops" and prepare_calls(shell_copy)[-1]["caseops"] is True


@pytest.mark.parametrize("env, message", [
    ({"DATASET": "mine"}, "DATASET=mine and DOCS are both set, but DOCS builds docs_sp1024; unset DATASET (or set DATASET=docs_sp1024)"),
    ({"CASEOPS": "yes"}, "CASEOPS=yes must be 0 or 1"),
    ({"VAL_DOCS": "3e2"}, "VAL_DOCS=3e2 must be a whole number of documents"),
    ({"TOKENIZER_PATH": "nope.model"}, "TOKENIZER_PATH=nope.model does not exist; point it at a sentencepiece .model or unset it"),
    ({"manifest": None}, "./data/datasets/docs_sp1024 has no manifest.json, so what it was built from is unknown; "
                         "delete it to rebuild it (rm -r ./data/datasets/docs_sp1024), or use another DATA_DIR"),
])
def test_run_sh_docs_settings_errors(shell_copy, env, message):
    (shell_copy / "docs.jsonl").write_text('{"text": "hello"}\n')
    if "manifest" in env:  # a dataset folder whose origin cannot be checked
        (shell_copy / "data" / "datasets" / "docs_sp1024").mkdir(parents=True)
        env = {}
    result = prepare_data(shell_copy, DOCS="docs.jsonl", **env)
    assert (result.returncode, result.stderr) == (1, f"run.sh: error: {message}\n")


def test_every_knob_is_the_attribute_of_its_lower_case_name():
    """The artifact config and --help read knobs by name: NAME must be Hyperparameters().name.lower()."""
    import train_gpt as tg

    h = tg.Hyperparameters()
    missing = [name for name in tg.CONFIG_REGISTRY if not hasattr(h, name.lower())]
    assert not missing
