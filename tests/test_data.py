"""Data section of train_gpt.py and the data/ scripts: shards, loader, byte accounting, dataset builder."""
import gzip
import hashlib
import importlib.util
import itertools
import json
import lzma
import math
import os
import subprocess
import sys
import threading
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt as tg
from tiny import tiny_hparams, write_shard

REPO_ROOT = Path(__file__).resolve().parents[1]
PREPARE_DOCS = REPO_ROOT / "data" / "prepare_docs.py"
WIDE_VOCAB = 1 << 16  # loader tests store each token's position as its id, so every id is valid


def load_script(name: str):
    if str(REPO_ROOT / "data") not in sys.path:  # the data/ scripts import each other, as they do when run
        sys.path.insert(0, str(REPO_ROOT / "data"))
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "data" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@lru_cache(maxsize=None)
def corpus_docs(path: Path, n: int) -> tuple[str, ...]:
    """The first n corpus documents, stream-decompressed (only the start of the file is read)."""
    with lzma.open(path, "rt", encoding="utf-8") as f:
        return tuple(json.loads(line)["text"] for line in itertools.islice(f, n))


def normalized(sp, text: str) -> str:
    """The text as the tokenizer sees it (docs/BYTES.md): sentencepiece's normaliser, with '▁' shown as a space."""
    return sp.normalize(text).replace("\u2581", " ")


def train_spaceless_tokenizer(folder: Path) -> tuple[Path, int]:
    """A tokenizer trained on text without spaces: its vocabulary has no '▁' piece."""
    import sentencepiece as spm

    lines = ["".join(chr(97 + (i * j) % 26) for j in range(40)) for i in range(200)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(folder / "nospace"), vocab_size=300,
                                   minloglevel=2, **load_script("prepare_docs").TRAINER_SETTINGS)
    model = folder / "nospace.model"
    return model, spm.SentencePieceProcessor(model_file=str(model)).vocab_size()


# --------------------------------------------------------------------------------------------------
# Shards


def test_read_shard_round_trips_tokens_memory_mapped(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16) * 7
    shard = tg.read_shard(str(write_shard(tmp_path / "fineweb_val_000000.bin", tokens)), vocab_size=7000)
    assert isinstance(shard, np.memmap)
    np.testing.assert_array_equal(shard, tokens)


@pytest.mark.parametrize("kind", ["magic", "version", "truncated", "trailing", "header_only_partial"])
def test_read_shard_rejects_malformed_files(tmp_path, kind):
    path = tmp_path / "fineweb_train_000000.bin"
    tokens = np.arange(100)
    if kind == "magic":
        write_shard(path, tokens, magic=123)
    elif kind == "version":
        write_shard(path, tokens, version=2)
    elif kind == "truncated":
        write_shard(path, tokens, n_tokens=101)
    elif kind == "trailing":
        write_shard(path, tokens, extra=b"\0\0")
    else:
        path.write_bytes(b"\0" * 100)
    with pytest.raises(tg.DataError, match=str(path)):
        tg.read_shard(str(path))


def test_read_shard_rejects_ids_beyond_vocab(tmp_path):
    path = write_shard(tmp_path / "fineweb_val_000000.bin", [1, 5, 1024])
    tg.read_shard(str(path), vocab_size=1025)
    with pytest.raises(tg.DataError, match="1024 >= VOCAB_SIZE=1024"):
        tg.read_shard(str(path), vocab_size=1024)


def test_list_shards_errors_name_the_folder(tmp_path):
    with pytest.raises(tg.DataError, match="does not exist"):
        tg.list_shards(str(tmp_path / "missing"), "train")
    write_shard(tmp_path / "fineweb_val_000000.bin", [1, 2])
    with pytest.raises(tg.DataError, match=f"{tmp_path}.*no fineweb_train"):
        tg.list_shards(str(tmp_path), "train")


def test_load_validation_tokens_concatenates_shards_in_order(tmp_path):
    write_shard(tmp_path / "fineweb_val_000001.bin", [1, 30, 31])
    write_shard(tmp_path / "fineweb_val_000000.bin", [1, 10, 11, 1, 20])
    tokens = tg.load_validation_tokens(str(tmp_path), vocab_size=64)
    assert tokens.dtype == torch.int64
    assert tokens.tolist() == [1, 10, 11, 1, 20, 1, 30, 31]


# --------------------------------------------------------------------------------------------------
# Training loader


def position_shards(folder: Path, lengths: list[int]) -> list[str]:
    """Training shards whose token ids are their global positions, so a window reveals where it came from."""
    files, start = [], 0
    for i, n in enumerate(lengths):
        files.append(str(write_shard(folder / f"fineweb_train_{i:06d}.bin", np.arange(start, start + n))))
        start += n
    return files


def make_loader(files, seq_len=7, micro=1, accum=1, rank=0, world=1, seed=0, vocab=WIDE_VOCAB) -> tg.TrainLoader:
    return tg.TrainLoader(files, seq_len, micro, accum, tg.Runtime(rank=rank, world_size=world), seed, vocab)


def windows_of(loader, n_batches) -> list[np.ndarray]:
    rows = []
    for _ in range(n_batches):
        inputs, targets = loader.next_batch()
        assert inputs.shape == targets.shape and inputs.dtype == torch.int64
        assert torch.equal(inputs[:, 1:], targets[:, :-1])  # targets are the inputs shifted by one
        rows.extend(np.concatenate([inputs.numpy(), targets.numpy()[:, -1:]], axis=1))
    return rows


