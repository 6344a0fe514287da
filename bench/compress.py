"""Compressor benchmark for the artifact: bytes and seconds of every coder on the byte layout
train_gpt.py ships (header + int8 values of the quantized tensors + byte-shuffled fp16 side data).

Input: a trained artifact `final_model.<run>.ptz` (decompressed back to the exact payload it was made
from: the GPTQ ints at the searched clip scale), a saved state dict (`torch.save(model.state_dict())`,
quantized round-to-nearest with the configured clip sigmas), or nothing: a default-config model at
init whose zero-initialised output projections are re-drawn orthogonal.

Every coder runs on the WHOLE payload (an adaptive coder's advantage can differ on slices):
  - train_gpt.compress for each COMPRESSOR (what quantize_and_pack runs: brotli/zstd/lzma in 1 MiB
    chunks over child processes; rans in-process),
  - rans with one table per tensor (no column/row classes), to show what the classes save,
  - an optional package, skipped when not installed: constriction (Rust ANS, rans's class tables),
then a per-role table: order-0 entropy of the ints vs the rans class model's own estimate, and
which class models (columns or rows, k classes) the tensors chose; and a structure probe: per role,
the MDL size of the ints under other context models (2-D classes, row-scale classes, the previous
int in the row or column, rows sorted by L1 nearest neighbour), to choose the next model. The optional packages are not in
requirements.txt (train_gpt.py does not need it): pip install constriction. (PPMd via pyppmd lost to
brotli on synthetic ints and failed to round-trip the trained artifact, so it was dropped.)
BENCH_STREAMS=1 adds single-stream brotli/zstd/lzma settings (slow on a whole artifact);
BENCH_MAX_MB=N runs those on the first N MB only.

    python bench/compress.py final_model.X.ptz     # a trained artifact (the comparison that counts)
    python bench/compress.py final_model.X.pt      # a run's saved (averaged, unquantized) weights
    python bench/compress.py                       # default 36M model at init
"""
import json
import lzma
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def load_payload():
    """(Hyperparameters, serialize() payload): an artifact's own payload (its exact GPTQ ints), or saved
    or fresh weights rounded to nearest with their config's clip sigmas."""
    if len(sys.argv) > 1 and sys.argv[1].endswith(".ptz"):
        config, blob = tg.read_artifact(sys.argv[1])
        return tg.Hyperparameters(fixed=config), tg.decompress(blob)
    if len(sys.argv) > 1:
        config, state = tg.read_saved_weights(sys.argv[1])
        h, state = tg.Hyperparameters(fixed=config), {k: v.float() for k, v in state.items()}
    else:
        h = tg.Hyperparameters()
        torch.manual_seed(0)
        model = tg.GPT(h)
        with torch.no_grad():
            for p in model.params_for("muon"):
                if not p.any():
                    torch.nn.init.orthogonal_(p)
        state = {k: v.detach() for k, v in model.state_dict().items()}
    return h, tg.serialize(quantize_rtn_state(state, h))


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


