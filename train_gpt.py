"""Parameter Golf training script: train, quantize, pack and score a small language model.

One readable file, launched as `torchrun --nproc_per_node=8 train_gpt.py` (or plain `python
train_gpt.py` for one process, CPU included). It trains a GQA transformer with depth recurrence,
parallel residuals and U-Net skips under a wallclock budget, averages the weights (EMA), squeezes
them into a <= 16,000,000-byte artifact with full-Hessian GPTQ, reloads that artifact and reports
bits per byte on the validation text (plain, sliding window and legal score-first TTT).

Rules that keep it readable: every knob is an env var declared in the config section; there is one
forward pass (`GPT.forward`) used by training, evaluation, GPTQ calibration and TTT alike; sections
follow the data flow: config -> distributed/logging -> data -> model -> optimizers -> schedule ->
quantization/packing -> evaluation/TTT -> main. The shipped submission copy of this file is
generated (minified + compressed) by the script itself; this source stays readable.
"""
from __future__ import annotations

import copy
import glob
import io
import json
import math
import os
import queue
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

ARTIFACT_LIMIT_BYTES = 16_000_000

# ==================================================================================================
# Config: every knob is an env var, read and validated here, logged at start
# ==================================================================================================


class ConfigError(ValueError):
    """A malformed env var; the message names the variable and what is allowed."""


@dataclass
class Knob:
    name: str
    kind: str
    default: object
    help: str


CONFIG_REGISTRY: dict[str, Knob] = {}


def _register(name: str, kind: str, default, help: str) -> None:
    CONFIG_REGISTRY[name] = Knob(name, kind, default, help)


def env_int(name: str, default: int, help: str, min_value: int | None = None) -> int:
    _register(name, "int", default, help)
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        value = default
    else:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not an integer ({help})") from None
    if min_value is not None and value < min_value:
        raise ConfigError(f"{name}={value} must be >= {min_value} ({help})")
    return value


def env_float(name: str, default: float, help: str, min_value: float | None = None,
              max_value: float | None = None) -> float:
    _register(name, "float", default, help)
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        value = default
    else:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not a number ({help})") from None
    if not math.isfinite(value):
        raise ConfigError(f"{name}={raw!r} must be finite ({help})")
    if min_value is not None and value < min_value:
        raise ConfigError(f"{name}={value} must be >= {min_value} ({help})")
    if max_value is not None and value > max_value:
        raise ConfigError(f"{name}={value} must be <= {max_value} ({help})")
    return value


def env_bool(name: str, default: bool, help: str) -> bool:
    _register(name, "bool", int(default), help)
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean; use 1 or 0 ({help})")


def env_str(name: str, default: str, help: str, choices: tuple[str, ...] | None = None) -> str:
    _register(name, "str", default, help)
    value = os.environ.get(name, default).strip()
    if choices is not None and value not in choices:
        raise ConfigError(f"{name}={value!r} must be one of {', '.join(choices)} ({help})")
    return value