def test_loader_epochs_cover_every_phase_aligned_window_once(tmp_path):
    lengths = [203, 150]
    files = position_shards(tmp_path, lengths)
    loader = make_loader(files, seq_len=7)
    window = 8
    per_epoch = sum((n - 7) // window for n in lengths)
    assert loader.windows_per_epoch == per_epoch
    shard_starts = np.cumsum([0] + lengths)
    epoch_orders = []
    for _ in range(4):
        rows = windows_of(loader, per_epoch)
        starts = [int(r[0]) for r in rows]
        for r in rows:  # contiguous and inside one shard
            assert np.array_equal(r, np.arange(r[0], r[0] + window))
            shard = np.searchsorted(shard_starts, r[0], side="right") - 1
            assert r[-1] < shard_starts[shard + 1]
        offsets = {(s - shard_starts[np.searchsorted(shard_starts, s, side="right") - 1]) % window for s in starts}
        assert len(offsets) == 1  # one phase per epoch
        assert len(set(starts)) == per_epoch  # each window exactly once, none overlapping
        epoch_orders.append(starts)
    assert len({tuple(o) for o in epoch_orders}) > 1  # a new epoch draws a new phase/order
    loader.close()


def test_loader_gives_each_step_the_same_data_for_any_world_size(tmp_path):
    files = position_shards(tmp_path, [500, 400])
    steps = 3

    def per_step(world, accum, seed=0):
        loaders = [make_loader(files, micro=2, accum=accum, rank=r, world=world, seed=seed) for r in range(world)]
        data = [np.stack([w for loader in loaders for w in windows_of(loader, accum)]) for _ in range(steps)]
        for loader in loaders:
            loader.close()
        return data

    single = per_step(world=1, accum=4)
    for world, accum in ((2, 2), (4, 1)):
        for a, b in zip(single, per_step(world, accum)):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(single[0], per_step(world=1, accum=4, seed=1)[0])


def test_loader_state_dict_restores_the_exact_position(tmp_path):
    files = position_shards(tmp_path, [300, 300])
    loader = make_loader(files, micro=3, accum=2)
    windows_of(loader, 5)
    state = loader.state_dict()
    first = windows_of(loader, 30)  # runs past an epoch boundary (50 windows per epoch)
    loader.load_state_dict(state)
    np.testing.assert_array_equal(np.stack(first), np.stack(windows_of(loader, 30)))
    fresh = make_loader(files, micro=3, accum=2)
    fresh.load_state_dict(state)
    np.testing.assert_array_equal(np.stack(first), np.stack(windows_of(fresh, 30)))
    for l in (loader, fresh):
        l.close()


def test_loader_close_stops_its_thread(tmp_path):
    loader = make_loader(position_shards(tmp_path, [100]))
    worker = loader._worker
    assert worker.is_alive()
    loader.close()
    assert not worker.is_alive()
    assert not any(t.name == "train-loader" and t.is_alive() for t in threading.enumerate())


def test_loader_refuses_validation_files(tmp_path):
    val = write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(100))
    train = position_shards(tmp_path, [100])
    with pytest.raises(tg.DataError, match="validation shard"):
        make_loader(train + [str(val)])
    alias = tmp_path / "elsewhere" / "fineweb_train_000001.bin"
    alias.parent.mkdir()
    alias.symlink_to(val)
    with pytest.raises(tg.DataError, match="validation shard"):
        make_loader(train + [str(alias)])


def test_loader_rejects_ids_beyond_vocab_when_reading(tmp_path):
    path = write_shard(tmp_path / "fineweb_train_000000.bin", np.full(64, 5000))
    loader = make_loader([str(path)], vocab=1024)
    for _ in range(2):  # and it keeps failing rather than hanging
        with pytest.raises(tg.DataError, match=f"{path}.*5000 >= VOCAB_SIZE=1024"):
            loader.next_batch()
    loader.close()


def test_loader_rejects_shards_shorter_than_a_window(tmp_path):
    with pytest.raises(tg.DataError, match="TRAIN_SEQ_LEN"):
        make_loader(position_shards(tmp_path, [5]), seq_len=7)


# --------------------------------------------------------------------------------------------------
# Tokenizer and byte tables


def test_load_tokenizer_checks_file_and_vocab_size(tmp_path, sp1024_model_path):
    with pytest.raises(tg.DataError, match="not found"):
        tg.load_tokenizer(str(tmp_path / "none.model"), 1024)
    with pytest.raises(tg.DataError, match="1024 pieces but VOCAB_SIZE=8192"):
        tg.load_tokenizer(str(sp1024_model_path), 8192)
    assert tg.load_tokenizer(str(sp1024_model_path), 1024).vocab_size() == 1024


def test_load_tokenizer_requires_a_standalone_space_piece(tmp_path):
    model, size = train_spaceless_tokenizer(tmp_path)
    with pytest.raises(tg.DataError, match="no standalone"):
        tg.load_tokenizer(str(model), size)