def int_tensors(payload: bytes):
    """(name, ints [rows, cols] int64) of every quantized tensor, and the payload without the ints."""
    header_len = int.from_bytes(payload[:4], "little")
    begin, tensors = 4 + header_len, []
    for name, kind, shape in json.loads(payload[4:begin]):
        if kind == "q":
            count = math.prod(shape)
            ints = np.frombuffer(payload, np.int8, count, begin).astype(np.int64)
            tensors.append((name, ints.reshape(shape[0], count // max(shape[0], 1))))
            begin += count
    return tensors, payload[: 4 + header_len] + payload[begin:]


def rans_one_table():
    def run(compress_or_decompress, data):
        saved, tg.RANS_CLASSES = tg.RANS_CLASSES, (1,)
        try:
            return compress_or_decompress(data)
        finally:
            tg.RANS_CLASSES = saved
    return (lambda d: run(tg.rans_compress, d)), (lambda b: run(tg.rans_decompress, b))


def constriction_coder(payload: bytes):
    """constriction's ANS with rans's class tables (same model, Rust coder): bytes = its stream + the
    lzma side part of rans's blob (header, fp16 section, labels, tables)."""
    import constriction
    chunks = []  # (symbols, probabilities) per tensor class, in coding order; filled by compress
    rans_blob = tg.rans_compress(payload)
    side_bytes = 5 + int.from_bytes(rans_blob[1:5], "little")

    def compress(data):
        chunks.clear()
        for _, q in int_tensors(data)[0]:
            if q.size:
                sym = q - q.min()
                axis, labels, codes = tg.fit_classes(sym, int(sym.max()) + 1)
                freq = tg.code_frequencies(codes)
                for c in range(len(codes)):
                    part = sym[:, labels == c] if axis else sym[labels == c]
                    chunks.append((part.ravel().astype(np.int32), freq[c] / 65536.0))
        coder = constriction.stream.stack.AnsCoder()
        for symbols, p in reversed(chunks):
            coder.encode_reverse(symbols, constriction.stream.model.Categorical(p, perfect=False))
        return b"\0" * side_bytes + coder.get_compressed().tobytes()

    def decompress(blob):
        coder = constriction.stream.stack.AnsCoder(np.frombuffer(blob[side_bytes:], np.uint32).copy())
        for symbols, p in chunks:
            assert np.array_equal(coder.decode(constriction.stream.model.Categorical(p, perfect=False), len(symbols)), symbols)
        return payload
    return compress, decompress


def whole_payload_coders(payload: bytes):
    """(label, compress, decompress) of every coder that runs on the whole payload."""
    for name in tg.COMPRESSOR_TAGS:
        yield (f"train_gpt.compress {name}", lambda d, n=name: tg.compress(d, n), tg.decompress)
    yield ("rans, one table per tensor (no classes)", *rans_one_table())
    for label, make in (("constriction ANS, rans's class tables", constriction_coder),):
        try:
            yield (label, *make(payload))
        except ImportError as error:
            print(f"skipped {label}: {error} (pip install {error.name})")


def stream_settings():
    """(label, compress, decompress) of single-stream settings (BENCH_STREAMS=1)."""
    import brotli
    import zstandard
    for quality in (9, 10, 11):
        yield (f"brotli q{quality} lgwin24 (one stream)",
               lambda d, q=quality: brotli.compress(d, quality=q, lgwin=24), brotli.decompress)
    yield ("zstd 22 (one stream)", lambda d: zstandard.ZstdCompressor(level=22).compress(d),
           lambda d: zstandard.ZstdDecompressor().decompress(d))
    yield ("lzma 9e (one stream)", lambda d: lzma.compress(d, preset=9 | lzma.PRESET_EXTREME), lzma.decompress)


def measure(label, compress, decompress, data, rows):
    t0 = time.perf_counter()
    packed = compress(data)
    t1 = time.perf_counter()
    assert decompress(packed) == data, label
    rows.append((label, len(packed), t1 - t0, time.perf_counter() - t1))
    print(f"  {label}: {len(packed):,} bytes", flush=True)


def role_study(payload: bytes, roles: dict):
    """Per quant group: order-0 entropy of the ints vs the rans class model (code length + labels + tables)."""
    groups = {}
    for name, q in int_tensors(payload)[0]:
        if not q.size:
            continue
        sym = q - q.min()
        axis, labels, codes = tg.fit_classes(sym, int(sym.max()) + 1)
        freq = tg.code_frequencies(codes)
        model_bits = len(labels) * math.log2(len(codes)) + 4 * np.count_nonzero(codes)
        for c in range(len(codes)):
            counts = np.bincount((sym[:, labels == c] if axis else sym[labels == c]).ravel(), minlength=freq.shape[1])
            model_bits -= (counts * np.log2(freq[c].clip(1) / 65536)).sum()
        entry = groups.setdefault(roles[name], {"values": 0, "h0": 0.0, "model": 0.0, "classes": {}})
        entry["values"] += q.size
        entry["h0"] += tg.int_entropy_bytes(torch.from_numpy(q))
        entry["model"] += model_bits / 8
        key = f"{'cols' if axis else 'rows'}x{len(codes)}"
        entry["classes"][key] = entry["classes"].get(key, 0) + 1
    print("\n| quant group | values | order-0 entropy bytes | rans class model bytes | vs order-0 | classes chosen (tensors) |")
    print("|---|---|---|---|---|---|")
    for role, e in groups.items():
        print(f"| {role} | {e['values']:,} | {e['h0']:,.0f} | {e['model']:,.0f} | {e['model'] / e['h0'] - 1:+.2%} | "
              f"{', '.join(f'{k}: {v}' for k, v in sorted(e['classes'].items()))} |")


def mdl_bits(symbols: np.ndarray, contexts: np.ndarray) -> float:
    """Code length of symbols under one static table per context, plus the tables' cost
    (MDL: (nonzero entries - 1)/2 * log2(n) bits per context): what a coder with that context gets."""
    symbols, contexts = symbols.ravel(), contexts.ravel()
    alphabet = int(symbols.max()) + 1
    counts = np.bincount(contexts * alphabet + symbols, minlength=(int(contexts.max()) + 1) * alphabet)
    counts = counts.reshape(-1, alphabet).astype(np.float64)
    totals = counts.sum(1, keepdims=True)
    code = -(counts * np.log2(np.where(counts > 0, counts / np.maximum(totals, 1), 1))).sum()
    return code + ((np.count_nonzero(counts, 1) - 1).clip(0) / 2 * np.log2(np.maximum(totals[:, 0], 2))).sum()


def nearest_neighbour_order(rows: np.ndarray) -> np.ndarray:
    """Greedy L1 nearest-neighbour chain through the rows (the records' row sort), on the GPU if any."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.from_numpy(rows.astype(np.float32)).to(device)
    distance = torch.cdist(x, x, p=1)
    distance.fill_diagonal_(float("inf"))
    order, current = [0], 0
    for _ in range(len(rows) - 1):
        distance[:, current] = float("inf")
        current = int(distance[current].argmin())
        order.append(current)
    return np.array(order)


def structure_probe(payload: bytes, roles: dict):
    """Per role, bytes a coder would need with each context model (MDL estimates on the real ints):
    what structure the weights have beyond per-tensor order-0 statistics, to decide the next model.
    rows4xcols4: classes by quantiles of each row's and column's mean |s - mean| (+2 bits per label);
    row scale 8: classes by quantiles of the fp16 row scale (free: the decoder has the scales first);
    left |q|: the previous int in the row, min(|q|, 8); above |q|, NN-sorted: the previous row's int
    after sorting rows into a greedy L1 nearest-neighbour chain (+ the permutation, log2 R bits/row;
    tensors over 2,048 rows only with a GPU)."""
    scales = {name: e["scale"].float().numpy() for name, e in tg.deserialize(payload).items() if "q" in e}
    labels = ["order-0", "rows4xcols4", "row scale 8", "left |q|", "above |q|", "above |q|, NN-sorted"]
    groups = {}
    for name, q in int_tensors(payload)[0]:
        if q.size == 0 or q.shape[1] < 2:
            continue
        sym = q - q.min()
        spread = np.abs(sym - sym.mean())
        quartile = lambda v: np.searchsorted(np.quantile(v, [0.25, 0.5, 0.75]), v)  # noqa: E731
        octile = np.searchsorted(np.quantile(np.log(scales[name] + 1e-12), np.linspace(0, 1, 9)[1:-1]), np.log(scales[name] + 1e-12))
        magnitude = np.minimum(np.abs(q), 8)
        left = np.concatenate([np.full((q.shape[0], 1), 9), magnitude[:, :-1]], 1)
        above = np.concatenate([np.full((1, q.shape[1]), 9), magnitude[:-1]], 0)
        bits = [mdl_bits(sym, np.zeros_like(sym)),
                mdl_bits(sym, 4 * quartile(spread.mean(1))[:, None] + quartile(spread.mean(0))[None, :]) + 2 * sum(q.shape),
                mdl_bits(sym, np.broadcast_to(octile[:, None], q.shape)), mdl_bits(sym, left), mdl_bits(sym, above)]
        if q.shape[0] <= 2048 or torch.cuda.is_available():
            order = nearest_neighbour_order(q)
            sorted_above = np.concatenate([np.full((1, q.shape[1]), 9), magnitude[order][:-1]], 0)
            bits.append(mdl_bits(sym[order], sorted_above) + q.shape[0] * math.log2(q.shape[0]))
        else:
            bits.append(float("nan"))
        groups[roles[name]] = [a + b / 8 for a, b in zip(groups.get(roles[name], [0.0] * len(bits)), bits)]
    print("\n| quant group | " + " | ".join(labels) + " |\n|" + "---|" * (len(labels) + 1))
    for role, sizes in groups.items():
        print(f"| {role} | {sizes[0]:,.0f} | " + " | ".join(f"{s / sizes[0] - 1:+.2%}" for s in sizes[1:]) + " |")


def main():
    h, payload = load_payload()
    with torch.device("meta"):
        roles = {name: role.quant for name, role in tg.GPT(h).parameter_roles().items()}
    tensors, rest = int_tensors(payload)
    entropy = sum(tg.int_entropy_bytes(torch.from_numpy(q)) for _, q in tensors if q.size)
    print(f"payload {len(payload):,} bytes ({sum(q.size for _, q in tensors):,} ints, {len(rest):,} bytes of header "
          f"and fp16); order-0 entropy of the ints {entropy:,.0f} bytes; {os.cpu_count()} CPUs")
    rows = []
    for label, compress, decompress in whole_payload_coders(payload):
        measure(label, compress, decompress, payload, rows)
    max_mb = float(os.environ.get("BENCH_MAX_MB", "0"))
    if os.environ.get("BENCH_STREAMS") == "1" or max_mb:
        data = payload[: int(max_mb * 1e6)] if max_mb else payload
        for label, compress, decompress in stream_settings():
            measure(f"{label}{f', first {max_mb:g} MB' if max_mb else ''}", compress, decompress, data, rows)
    reference = next(size for label, size, _, _ in rows if label == "train_gpt.compress brotli")
    print("\n| coder | bytes | vs train_gpt brotli | compress s | decompress s |\n|---|---|---|---|---|")
    for label, size, seconds, back in rows:
        print(f"| {label} | {size:,} | {size - reference:+,} | {seconds:.1f} | {back:.2f} |")
    role_study(payload, roles)
    structure_probe(payload, roles)


if __name__ == "__main__":
    main()
