"""Package finished runs as a records folder: README.md, submission.json, the shipped code and the logs.

    python records/make_record.py --log logs/seed1.jsonl --log logs/seed2.jsonl --log logs/seed3.jsonl \
        --name MyStack --author "Ada" --github-id ada --blurb "what changed"

Writes <out>/<YYYY-MM-DD>_<name>/. Of several logs (`--log logs/*.jsonl`), runs that failed or did not
finish are skipped with a one-line notice each; it refuses (exit 1, nothing written) when no finished run
remains, when the one log given failed, when an artifact is over 16,000,000 bytes, or when the runs are
not seeds of one submission. Runs that are not on 8xH100, break the 600 s train/eval limits or their own
training budget, or are not scored on FineWeb's full validation split ARE written, but flagged
`"compliant": false` with the reasons, in submission.json and at the top of README.md: they are useful as
documented experiments, never as record claims. Every flag is computed from the logs.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from runlog import RunLog, RunLogError, finished_ok, read_run_log, unfinished_reason

REPO = Path(__file__).resolve().parent.parent
ARTIFACT_LIMIT_BYTES = 16_000_000
TRAIN_LIMIT_S = 600.0
EVAL_LIMIT_S = 600.0
RECORD_WORLD_SIZE = 8
RECORD_GPU = "H100"
FINEWEB_VAL_DOCUMENTS = 50_000  # the challenge's validation split: the first 50,000 FineWeb documents
# Config keys that may differ between the seeds of one submission.
PER_SEED_KEYS = {"event", "seed", "run_id"}
# Knobs left out of the reproduce command's overrides: per seed, or paths of the machine that ran it.
NOT_OVERRIDES = {"RUN_ID", "SEED", "DATA_DIR", "LOG_DIR", "TOKENIZER_PATH", "EVAL_ONLY"}


def fail(msg: str) -> None:
    raise RunLogError(msg)


# ---- reading and checking the runs -----------------------------------------------------------------


def usable_runs(paths: list[Path]) -> list[RunLog]:
    """The finished runs among the logs. Of several logs, failed or unfinished runs are skipped with a notice
    (a glob over logs/ catches them); the one log named alone must be finished."""
    logs = [read_run_log(p) for p in paths]
    if len(logs) == 1:
        return logs
    usable = []
    for log in logs:
        reason = unfinished_reason(log)
        if reason:
            print(f"make_record: skipped {log.path}: {reason}", file=sys.stderr)
        else:
            usable.append(log)
    if not usable:
        fail(f"none of the {len(logs)} logs is a finished run (skipped above); pass the logs of finished runs")
    return usable


def check_run(log: RunLog) -> dict:
    """The final event of a finished, in-budget run; RunLogError otherwise."""
    final = finished_ok(log)
    if final["total_bytes"] > ARTIFACT_LIMIT_BYTES:
        fail(f"{log.path}: artifact is {final['total_bytes']:,} bytes, over the {ARTIFACT_LIMIT_BYTES:,} limit; "
             "shrink the model or its bits and rerun")
    if not log.config:
        fail(f"{log.path}: no config event; was it written by train_gpt.py?")
    return final


def shipped_code(log: RunLog) -> Path:
    """The generated submission copy of train_gpt.py named by the run, checked against the logged size."""
    raw = log.final.get("shipped_code_path")
    if not raw:
        fail(f"{log.path}: final event has no shipped_code_path; the run did not write its submission code")
    candidates = [Path(raw), log.path.parent.parent / raw, log.path.parent / Path(raw).name]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        fail(f"{log.path}: shipped code {raw} not found; run make_record.py from the folder the run was launched in")
    logged = log.artifact.get("code_bytes")
    if logged is not None and path.stat().st_size != logged:
        fail(f"{path} is {path.stat().st_size} bytes but the run logged code_bytes={logged}; it changed after the run")
    return path


def check_same_submission(logs: list[RunLog], codes: list[Path]) -> None:
    """Several --log files must be seeds of one submission: same code, same config, distinct seeds."""
    seeds = [log.seed for log in logs]
    if len(set(seeds)) != len(seeds):
        fail(f"seeds repeat ({seeds}); pass one log per distinct SEED")
    first = {k: v for k, v in logs[0].config.items() if k not in PER_SEED_KEYS}
    for log, code in zip(logs[1:], codes[1:]):
        other = {k: v for k, v in log.config.items() if k not in PER_SEED_KEYS}
        differing = sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k))
        if differing:
            fail(f"{log.path}: config differs from {logs[0].path} in {', '.join(differing)}; one record = one config")
        if sha256(code) != sha256(codes[0]):
            fail(f"{code} differs from {codes[0]}; all seeds must ship the same code")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- what the record says ----------------------------------------------------------------------------


def hardware(log: RunLog) -> str:
    return f"{log.final['world_size']}x {log.config.get('device_name', 'unknown device')}"


def train_over_own_budget(log: RunLog) -> bool:
    """The run's own verdict when it logged one; older logs: training took longer than MAX_WALLCLOCK_SECONDS."""
    if "train_over_budget" in log.final:
        return bool(log.final["train_over_budget"])
    budget = float(log.config.get("max_wallclock_seconds") or 0)
    return budget > 0 and log.final["train_time_s"] > budget