class Hyperparameters:
    """All knobs. Defaults are the record configuration (SPEC.md, REFERENCE.md)."""

    def __init__(self) -> None:
        # Data and run identity.
        self.data_dir = env_str("DATA_DIR", "./data", "root holding datasets/ and tokenizers/")
        self.vocab_size = env_int("VOCAB_SIZE", 8192, "tokenizer vocabulary size", min_value=2)
        self.tokenizer_path = env_str("TOKENIZER_PATH", "", "sentencepiece model; empty = DATA_DIR/tokenizers/fineweb_{VOCAB_SIZE}_bpe.model")
        self.run_id = env_str("RUN_ID", "", "name of this run's logs/ files; empty = a fresh uuid")
        self.seed = env_int("SEED", 1337, "seed for weights and data order")
        self.log_dir = env_str("LOG_DIR", "logs", "folder for <RUN_ID>.txt and <RUN_ID>.jsonl")

        # Training length and batch.
        self.iterations = env_int("ITERATIONS", 20000, "upper bound on optimizer steps", min_value=0)
        self.max_wallclock_seconds = env_float("MAX_WALLCLOCK_SECONDS", 600.0, "training wallclock budget incl. GPTQ calibration; 0 = no limit", min_value=0)
        self.gptq_reserve_seconds = env_float("GPTQ_RESERVE_SECONDS", 12.0, "part of the budget kept for GPTQ calibration", min_value=0)
        self.warmup_steps = env_int("WARMUP_STEPS", 5, "compile warm-up steps per graph variant (weights restored afterwards)", min_value=0)
        self.warmdown_frac = env_float("WARMDOWN_FRAC", 0.72, "final fraction of the time budget with linear LR decay", min_value=0, max_value=1)
        self.min_lr = env_float("MIN_LR", 0.0, "LR multiplier reached at the end of warmdown", min_value=0, max_value=1)
        self.train_batch_tokens = env_int("TRAIN_BATCH_TOKENS", 786_432, "global tokens per optimizer step", min_value=1)
        self.train_seq_len = env_int("TRAIN_SEQ_LEN", 2048, "training sequence length", min_value=1)
        self.micro_batch_seqs = env_int("MICRO_BATCH_SEQS", 48, "sequences per forward/backward on one rank (gradient accumulation fills the rest)", min_value=1)
        self.val_loss_every = env_int("VAL_LOSS_EVERY", 0, "plain validation every N steps during training; 0 = only at the end", min_value=0)
        self.train_log_every = env_int("TRAIN_LOG_EVERY", 50, "log a step line every N steps", min_value=1)
        self.compile_mode = env_str("COMPILE", "auto", "torch.compile: auto (regional on CUDA, off on CPU), regional, full, none", ("auto", "regional", "full", "none"))

        # Model shape.
        self.num_layers = env_int("NUM_LAYERS", 11, "physical transformer layers", min_value=1)
        self.model_dim = env_int("MODEL_DIM", 512, "residual width", min_value=8)
        self.num_heads = env_int("NUM_HEADS", 8, "query heads", min_value=1)
        self.num_kv_heads = env_int("NUM_KV_HEADS", 4, "key/value heads (GQA)", min_value=1)
        self.mlp_mult = env_int("MLP_MULT", 4, "MLP hidden width / MODEL_DIM", min_value=1)
        self.rope_dims = env_int("ROPE_DIMS", 16, "head dims that get rotary position (partial RoPE)", min_value=0)
        self.rope_base = env_float("ROPE_BASE", 10000.0, "RoPE base frequency", min_value=1)
        self.qk_gain_init = env_float("QK_GAIN_INIT", 5.25, "initial per-head query gain")
        self.xsa_last_n = env_int("XSA_LAST_N", 11, "XSA on the last N physical layers", min_value=0)
        self.logit_softcap = env_float("LOGIT_SOFTCAP", 30.0, "logits = c*tanh(z/c)", min_value=1e-3)
        self.embed_init_std = env_float("EMBED_INIT_STD", 0.005, "std of the tied embedding at init", min_value=0)
        self.loop_start = env_int("LOOP_START", 3, "first physical layer of the recurrent span", min_value=0)
        self.loop_end = env_int("LOOP_END", 5, "last physical layer of the recurrent span (inclusive)", min_value=0)
        self.num_loops = env_int("NUM_LOOPS", 2, "extra passes over the recurrent span; 0 = no recurrence", min_value=0)
        self.enable_looping_at = env_float("ENABLE_LOOPING_AT", 0.35, "fraction of the time budget after which recurrence is on", min_value=0, max_value=1)
        self.parallel_start = env_int("PARALLEL_START", 7, "first physical layer with parallel residuals (>= NUM_LAYERS: none)", min_value=0)
        self.parallel_mode = env_str("PARALLEL_MODE", "lanes", "parallel residual variant: lanes (two lanes, learned routing) or single (one stream)", ("lanes", "single"))

        # Optimizers.
        self.matrix_lr = env_float("MATRIX_LR", 0.022, "Muon LR for block matrices", min_value=0)
        self.scalar_lr = env_float("SCALAR_LR", 0.02, "AdamW LR for vectors and scalars", min_value=0)
        self.tied_embed_lr = env_float("TIED_EMBED_LR", 0.03, "AdamW LR for the tied embedding", min_value=0)
        self.muon_momentum = env_float("MUON_MOMENTUM", 0.99, "Muon momentum after warm-up", min_value=0, max_value=1)
        self.muon_momentum_warmup_start = env_float("MUON_MOMENTUM_WARMUP_START", 0.92, "Muon momentum at step 0", min_value=0, max_value=1)
        self.muon_momentum_warmup_steps = env_int("MUON_MOMENTUM_WARMUP_STEPS", 1500, "steps to ramp Muon momentum", min_value=0)
        self.muon_wd = env_float("MUON_WD", 0.095, "decoupled weight decay of Muon matrices", min_value=0)
        self.muon_ns_steps = env_int("MUON_NS_STEPS", 5, "Newton-Schulz iterations", min_value=1)
        self.muon_polar_express = env_bool("MUON_POLAR_EXPRESS", False, "per-iteration Polar Express coefficients instead of the classic ones")
        self.embed_wd = env_float("EMBED_WD", 0.085, "AdamW weight decay of the embedding", min_value=0)
        self.scalar_wd = env_float("SCALAR_WD", 0.02, "AdamW weight decay of vectors and scalars", min_value=0)
        self.adam_beta1 = env_float("ADAM_BETA1", 0.9, "AdamW beta1", min_value=0, max_value=1)
        self.adam_beta2 = env_float("ADAM_BETA2", 0.95, "AdamW beta2", min_value=0, max_value=1)
        self.adam_eps = env_float("ADAM_EPS", 1e-8, "AdamW epsilon", min_value=0)
        self.grad_clip_norm = env_float("GRAD_CLIP_NORM", 0.3, "global gradient-norm clip; 0 = off", min_value=0)

        # Weight averaging.
        self.averaging = env_str("AVERAGING", "ema", "weights to quantize: ema, swa or none (raw)", ("ema", "swa", "none"))
        self.ema_decay = env_float("EMA_DECAY", 0.9965, "EMA decay cap; the decay ramps as min(cap, (1+t)/(10+t))", min_value=0, max_value=1)
        self.swa_every = env_int("SWA_EVERY", 50, "SWA: snapshot every N steps during warmdown", min_value=1)

        # Quantization and packing.
        self.matrix_bits = env_int("MATRIX_BITS", 6, "bits of block matrices (GPTQ)", min_value=2)
        self.embed_bits = env_int("EMBED_BITS", 8, "bits of the tied embedding (GPTQ)", min_value=2)
        self.matrix_clip_sigmas = env_float("MATRIX_CLIP_SIGMAS", 12.85, "SDClip: row scale = k*std(row)/(2^(bits-1)-1) for matrices", min_value=0.1)
        self.embed_clip_sigmas = env_float("EMBED_CLIP_SIGMAS", 20.0, "SDClip k for the embedding", min_value=0.1)
        self.gptq_calibration_batches = env_int("GPTQ_CALIBRATION_BATCHES", 64, "training sequences-batches used for GPTQ Hessians", min_value=1)
        self.gptq_block_size = env_int("GPTQ_BLOCK_SIZE", 128, "GPTQ column block", min_value=1)
        self.gptq_damp = env_float("GPTQ_DAMP", 0.01, "GPTQ damping as a fraction of mean(diag H)", min_value=0)
        self.compressor = env_str("COMPRESSOR", "brotli", "artifact compressor", ("brotli", "zstd", "lzma"))
        self.artifact_target_bytes = env_int("ARTIFACT_TARGET_BYTES", 0, "total bytes to fit; 0 = 16,000,000", min_value=0)

        # Evaluation.
        self.eval_seq_len = env_int("EVAL_SEQ_LEN", 2048, "evaluation window length", min_value=1)
        self.val_batch_tokens = env_int("VAL_BATCH_TOKENS", 262_144, "tokens per evaluation forward on one rank", min_value=1)
        self.sliding_window_enabled = env_bool("SLIDING_WINDOW_ENABLED", True, "run the sliding-window evaluation")
        self.eval_stride = env_int("EVAL_STRIDE", 64, "sliding window advance (targets scored per window)", min_value=1)
        self.ttt_enabled = env_bool("TTT_ENABLED", True, "run legal score-first test-time training")
        self.ttt_lr = env_float("TTT_LR", 0.005, "TTT SGD learning rate (cosine over chunks)", min_value=0)
        self.ttt_momentum = env_float("TTT_MOMENTUM", 0.9, "TTT SGD momentum", min_value=0, max_value=1)
        self.ttt_epochs = env_int("TTT_EPOCHS", 3, "TTT passes over each scored chunk", min_value=0)
        self.ttt_chunk_tokens = env_int("TTT_CHUNK_TOKENS", 32768, "TTT chunk length in tokens", min_value=1)
        self.ttt_grad_clip = env_float("TTT_GRAD_CLIP", 1.0, "TTT gradient-norm clip; 0 = off", min_value=0)
        self.eval_only = env_str("EVAL_ONLY", "", "path of a saved .ptz artifact to re-score without training")

        self._check_consistency()

    def _check_consistency(self) -> None:
        if self.model_dim % self.num_heads:
            raise ConfigError(f"MODEL_DIM={self.model_dim} must be divisible by NUM_HEADS={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"NUM_HEADS={self.num_heads} must be divisible by NUM_KV_HEADS={self.num_kv_heads}")
        head_dim = self.model_dim // self.num_heads
        if self.rope_dims > head_dim or self.rope_dims % 2:
            raise ConfigError(f"ROPE_DIMS={self.rope_dims} must be even and <= head dim {head_dim}")
        if self.num_loops and not (0 <= self.loop_start <= self.loop_end < self.num_layers):
            raise ConfigError(f"LOOP_START={self.loop_start}..LOOP_END={self.loop_end} must lie inside 0..NUM_LAYERS-1={self.num_layers - 1}")
        if self.train_batch_tokens % self.train_seq_len:
            raise ConfigError(f"TRAIN_BATCH_TOKENS={self.train_batch_tokens} must be a multiple of TRAIN_SEQ_LEN={self.train_seq_len}")
        if self.max_wallclock_seconds and self.gptq_reserve_seconds >= self.max_wallclock_seconds:
            raise ConfigError(f"GPTQ_RESERVE_SECONDS={self.gptq_reserve_seconds} must be below MAX_WALLCLOCK_SECONDS={self.max_wallclock_seconds}")

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def train_budget_seconds(self) -> float:
        """Seconds of training proper: the wallclock budget minus what GPTQ calibration needs."""
        if self.max_wallclock_seconds <= 0:
            return float("inf")
        return self.max_wallclock_seconds - self.gptq_reserve_seconds

    @property
    def tokenizer_file(self) -> str:
        return self.tokenizer_path or os.path.join(self.data_dir, "tokenizers", f"fineweb_{self.vocab_size}_bpe.model")

    @property
    def dataset_dir(self) -> str:
        return os.path.join(self.data_dir, "datasets", f"fineweb10B_sp{self.vocab_size}")

    def as_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}