def test_byte_tables_follow_the_piece_rules(sp8192_model_path):
    sp = tg.load_tokenizer(str(sp8192_model_path), 8192)
    tables = tg.build_byte_tables(sp, 8192)
    for i in range(8192):
        piece = sp.id_to_piece(i)
        if sp.is_control(i) or sp.is_unknown(i):
            assert tables.is_boundary[i] and tables.base_bytes[i] == 0
        elif sp.is_byte(i):
            assert tables.base_bytes[i] == 1 and not tables.has_leading_space[i]
        else:
            body = piece[1:] if piece.startswith("\u2581") else piece
            assert "\u2581" not in body  # the rule relies on '▁' only ever leading a piece
            assert tables.has_leading_space[i] == piece.startswith("\u2581")
            assert tables.base_bytes[i] == len(body.encode())
    space = sp.piece_to_id("\u2581")
    word = sp.piece_to_id("\u2581the")
    assert tables.target_bytes(torch.tensor([tg.BOS_ID, word]), torch.tensor([word, space])).tolist() == [3, 1]


# --------------------------------------------------------------------------------------------------
# Exact byte accounting on real documents (docs/BYTES.md)


@pytest.mark.parametrize("model_fixture,vocab", [("sp1024_model_path", 1024), ("sp8192_model_path", 8192)])
def test_bytes_of_each_document_equal_its_normalized_utf8_length(request, corpus_path, model_fixture, vocab):
    sp = tg.load_tokenizer(str(request.getfixturevalue(model_fixture)), vocab)
    tables = tg.build_byte_tables(sp, vocab)
    docs = corpus_docs(corpus_path, 300)
    stream, expected_total, changed = [], 0, 0
    for text in docs:
        ids = [tg.BOS_ID] + sp.encode(text)
        ids_t = torch.tensor(ids)
        norm = normalized(sp, text)
        assert int(tables.target_bytes(ids_t[:-1], ids_t[1:]).sum()) == len(norm.encode("utf-8"))
        assert sp.decode(ids[1:]) == norm  # what the tokens spell is exactly the normalised text
        if all(c.isascii() and (c.isprintable() or c in "\n\t\r") for c in text):  # only whitespace runs change
            assert norm == " ".join(text.split())
        stream += ids
        expected_total += len(norm.encode("utf-8"))
        changed += norm != text
    assert changed > 0  # the sample does exercise normalisation (newlines at least)
    no_sidecar = str(REPO_ROOT / "tests")  # a folder without fineweb_val_bytes_*.bin: bytes come from the tables
    assert int(tg.validation_target_bytes(no_sidecar, torch.tensor(stream), tables, caseops=False).sum()) == expected_total


@pytest.mark.parametrize("text,expected", [
    ("  two  spaces\n\nand\ttab  ", "two spaces and tab"),    # whitespace runs -> one space, ends stripped
    ("ﬁne ½ ① ™", "fine 1⁄2 1 TM"),                           # NFKC compatibility mappings
    ("zero\u200bwidth no\u00a0break", "zero width no break"),  # invisible/odd spaces -> a space
    ("ctrl\x01char\x0bvt\x0cff", "ctrlcharvt ff"),           # ASCII controls dropped, form feed is a space
    ("literal \u2581 mark", "literal mark"),                  # U+2581 is the space marker itself
])
def test_documented_normalisation_examples(sp8192_model_path, text, expected):
    sp = tg.load_tokenizer(str(sp8192_model_path), 8192)
    tables = tg.build_byte_tables(sp, 8192)
    ids = torch.tensor([tg.BOS_ID] + sp.encode(text))
    assert normalized(sp, text) == expected == sp.decode(ids[1:].tolist())
    assert int(tables.target_bytes(ids[:-1], ids[1:]).sum()) == len(expected.encode())


# --------------------------------------------------------------------------------------------------
# Byte side-car: the per-target byte counts every bpb divides by


def random_tables(vocab_size: int) -> tg.ByteTables:
    g = torch.Generator().manual_seed(0)
    is_boundary = torch.zeros(vocab_size, dtype=torch.bool)
    is_boundary[:4] = True  # pad, bos, eos, unk
    base_bytes = torch.randint(1, 5, (vocab_size,), generator=g).to(torch.int16).masked_fill(is_boundary, 0)
    return tg.ByteTables(base_bytes, (torch.rand(vocab_size, generator=g) < 0.4) & ~is_boundary, is_boundary)


def dataset_with_sidecar(folder: Path, val: torch.Tensor, sidecar, split_at: int | None = None) -> str:
    """Validation shards of val (cut at split_at) and, when sidecar is not None, its side-car cut the same way."""
    folder.mkdir(parents=True)
    cuts = [0, split_at or len(val), len(val)]
    for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
        if b > a:
            write_shard(folder / f"fineweb_val_{i:06d}.bin", val[a:b].numpy())
            if sidecar is not None:
                write_shard(folder / f"fineweb_val_bytes_{i:06d}.bin", np.asarray(sidecar[a:b]))
    return str(folder)


def table_sidecar(val: torch.Tensor, tables: tg.ByteTables) -> np.ndarray:
    """A side-car written from the tables: entry j is token j's bytes as a target, 0 for the first token."""
    return np.concatenate(([0], tables.target_bytes(val[:-1], val[1:]).numpy()))