def eval_time_8gpu(log: RunLog) -> tuple[float, bool]:
    """(evaluation seconds on 8 GPUs, whether that is the run's projection rather than a measurement)."""
    if log.final.get("eval_time_8gpu_s") is not None:
        return log.final["eval_time_8gpu_s"], bool(log.final.get("eval_time_projected"))
    return log.final["eval_time_s"], False  # older logs: measured on the run's own hardware


def validation_set(log: RunLog) -> tuple[str, bool]:
    """Which validation text the score covers, and whether it is the challenge's: every token of FineWeb's
    50,000-document validation split (a local-docs split is not, however many documents it has)."""
    provenance = log.config.get("data_provenance") or {}
    source, documents = provenance.get("source", "unknown (the log predates data provenance)"), provenance.get("val_documents")
    prefix = int(log.config.get("val_max_tokens") or 0)
    text = source + (f", {documents:,} documents" if documents is not None else "") + (f", first {prefix:,} tokens only" if prefix else "")
    return text, source == "fineweb" and documents == FINEWEB_VAL_DOCUMENTS and not prefix


def readable(name: str, value) -> str:
    """A check's value as a person reads it: seconds to 0.1 s, bytes with thousands separators."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:.1f} s" if name.endswith("_s") or "budget" in name else f"{value:,}"


def compliance(logs: list[RunLog]) -> dict:
    """Each challenge limit with the worst measured value over the seeds, and whether it holds."""
    on_record_hw = all(log.final["world_size"] == RECORD_WORLD_SIZE and RECORD_GPU in str(log.config.get("device_name", ""))
                       for log in logs)
    train_s = round(max(log.final["train_time_s"] for log in logs), 1)
    budgets = [log.final.get("train_budget_s") or float(log.config.get("max_wallclock_seconds") or 0) for log in logs]
    evals = [eval_time_8gpu(log) for log in logs]
    sets = [validation_set(log) for log in logs]
    checks = {
        "hardware_8xH100": {"value": ", ".join(sorted({hardware(log) for log in logs})), "limit": f"{RECORD_WORLD_SIZE}x {RECORD_GPU}",
                            "ok": on_record_hw},
        "train_time_s": {"value": train_s, "limit": TRAIN_LIMIT_S, "ok": train_s <= TRAIN_LIMIT_S},
        # A smoke run's own budget (MAX_WALLCLOCK_SECONDS) binds it like the 600 s binds a record run.
        "train_within_own_budget": {"value": train_s, "limit": round(min(budgets), 1) if min(budgets) > 0 else "none",
                                    "ok": not any(train_over_own_budget(log) for log in logs)},
        "eval_time_s": {"value": round(max(t for t, _ in evals), 1), "limit": EVAL_LIMIT_S,
                        "projected_to_8_gpus": any(projected for _, projected in evals)},
        "total_bytes": {"value": max(log.final["total_bytes"] for log in logs), "limit": ARTIFACT_LIMIT_BYTES},
        "full_validation_set": {"value": "; ".join(sorted({text for text, _ in sets})),
                                "limit": f"fineweb, {FINEWEB_VAL_DOCUMENTS:,} documents, every token", "ok": all(ok for _, ok in sets)},
    }
    for name in ("eval_time_s", "total_bytes"):
        checks[name]["ok"] = checks[name]["value"] <= checks[name]["limit"]
    problems = [f"{name} = {readable(name, c['value'])} (limit {readable(name, c['limit'])})" for name, c in checks.items() if not c["ok"]]
    return {"compliant": not problems, "problems": problems, "checks": checks}


def seed_result(log: RunLog) -> dict:
    """One seed's numbers, rounded as a person reads them (losses to 1e-6, seconds to 0.1 s)."""
    f = log.final
    return {
        "seed": log.seed, "run_id": log.run_id, "val_loss": round(f["val_loss"], 6), "val_bpb": round(f["val_bpb"], 6),
        "final_stage": f.get("final_stage"), "train_time_s": round(f["train_time_s"], 1), "eval_time_s": round(f["eval_time_s"], 1),
        "total_bytes": f["total_bytes"], "world_size": f["world_size"],
        "peak_memory_mib": round(f["peak_memory_mib"]) if f.get("peak_memory_mib") is not None else None,
        "stages": {e["stage"]: {"val_loss": round(e["val_loss"], 6), "val_bpb": round(e["val_bpb"], 6),
                                "eval_time_s": round(e["eval_time_ms"] / 1000, 1) if e.get("eval_time_ms") is not None else None}
                   for e in log.evals},
        "log": log.path.name,
    }


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return round(statistics.fmean(values), 6), (round(statistics.stdev(values), 6) if len(values) > 1 else None)


