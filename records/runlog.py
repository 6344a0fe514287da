"""Read a run's machine-readable log (logs/<RUN_ID>.jsonl, one JSON object per line with an `event`)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


class RunLogError(ValueError):
    """A log that is unreadable or does not describe a finished run; the message says what to do."""


@dataclass
class RunLog:
    path: Path
    config: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    evals: list[dict] = field(default_factory=list)
    timings: list[dict] = field(default_factory=list)
    artifact: dict = field(default_factory=dict)
    final: dict | None = None

    @property
    def run_id(self) -> str:
        return self.config.get("run_id") or self.path.stem

    @property
    def seed(self):
        return self.config.get("seed")


def read_run_log(path: str | Path) -> RunLog:
    """Parse every event of a one-run jsonl log (the last `final`/`artifact`/`data` event wins)."""
    path = Path(path)
    if not path.is_file():
        raise RunLogError(f"{path}: no such log; pass the logs/<RUN_ID>.jsonl written by train_gpt.py")
    log = RunLog(path)
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError as e:
            raise RunLogError(f"{path}:{number}: not JSON ({e.msg}); is this the .jsonl log, not the .txt?") from None
        kind = event.get("event")
        if kind == "eval":
            log.evals.append(event)
        elif kind == "timing":
            log.timings.append(event)
        elif kind == "config" and log.config:
            raise RunLogError(f"{path}:{number}: a second config event: two runs share this RUN_ID (logs are appended); "
                              "rerun with a fresh RUN_ID")
        elif kind in ("config", "data", "artifact", "final"):
            setattr(log, kind, event)
    return log


def unfinished_reason(log: RunLog) -> str | None:
    """Why the run did not finish with status ok; None when it did."""
    if log.final is None:
        return "no final event, the run did not finish (crashed, killed or still running)"
    if log.final.get("status") != "ok":
        return f"the run failed ({log.final.get('error') or 'no error message'})"
    return None


def finished_ok(log: RunLog) -> dict:
    """The run's `final` event; RunLogError unless the run finished with status ok."""
    reason = unfinished_reason(log)
    if reason:
        raise RunLogError(f"{log.path}: {reason}; " + ("rerun it" if log.final is None else "fix it and rerun"))
    for key in ("val_loss", "val_bpb", "total_bytes", "train_time_s", "eval_time_s", "world_size"):
        if log.final.get(key) is None:
            raise RunLogError(f"{log.path}: final event lacks {key!r}; was it written by an older train_gpt.py?")
    return log.final