def test_sidecar_bytes_are_what_every_bpb_divides_by(monkeypatch, tmp_path):
    h = tiny_hparams(monkeypatch, VAL_BATCH_TOKENS=128)
    tables, model = random_tables(h.vocab_size), tg.GPT(h)
    val = torch.randint(4, h.vocab_size, (301,), generator=torch.Generator().manual_seed(1))
    val[::37] = tg.BOS_ID
    sidecar = table_sidecar(val, tables)
    logged = []
    from_tables = tg.validation_target_bytes(str(tmp_path / "none"), val, tables, caseops=False, log=logged.append)
    from_sidecar = tg.validation_target_bytes(dataset_with_sidecar(tmp_path / "same", val, sidecar, split_at=150),
                                              val, tables, caseops=False, log=logged.append)
    assert from_tables.dtype == from_sidecar.dtype == torch.int32 and torch.equal(from_tables, from_sidecar)
    assert logged == ["bytes: tokenizer tables",
                      f"bytes: side-car {tmp_path / 'same' / 'fineweb_val_bytes_000000.bin'} (+1 more)"]
    doubled = tg.validation_target_bytes(dataset_with_sidecar(tmp_path / "doubled", val, 2 * sidecar), val, tables, caseops=False)
    with torch.no_grad():
        plain = [tg.eval_plain(model, val, target_bytes, h, tg.Runtime()) for target_bytes in (from_tables, from_sidecar, doubled)]
    assert plain[0].bpb == plain[1].bpb and plain[0].bytes == int(sidecar.sum())
    assert plain[2].loss == plain[0].loss and plain[2].bpb == pytest.approx(plain[0].bpb / 2, rel=1e-12)


@pytest.mark.parametrize("case", ["caseops_without_sidecar", "short_sidecar", "shifted_sidecar"])
def test_byte_sidecar_problems_are_refused(tmp_path, case):
    tables = random_tables(64)
    val = torch.tensor([tg.BOS_ID, 10, 11, 12, tg.BOS_ID, 20, 21])
    sidecar = table_sidecar(val, tables)
    sidecar, expect = {"caseops_without_sidecar": (None, "CaseOps dataset without a byte side-car"),
                       "short_sidecar": (sidecar[:-1], "6 entries for 7 validation tokens"),
                       "shifted_sidecar": (np.roll(sidecar, 1), "gives BOS tokens bytes")}[case]
    folder = dataset_with_sidecar(tmp_path / "data", val, sidecar)
    with pytest.raises(tg.DataError, match=expect):
        tg.validation_target_bytes(folder, val, tables, caseops=True)


def test_validation_shards_exclude_the_sidecar(tmp_path):
    val = torch.tensor([tg.BOS_ID, 10, 11])
    folder = dataset_with_sidecar(tmp_path / "data", val, [0, 3, 4])
    assert tg.list_shards(folder, "val") == [str(tmp_path / "data" / "fineweb_val_000000.bin")]
    assert tg.load_validation_tokens(folder, 64).tolist() == val.tolist()


def test_tokenizer_comes_from_the_dataset_manifest(monkeypatch, tmp_path):
    dataset = tmp_path / "datasets" / "docs_sp256"
    dataset.mkdir(parents=True)
    default = str(tmp_path / "tokenizers" / "fineweb_256_bpe.model")
    h = tiny_hparams(monkeypatch, DATA_DIR=str(tmp_path), DATASET="docs_sp256", TOKENIZER_PATH="")
    assert h.tokenizer_file == default  # no manifest: the FineWeb default
    (dataset / "manifest.json").write_text(json.dumps({"tokenizer": {"file": "tokenizers/docs_sp256.model"}}))
    assert h.tokenizer_file == str(tmp_path / "tokenizers" / "docs_sp256.model")
    assert tiny_hparams(monkeypatch, DATA_DIR=str(tmp_path), DATASET="docs_sp256", TOKENIZER_PATH="x.model").tokenizer_file == "x.model"
    (dataset / "manifest.json").write_text("{not json")
    with pytest.raises(tg.DataError, match="manifest.json: unreadable manifest"):
        h.tokenizer_file


