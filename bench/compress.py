"""Compressor benchmark for the artifact: size and time of brotli, zstd and lzma settings on the
byte layout train_gpt.py ships (SDClip-quantized ints + byte-shuffled fp16 side data).

The weights come from a saved state dict (`torch.save(model.state_dict(), path)`) or, without one,
from a default-config model at init whose zero-initialised output projections are re-drawn
orthogonal (zeros would compress to nothing and flatter every compressor). Ints are rounded to
nearest with the configured clip sigmas: GPTQ's ints have ~1% more entropy, the ranking is the same.

    python bench/compress.py                       # default 36M model at init
    python bench/compress.py final_model.X.pt      # a run's saved (averaged, unquantized) weights
    python bench/compress.py final_model.X.ptz     # a trained model's artifact (dequantized, then re-quantized)
    BENCH_MAX_MB=4 python bench/compress.py        # only the first 4 MB of the payload (quick look)
"""
import lzma
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def load_state():
    """(Hyperparameters, state dict): from an artifact or saved weights (their own model config), else a fresh model."""
    if len(sys.argv) > 1 and sys.argv[1].endswith(".ptz"):
        config, blob = tg.read_artifact(sys.argv[1])
        h = tg.Hyperparameters(fixed=config)
        model = tg.GPT(h)
        tg.load_artifact(blob, model)
        return h, {k: v.detach() for k, v in model.state_dict().items()}
    if len(sys.argv) > 1:
        config, state = tg.read_saved_weights(sys.argv[1])
        return tg.Hyperparameters(fixed=config), {k: v.float() for k, v in state.items()}
    h = tg.Hyperparameters()
    torch.manual_seed(0)
    model = tg.GPT(h)
    with torch.no_grad():
        for p in model.params_for("muon"):
            if not p.any():
                torch.nn.init.orthogonal_(p)
    return h, {k: v.detach() for k, v in model.state_dict().items()}


def quantize_rtn_state(state, h):
    """SDClip + round to nearest, as each parameter's Role says, in the {name: entry} form train_gpt.serialize takes."""
    with torch.device("meta"):
        roles = tg.GPT(h).parameter_roles()
    quantized = {}
    for name, tensor in state.items():
        quant = roles[name].quant
        if quant not in tg.GPTQ_GROUPS:
            quantized[name] = tg.quantize_absmax_rows(tensor) if quant == "gate" else {"fp16": tensor.half()}
            continue
        bits, clip = tg.gptq_settings(quant, h)
        scale = tg.sdclip_scales(tensor, bits, clip)
        quantized[name] = {"q": tg.quantize_rtn(tensor.float(), scale, bits).to(torch.int8), "scale": scale.half()}
    return quantized


def settings():
    """(label, compress function, decompress function) for every setting measured in one stream."""
    import brotli
    import zstandard
    for quality in (9, 10, 11):
        for lgwin in (22, 23, 24):
            yield (f"brotli q{quality} lgwin{lgwin}",
                   lambda d, q=quality, w=lgwin: brotli.compress(d, quality=q, lgwin=w), brotli.decompress)
    for level in (19, 22):
        for threads in (0, -1):
            yield (f"zstd {level} threads={'auto' if threads else 0}",
                   lambda d, lv=level, t=threads: zstandard.ZstdCompressor(level=lv, threads=t).compress(d),
                   lambda d: zstandard.ZstdDecompressor().decompress(d))
    yield ("lzma 9e", lambda d: lzma.compress(d, preset=9 | lzma.PRESET_EXTREME), lzma.decompress)


def main():
    h, state = load_state()
    quantized = quantize_rtn_state(state, h)
    payload = tg.serialize(quantized)
    max_mb = float(os.environ.get("BENCH_MAX_MB", "0"))
    if max_mb:
        payload = payload[: int(max_mb * 1e6)]
    entropy = sum(tg.int_entropy_bytes(e["q"]) for e in quantized.values() if "q" in e)
    print(f"payload {len(payload):,} bytes; order-0 entropy of the ints {entropy:,.0f} bytes; "
          f"{os.cpu_count()} CPUs")
    rows = []
    for label, compress, decompress in settings():
        t0 = time.perf_counter()
        packed = compress(payload)
        t1 = time.perf_counter()
        assert decompress(packed) == payload
        rows.append((label, len(packed), t1 - t0, time.perf_counter() - t1))
    for name in tg.COMPRESSOR_TAGS:  # what train_gpt.py runs: 1 MiB chunks in parallel child processes
        t0 = time.perf_counter()
        packed = tg.compress(payload, name)
        t1 = time.perf_counter()
        assert tg.decompress(packed) == payload
        rows.append((f"train_gpt.compress {name} (chunked, parallel)", len(packed), t1 - t0, time.perf_counter() - t1))
    best = min(size for _, size, _, _ in rows)
    print(f"| setting | bytes | vs best | compress s | decompress s |\n|---|---|---|---|---|")
    for label, size, seconds, back in rows:
        print(f"| {label} | {size:,} | +{size - best:,} | {seconds:.1f} | {back:.2f} |")


if __name__ == "__main__":
    main()
