"""Build a tokenized dataset (shards + tokenizer + manifest) from local JSONL documents.

    python data/prepare_docs.py --docs docs.jsonl.xz --vocab-size 8192 --val-docs 50000 --out data/ [--caseops] \
        [--tokenizer model.model] [--tokenizer-docs 30000] [--shard-tokens 100000000] [--workers 16]

Input: one JSON object per line with a "text" field; .jsonl, .jsonl.xz, .jsonl.zst or .jsonl.gz.
The first --val-docs documents (file order) are validation, the rest training. Every document is
stored as BOS (id 1) + its tokens, no EOS, in the challenge's shard format (SPEC §2):
OUT/datasets/docs_sp{V}/fineweb_{val,train}_NNNNNN.bin with its manifest.json, and the tokenizer
OUT/tokenizers/docs_sp{V}.model. The same input gives byte-identical output.

--caseops (FRONTIER §6, docs/BYTES.md) names both docs_sp{V}_caseops: each document is normalised
as the challenge's tokenizer would (nmt_nfkc), case-transformed (data/caseops.py) and tokenized by
a tokenizer trained on transformed text, and the validation split gets a byte side-car,
fineweb_val_bytes_NNNNNN.bin: per token, the UTF-8 bytes of the normalised original text it spells.
"""
from __future__ import annotations

import argparse
import collections
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

import caseops

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
# CaseOps: the operators are single pieces that BPE never merges. The text is nmt_nfkc-normalised
# BEFORE the transform, so the tokenizer itself must not normalise again: NFKC does not commute with
# the transform ("™" becomes the capitals "TM"; "t" + U+0308 composes to "ẗ" where "T" + U+0308 has
# no composed form), and only an identity normaliser keeps the pieces spelling the transformed text.
CASEOPS_TRAINER_SETTINGS = {**TRAINER_SETTINGS, "normalization_rule_name": "identity",
                            "user_defined_symbols": list(caseops.OPERATORS)}
CHALLENGE_VAL_DOCS = 50_000  # documents in the challenge's FineWeb validation split


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


def iter_docs(path: Path, counts: collections.Counter | None = None):
    """Yield the "text" of every line; InputError with the line (and column) for anything else.
    Blank lines are skipped and counted in counts["blank_lines"]."""
    with open_docs(path) as f:
        line_no = 0
        try:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    if counts is not None:
                        counts["blank_lines"] += 1
                    continue
                try:
                    doc = json.loads(line)
                except json.JSONDecodeError as error:
                    raise InputError(f"{path}:{line_no}:{error.colno}: not valid JSON ({error.msg} at column {error.colno}); "
                                     "each line must be one JSON object") from None
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


def document_hash(tokens: np.ndarray) -> bytes:
    """A digest of one document's token sequence (BOS included)."""
    return hashlib.blake2b(np.ascontiguousarray(tokens, dtype="<u2").tobytes(), digest_size=16).digest()


def document_hashes(tokens: np.ndarray) -> list[bytes]:
    """document_hash of each document in a stream of documents that each start with BOS."""
    starts = np.flatnonzero(tokens == BOS_ID)
    return [document_hash(tokens[a:b]) for a, b in zip(starts, [*starts[1:], len(tokens)])]


class LeakCheck:
    """Validation documents whose exact token sequence also occurs in training: the --val-docs trap
    (FRONTIER §6), where 40,000 validation documents ended up in the training shards. Feed every
    validation document before any training one."""

    def __init__(self) -> None:
        self.val: collections.Counter = collections.Counter()
        self.seen_in_train: set[bytes] = set()

    def add_val(self, hashes: list[bytes]) -> None:
        self.val.update(hashes)

    def add_train(self, hashes: list[bytes]) -> None:
        self.seen_in_train.update(h for h in hashes if h in self.val)

    @property
    def leaked(self) -> int:
        return sum(self.val[h] for h in self.seen_in_train)

    def message(self) -> str:
        return (f"{self.leaked} of {sum(self.val.values())} validation documents also appear in the training split "
                "(identical tokens), so the model would be scored on text it trained on")