def test_every_reported_bpb_counts_the_sidecar_bytes(tmp_path, sp1024_model_path):
    """The whole script, on a dataset whose manifest names its tokenizer and whose side-car says every
    target has twice the bytes the tables give: every evaluation stage reports those doubled bytes."""
    from tiny import TINY_ENV, write_shards

    dataset = write_shards(tmp_path / "data" / "datasets" / "docs_sp1024", 1024, train_tokens=20_000, val_tokens=1_500)
    (tmp_path / "data" / "tokenizers").mkdir()
    (tmp_path / "data" / "tokenizers" / "docs_sp1024.model").write_bytes(sp1024_model_path.read_bytes())
    (dataset / "manifest.json").write_text(json.dumps({"tokenizer": {"file": "tokenizers/docs_sp1024.model"}}))
    val = tg.load_validation_tokens(str(dataset), 1024)
    tables = tg.build_byte_tables(tg.load_tokenizer(str(sp1024_model_path), 1024), 1024)
    write_shard(dataset / "fineweb_val_bytes_000000.bin", 2 * table_sidecar(val, tables))
    expected_bytes = 2 * int(tables.target_bytes(val[:-1], val[1:]).sum())
    env = {**os.environ, **TINY_ENV, "VOCAB_SIZE": "1024", "DATA_DIR": str(tmp_path / "data"), "DATASET": "docs_sp1024",
           "TOKENIZER_PATH": "", "RUN_ID": "sidecar", "LOG_DIR": str(tmp_path / "logs"), "ITERATIONS": "2",
           "MAX_WALLCLOCK_SECONDS": "0", "WARMUP_STEPS": "0", "TRAIN_BATCH_TOKENS": "256", "MICRO_BATCH_SEQS": "8",
           "VAL_LOSS_EVERY": "1", "GPTQ_CALIBRATION_BATCHES": "1", "AVERAGE_CHECK_SEQS": "2", "EVAL_STRIDE": "16",
           "VAL_BATCH_TOKENS": "1024", "TTT_CHUNK_TOKENS": "512", "TTT_EPOCHS": "1", "OMP_NUM_THREADS": "1",
           "SLIDING_WINDOW_ENABLED": "1"}  # every stage, the default-off sliding one too
    done = subprocess.run([sys.executable, str(REPO_ROOT / "train_gpt.py")], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"tokenizer:{tmp_path / 'data' / 'tokenizers' / 'docs_sp1024.model'}" in done.stdout
    assert f"bytes: side-car {dataset / 'fineweb_val_bytes_000000.bin'}" in done.stdout
    events = [json.loads(line) for line in open(tmp_path / "logs" / "sidecar.jsonl")]
    evals = {e["stage"]: e for e in events if e["event"] == "eval"}
    stages = {"step1", "pre_average", "post_ema", "quantized", "quantized_sliding", "quantized_ttt"}
    assert set(evals) == stages | {f"{s}_untilted" for s in stages}  # the n-gram tilt (default on) logs both
    for e in evals.values():
        assert e["bytes"] == expected_bytes, e["stage"]
        assert e["val_bpb"] == pytest.approx(e["val_loss"] * e["tokens"] / (math.log(2) * expected_bytes), rel=1e-9)
    assert next(e for e in events if e["event"] == "data")["val_bytes"] == expected_bytes


# --------------------------------------------------------------------------------------------------
# data/prepare_docs.py


def run_prepare(*args, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(PREPARE_DOCS), *map(str, args)], capture_output=True, text=True)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def write_jsonl(path: Path, texts) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def dataset_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_prepare_docs_builds_a_loadable_dataset_deterministically(tmp_path, corpus_path):
    docs = corpus_docs(corpus_path, 300)
    source = write_jsonl(tmp_path / "docs.jsonl", docs)
    common = ("--docs", source, "--vocab-size", 512, "--val-docs", 40, "--tokenizer-docs", 150,
              "--shard-tokens", 60_000, "--workers", 2)
    run_prepare(*common, "--out", tmp_path / "a")
    run_prepare(*common, "--out", tmp_path / "b")
    a, b = dataset_files(tmp_path / "a"), dataset_files(tmp_path / "b")
    assert a == b  # byte-identical, tokenizer included

    out = tmp_path / "a"
    dataset = out / "datasets" / "docs_sp512"  # local documents are not stored under a FineWeb name
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert not (out / "manifest.json").exists() and not (out / "datasets" / "fineweb10B_sp512").exists()
    sp = tg.load_tokenizer(str(out / "tokenizers" / "docs_sp512.model"), 512)
    val = tg.load_validation_tokens(str(dataset), 512)
    train = np.concatenate([tg.read_shard(f, 512) for f in tg.list_shards(str(dataset), "train")])
    assert len(tg.list_shards(str(dataset), "train")) > 1  # documents flow across shard boundaries

    # Each split is BOS + tokens per document, in file order, no EOS.
    for tokens, texts in ((val.numpy(), docs[:40]), (train, docs[40:])):
        starts = np.flatnonzero(tokens == tg.BOS_ID)
        assert starts[0] == 0 and len(starts) == len(texts)
        bodies = np.split(tokens, starts[1:])
        assert all(sp.decode(body[1:].tolist()) == normalized(sp, t) for body, t in zip(bodies, texts))
        assert not np.any(tokens == sp.eos_id())

    tables = tg.build_byte_tables(sp, 512)
    val_stats = manifest["splits"]["val"]
    assert (val_stats["documents"], val_stats["tokens"]) == (40, len(val))
    assert val_stats["normalized_bytes"] == int(tables.target_bytes(val[:-1], val[1:]).sum())
    assert val_stats["raw_bytes"] == sum(len(t.encode()) for t in docs[:40])
    assert manifest["splits"]["train"]["tokens"] == len(train)
    for split in ("val", "train"):
        for shard in manifest["splits"][split]["shards"]:
            assert hashlib.sha256((dataset / shard["file"]).read_bytes()).hexdigest() == shard["sha256"]
    assert manifest["tokenizer"]["sha256"] == hashlib.sha256(a["tokenizers/docs_sp512.model"]).hexdigest()
    assert manifest["tokenizer"]["file"] == "tokenizers/docs_sp512.model"
    assert manifest["source"] == {"kind": "local documents", "path": str(source), "blank_lines": 0,
                                  "sha256": hashlib.sha256(source.read_bytes()).hexdigest()}
    assert (manifest["caseops"], manifest["val_docs"], manifest["tokenizer_docs"]) == (False, 40, 150)
    assert (manifest["val_docs_in_train"], manifest["not_comparable"]) == (0, None)
    assert not list(dataset.glob("fineweb_val_bytes_*.bin"))  # no side-car without --caseops