# ==================================================================================================
# Distributed setup and logging
# ==================================================================================================


@dataclass
class Runtime:
    """Where this process runs: rank, world size and device, set once by `setup_distributed`."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed() -> Runtime:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain `python` is one process. NCCL on CUDA, gloo on CPU."""
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    return Runtime(rank, world_size, local_rank, device)


class Logger:
    """One log(): console and logs/<run_id>.txt on rank 0, plus a JSON-lines copy of the metrics."""

    def __init__(self, runtime: Runtime, log_dir: str | None, run_id: str) -> None:
        self.enabled = runtime.is_main
        self.text_path = self.jsonl_path = None
        if self.enabled and log_dir:
            os.makedirs(log_dir, exist_ok=True)
            self.text_path = os.path.join(log_dir, f"{run_id}.txt")
            self.jsonl_path = os.path.join(log_dir, f"{run_id}.jsonl")

    def __call__(self, msg: str, console: bool = True) -> None:
        if not self.enabled:
            return
        if console:
            print(msg, flush=True)
        if self.text_path:
            with open(self.text_path, "a", encoding="utf-8") as f:
                f.write(msg + "\n")

    def metrics(self, **fields) -> None:
        if self.enabled and self.jsonl_path:
            with open(self.jsonl_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(fields) + "\n")


