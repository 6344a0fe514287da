"""Is a candidate better than a baseline by the challenge's bar (>= 0.005 nats, one-sided p < 0.01)?

    python records/significance.py --candidate logs/c1.jsonl logs/c2.jsonl logs/c3.jsonl \
                                   --baseline records/track_10min_16mb/2026-01-01_Base/submission.json

Inputs are run logs (`logs/<RUN_ID>.jsonl`, one seed each) or records' submission.json files (every
entry of their "seeds"). The test is Welch's t-test on per-seed val_loss (nats), one-sided
(H1: the candidate's mean loss is lower). The t distribution is computed here with `math` only.
Each seed is one independent run: the same log given twice, or one seed twice on a side, is refused.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from runlog import RunLogError, finished_ok, read_run_log

MIN_IMPROVEMENT_NATS = 0.005
MAX_P_VALUE = 0.01


# ---- the t distribution, from the regularized incomplete beta function --------------------------------


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of I_x(a, b) (modified Lentz; Numerical Recipes `betacf`)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta did not converge (a={a}, b={b}, x={x})")


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) = B(x; a, b) / B(a, b) for 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with df (real, > 0) degrees of freedom: 0.5 * I_{df/(df+t^2)}(df/2, 1/2) for t > 0."""
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * regularized_beta(df / 2.0, 0.5, df / (df + t * t))
    return tail if t > 0 else 1.0 - tail


# ---- the test ----------------------------------------------------------------------------------------


@dataclass
class Sample:
    label: str
    loss: list[float]   # val_loss per seed, nats per token
    bpb: list[float]    # val_bpb per seed

    @property
    def n(self) -> int:
        return len(self.loss)


def load_results(paths: list[Path], label: str) -> Sample:
    """Per-seed (val_loss, val_bpb) from jsonl logs of finished runs and/or submission.json files."""
    loss, bpb, seen = [], [], {}  # seen: seed -> the file it came from
    for path in paths:
        if path.suffix == ".json":
            try:
                seeds = json.loads(path.read_text(encoding="utf-8"))["seeds"]
            except (OSError, json.JSONDecodeError, KeyError) as e:
                raise RunLogError(f"{path}: not a submission.json with a 'seeds' list ({e})") from None
        else:
            log = read_run_log(path)
            seeds = [{**finished_ok(log), "seed": log.seed}]
        for s in seeds:
            if s.get("seed") is not None and s["seed"] in seen:
                raise RunLogError(f"--{label} has seed {s['seed']} twice ({seen[s['seed']]} and {path}); "
                                  "each seed must be a distinct run, so pass every run once")
            seen[s.get("seed")] = path
            loss.append(s["val_loss"])
            bpb.append(s["val_bpb"])
    if len(loss) < 2:
        raise RunLogError(f"--{label} has {len(loss)} seed(s); the t-test needs at least 2 per side (the challenge uses 3)")
    return Sample(label, loss, bpb)


def welch_one_sided(candidate: list[float], baseline: list[float]) -> tuple[float, float, float]:
    """(t, df, p) for H1: mean(candidate) < mean(baseline), Welch–Satterthwaite degrees of freedom."""
    var_c = statistics.variance(candidate) / len(candidate)
    var_b = statistics.variance(baseline) / len(baseline)
    diff = statistics.fmean(baseline) - statistics.fmean(candidate)
    if var_c + var_b == 0.0:  # identical seeds on both sides: the sign of the difference decides
        p = 0.0 if diff > 0 else 1.0 if diff < 0 else 0.5
        return (math.copysign(math.inf, diff) if diff else 0.0), math.nan, p
    t = diff / math.sqrt(var_c + var_b)
    df = (var_c + var_b) ** 2 / (var_c ** 2 / (len(candidate) - 1) + var_b ** 2 / (len(baseline) - 1))
    return t, df, t_sf(t, df)


def describe(sample: Sample) -> str:
    return (f"{sample.label:<9} n={sample.n}  val_loss {statistics.fmean(sample.loss):.5f} ± {statistics.stdev(sample.loss):.5f} nats"
            f"  val_bpb {statistics.fmean(sample.bpb):.5f} ± {statistics.stdev(sample.bpb):.5f}")


def report(candidate: Sample, baseline: Sample) -> tuple[str, bool]:
    """The printed verdict and whether the candidate clears the bar."""
    t, df, p = welch_one_sided(candidate.loss, baseline.loss)
    gain_nats = statistics.fmean(baseline.loss) - statistics.fmean(candidate.loss)
    gain_bpb = statistics.fmean(baseline.bpb) - statistics.fmean(candidate.bpb)
    clears = gain_nats >= MIN_IMPROVEMENT_NATS and p < MAX_P_VALUE
    lines = [describe(candidate), describe(baseline),
             f"improvement: {gain_nats:+.5f} nats, {gain_bpb:+.5f} bpb (positive = candidate better)",
             f"Welch t-test (one-sided, on val_loss): t = {t:.3f}, df = {df:.2f}, p = {p:.3g}",
             ("CLEARS" if clears else "does NOT clear") +
             f" the bar (improvement >= {MIN_IMPROVEMENT_NATS} nats and p < {MAX_P_VALUE})"]
    return "\n".join(lines), clears


def check_distinct_files(paths: list[Path]) -> None:
    """The same file twice (on one side or both) would count one run as two samples."""
    first: dict[Path, Path] = {}
    for path in paths:
        key = path.resolve()
        if key in first:
            raise RunLogError(f"{path} is given twice (also as {first[key]}); pass each run's log once")
        first[key] = path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Does a candidate beat a baseline by the challenge's bar? The bar: the mean val_loss improves by "
                    f"at least {MIN_IMPROVEMENT_NATS} nats, and a one-sided Welch t-test on the per-seed val_loss gives "
                    f"p < {MAX_P_VALUE} (the challenge asks for 3 seeds a side).",
        epilog="Each input is a run log (logs/<RUN_ID>.jsonl, one seed) or a record's submission.json (all its seeds). "
               "Every seed must be a distinct finished run: the same log twice, or one seed twice on a side, is refused. "
               "Exit status 0 when the test ran (the verdict is printed), 1 on bad input.")
    parser.add_argument("--candidate", nargs="+", required=True, type=Path, help="jsonl logs or submission.json of the candidate")
    parser.add_argument("--baseline", nargs="+", required=True, type=Path, help="jsonl logs or submission.json of the baseline")
    args = parser.parse_args(argv)
    try:
        check_distinct_files(args.candidate + args.baseline)
        text, _ = report(load_results(args.candidate, "candidate"), load_results(args.baseline, "baseline"))
    except RunLogError as e:
        print(f"significance: {e}", file=sys.stderr)
        return 1
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