def test_prepare_docs_reuses_a_given_tokenizer(tmp_path, corpus_path, sp1024_model_path):
    docs = corpus_docs(corpus_path, 60)
    source = write_jsonl(tmp_path / "docs.jsonl", docs)
    out = tmp_path / "out"
    run_prepare("--docs", source, "--vocab-size", 1024, "--val-docs", 10, "--out", out,
                "--tokenizer", sp1024_model_path, "--workers", 1)
    assert (out / "tokenizers" / "docs_sp1024.model").read_bytes() == sp1024_model_path.read_bytes()
    sp = tg.load_tokenizer(str(sp1024_model_path), 1024)
    expected = [i for t in docs[:10] for i in [tg.BOS_ID] + sp.encode(t)]
    dataset = out / "datasets" / "docs_sp1024"
    assert tg.load_validation_tokens(str(dataset), 1024).tolist() == expected
    assert json.loads((dataset / "manifest.json").read_text())["tokenizer_docs"] is None  # not trained here

    # A rebuild that fails half-way leaves the previous dataset exactly as it was.
    before = dataset_files(out)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(source.read_text() + "not json\n")
    result = run_prepare("--docs", broken, "--vocab-size", 1024, "--val-docs", 10, "--out", out, "--workers", 1, check=False)
    assert result.returncode != 0 and ":61:1: not valid JSON" in result.stderr
    assert dataset_files(out) == before


def test_prepare_docs_reads_every_compression(tmp_path):
    texts = ["first doc", "second \u00e9 doc", "third"]
    plain = "".join(json.dumps({"text": t, "source": "x"}) + "\n" for t in texts).encode()
    import zstandard

    writers = {".jsonl": lambda b: b, ".jsonl.xz": lzma.compress, ".jsonl.gz": gzip.compress,
               ".jsonl.zst": lambda b: zstandard.ZstdCompressor().compress(b)}
    prepare_docs = load_script("prepare_docs")
    for suffix, compress in writers.items():
        path = tmp_path / f"docs{suffix}"
        path.write_bytes(compress(plain))
        assert list(prepare_docs.iter_docs(path)) == texts


BAD_INPUT_CASES = {  # case: (what the last line says, advice it must not give)
    "empty": ("no documents (0 blank lines)", None),
    "blank_lines_only": ("no documents (3 blank lines)", None),
    "bad_json": (":3:10: not valid JSON (Expecting value at column 10)", None),
    "no_text": (':2: no string "text" field', None),
    "too_few_docs": ("20 documents, so --val-docs 20 leaves none for training; use --val-docs 19 or fewer, or add documents", None),
    "one_doc": ("1 document; a dataset needs at least 2 (validation and training), add documents", "--val-docs"),
    "vocab_mismatch": ("1024 pieces but --vocab-size is 512", None),
    "no_space_piece": ("no standalone", None),
    "file_too_small_for_vocab": ("; add documents or lower --vocab-size", "--tokenizer-docs"),  # all 20 documents were used
    "tokenizer_docs_too_few": ("; raise --tokenizer-docs, add documents or lower --vocab-size", None),
    "caseops_with_plain_tokenizer": ("lacks the CaseOps operator pieces", None),
    "val_docs_in_train": ("2 of 5 validation documents also appear in the training split", None),
    "missing_docs": ("not found", None),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT_CASES))
def test_prepare_docs_bad_input_exits_with_one_clear_line(tmp_path, case, sp1024_model_path):
    texts = [f"document number {i}" for i in range(20)]
    source = write_jsonl(tmp_path / "docs.jsonl", texts)
    args = ["--tokenizer", sp1024_model_path, "--vocab-size", 1024, "--val-docs", 5]
    if case in ("empty", "blank_lines_only"):
        source.write_text("" if case == "empty" else "\n  \n\n")
    elif case == "bad_json":
        source.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n')
    elif case == "no_text":
        source.write_text('{"text": "ok"}\n{"body": "ok"}\n')
    elif case == "too_few_docs":
        args[-1] = 20
    elif case == "one_doc":
        write_jsonl(source, texts[:1])
        args[-1] = 1
    elif case == "vocab_mismatch":
        args[3] = 512
    elif case == "no_space_piece":
        model, size = train_spaceless_tokenizer(tmp_path)
        args[:4] = ["--tokenizer", model, "--vocab-size", size]
    elif case == "file_too_small_for_vocab":
        args[:4] = ["--vocab-size", 4096]
    elif case == "tokenizer_docs_too_few":
        args[:4] = ["--vocab-size", 4096, "--tokenizer-docs", 5]
    elif case == "caseops_with_plain_tokenizer":
        args.append("--caseops")
    elif case == "val_docs_in_train":
        write_jsonl(source, texts + [texts[1], texts[3], texts[3]])
    else:
        source = tmp_path / "missing.jsonl"
    result = run_prepare("--docs", source, "--out", tmp_path / "out", "--workers", 1, *args, check=False)
    last_line = result.stderr.strip().splitlines()[-1]
    expect, forbidden = BAD_INPUT_CASES[case]
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert last_line.startswith("prepare_docs: error:") and expect in last_line
    assert forbidden is None or forbidden not in last_line
    assert not (tmp_path / "out" / "datasets").exists() or not any((tmp_path / "out" / "datasets").iterdir())


