"""Time and peak memory of the n-gram tilt's hint pass (train_gpt.ngram_hints, FRONTIER §1).

Runs the pass on a synthetic stream of FineWeb's validation size (47,851,520 targets: Zipf-distributed
tokens over the vocabulary, with earlier spans quoted again so that about 1-2% of the targets are
gated, as on FineWeb), and on the real validation tokens when DATA_DIR holds them. On the GPU when
there is one (the pass runs there at evaluation), else on the CPU. Reports the first call (what an
evaluation stage pays) and the best of the repeats, the peak memory the pass adds on top of the
stream, and the fraction of targets gated. Goal (issue 17): <= 10 s and <= 2 GB for 47.9M tokens.

    python bench/ngram_tilt.py                          # synthetic stream (+ real tokens if ./data has them)
    DATA_DIR=/path/to/data python bench/ngram_tilt.py   # + the real validation split of DATA_DIR
    BENCH_TOKENS=2000000 python bench/ngram_tilt.py     # a smaller synthetic stream (CPU)
"""
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

FINEWEB_VAL_TARGETS = 47_851_520


def synthetic_stream(num_tokens: int, vocab_size: int, quoted_fraction: float = 0.015, seed: int = 0) -> torch.Tensor:
    """Zipf(1) tokens; then quoted_fraction of the stream overwritten by copies of earlier spans of
    32-256 tokens (the repeats a 15-token context finds)."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, vocab_size + 1)
    tokens = rng.choice(vocab_size, size=num_tokens, p=weights / weights.sum()).astype(np.int64)
    quoted = 0
    while quoted < quoted_fraction * num_tokens:
        length = int(rng.integers(32, 257))
        dst = int(rng.integers(length, num_tokens - length))
        src = int(rng.integers(0, dst - length + 1))
        tokens[dst : dst + length] = tokens[src : src + length]
        quoted += length
    return torch.from_numpy(tokens)


def rss_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset_rss_peak) of this process, MiB; Linux /proc."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) / 1024


def reset_rss_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the peak counts only what follows; ru_maxrss never resets
    (building the synthetic stream had already raised it past the pass's peak: 29 MiB was reported for ~2 GB)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(name: str, tokens: torch.Tensor, h: tg.Hyperparameters, device: torch.device, repeats: int) -> None:
    tokens = tokens.to(device)
    cuda = device.type == "cuda"
    seconds = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        else:
            reset_rss_peak()
            base = rss_mib("VmRSS")
        t0 = time.perf_counter()
        hints, gates = tg.ngram_hints(tokens, h.ngram_tilt_order, h.ngram_tilt_threshold)
        if cuda:
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - t0)
        extra = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if cuda else rss_mib("VmHWM") - base
        del hints
    gated = int(gates.sum())
    print(f"{name}: tokens:{tokens.numel():,} device:{device} order:{h.ngram_tilt_order} "
          f"threshold:{h.ngram_tilt_threshold} gated:{gated:,}/{tokens.numel() - 1:,} ({gated / (tokens.numel() - 1):.3%}) "
          f"first_call:{seconds[0]:.2f}s best:{min(seconds):.2f}s "
          f"peak_extra_memory:{extra:.0f} MiB{'' if cuda else ' (CPU: peak RSS over the RSS before)'}", flush=True)


def main() -> None:
    h = tg.Hyperparameters()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    repeats = int(os.environ.get("BENCH_REPEATS", "3"))
    num_tokens = int(os.environ.get("BENCH_TOKENS", str(FINEWEB_VAL_TARGETS + 1)))
    if device.type == "cuda":
        torch.zeros(1, device=device)  # CUDA context outside the timings
        print(f"gpu: {torch.cuda.get_device_name(device)}")
    t0 = time.perf_counter()
    tokens = synthetic_stream(num_tokens, h.vocab_size)
    print(f"synthetic stream built in {time.perf_counter() - t0:.1f}s")
    measure("synthetic", tokens, h, device, repeats)
    if device.type == "cuda":  # the tests run on CPU: check the GPU pass against the CPU one on a prefix
        prefix = tokens[:2_000_001]
        default, tg.HINT_SORT_TARGETS = tg.HINT_SORT_TARGETS, 250_000  # 8 classes: the per-class path, as at FineWeb's size
        same = all(torch.equal(a, b.cpu()) for a, b in zip(tg.ngram_hints(prefix, h.ngram_tilt_order, h.ngram_tilt_threshold),
                                                           tg.ngram_hints(prefix.to(device), h.ngram_tilt_order, h.ngram_tilt_threshold)))
        tg.HINT_SORT_TARGETS = default
        print(f"gpu hints == cpu hints on the first {prefix.numel() - 1:,} targets, in 8 sort classes: {same}")
    del tokens
    if os.path.isdir(h.dataset_dir):
        measure("validation", tg.load_validation_tokens(h.dataset_dir, h.vocab_size), h, device, repeats)
    else:
        print(f"no validation set at {h.dataset_dir} (set DATA_DIR/VOCAB_SIZE): real tokens skipped")


if __name__ == "__main__":
    main()