def not_comparable(caseops_data: bool, val_docs: int) -> str | None:
    """Why a CaseOps validation split cannot be compared with the challenge's scores, or None."""
    if caseops_data and val_docs < CHALLENGE_VAL_DOCS:
        return f"CaseOps validation split of {val_docs} documents, not the challenge's {CHALLENGE_VAL_DOCS:,}"
    return None


# --------------------------------------------------------------------------------------------------
# Tokenizer


def text_normalizer():
    """sentencepiece's nmt_nfkc with the challenge tokenizer's flags: text as that tokenizer sees it (docs/BYTES.md)."""
    import sentencepiece as spm

    return spm.SentencePieceNormalizer(rule_name="nmt_nfkc", add_dummy_prefix=False, remove_extra_whitespaces=True,
                                       escape_whitespaces=True)


def caseops_form(texts: list[str], normalizer) -> tuple[list[str], list[str]]:
    """(normalised texts, their CaseOps forms): normalise first, then transform (see CASEOPS_TRAINER_SETTINGS)."""
    normalized = [n.replace("\u2581", " ") for n in normalizer.normalize(texts)]
    return normalized, [caseops.encode(n) for n in normalized]


def train_tokenizer(docs: Path, vocab_size: int, n_docs: int, prefix: Path, use_caseops: bool) -> None:
    """Train sentencepiece BPE on the first n_docs documents, as the challenge did (NUL -> space, stripped, empties skipped)."""
    import sentencepiece as spm

    texts = [t.replace("\x00", " ").strip() for t in itertools.islice(iter_docs(docs), n_docs)]
    settings = CASEOPS_TRAINER_SETTINGS if use_caseops else TRAINER_SETTINGS
    if use_caseops:
        texts = caseops_form(texts, text_normalizer())[1]
    log(f"training a {vocab_size}-piece BPE tokenizer on the first {len(texts)} documents")
    # model_writer instead of model_prefix: the prefix would be stored inside the model and make it path-dependent.
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=(t for t in texts if t), model_writer=model,
                                       vocab_size=vocab_size, minloglevel=2, **settings)
    except RuntimeError as error:
        raise InputError(f"{docs}: tokenizer training on the first {len(texts)} documents failed ({' '.join(str(error).split())}); "
                         "check --vocab-size and --tokenizer-docs") from None
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    if sp.vocab_size() != vocab_size:  # hard_vocab_limit=False stops early when the text runs out of merges
        more = "raise --tokenizer-docs, add documents" if len(texts) == n_docs else "add documents"  # the file ran out
        raise InputError(f"{docs}: the first {len(texts)} documents only support a {sp.vocab_size()}-piece tokenizer, "
                         f"not {vocab_size}; {more} or lower --vocab-size")
    Path(f"{prefix}.model").write_bytes(model.getvalue())
    Path(f"{prefix}.vocab").write_text("".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.vocab_size())),
                                       encoding="utf-8")


def has_operator_pieces(sp) -> bool:
    return all(sp.id_to_piece(sp.piece_to_id(op)) == op for op in caseops.OPERATORS)


def check_tokenizer(model_path: Path, vocab_size: int, use_caseops: bool):
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
    if has_operator_pieces(sp) != use_caseops:
        raise InputError(f"{model_path}: " + ("tokenizer lacks the CaseOps operator pieces; omit --tokenizer to train one"
                                              if use_caseops else "tokenizer has the CaseOps operator pieces; add --caseops"))
    return sp