def test_prepare_docs_reports_blank_lines(tmp_path, sp1024_model_path):
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" + ("\n" if i % 3 == 0 else "") for i in range(12)))
    result = run_prepare("--docs", source, "--vocab-size", 1024, "--val-docs", 4, "--out", tmp_path / "out",
                         "--tokenizer", sp1024_model_path, "--workers", 1)
    assert "skipped 4 blank lines" in result.stderr
    manifest = json.loads((tmp_path / "out" / "datasets" / "docs_sp1024" / "manifest.json").read_text())
    assert manifest["source"]["blank_lines"] == 4 and manifest["splits"]["val"]["documents"] == 4


# --------------------------------------------------------------------------------------------------
# data/cached_challenge_fineweb.py, against a local hub cache laid out like the published repos

DOWNLOADER = REPO_ROOT / "data" / "cached_challenge_fineweb.py"


CASEOPS_REPO = ("romeerp/parameter-golf-caseops-v1", "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved",
                "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved")
VAL_SIDECAR = [[0, 5, 7], [0, 6, 8]]  # per validation shard: bytes of [BOS, 100 + i, 200 + i]
VARIANT_REPOS = {"sp1024": "willdepueoai/parameter-golf", "sp8192": "kevclark/parameter-golf"}


def fake_hub_repo(cache: Path, repo_id: str, vocab: int, train_shards: int, manifest_names=None, dataset=None,
                  tokenizer=None, sidecar=False, train=None) -> Path:
    """A huggingface_hub cache entry (refs/main -> snapshot) holding a repo's files under datasets/:
    two validation shards of one document [BOS, 100+i, 200+i] each, training shards of one document
    [BOS, 300+i, 400+i, 500+i] each unless `train` gives their tokens."""
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    repo = cache / f"datasets--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    root = repo / "snapshots" / commit / "datasets"
    shards = root / "datasets" / (dataset or f"fineweb10B_sp{vocab}")
    shards.mkdir(parents=True)
    for i in range(2):
        write_shard(shards / f"fineweb_val_{i:06d}.bin", [tg.BOS_ID, 100 + i, 200 + i])
        if sidecar:
            write_shard(shards / f"fineweb_val_bytes_{i:06d}.bin", VAL_SIDECAR[i])
    for i in range(train_shards):
        write_shard(shards / f"fineweb_train_{i:06d}.bin", train[i] if train else [tg.BOS_ID, 300 + i, 400 + i, 500 + i])
    (root / "tokenizers").mkdir()
    for suffix in (".model", ".vocab"):
        (root / "tokenizers" / f"{tokenizer or f'fineweb_{vocab}_bpe'}{suffix}").write_bytes(f"{repo_id} {vocab}{suffix}".encode())
    if manifest_names is not None:
        (root / "manifest.json").write_text(json.dumps({"datasets": [
            {"name": name, "stats": {"files_train": train_shards, "files_val": 2}} for name in manifest_names]}))
    return root