def build_submission(logs: list[RunLog], args, date: str, track: str) -> dict:
    seeds = [seed_result(log) for log in logs]
    first = logs[0]
    (loss, loss_std), (bpb, bpb_std) = mean_std([s["val_loss"] for s in seeds]), mean_std([s["val_bpb"] for s in seeds])
    return {
        "author": args.author, "github_id": args.github_id, "name": args.name, "blurb": args.blurb,
        "date": date, "track": track,
        "val_loss": loss, "val_bpb": bpb, "val_loss_std": loss_std, "val_bpb_std": bpb_std,
        "final_stage": first.final.get("final_stage"),
        "seeds": seeds,
        "bytes_total": max(s["total_bytes"] for s in seeds),
        "bytes_code": first.artifact.get("code_bytes"),
        "bytes_model": max(log.artifact.get("model_bytes", 0) for log in logs) or None,
        "compressor": first.artifact.get("compressor"),
        "hardware": hardware(first),
        "versions": {k: first.config.get(k) for k in ("torch_version", "python_version", "attention_backend")},
        "num_params": first.config.get("num_params"),
        "dataset": first.config.get("data_provenance"),
        **compliance(logs),
    }


def data_command(log: RunLog) -> list[str]:
    """The command that builds (or fetches) the run's dataset into ./data, and the hashes to check it against."""
    provenance, vocab = log.config.get("data_provenance") or {}, log.config.get("vocab_size")
    hashes = [f"{what} sha256 {provenance[key]}" for what, key in (("docs", "docs_sha256"), ("tokenizer", "tokenizer_sha256"),
                                                                   ("dataset manifest", "manifest_sha256")) if provenance.get(key)]
    check = ["# expect " + ", ".join(hashes)] if hashes else []
    if provenance.get("source") == "local_docs":
        tokenizer = (f"--tokenizer-docs {provenance['tokenizer_train_docs']}" if provenance.get("tokenizer_train_docs")
                     else "--tokenizer TOKENIZER.model")
        return [f"python data/prepare_docs.py --docs {provenance['docs']} --vocab-size {vocab} --val-docs {provenance['val_documents']} "
                f"{tokenizer}{' --caseops' if provenance.get('caseops') else ''} --out ./data", *check]
    if provenance.get("source") == "fineweb":
        return [f"python data/cached_challenge_fineweb.py --variant sp{vocab} --train-shards {log.data.get('train_shards', 80)}", *check]
    return [f"# dataset {provenance.get('path', '(not logged)')}: its origin is unknown (no manifest.json); put it in ./data first", *check]


