"""Tiny configurations shared by the tests: small enough for a CPU, large enough to exercise
every feature (recurrence, parallel lanes, XSA, GQA, skips)."""
import os

TINY_ENV = dict(
    NUM_LAYERS="4", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2", MLP_MULT="2", VOCAB_SIZE="256",
    LOOP_START="1", LOOP_END="2", NUM_LOOPS="1", PARALLEL_START="3", XSA_LAST_N="4",
    ROPE_DIMS="8", TRAIN_SEQ_LEN="32", EVAL_SEQ_LEN="32", TTT_CHUNK_SIZE="8",  # LoRA TTT (the default) chunks fit the window
)


def tiny_hparams(monkeypatch=None, **overrides):
    """Hyperparameters() under the tiny env (plus overrides), via monkeypatch when given."""
    import train_gpt

    env = {**TINY_ENV, **{k: str(v) for k, v in overrides.items()}}
    if monkeypatch is not None:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        return train_gpt.Hyperparameters()
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return train_gpt.Hyperparameters()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def write_shard(path, tokens, magic=None, version=None, n_tokens=None, extra=b""):
    """One shard file in SPEC §2's format; magic/version/n_tokens/extra can be set wrong on purpose."""
    import numpy as np

    import train_gpt as tg

    tokens = np.asarray(tokens, dtype="<u2")
    header = np.zeros(tg.SHARD_HEADER_INTS, dtype="<i4")
    header[:3] = (tg.SHARD_MAGIC if magic is None else magic, tg.SHARD_VERSION if version is None else version,
                  len(tokens) if n_tokens is None else n_tokens)
    path.write_bytes(header.tobytes() + tokens.tobytes() + extra)
    return path


def write_shards(folder, vocab_size, train_tokens=40_000, val_tokens=4_000, seed=0):
    """A synthetic dataset in the standard layout: BOS-separated documents of random ids that follow a
    simple pattern (so a model can learn something). Returns the dataset folder."""
    from pathlib import Path

    import numpy as np

    import train_gpt as tg

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def stream(n):
        out = []
        while len(out) < n:
            start = int(rng.integers(4, vocab_size))
            doc = [(start + 3 * i) % (vocab_size - 4) + 4 for i in range(int(rng.integers(20, 200)))]
            out += [tg.BOS_ID] + doc
        return out[:n]

    for split, n in (("train", train_tokens), ("val", val_tokens)):
        write_shard(folder / f"fineweb_{split}_000000.bin", stream(n))
    return folder


def write_tokenizer(path, vocab_size):
    """A sentencepiece BPE model of exactly vocab_size pieces (with the standalone '▁' the byte rule
    needs), trained in a second on random words: whole-script runs without the dev corpus."""
    import random

    import sentencepiece as spm

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 9))) for _ in range(3000)]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(3000)]
    with open(path, "wb") as model:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
                                       model_type="bpe", add_dummy_prefix=False, byte_fallback=True, minloglevel=2,
                                       pad_id=0, bos_id=1, eos_id=2, unk_id=3)
    return path


def free_port() -> int:
    """A TCP port free on this machine now (for a test's MASTER_PORT)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def end_gloo_rank() -> None:
    """End a spawned gloo test rank as train_gpt.py's main ends a distributed run: a barrier (every rank done), then
    os._exit(0) without tearing gloo down. Its teardown (destroy_process_group or at interpreter exit) aborts a
    finished rank now and then ('terminate called without an active exception', SIGABRT: seen in CI on 4 ranks)."""
    import sys

    import torch.distributed as dist

    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