def piece_byte_table(sp) -> np.ndarray:
    """Bytes of the original text each piece of a CaseOps tokenizer spells: its UTF-8 with '▁' as a space,
    1 for a byte piece <0xNN>, 0 for control pieces and the operators (an escaped one is fixed by sidecar_bytes)."""
    table = np.zeros(sp.vocab_size(), dtype=np.uint16)
    for i in range(sp.vocab_size()):
        piece = sp.id_to_piece(i)
        if sp.is_byte(i):
            table[i] = 1
        elif not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i) or piece in caseops.OPERATORS):
            table[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
    return table


def sidecar_bytes(tokens: np.ndarray, table: np.ndarray, escape_id: int, operator_ids: np.ndarray) -> np.ndarray:
    """Original UTF-8 bytes of each token (uint16): table[token], except that the operator piece after
    an ESCAPE is a literal character of the text and counts its own bytes."""
    counts = table[tokens]
    literal = -1
    for i in np.flatnonzero(tokens == escape_id):
        if i == literal:  # this ESCAPE is itself the escaped literal
            continue
        literal = i + 1
        if literal >= len(tokens) or tokens[literal] not in operator_ids:
            raise InputError(f"an ESCAPE token is not followed by an operator at token {i}; the tokenizer does not "
                             "spell the transformed text, use one trained by prepare_docs.py --caseops")
        counts[literal] = 3  # U+E001..U+E004 are 3 UTF-8 bytes each
    return counts


# --------------------------------------------------------------------------------------------------
# Tokenizing workers (one sentencepiece model per process)

_worker = {}


def _init_worker(model_path: str, use_caseops: bool) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model_path)
    _worker.update(sp=sp, caseops=use_caseops)
    if use_caseops:
        _worker.update(normalizer=text_normalizer(), table=piece_byte_table(sp), escape_id=sp.piece_to_id(caseops.ESCAPE),
                       operator_ids=np.array([sp.piece_to_id(op) for op in caseops.OPERATORS]))


def encode_batch(task: tuple[list[str], bool]) -> dict:
    """BOS+tokens of every text concatenated (uint16), per-document token hashes, byte counts, and for
    a validation batch of CaseOps data the byte side-car aligned with the tokens."""
    texts, is_val = task
    sp = _worker["sp"]
    if _worker["caseops"]:
        normalized, texts_to_encode = caseops_form(texts, _worker["normalizer"])
    else:
        # decode(encode(t)) is exactly this normalised text (docs/BYTES.md); it is what bpb counts.
        normalized, texts_to_encode = [n.replace("\u2581", " ") for n in sp.normalize(texts)], texts
    pieces = sp.encode(texts_to_encode, num_threads=1)  # parallelism comes from the processes
    lengths = np.fromiter((len(p) + 1 for p in pieces), dtype=np.int64, count=len(pieces))
    tokens = np.empty(int(lengths.sum()), dtype=np.uint16)
    doc_starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    tokens[doc_starts] = BOS_ID
    is_body = np.ones(len(tokens), dtype=bool)
    is_body[doc_starts] = False
    tokens[is_body] = np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.uint16, count=int(is_body.sum()))
    result = {"tokens": tokens, "documents": len(texts), "raw_bytes": sum(len(t.encode("utf-8")) for t in texts),
              "normalized_bytes": sum(len(n.encode("utf-8")) for n in normalized), "hashes": document_hashes(tokens)}
    if _worker["caseops"] and is_val:
        result["sidecar"] = sidecar_bytes(tokens, _worker["table"], _worker["escape_id"], _worker["operator_ids"])
        if int(result["sidecar"].sum(dtype=np.int64)) != result["normalized_bytes"]:  # the byte proof, checked on every build
            raise InputError(f"the byte side-car counts {int(result['sidecar'].sum(dtype=np.int64))} bytes for text of "
                             f"{result['normalized_bytes']}; use a tokenizer trained by prepare_docs.py --caseops")
    return result


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


def dataset_name(vocab_size: int, use_caseops: bool) -> str:
    """Local documents are not FineWeb, so their datasets are docs_*, never fineweb10B_*."""
    return f"docs_sp{vocab_size}" + ("_caseops" if use_caseops else "")