def log_nothing(msg: str = "", console: bool = True) -> None:
    """A logger for library use (tests, benchmarks) that prints nothing."""


def all_reduce_sum(t: Tensor, runtime: Runtime) -> Tensor:
    if runtime.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


# ==================================================================================================
# Data: shards, training loader, validation tokens, exact byte accounting
# ==================================================================================================
# Shard format (SPEC §2): 256 little-endian int32 header ([0]=20240520 magic, [1]=1 version,
# [2]=n_tokens), then n_tokens little-endian uint16 ids. File size must be 1024 + 2*n_tokens.

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_INTS = 256
BOS_ID = 1
SHARD_HEADER_BYTES = SHARD_HEADER_INTS * 4
DATA_HELP = "download shards with data/cached_challenge_fineweb.py or build them with data/prepare_docs.py"


class DataError(RuntimeError):
    """Bad input data; the message names the file and what to do."""


def read_shard(path: str, vocab_size: int | None = None) -> np.ndarray:
    """Memory-map one shard after validating its header and size (and ids < vocab_size if given)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: shard not found; {DATA_HELP}")
    file_size = os.path.getsize(path)
    if file_size < SHARD_HEADER_BYTES:
        raise DataError(f"{path}: {file_size} bytes is shorter than the {SHARD_HEADER_BYTES}-byte header; re-create the shard")
    header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
    if header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise DataError(f"{path}: header magic/version {header[0]}/{header[1]}, expected {SHARD_MAGIC}/{SHARD_VERSION}; "
                        "not a shard of this format, re-create it")
    n_tokens = int(header[2])
    if n_tokens < 0 or file_size != SHARD_HEADER_BYTES + 2 * n_tokens:
        raise DataError(f"{path}: header says {n_tokens} tokens so the file should be {SHARD_HEADER_BYTES + 2 * n_tokens} "
                        f"bytes, but it is {file_size}; the shard is truncated or corrupt, re-create it")
    if n_tokens == 0:
        return np.zeros(0, dtype=np.uint16)
    tokens = np.memmap(path, dtype="<u2", mode="r", offset=SHARD_HEADER_BYTES, shape=(n_tokens,))
    if vocab_size is not None:
        _check_token_range(tokens, vocab_size, path)
    return tokens


def _check_token_range(tokens: np.ndarray, vocab_size: int, path: str) -> None:
    largest = int(tokens.max()) if len(tokens) else 0
    if largest >= vocab_size:
        raise DataError(f"{path}: token id {largest} >= VOCAB_SIZE={vocab_size}; the shard was made with another "
                        "tokenizer, set VOCAB_SIZE to match or point DATA_DIR at the right dataset")


def list_shards(dataset_dir: str, split: str) -> list[str]:
    """Sorted fineweb_{split}_*.bin files of a dataset folder; DataError if there are none."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if not os.path.isdir(dataset_dir):
        raise DataError(f"{dataset_dir}: dataset folder does not exist; check DATA_DIR/VOCAB_SIZE, or {DATA_HELP}")
    files = sorted(glob.glob(os.path.join(dataset_dir, f"fineweb_{split}_*.bin")))
    if not files:
        raise DataError(f"{dataset_dir}: no fineweb_{split}_*.bin shards; {DATA_HELP}")
    return files


