"""Build a tokenized dataset (shards + tokenizer + manifest) from local JSONL documents.

    python data/prepare_docs.py --docs docs.jsonl.xz --vocab-size 8192 --val-docs 50000 --out data/ \
        [--tokenizer fineweb_8192_bpe.model] [--tokenizer-docs 30000] [--shard-tokens 100000000] [--workers 16]

Input: one JSON object per line with a "text" field; .jsonl, .jsonl.xz, .jsonl.zst or .jsonl.gz.
The first --val-docs documents (file order) are validation, the rest training. Every document is
stored as BOS (id 1) + its tokens, no EOS, in the challenge's shard format (SPEC §2):
OUT/datasets/fineweb10B_sp{V}/fineweb_{val,train}_NNNNNN.bin, OUT/tokenizers/fineweb_{V}_bpe.model
and OUT/manifest.json. The same input gives byte-identical output.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import itertools
import json
import lzma
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_INTS = 256
BOS_ID = 1
DOCS_PER_TASK = 256  # documents per worker task: large enough to amortise pickling, small enough to balance

# The challenge's tokenizer trainer settings (SPEC §2); everything else is sentencepiece's default,
# including max_sentence_length=4192 bytes: the trainer skips longer documents, as the challenge's did.
TRAINER_SETTINGS = dict(
    model_type="bpe", character_coverage=0.999, byte_fallback=True, split_digits=True,
    normalization_rule_name="nmt_nfkc", add_dummy_prefix=False,
    pad_id=0, bos_id=1, eos_id=2, unk_id=3, hard_vocab_limit=False,
)


class InputError(Exception):
    """Bad input or arguments; main() prints the one-line message and exits non-zero."""


def log(msg: str) -> None:
    print(f"[prepare_docs] {msg}", file=sys.stderr, flush=True)


def open_docs(path: Path) -> io.TextIOBase:
    """Text stream of a JSONL file, decompressing by suffix."""
    if not path.is_file():
        raise InputError(f"{path}: docs file not found; pass --docs a .jsonl[.xz|.zst|.gz] file")
    name = path.name
    if name.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8")
    if name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if name.endswith(".zst"):
        import zstandard

        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True), encoding="utf-8")
    return open(path, "r", encoding="utf-8")


def iter_docs(path: Path):
    """Yield the "text" of every line; InputError with the line number for anything else. Blank lines are skipped."""
    with open_docs(path) as f:
        line_no = 0
        try:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)
                except json.JSONDecodeError as error:
                    raise InputError(f"{path}:{line_no}: not valid JSON ({error.msg}); each line must be one JSON object") from None
                if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
                    raise InputError(f"{path}:{line_no}: no string \"text\" field; each line must be {{\"text\": \"...\"}}")
                yield doc["text"]
        except (UnicodeDecodeError, EOFError, lzma.LZMAError, gzip.BadGzipFile, OSError) as error:
            raise InputError(f"{path}: unreadable after line {line_no} ({error}); check the file and its compression") from None


def batched(iterable, size: int):
    iterator = iter(iterable)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(docs: Path, vocab_size: int, n_docs: int, prefix: Path) -> None:
    """Train sentencepiece BPE on the first n_docs documents, as the challenge did (NUL -> space, stripped, empties skipped)."""
    import sentencepiece as spm

    texts = [t.replace("\x00", " ").strip() for t in itertools.islice(iter_docs(docs), n_docs)]
    log(f"training a {vocab_size}-piece BPE tokenizer on the first {len(texts)} documents")
    # model_writer instead of model_prefix: the prefix would be stored inside the model and make it path-dependent.
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=(t for t in texts if t), model_writer=model,
                                       vocab_size=vocab_size, minloglevel=2, **TRAINER_SETTINGS)
    except RuntimeError as error:
        raise InputError(f"{docs}: tokenizer training on the first {len(texts)} documents failed ({' '.join(str(error).split())}); "
                         "check --vocab-size and --tokenizer-docs") from None
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    if sp.vocab_size() != vocab_size:  # hard_vocab_limit=False stops early when the text runs out of merges
        raise InputError(f"{docs}: the first {len(texts)} documents only support a {sp.vocab_size()}-piece tokenizer, "
                         f"not {vocab_size}; raise --tokenizer-docs or lower --vocab-size")
    Path(f"{prefix}.model").write_bytes(model.getvalue())
    Path(f"{prefix}.vocab").write_text("".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.vocab_size())),
                                       encoding="utf-8")


def check_tokenizer(model_path: Path, vocab_size: int):
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=str(model_path))
    except (RuntimeError, OSError) as error:
        raise InputError(f"{model_path}: not a sentencepiece model ({error}); pass --tokenizer a .model file") from None
    if sp.vocab_size() != vocab_size:
        raise InputError(f"{model_path}: tokenizer has {sp.vocab_size()} pieces but --vocab-size is {vocab_size}; make them match")
    if sp.bos_id() != BOS_ID:
        raise InputError(f"{model_path}: tokenizer BOS id is {sp.bos_id()}, shards need {BOS_ID}; use a tokenizer trained with bos_id=1")
    if sp.id_to_piece(sp.piece_to_id("\u2581")) != "\u2581":
        raise InputError(f"{model_path}: tokenizer has no standalone '\u2581' piece, so bytes cannot be counted exactly; "
                         "omit --tokenizer to train one")
    return sp


# --------------------------------------------------------------------------------------------------
# Tokenizing workers (one sentencepiece model per process)

_worker_sp = None


def _init_worker(model_path: str) -> None:
    global _worker_sp
    import sentencepiece as spm

    _worker_sp = spm.SentencePieceProcessor(model_file=model_path)


def encode_batch(texts: list[str]) -> tuple[np.ndarray, int, int, int]:
    """(BOS+tokens of every text concatenated as uint16, documents, raw UTF-8 bytes, bytes as the tokenizer normalised them)."""
    pieces = _worker_sp.encode(texts, num_threads=1)  # parallelism comes from the processes
    lengths = np.fromiter((len(p) + 1 for p in pieces), dtype=np.int64, count=len(pieces))
    tokens = np.empty(int(lengths.sum()), dtype=np.uint16)
    doc_starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    tokens[doc_starts] = BOS_ID
    is_body = np.ones(len(tokens), dtype=bool)
    is_body[doc_starts] = False
    tokens[is_body] = np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.uint16, count=int(is_body.sum()))
    raw_bytes = sum(len(t.encode("utf-8")) for t in texts)
    # decode(encode(t)) is exactly this normalised text (docs/BYTES.md); it is what bpb counts.
    normalized_bytes = sum(len(n.replace("\u2581", " ").encode("utf-8")) for n in _worker_sp.normalize(texts))
    return tokens, len(texts), raw_bytes, normalized_bytes


# --------------------------------------------------------------------------------------------------
# Shards


class ShardWriter:
    """Cuts one split's token stream into fineweb_{split}_NNNNNN.bin files of shard_tokens tokens (the last one shorter)."""

    def __init__(self, folder: Path, split: str, shard_tokens: int) -> None:
        self.folder, self.split, self.shard_tokens = folder, split, shard_tokens
        self.buffer = np.empty(shard_tokens, dtype="<u2")
        self.filled = 0
        self.files: list[dict] = []

    def add(self, tokens: np.ndarray) -> None:
        while len(tokens):
            take = min(len(tokens), self.shard_tokens - self.filled)
            self.buffer[self.filled:self.filled + take] = tokens[:take]
            self.filled += take
            tokens = tokens[take:]
            if self.filled == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if self.filled == 0:
            return
        path = self.folder / f"fineweb_{self.split}_{len(self.files):06d}.bin"
        header = np.zeros(SHARD_HEADER_INTS, dtype="<i4")
        header[:3] = (SHARD_MAGIC, SHARD_VERSION, self.filled)
        with open(path, "wb") as f:
            f.write(header.tobytes())
            f.write(self.buffer[:self.filled].tobytes())
        self.files.append({"file": path.name, "tokens": self.filled, "sha256": sha256_of(path)})
        self.filled = 0