def build(args: argparse.Namespace) -> dict:
    """Build into a staging folder and publish only on success, so a failed run never mixes old and new files."""
    out, vocab_size = Path(args.out), args.vocab_size
    if not 2 <= vocab_size <= 1 << 16:
        raise InputError(f"--vocab-size {vocab_size}: shards store uint16 ids, use 2..65536")
    counts = collections.Counter()
    if next(iter_docs(Path(args.docs), counts), None) is None:  # also fails early on a missing or unreadable file
        raise InputError(f"{args.docs}: no documents ({counts['blank_lines']} blank lines); each line must be {{\"text\": \"...\"}}")
    name = dataset_name(vocab_size, args.caseops)
    staging = out / f".prepare_docs_{name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "shards").mkdir(parents=True)
    try:
        manifest = build_staged(args, staging, name)
        publish(staging, out, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def build_staged(args: argparse.Namespace, staging: Path, name: str) -> dict:
    docs, vocab_size = Path(args.docs), args.vocab_size
    tokenizer_path = staging / f"{name}.model"
    started = time.perf_counter()
    if args.tokenizer:
        source = Path(args.tokenizer)
        if not source.is_file():
            raise InputError(f"{source}: tokenizer not found; pass --tokenizer an existing .model file or omit it to train one")
        check_tokenizer(source, vocab_size, args.caseops)
        shutil.copyfile(source, tokenizer_path)
        tokenizer_info = {"source": str(source), "trained": False}
    else:
        train_tokenizer(docs, vocab_size, args.tokenizer_docs, tokenizer_path.with_suffix(""), args.caseops)
        check_tokenizer(tokenizer_path, vocab_size, args.caseops)
        tokenizer_info = {"trained": True, "train_docs": args.tokenizer_docs,
                          "trainer_settings": CASEOPS_TRAINER_SETTINGS if args.caseops else TRAINER_SETTINGS}
        log(f"tokenizer trained in {time.perf_counter() - started:.1f}s")

    writers = {split: ShardWriter(staging / "shards", split, args.shard_tokens) for split in ("val", "train", "val_bytes")}
    stats = {split: {"documents": 0, "tokens": 0, "raw_bytes": 0, "normalized_bytes": 0} for split in ("val", "train")}
    line_counts = collections.Counter()
    leaks = LeakCheck()
    encode_started = last_report = time.perf_counter()

    def tasks():
        """Batches never straddle the val/train boundary, so each result belongs to one split."""
        texts = iter_docs(docs, line_counts)
        yield from ((batch, True) for batch in batched(itertools.islice(texts, args.val_docs), DOCS_PER_TASK))
        yield from ((batch, False) for batch in batched(texts, DOCS_PER_TASK))

    with multiprocessing.get_context("fork").Pool(args.workers, _init_worker, (str(tokenizer_path), args.caseops)) as pool:
        for result in pool.imap(encode_batch, tasks(), chunksize=1):
            split = "val" if stats["val"]["documents"] < args.val_docs else "train"
            writers[split].add(result["tokens"])
            if "sidecar" in result:
                writers["val_bytes"].add(result["sidecar"])
            (leaks.add_val if split == "val" else leaks.add_train)(result["hashes"])
            stats[split]["tokens"] += len(result["tokens"])
            for key in ("documents", "raw_bytes", "normalized_bytes"):
                stats[split][key] += result[key]
            if time.perf_counter() - last_report > 5:
                last_report = time.perf_counter()
                done = stats["val"]["documents"] + stats["train"]["documents"]
                log(f"{done} documents, {stats['val']['tokens'] + stats['train']['tokens']:,} tokens, "
                    f"{done / (last_report - encode_started):.0f} docs/s")
    for writer in writers.values():
        writer.flush()

    total = stats["val"]["documents"] + stats["train"]["documents"]
    if total < 2:
        raise InputError(f"{docs}: {total} document; a dataset needs at least 2 (validation and training), add documents")
    if stats["train"]["documents"] == 0:
        raise InputError(f"{docs}: {total} documents, so --val-docs {args.val_docs} leaves none for training; "
                         f"use --val-docs {total - 1} or fewer, or add documents")
    if leaks.leaked:
        raise InputError(f"{docs}: {leaks.message()}; remove the duplicate documents from the file")
    if line_counts["blank_lines"]:
        log(f"skipped {line_counts['blank_lines']} blank lines")
    for split in ("val", "train"):
        s = stats[split]
        log(f"{split}: {s['documents']} documents, {s['tokens']:,} tokens, {s['normalized_bytes']:,} bytes "
            f"({s['normalized_bytes'] / max(1, s['tokens'] - s['documents']):.3f} bytes/token), {len(writers[split].files)} shards")
    log(f"built in {time.perf_counter() - started:.1f}s (tokenizing {time.perf_counter() - encode_started:.1f}s)")
    flag = not_comparable(args.caseops, stats["val"]["documents"])
    if flag:
        log(f"WARNING: {flag}: its scores are not comparable with the challenge's")
    splits = {split: {**stats[split], "shards": writers[split].files} for split in ("val", "train")}
    if args.caseops:
        splits["val"]["byte_sidecar"] = writers["val_bytes"].files
    return {
        "name": name,
        "source": {"kind": "local documents", "path": str(docs), "sha256": sha256_of(docs),
                   "blank_lines": line_counts["blank_lines"]},
        "vocab_size": vocab_size,
        "caseops": args.caseops,
        "val_docs": stats["val"]["documents"],
        "tokenizer_docs": None if args.tokenizer else args.tokenizer_docs,
        "not_comparable": flag,
        "val_docs_in_train": leaks.leaked,
        "settings": {"shard_tokens": args.shard_tokens, "bos_id": BOS_ID, "eos_appended": False},
        "tokenizer": {"file": f"tokenizers/{tokenizer_path.name}", "sha256": sha256_of(tokenizer_path), **tokenizer_info},
        "splits": splits,
    }


def publish(staging: Path, out: Path, manifest: dict) -> None:
    """Replace the dataset's shards, manifest and tokenizer with the staged ones."""
    name = manifest["name"]
    dataset_dir, tokenizer_dir = out / "datasets" / name, out / "tokenizers"
    dataset_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    for stale in dataset_dir.glob("fineweb_*.bin"):
        stale.unlink()  # a smaller rebuild must not leave shards of an older one behind
    for shard in sorted((staging / "shards").iterdir()):
        os.replace(shard, dataset_dir / shard.name)
    for suffix in (".model", ".vocab"):
        staged, final = staging / f"{name}{suffix}", tokenizer_dir / f"{name}{suffix}"
        if staged.exists():
            os.replace(staged, final)
        else:
            final.unlink(missing_ok=True)  # a reused tokenizer has no .vocab; drop one left by an older build
    (dataset_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    log(f"wrote {dataset_dir} and {tokenizer_dir / name}.model")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", required=True, help="JSONL documents with a \"text\" field (.jsonl, .xz, .zst, .gz)")
    parser.add_argument("--vocab-size", type=int, required=True, help="tokenizer vocabulary size V")
    parser.add_argument("--val-docs", type=int, required=True, help="the first N documents form the validation split")
    parser.add_argument("--out", required=True, help="data folder to fill (datasets/docs_sp{V}[_caseops]/, tokenizers/)")
    parser.add_argument("--caseops", action="store_true", help="CaseOps: case-transformed text, its own tokenizer, a byte side-car")
    parser.add_argument("--tokenizer", help="reuse this sentencepiece .model instead of training one")
    parser.add_argument("--tokenizer-docs", type=int, default=30_000, help="train the tokenizer on the first K documents")
    parser.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizing processes")
    args = parser.parse_args(argv)
    for name in ("val_docs", "tokenizer_docs", "shard_tokens", "workers"):
        if getattr(args, name) < 1:
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
