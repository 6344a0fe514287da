"""Package finished runs as a records folder: README.md, submission.json, the shipped code and the logs.

    python records/make_record.py --log logs/seed1.jsonl --log logs/seed2.jsonl --log logs/seed3.jsonl \
        --name MyStack --author "Ada" --github-id ada --blurb "what changed"

Writes <out>/<YYYY-MM-DD>_<name>/. It refuses (exit 1, nothing written) when a run failed or did not
finish, when an artifact is over 16,000,000 bytes, or when the seeds are not runs of one submission.
Runs that are not on 8xH100 or that break the 600 s train/eval limits ARE written, but flagged
`"compliant": false` with the reasons, in submission.json and at the top of README.md: they are
useful as documented experiments, never as record claims. Every flag is computed from the logs.
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

from runlog import RunLog, RunLogError, finished_ok, read_run_log

REPO = Path(__file__).resolve().parent.parent
ARTIFACT_LIMIT_BYTES = 16_000_000
TRAIN_LIMIT_S = 600.0
EVAL_LIMIT_S = 600.0
RECORD_WORLD_SIZE = 8
RECORD_GPU = "H100"
# Config keys that may differ between the seeds of one submission.
PER_SEED_KEYS = {"event", "seed", "run_id"}
# Knobs left out of the reproduce command's overrides: per seed, or paths of the machine that ran it.
NOT_OVERRIDES = {"RUN_ID", "SEED", "DATA_DIR", "LOG_DIR", "TOKENIZER_PATH", "EVAL_ONLY"}


def fail(msg: str) -> None:
    raise RunLogError(msg)


# ---- reading and checking the runs -----------------------------------------------------------------


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


def compliance(logs: list[RunLog]) -> dict:
    """Each challenge limit with the worst measured value over the seeds, and whether it holds."""
    on_record_hw = all(log.final["world_size"] == RECORD_WORLD_SIZE and RECORD_GPU in str(log.config.get("device_name", ""))
                       for log in logs)
    checks = {
        "hardware_8xH100": {"value": ", ".join(sorted({hardware(log) for log in logs})), "limit": f"{RECORD_WORLD_SIZE}x {RECORD_GPU}",
                            "ok": on_record_hw},
        "train_time_s": {"value": max(log.final["train_time_s"] for log in logs), "limit": TRAIN_LIMIT_S},
        "eval_time_s": {"value": max(log.final["eval_time_s"] for log in logs), "limit": EVAL_LIMIT_S},
        "total_bytes": {"value": max(log.final["total_bytes"] for log in logs), "limit": ARTIFACT_LIMIT_BYTES},
        # A score over a prefix of the validation set (VAL_MAX_TOKENS) is not comparable.
        "full_validation_set": {"value": max(int(log.config.get("val_max_tokens") or 0) for log in logs), "limit": 0,
                                "ok": all(not log.config.get("val_max_tokens") for log in logs)},
    }
    for name in ("train_time_s", "eval_time_s", "total_bytes"):
        checks[name]["ok"] = checks[name]["value"] <= checks[name]["limit"]
    problems = [f"{name} = {c['value']} (limit {c['limit']})" for name, c in checks.items() if not c["ok"]]
    return {"compliant": not problems, "problems": problems, "checks": checks}


def seed_result(log: RunLog) -> dict:
    f = log.final
    return {
        "seed": log.seed, "run_id": log.run_id, "val_loss": f["val_loss"], "val_bpb": f["val_bpb"],
        "final_stage": f.get("final_stage"), "train_time_s": f["train_time_s"], "eval_time_s": f["eval_time_s"],
        "total_bytes": f["total_bytes"], "world_size": f["world_size"], "peak_memory_mib": f.get("peak_memory_mib"),
        "stages": {e["stage"]: {"val_loss": e["val_loss"], "val_bpb": e["val_bpb"], "eval_time_ms": e.get("eval_time_ms")}
                   for e in log.evals},
        "log": log.path.name,
    }


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def build_submission(logs: list[RunLog], args, date: str, track: str) -> dict:
    seeds = [seed_result(log) for log in logs]
    first = logs[0]
    return {
        "author": args.author, "github_id": args.github_id, "name": args.name, "blurb": args.blurb,
        "date": date, "track": track,
        "val_loss": statistics.fmean(s["val_loss"] for s in seeds),
        "val_bpb": statistics.fmean(s["val_bpb"] for s in seeds),
        "val_loss_std": mean_std([s["val_loss"] for s in seeds])[1],
        "val_bpb_std": mean_std([s["val_bpb"] for s in seeds])[1],
        "final_stage": first.final.get("final_stage"),
        "seeds": seeds,
        "bytes_total": max(s["total_bytes"] for s in seeds),
        "bytes_code": first.artifact.get("code_bytes"),
        "bytes_model": max(log.artifact.get("model_bytes", 0) for log in logs) or None,
        "compressor": first.artifact.get("compressor"),
        "hardware": hardware(first),
        "versions": {k: first.config.get(k) for k in ("torch_version", "python_version", "attention_backend")},
        "num_params": first.config.get("num_params"),
        **compliance(logs),
    }


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


def render_readme(sub: dict, config: dict, overrides: dict) -> str:
    lines = [f"# {sub['name']}", "", sub["blurb"] or "(no blurb)", ""]
    if sub["compliant"]:
        lines += [f"**Compliant with the {sub['track']} track** (checked from the logs: 8xH100, train <= 600 s, "
                  "eval <= 600 s, artifact <= 16,000,000 bytes).", ""]
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
        lines.append(f"| {name} | {c['value']} | {c['limit']} | {'yes' if c['ok'] else 'NO'} |")
    lines += ["", "## Hardware and versions", "", f"- hardware: {sub['hardware']}"]
    lines += [f"- {k}: {v}" for k, v in sub["versions"].items()]
    env = " ".join(f"{k}={v}" for k, v in overrides.items())
    lines += ["", "## Reproduce", "",
              "From the project root, with the dataset of this vocabulary in `DATA_DIR` (see the project README):", "",
              "```bash",
              *[f"{env + ' ' if env else ''}SEED={s['seed']} RUN_ID={s['run_id']} torchrun --standalone --nproc_per_node={s['world_size']} train_gpt.py"
                for s in sub["seeds"]],
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
    readme = render_readme(submission, logs[0].config, config_overrides(logs[0].config))

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
    parser = argparse.ArgumentParser(description="Write a records folder from finished runs (one --log per seed).")
    parser.add_argument("--log", action="append", required=True, type=Path, help="logs/<RUN_ID>.jsonl of one seed; repeat for more seeds")
    parser.add_argument("--name", help="record name (folder <date>_<name>); default: the first run's RUN_ID")
    parser.add_argument("--author", default="", help="your name")
    parser.add_argument("--github-id", default="", help="your GitHub user name")
    parser.add_argument("--blurb", default="", help="one paragraph: what this submission does")
    parser.add_argument("--out", type=Path, default=REPO / "records" / "track_10min_16mb", help="track folder")
    args = parser.parse_args(argv)

    try:
        logs = [read_run_log(p) for p in args.log]
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