def build(args: argparse.Namespace) -> dict:
    """Build into a staging folder and publish only on success, so a failed run never mixes old and new files."""
    out, vocab_size = Path(args.out), args.vocab_size
    if not 2 <= vocab_size <= 1 << 16:
        raise InputError(f"--vocab-size {vocab_size}: shards store uint16 ids, use 2..65536")
    if next(iter_docs(Path(args.docs)), None) is None:  # also fails early on a missing or unreadable file
        raise InputError(f"{args.docs}: no documents; each line must be {{\"text\": \"...\"}}")
    staging = out / f".prepare_docs_sp{vocab_size}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "shards").mkdir(parents=True)
    try:
        manifest = build_staged(args, staging)
        publish(staging, out, vocab_size, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def build_staged(args: argparse.Namespace, staging: Path) -> dict:
    docs, vocab_size = Path(args.docs), args.vocab_size
    tokenizer_path = staging / f"fineweb_{vocab_size}_bpe.model"
    started = time.perf_counter()
    if args.tokenizer:
        source = Path(args.tokenizer)
        if not source.is_file():
            raise InputError(f"{source}: tokenizer not found; pass --tokenizer an existing .model file or omit it to train one")
        check_tokenizer(source, vocab_size)
        shutil.copyfile(source, tokenizer_path)
        tokenizer_info = {"source": str(source), "trained": False}
    else:
        train_tokenizer(docs, vocab_size, args.tokenizer_docs, tokenizer_path.with_suffix(""))
        check_tokenizer(tokenizer_path, vocab_size)
        tokenizer_info = {"trained": True, "train_docs": args.tokenizer_docs, "trainer_settings": TRAINER_SETTINGS}
        log(f"tokenizer trained in {time.perf_counter() - started:.1f}s")

    writers = {split: ShardWriter(staging / "shards", split, args.shard_tokens) for split in ("val", "train")}
    stats = {split: {"documents": 0, "tokens": 0, "raw_bytes": 0, "normalized_bytes": 0} for split in writers}
    encode_started = last_report = time.perf_counter()

    def tasks():
        """Batches never straddle the val/train boundary, so each result belongs to one split."""
        texts = iter_docs(docs)
        yield from batched(itertools.islice(texts, args.val_docs), DOCS_PER_TASK)
        yield from batched(texts, DOCS_PER_TASK)

    with multiprocessing.get_context("fork").Pool(args.workers, _init_worker, (str(tokenizer_path),)) as pool:
        for tokens, n_docs, raw_bytes, normalized_bytes in pool.imap(encode_batch, tasks(), chunksize=1):
            split = "val" if stats["val"]["documents"] < args.val_docs else "train"
            writers[split].add(tokens)
            for key, value in (("documents", n_docs), ("tokens", len(tokens)), ("raw_bytes", raw_bytes),
                               ("normalized_bytes", normalized_bytes)):
                stats[split][key] += value
            if time.perf_counter() - last_report > 5:
                last_report = time.perf_counter()
                done = stats["val"]["documents"] + stats["train"]["documents"]
                log(f"{done} documents, {stats['val']['tokens'] + stats['train']['tokens']:,} tokens, "
                    f"{done / (last_report - encode_started):.0f} docs/s")
    for writer in writers.values():
        writer.flush()

    if stats["val"]["documents"] < args.val_docs or stats["train"]["documents"] == 0:
        raise InputError(f"{docs}: only {stats['val']['documents'] + stats['train']['documents']} documents, need more than "
                         f"--val-docs {args.val_docs} so that some are left for training; lower --val-docs")
    for split in ("val", "train"):
        s = stats[split]
        log(f"{split}: {s['documents']} documents, {s['tokens']:,} tokens, {s['normalized_bytes']:,} bytes "
            f"({s['normalized_bytes'] / max(1, s['tokens'] - s['documents']):.3f} bytes/token), {len(writers[split].files)} shards")
    log(f"built in {time.perf_counter() - started:.1f}s (tokenizing {time.perf_counter() - encode_started:.1f}s)")
    return {
        "docs": str(docs),
        "vocab_size": vocab_size,
        "settings": {"val_docs": args.val_docs, "shard_tokens": args.shard_tokens, "bos_id": BOS_ID, "eos_appended": False},
        "tokenizer": {"file": f"tokenizers/{tokenizer_path.name}", "sha256": sha256_of(tokenizer_path), **tokenizer_info},
        "splits": {split: {**stats[split], "shards": writers[split].files} for split in ("val", "train")},
        "dataset_dir": f"datasets/fineweb10B_sp{vocab_size}",
    }


def publish(staging: Path, out: Path, vocab_size: int, manifest: dict) -> None:
    """Replace the dataset's shards, tokenizer and manifest with the staged ones."""
    dataset_dir, tokenizer_dir = out / manifest["dataset_dir"], out / "tokenizers"
    dataset_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    for stale in itertools.chain(dataset_dir.glob("fineweb_train_*.bin"), dataset_dir.glob("fineweb_val_*.bin")):
        stale.unlink()  # a smaller rebuild must not leave shards of an older one behind
    for shard in sorted((staging / "shards").iterdir()):
        os.replace(shard, dataset_dir / shard.name)
    for suffix in (".model", ".vocab"):
        staged, final = staging / f"fineweb_{vocab_size}_bpe{suffix}", tokenizer_dir / f"fineweb_{vocab_size}_bpe{suffix}"
        if staged.exists():
            os.replace(staged, final)
        else:
            final.unlink(missing_ok=True)  # a reused tokenizer has no .vocab; drop one left by an older build
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    log(f"wrote {out}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", required=True, help="JSONL documents with a \"text\" field (.jsonl, .xz, .zst, .gz)")
    parser.add_argument("--vocab-size", type=int, required=True, help="tokenizer vocabulary size V")
    parser.add_argument("--val-docs", type=int, required=True, help="the first N documents form the validation split")
    parser.add_argument("--out", required=True, help="data folder to fill (datasets/, tokenizers/, manifest.json)")
    parser.add_argument("--tokenizer", help="reuse this sentencepiece .model instead of training one")
    parser.add_argument("--tokenizer-docs", type=int, default=30_000, help="train the tokenizer on the first K documents")
    parser.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizing processes")
    args = parser.parse_args(argv)
    for name in ("val_docs", "tokenizer_docs", "shard_tokens", "workers"):
        if getattr(args, name) < (0 if name == "val_docs" else 1):
            parser.error(f"--{name.replace('_', '-')} must be positive")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        build(args)
    except InputError as error:
        print(f"prepare_docs: error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