def launch_command(world_size: int) -> str:
    """How train_gpt.py was started: python for one process, torchrun for several."""
    return "python train_gpt.py" if world_size == 1 else f"torchrun --standalone --nproc_per_node={world_size} train_gpt.py"


def config_overrides(config: dict) -> dict[str, object]:
    """Env vars whose logged value differs from train_gpt.py's default (env name = attribute name upper-cased)."""
    sys.path.insert(0, str(REPO / "tools"))
    from env_table import load_registry

    registry = load_registry()
    overrides = {}
    for attr, value in config.items():
        knob = registry.get(attr.upper())
        if knob is None or knob.name in NOT_OVERRIDES:
            continue
        default = knob.default
        same = float(value) == float(default) if knob.kind in ("int", "float", "bool") else str(value) == str(default)
        if not same:
            overrides[knob.name] = int(value) if knob.kind == "bool" else value
    return overrides


def render_readme(sub: dict, logs: list[RunLog], overrides: dict) -> str:
    config = logs[0].config
    lines = [f"# {sub['name']}", "", sub["blurb"] or "(no blurb)", ""]
    if sub["compliant"]:
        lines += [f"**Compliant with the {sub['track']} track** (checked from the logs: 8xH100, train <= 600 s, "
                  "eval <= 600 s, artifact <= 16,000,000 bytes, FineWeb's full validation split).", ""]
    else:
        lines += ["**NOT a compliant record.** " + "; ".join(sub["problems"]) + ".", ""]
    std = f" ± {sub['val_bpb_std']:.5f}" if sub["val_bpb_std"] is not None else ""
    lines += [f"Mean val_bpb **{sub['val_bpb']:.5f}**{std} over {len(sub['seeds'])} seed(s) "
              f"(val_loss {sub['val_loss']:.5f} nats, stage `{sub['final_stage']}`).", "",
              "## Results", "",
              "| seed | val_loss (nats) | val_bpb | stage | train s | eval s | total bytes |",
              "|---|---|---|---|---|---|---|"]
    for s in sub["seeds"]:
        lines.append(f"| {s['seed']} | {s['val_loss']:.5f} | {s['val_bpb']:.5f} | {s['final_stage']} | "
                     f"{s['train_time_s']:.1f} | {s['eval_time_s']:.1f} | {s['total_bytes']:,} |")
    lines += ["", f"Artifact: {sub['bytes_total']:,} bytes total (code {sub['bytes_code']:,}, model {sub['bytes_model'] or 0:,}, "
              f"{sub['compressor']}); limit {ARTIFACT_LIMIT_BYTES:,}.", "",
              "## Compliance (measured)", "", "| check | measured | limit | ok |", "|---|---|---|---|"]
    for name, c in sub["checks"].items():
        note = " (projected to 8 GPUs)" if c.get("projected_to_8_gpus") else ""
        lines.append(f"| {name} | {readable(name, c['value'])}{note} | {readable(name, c['limit'])} | {'yes' if c['ok'] else 'NO'} |")
    data = sub["dataset"] or {}
    origin = {"fineweb": "FineWeb (the challenge's data)", "local_docs": f"local documents `{data.get('docs')}` (not FineWeb)"}
    lines += ["", "## Data", "", f"- dataset: `{data.get('path', '(not logged)')}`, {origin.get(data.get('source'), 'origin unknown')}",
              f"- validation documents: {data.get('val_documents', '(not logged)')} (the challenge's FineWeb split has {FINEWEB_VAL_DOCUMENTS:,})",
              f"- dataset manifest sha256: `{data.get('manifest_sha256')}`", f"- tokenizer sha256: `{data.get('tokenizer_sha256')}`",
              "", "## Hardware and versions", "", f"- hardware: {sub['hardware']}"]
    lines += [f"- {k}: {v}" for k, v in sub["versions"].items()]
    env = " ".join(f"{k}={v}" for k, v in overrides.items())
    lines += ["", "## Reproduce", "", "From the project root: build the same data, then run each seed.", "",
              "```bash", *data_command(logs[0]),
              *[f"{env + ' ' if env else ''}SEED={s['seed']} RUN_ID={s['run_id']} {launch_command(s['world_size'])}" for s in sub["seeds"]],
              "```", "", "## Configuration (as logged)", "", "| key | value |", "|---|---|"]
    lines += [f"| {k} | `{v}` |" for k, v in config.items() if k != "event"]
    lines += ["", "## Files", "", "- `train_gpt.py`: the shipped code (its size is `bytes_code`)",
              "- `submission.json`: the numbers above, machine-readable",
              *[f"- `{s['log']}` (+ `.txt`): the log of seed {s['seed']}" for s in sub["seeds"]], ""]
    return "\n".join(lines)