def run_downloader(cache: Path, *args, offline=True, endpoint=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1" if offline else "0"}
    if endpoint:
        env["HF_ENDPOINT"] = endpoint
    return subprocess.run([sys.executable, str(DOWNLOADER), *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=60)


def test_downloader_places_the_standard_layout_from_each_variants_repo(tmp_path):
    cache, out = tmp_path / "hub", tmp_path / "data"
    sp1024_repo = fake_hub_repo(cache, "willdepueoai/parameter-golf", 1024, 3, manifest_names=["fineweb10B_sp1024"])
    sp8192_repo = fake_hub_repo(cache, "kevclark/parameter-golf", 8192, 3)  # no manifest, like the real repo

    # sp1024 first, so its repo's manifest is cached when sp8192 (which it does not list) is fetched.
    for variant, vocab, repo in (("sp1024", 1024, sp1024_repo), ("sp8192", 8192, sp8192_repo)):
        result = run_downloader(cache, "--variant", variant, "--train-shards", 2, "--out", out)
        assert result.returncode == 0, result.stderr
        dataset = out / "datasets" / f"fineweb10B_sp{vocab}"
        shards = ["fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_val_000000.bin", "fineweb_val_000001.bin"]
        assert sorted(p.name for p in dataset.iterdir()) == sorted(shards + ["manifest.json"])
        for shard in shards:
            assert (dataset / shard).read_bytes() == (repo / "datasets" / dataset.name / shard).read_bytes()
        assert tg.load_validation_tokens(str(dataset), vocab).tolist() == [1, 100, 200, 1, 101, 201]
        for suffix in (".model", ".vocab"):
            name = f"fineweb_{vocab}_bpe{suffix}"
            assert (out / "tokenizers" / name).read_bytes() == (repo / "tokenizers" / name).read_bytes()
        manifest = json.loads((dataset / "manifest.json").read_text())
        assert manifest["source"]["repo_id"] == VARIANT_REPOS[variant] and manifest["source"]["revision"] == repo.parent.name
        assert (manifest["val_docs"], manifest["val_docs_in_train"], manifest["caseops"], manifest["not_comparable"]) == (2, 0, False, None)
        assert [s["sha256"] for s in manifest["splits"]["train"]["shards"]] == [
            hashlib.sha256((dataset / f).read_bytes()).hexdigest() for f in shards[:2]]
    assert not (out / "manifest.json").exists()  # no shared manifest file that a later repo could misread


def test_downloader_places_the_caseops_dataset_with_its_byte_sidecar(tmp_path, monkeypatch):
    cache, out = tmp_path / "hub", tmp_path / "data"
    repo_id, remote, tokenizer = CASEOPS_REPO
    fake_hub_repo(cache, repo_id, 8192, 2, manifest_names=[remote], dataset=remote, tokenizer=tokenizer, sidecar=True)
    result = run_downloader(cache, "--variant", "sp8192-caseops", "--train-shards", 2, "--out", out)
    assert result.returncode == 0, result.stderr
    dataset = out / "datasets" / "fineweb10B_sp8192_caseops"
    assert sorted(p.name for p in dataset.glob("fineweb_val_bytes_*.bin")) == ["fineweb_val_bytes_000000.bin", "fineweb_val_bytes_000001.bin"]
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest["caseops"] is True and manifest["val_docs"] == 2
    assert "2 documents" in manifest["not_comparable"] and "not comparable" in result.stderr  # flagged: fewer than 50,000
    assert len(manifest["splits"]["val"]["byte_sidecar"]) == 2
    # train_gpt.py finds the tokenizer through the manifest and scores bytes from the side-car.
    h = tiny_hparams(monkeypatch, DATA_DIR=str(out), DATASET=dataset.name, VOCAB_SIZE=8192, TOKENIZER_PATH="")
    assert h.tokenizer_file == str(out / "tokenizers" / f"{tokenizer}.model")
    val = tg.load_validation_tokens(h.dataset_dir, 8192)
    logged = []
    target_bytes = tg.validation_target_bytes(h.dataset_dir, val, None, tg.read_dataset_manifest(h.dataset_dir)["caseops"], logged.append)
    assert target_bytes.tolist() == (VAL_SIDECAR[0] + VAL_SIDECAR[1])[1:]
    assert logged[0] == f"bytes: side-car {dataset / 'fineweb_val_bytes_000000.bin'} (+1 more)"
    assert logged[1].startswith("WARNING: CaseOps validation split of 2 documents")


@pytest.mark.parametrize("allow_overlap", [0, 1])
def test_downloader_refuses_validation_documents_in_training(tmp_path, allow_overlap):
    # Training shard 0 ends with [BOS, 100] and shard 1 goes on with [200, ...]: validation document 0 straddles the boundary.
    train = [[tg.BOS_ID, 300, 301, tg.BOS_ID, 100], [200, tg.BOS_ID, 302, 303]]
    cache = tmp_path / "hub"
    fake_hub_repo(cache, "kevclark/parameter-golf", 8192, 2, train=train)
    result = run_downloader(cache, "--variant", "sp8192", "--train-shards", 2, "--out", tmp_path / "data",
                            "--allow-overlap", allow_overlap)
    if allow_overlap:
        assert result.returncode == 0, result.stderr
        manifest = json.loads((tmp_path / "data" / "datasets" / "fineweb10B_sp8192" / "manifest.json").read_text())
        assert manifest["val_docs_in_train"] == 1
        return
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "1 of 2 validation documents also appear in the training split" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "data").exists()  # nothing placed


@pytest.mark.parametrize("case", ["manifest_lacks_variant", "too_many_shards", "no_manifest_too_many_shards", "caseops_without_sidecar"])
def test_downloader_explains_what_the_repo_lacks(tmp_path, case):
    cache = tmp_path / "hub"
    fake_hub_repo(cache, "willdepueoai/parameter-golf", 1024, 3, manifest_names=["fineweb10B_sp1024"])
    fake_hub_repo(cache, "kevclark/parameter-golf", 8192, 3)
    fake_hub_repo(cache, CASEOPS_REPO[0], 8192, 3, dataset=CASEOPS_REPO[1], tokenizer=CASEOPS_REPO[2])
    args, expect = {
        "caseops_without_sidecar": (["--variant", "sp8192-caseops", "--train-shards", 1], "0 byte side-car files"),
        "manifest_lacks_variant": (["--variant", "sp8192", "--repo-id", "willdepueoai/parameter-golf"], "lists no fineweb10B_sp8192"),
        "too_many_shards": (["--variant", "sp1024", "--train-shards", 5], "has 3 training shards, 5 requested"),
        "no_manifest_too_many_shards": (["--variant", "sp8192", "--train-shards", 5], "2 of 5 requested training shards are missing"),
    }[case]
    result = run_downloader(cache, *args, "--out", tmp_path / "data")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert expect in result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("offline", [False, True])
def test_downloader_without_hub_fails_fast_and_names_prepare_docs(tmp_path, offline):
    # Port 9 on localhost refuses connections at once; offline mode with an empty cache is the other way to have no hub.
    result = run_downloader(tmp_path / "empty_cache", "--variant", "sp1024", "--train-shards", 1, "--out", tmp_path / "data",
                            offline=offline, endpoint="http://127.0.0.1:9")
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(lines) == 1 and "cannot reach the Hugging Face Hub" in lines[0] and "data/prepare_docs.py" in lines[0]