def load_validation_tokens(dataset_dir: str, vocab_size: int) -> Tensor:
    """All validation tokens, concatenated in file order, as a 1-D int64 CPU tensor."""
    shards = [read_shard(path, vocab_size) for path in list_shards(dataset_dir, "val")]
    tokens = torch.from_numpy(np.concatenate(shards).astype(np.int64))
    if len(tokens) < 2:
        raise DataError(f"{dataset_dir}: validation shards hold {len(tokens)} tokens, need at least 2 to score; {DATA_HELP}")
    return tokens


def _check_not_validation(files: list[str]) -> None:
    """Training must never read a validation shard: compare real paths with every val shard beside them."""
    folders = {os.path.dirname(os.path.realpath(f)) for f in files} | {os.path.dirname(os.path.abspath(f)) for f in files}
    val_paths = {os.path.realpath(p) for folder in folders for p in glob.glob(os.path.join(folder, "fineweb_val_*.bin"))}
    for f in files:
        if os.path.realpath(f) in val_paths or os.path.basename(os.path.realpath(f)).startswith("fineweb_val_"):
            raise DataError(f"{f}: this training file is a validation shard; remove it from the training files")


class TrainLoader:
    """Training batches: non-overlapping (seq_len+1)-token windows in a SEED-shuffled global order.

    Optimizer step s consumes the global windows [s*G, (s+1)*G) (G = sequences per step); rank r at
    micro-step m reads its own contiguous slice of them, so the data seen per step is the same for
    any world size. A background thread prepares the next micro-batch in pinned memory.
    """

    def __init__(self, files: list[str], seq_len: int, micro_batch_seqs: int, grad_accum_steps: int,
                 runtime: Runtime, seed: int, vocab_size: int) -> None:
        if not files:
            raise DataError(f"no training shards given; {DATA_HELP}")
        _check_not_validation(files)
        self.files = list(files)
        # Plain ndarray views of the memory maps (cheaper to slice); ids are range-checked per batch, not by a full scan.
        self.shards = [np.asarray(read_shard(f)) for f in self.files]
        self.window = seq_len + 1
        self.micro_batch_seqs = micro_batch_seqs
        self.grad_accum_steps = grad_accum_steps
        self.seed = seed
        self.vocab_size = vocab_size
        self.device = runtime.device
        self.pin_memory = torch.cuda.is_available() and runtime.device.type == "cuda"
        # A window never crosses a shard end. The count per shard is the same for every phase in
        # [0, seq_len], so an epoch always has the same length and a global index maps to (epoch, slot).
        windows_per_shard = [max(0, (len(s) - seq_len) // self.window) for s in self.shards]
        self.shard_first_window = np.cumsum([0] + windows_per_shard)
        self.windows_per_epoch = int(self.shard_first_window[-1])
        if self.windows_per_epoch == 0:
            raise DataError(f"{self.files[0]}: the training shards hold no window of TRAIN_SEQ_LEN+1={self.window} tokens; "
                            f"lower TRAIN_SEQ_LEN or {DATA_HELP}")
        self.sequences_per_step = micro_batch_seqs * grad_accum_steps * runtime.world_size
        self.rank_first_sequence = runtime.rank * grad_accum_steps * micro_batch_seqs
        self.micro_batches_done = 0
        self._epoch_orders: dict[int, tuple[int, np.ndarray]] = {}
        self._worker: threading.Thread | None = None
        self._start_worker()

    def _epoch_order(self, epoch: int) -> tuple[int, np.ndarray]:
        """(phase, window permutation) of one epoch; a pure function of (SEED, epoch)."""
        if epoch not in self._epoch_orders:
            rng = np.random.default_rng((self.seed, epoch))
            phase = int(rng.integers(0, self.window))
            order = rng.permutation(self.windows_per_epoch)
            self._epoch_orders = {e: v for e, v in self._epoch_orders.items() if e >= epoch - 1}
            self._epoch_orders[epoch] = (phase, order)
        return self._epoch_orders[epoch]

    def _host_batch(self, micro_batch: int) -> Tensor:
        """Windows [micro_batch_seqs, seq_len+1] of this rank's micro-batch number `micro_batch`, int64 on the host."""
        step, micro_step = divmod(micro_batch, self.grad_accum_steps)
        first = step * self.sequences_per_step + self.rank_first_sequence + micro_step * self.micro_batch_seqs
        rows, row_shards = [], []
        for index in range(first, first + self.micro_batch_seqs):
            epoch, slot = divmod(index, self.windows_per_epoch)
            phase, order = self._epoch_order(epoch)
            window_id = int(order[slot])
            shard = int(np.searchsorted(self.shard_first_window, window_id, side="right")) - 1
            start = phase + (window_id - int(self.shard_first_window[shard])) * self.window
            rows.append(self.shards[shard][start:start + self.window])
            row_shards.append(shard)
        windows = np.stack(rows)
        if int(windows.max()) >= self.vocab_size:
            for row, shard in zip(rows, row_shards):
                _check_token_range(row, self.vocab_size, self.files[shard])
        batch = torch.from_numpy(windows.astype(np.int64))
        return batch.pin_memory() if self.pin_memory else batch

    def _produce(self, first_micro_batch: int, stop: threading.Event, out: queue.Queue) -> None:
        micro_batch = first_micro_batch
        while not stop.is_set():
            try:
                item = (micro_batch, self._host_batch(micro_batch))
            except BaseException as error:  # handed to next_batch, which re-raises it on the caller's thread
                item = (micro_batch, error)
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.05)
                    break
                except queue.Full:
                    continue
            if isinstance(item[1], BaseException):
                return
            micro_batch += 1

    def _start_worker(self) -> None:
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._worker = threading.Thread(target=self._produce, args=(self.micro_batches_done, self._stop, self._queue),
                                        name="train-loader", daemon=True)
        self._worker.start()

    def _stop_worker(self) -> None:
        if self._worker is not None:
            self._stop.set()
            self._worker.join()
            self._worker = None

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """(inputs, targets), each [micro_batch_seqs, seq_len] int64 on the runtime device."""
        if self._worker is None:
            raise RuntimeError("TrainLoader.next_batch after close()")
        micro_batch, batch = self._queue.get()
        if isinstance(batch, BaseException):
            self._queue.put((micro_batch, batch))  # the thread has stopped; keep failing the same way
            raise batch
        assert micro_batch == self.micro_batches_done, "prefetch thread out of step"
        self.micro_batches_done += 1
        batch = batch.to(self.device, non_blocking=True)
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def state_dict(self) -> dict:
        """Position of the next batch next_batch() returns (prefetched batches are recomputed on load)."""
        return {"micro_batches_done": self.micro_batches_done, "seed": self.seed,
                "sequences_per_step": self.sequences_per_step}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed or state["sequences_per_step"] != self.sequences_per_step:
            raise DataError(f"loader state from SEED={state['seed']}, {state['sequences_per_step']} sequences/step does not "
                            f"match this loader (SEED={self.seed}, {self.sequences_per_step}); resume with the same config")
        self._stop_worker()
        self.micro_batches_done = int(state["micro_batches_done"])
        self._start_worker()

    def close(self) -> None:
        self._stop_worker()


@dataclass
class ByteTables:
    """Per-token byte counts for bpb (SPEC §2): bytes(t | prev p) = base[t] + (space[t] and not boundary[p])."""
    base_bytes: Tensor        # int16 [V]: UTF-8 bytes of the piece without its leading '▁'; 1 for <0xNN>; 0 for control
    has_leading_space: Tensor  # bool [V]: the piece starts with '▁'
    is_boundary: Tensor       # bool [V]: control/unknown/unused pieces (no space is counted after them)

    def to(self, device) -> "ByteTables":
        return ByteTables(self.base_bytes.to(device), self.has_leading_space.to(device), self.is_boundary.to(device))

    def target_bytes(self, prev_ids: Tensor, target_ids: Tensor) -> Tensor:
        """Bytes of each target token given the token before it (same shapes), as int32."""
        space = self.has_leading_space[target_ids] & ~self.is_boundary[prev_ids]
        return self.base_bytes[target_ids].to(torch.int32) + space.to(torch.int32)


def load_tokenizer(path: str, vocab_size: int):
    """Load a sentencepiece model; DataError if missing, if its size != vocab_size, or if it lacks '▁'."""
    import sentencepiece as spm

    if not os.path.isfile(path):
        raise DataError(f"{path}: tokenizer not found; set TOKENIZER_PATH, or {DATA_HELP}")
    try:
        sp = spm.SentencePieceProcessor(model_file=path)
    except (RuntimeError, OSError) as error:
        raise DataError(f"{path}: not a sentencepiece model ({error}); point TOKENIZER_PATH at a .model file") from None
    if sp.vocab_size() != vocab_size:
        raise DataError(f"{path}: tokenizer has {sp.vocab_size()} pieces but VOCAB_SIZE={vocab_size}; make them match")
    _check_space_piece(sp, path)
    return sp


def _check_space_piece(sp, where: str) -> None:
    # The byte rule charges a word's space to the piece that starts with '▁'; a space that BPE could not
    # merge is the standalone '▁' piece, so without it the accounting would be wrong.
    if sp.id_to_piece(sp.piece_to_id("\u2581")) != "\u2581":
        raise DataError(f"{where}: tokenizer has no standalone '\u2581' piece, so bytes cannot be counted exactly; "
                        "use a tokenizer trained by data/prepare_docs.py")


def build_byte_tables(sp, vocab_size: int) -> ByteTables:
    """Byte tables of a sentencepiece model (SPEC §2); ids past the model's size are boundaries worth 0 bytes."""
    if sp.vocab_size() > vocab_size:
        raise DataError(f"tokenizer has {sp.vocab_size()} pieces, more than VOCAB_SIZE={vocab_size}; make them match")
    _check_space_piece(sp, "tokenizer")
    base_bytes = np.zeros(vocab_size, dtype=np.int16)
    has_leading_space = np.zeros(vocab_size, dtype=np.bool_)
    is_boundary = np.ones(vocab_size, dtype=np.bool_)
    for token_id in range(sp.vocab_size()):
        if sp.is_control(token_id) or sp.is_unknown(token_id) or sp.is_unused(token_id):
            continue
        is_boundary[token_id] = False
        if sp.is_byte(token_id):  # <0xNN>: one raw byte of a character the vocabulary lacks
            base_bytes[token_id] = 1
            continue
        piece = sp.id_to_piece(token_id)
        if piece.startswith("\u2581"):
            has_leading_space[token_id] = True
            piece = piece[1:]
        base_bytes[token_id] = len(piece.encode("utf-8"))
    return ByteTables(torch.from_numpy(base_bytes), torch.from_numpy(has_leading_space), torch.from_numpy(is_boundary))


def count_validation_bytes(val_tokens: Tensor, tables: ByteTables) -> int:
    """UTF-8 bytes of all scored targets val_tokens[1:] given their predecessors: the bpb denominator."""
    total = 0
    chunk = 1 << 22  # bounded memory for long streams
    for start in range(0, len(val_tokens) - 1, chunk):
        end = min(start + chunk, len(val_tokens) - 1)
        total += int(tables.target_bytes(val_tokens[start:end], val_tokens[start + 1:end + 1]).sum(dtype=torch.int64))
    return total


# ==================================================================================================
# Model
# ==================================================================================================
# (model section: GPT with forward(input_ids, target_ids=None, reduction="mean"); see GPT docstring)


# ==================================================================================================
# Optimizers: row-normalised Muon (distributed over banks of same-shape matrices) + AdamW
# ==================================================================================================


# ==================================================================================================
# Schedule and weight averaging
# ==================================================================================================


# ==================================================================================================
# Quantization and packing: GPTQ int6/int8 with SDClip, byte shuffle, compression, shipped code
# ==================================================================================================


def collect_hessians(model: nn.Module, batches, runtime: Runtime) -> dict[str, Tensor]:
    """H = sum X^T X of the input of every large matrix (and of the tied head), on training batches."""
    raise NotImplementedError("quantization section")


def quantize_and_pack(model: nn.Module, hessians: dict[str, Tensor], h: Hyperparameters, code_bytes: int,
                      log=log_nothing) -> tuple[bytes, dict]:
    """GPTQ-quantize the model's weights, fit the artifact budget, return (compressed blob, report)."""
    raise NotImplementedError("quantization section")


def load_artifact(blob: bytes, model: nn.Module) -> None:
    """Decompress and dequantize an artifact into `model` (in place)."""
    raise NotImplementedError("quantization section")


def build_submission_code(source: str) -> bytes:
    """The shipped copy of this script: minified, compressed, wrapped in a self-extracting exec stub."""
    raise NotImplementedError("quantization section")


# ==================================================================================================
# Evaluation and test-time training
# ==================================================================================================


@dataclass
class EvalResult:
    stage: str
    loss: float          # mean nats per scored target
    bpb: float           # sum(nats) / (ln 2 * sum(bytes))
    tokens: int          # scored targets
    bytes: int           # their UTF-8 bytes
    seconds: float


def eval_plain(model: nn.Module, val_tokens: Tensor, tables: ByteTables, h: Hyperparameters,
               runtime: Runtime, stage: str = "plain") -> EvalResult:
    raise NotImplementedError("evaluation section")


def eval_sliding(model: nn.Module, val_tokens: Tensor, tables: ByteTables, h: Hyperparameters,
                 runtime: Runtime, stage: str = "sliding") -> EvalResult:
    raise NotImplementedError("evaluation section")


def eval_ttt(model: nn.Module, val_tokens: Tensor, tables: ByteTables, h: Hyperparameters,
             runtime: Runtime, log=log_nothing, stage: str = "ttt") -> EvalResult:
    raise NotImplementedError("evaluation section")


# ==================================================================================================
# Main
# ==================================================================================================


def main() -> None:
    raise NotImplementedError("main")


if __name__ == "__main__":
    main()