# ---- writing the folder ------------------------------------------------------------------------------


def folder_name(date: str, name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")
    if not slug:
        fail(f"--name {name!r} has no usable characters; use letters, digits, . _ -")
    return f"{date}_{slug}"


def write_record(logs: list[RunLog], codes: list[Path], args) -> tuple[Path, dict]:
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    track = args.out.name.removeprefix("track_")
    target = args.out / folder_name(date, args.name)
    if target.exists():
        fail(f"{target} already exists; pick another --name or remove it")
    submission = build_submission(logs, args, date, track)
    readme = render_readme(submission, logs, config_overrides(logs[0].config))

    args.out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging_", dir=args.out))
    try:
        (staging / "README.md").write_text(readme, encoding="utf-8")
        (staging / "submission.json").write_text(json.dumps(submission, indent=2) + "\n", encoding="utf-8")
        shutil.copyfile(codes[0], staging / "train_gpt.py")
        for log in logs:
            shutil.copyfile(log.path, staging / log.path.name)
            text_log = log.path.with_suffix(".txt")
            if text_log.is_file():
                shutil.copyfile(text_log, staging / text_log.name)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target, submission


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a records folder from finished runs (one log per seed).")
    parser.add_argument("--log", action="extend", nargs="+", required=True, type=Path,
                        help="logs/<RUN_ID>.jsonl of each seed (several, a glob, or repeated --log); of several, failed runs are skipped")
    parser.add_argument("--name", help="record name (folder <date>_<name>); default: the first run's RUN_ID")
    parser.add_argument("--author", default="", help="your name")
    parser.add_argument("--github-id", default="", help="your GitHub user name")
    parser.add_argument("--blurb", default="", help="one paragraph: what this submission does")
    parser.add_argument("--out", type=Path, default=REPO / "records" / "track_10min_16mb", help="track folder")
    args = parser.parse_args(argv)

    try:
        logs = usable_runs(args.log)
        for log in logs:
            check_run(log)
        codes = [shipped_code(log) for log in logs]
        check_same_submission(logs, codes)
        args.name = args.name or logs[0].run_id
        target, submission = write_record(logs, codes, args)
    except RunLogError as e:
        print(f"make_record: refused: {e}", file=sys.stderr)
        return 1
    print(f"make_record: wrote {target}")
    print(f"make_record: val_bpb {submission['val_bpb']:.5f} over {len(logs)} seed(s), {submission['bytes_total']:,} bytes")
    if not submission["compliant"]:
        print("make_record: WARNING: not a compliant record: " + "; ".join(submission["problems"]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
