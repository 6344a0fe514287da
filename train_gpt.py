"""Parameter Golf training script: train, quantize, pack and score a small language model.

One readable file, launched as `torchrun --nproc_per_node=8 train_gpt.py` (or plain `python train_gpt.py`
for one process, CPU included). It trains a GQA transformer with depth recurrence, parallel residuals and
U-Net skips under a wallclock budget, averages the weights (EMA), squeezes them into a <= 16,000,000-byte
artifact with full-Hessian GPTQ, reloads it and reports bits per byte on the validation text (plain, then
legal score-first TTT: per-document LoRA with a phase of global SGD by default, scored with an n-gram tilt).

Rules that keep it readable: every knob is an env var declared in the config section; one forward pass
(`GPT.forward`) serves training, evaluation, GPTQ calibration and TTT; sections follow the data flow:
config -> distributed/logging -> data -> model -> optimizers -> schedule -> quantization/packing ->
evaluation/TTT -> main. The shipped copy of this file is generated (minified + compressed) by the script.
"""
from __future__ import annotations

import ast
import contextlib
import copy
import datetime
import functools
import glob
import hashlib
import importlib.metadata
import json
import linecache
import lzma
import math
import os
import queue
import subprocess
import sys
import threading
import time
import traceback
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

ARTIFACT_LIMIT_BYTES = 16_000_000
EVAL_LIMIT_SECONDS = 600.0

# ========== Config: every knob is an env var, read and validated here, logged at start ================================
class ConfigError(ValueError):
    """A malformed env var; the message names the variable and what is allowed."""

@dataclass
class Knob:
    name: str
    kind: str
    default: object
    help: str
    section: str

CONFIG_REGISTRY: dict[str, Knob] = {}
# Sections whose knobs define the artifact: stored in it; EVAL_ONLY / REQUANTIZE_FROM rebuild the model from them.
ARTIFACT_SECTIONS = ("model", "quantization")
_section = "data"
_fixed: dict[str, object] = {}  # knob values that come from an artifact (see Hyperparameters(fixed=...))

def _register(name: str, kind: str, default, help: str) -> str | None:
    """Record the knob in CONFIG_REGISTRY; return its raw env value (None when unset or blank)."""
    CONFIG_REGISTRY[name] = Knob(name, kind, default, help, _section)
    raw = os.environ.get(name)
    return None if raw is None or raw.strip() == "" else raw

def _settle(name: str, value, raw: str | None):
    """An artifact's value wins over the default; an env var that disagrees with it is refused."""
    if name not in _fixed:
        return value
    if raw is not None and value != _fixed[name]:
        raise ConfigError(f"{name}={raw.strip()} conflicts with the artifact's {name}={_fixed[name]}; unset {name} "
                          "(model and quantization knobs come from the artifact)")
    return _fixed[name]

def _env_number(name: str, kind: str, default, help: str, min_value=None, max_value=None):
    """Shared parse-and-validate of env_int and env_float (kind "int" or "float")."""
    raw = _register(name, kind, default, help)
    if raw is None:
        value = default
    else:
        try:
            value = (int if kind == "int" else float)(raw.strip())
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not {'an integer' if kind == 'int' else 'a number'} ({help})") from None
    if kind == "float" and not math.isfinite(value):
        raise ConfigError(f"{name}={raw!r} must be finite ({help})")
    if min_value is not None and value < min_value:
        raise ConfigError(f"{name}={value} must be >= {min_value} ({help})")
    if max_value is not None and value > max_value:
        raise ConfigError(f"{name}={value} must be <= {max_value} ({help})")
    return _settle(name, value, raw)

def env_int(name: str, default: int, help: str, min_value: int | None = None, max_value: int | None = None) -> int:
    return _env_number(name, "int", default, help, min_value, max_value)

def env_float(name: str, default: float, help: str, min_value: float | None = None, max_value: float | None = None) -> float:
    return _env_number(name, "float", default, help, min_value, max_value)

def env_bool(name: str, default: bool, help: str) -> bool:
    raw = _register(name, "bool", int(default), help)
    if raw is None:
        return _settle(name, default, raw)
    value = raw.strip().lower()
    if value not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise ConfigError(f"{name}={raw!r} is not a boolean; use 1 or 0 ({help})")
    return _settle(name, value in ("1", "true", "yes", "on"), raw)

def env_str(name: str, default: str, help: str, choices: tuple[str, ...] | None = None) -> str:
    raw = _register(name, "str", default, help)
    value = default if raw is None else raw.strip()
    if choices is not None and value not in choices:
        raise ConfigError(f"{name}={value!r} must be one of {', '.join(choices)} ({help})")
    return _settle(name, value, raw)

@contextlib.contextmanager
def config_section(name: str):
    """Knobs declared inside belong to this section (the README table and the artifact's config)."""
    global _section
    previous, _section = _section, name
    try:
        yield
    finally:
        _section = previous

class Hyperparameters:
    """All knobs, in sections; defaults are the best measured configuration (README "Choices"). `fixed`: knob values
    read from an artifact (EVAL_ONLY, REQUANTIZE_FROM); they replace the defaults, and a disagreeing env var is refused."""

    def __init__(self, fixed: dict | None = None) -> None:
        global _fixed
        _fixed = dict(fixed or {})
        try:
            self._declare()
        finally:
            _fixed = {}
        self._check_consistency()

    def _declare(self) -> None:
        with config_section("data"):  # data and run identity
            self.data_dir = env_str("DATA_DIR", "./data", "root holding datasets/ and tokenizers/")
            self.dataset = env_str("DATASET", "", "dataset folder under DATA_DIR/datasets/; empty = fineweb10B_sp{VOCAB_SIZE}")
            self.tokenizer_path = env_str("TOKENIZER_PATH", "", "sentencepiece model; empty = the one the dataset's manifest.json names, else DATA_DIR/tokenizers/fineweb_{VOCAB_SIZE}_bpe.model")
            self.run_id = env_str("RUN_ID", "", "name of this run's logs/ files; empty = <YYYYmmdd_HHMMSS>_<6 hex digits>")
            self.seed = env_int("SEED", 1337, "seed for weights and data order")
            self.log_dir = env_str("LOG_DIR", "logs", "folder for <RUN_ID>.txt, <RUN_ID>.jsonl and the artifact")

        with config_section("training"):  # length, batch, schedule, processes
            self.dist_timeout_seconds = env_float("DIST_TIMEOUT_SECONDS", 300.0, "a rank waiting longer in a collective fails the job; covers compile skew and rank 0's quantization + compression", min_value=1)
            self.iterations = env_int("ITERATIONS", 20000, "upper bound on optimizer steps; with MAX_WALLCLOCK_SECONDS=0 the schedule follows step/ITERATIONS", min_value=1)
            self.max_wallclock_seconds = env_float("MAX_WALLCLOCK_SECONDS", 600.0, "training wallclock budget incl. weight choice and GPTQ calibration; 0 = no limit", min_value=0)
            self.gptq_reserve_seconds = env_float("GPTQ_RESERVE_SECONDS", 4.0, "least part of the budget kept for weight choice + GPTQ calibration (their cost is also measured before training; the larger is kept)", min_value=0)
            self.warmup_steps = env_int("WARMUP_STEPS", 5, "compile warm-up steps per graph variant (weights restored afterwards)", min_value=0)
            self.warmdown_frac = env_float("WARMDOWN_FRAC", 0.85, "final fraction of training with linear LR decay", min_value=0, max_value=1)
            self.min_lr = env_float("MIN_LR", 0.1, "LR multiplier reached at the end of warmdown", min_value=0, max_value=1)
            self.train_batch_tokens = env_int("TRAIN_BATCH_TOKENS", 786_432, "global tokens per optimizer step", min_value=1)
            self.train_seq_len = env_int("TRAIN_SEQ_LEN", 2048, "training sequence length", min_value=1)
            self.micro_batch_seqs = env_int("MICRO_BATCH_SEQS", 64, "max sequences per forward/backward on one rank (gradient accumulation fills the rest)", min_value=1)
            self.val_loss_every = env_int("VAL_LOSS_EVERY", 0, "plain validation every N steps during training; 0 = only at the end", min_value=0)
            self.train_log_every = env_int("TRAIN_LOG_EVERY", 50, "log a step line every N steps", min_value=1)
            self.enable_looping_at = env_float("ENABLE_LOOPING_AT", 0.35, "fraction of training after which recurrence is on", min_value=0, max_value=1)
            self.fused_kernels = env_str("FUSED_KERNELS", "auto", "Triton kernels for the MLP and the softcapped cross-entropy: auto (on CUDA when triton imports) or off", ("auto", "off"))
            self.train_seq_len_schedule = env_str("TRAIN_SEQ_LEN_SCHEDULE", "", "growing attention span, e.g. 1024@0,2048@0.1: span L from that fraction of training on (documents cut into pieces of <= L; same tokens per step); empty = TRAIN_SEQ_LEN throughout")
            self.compile = env_str("COMPILE", "auto", "torch.compile: auto (regional on CUDA, off on CPU), regional, full, none", ("auto", "regional", "full", "none"))

        with config_section("model"):  # stored in the artifact
            self.vocab_size = env_int("VOCAB_SIZE", 8192, "tokenizer vocabulary size", min_value=2)
            self.num_layers = env_int("NUM_LAYERS", 11, "physical transformer layers", min_value=1)
            self.model_dim = env_int("MODEL_DIM", 512, "residual width", min_value=8)
            self.num_heads = env_int("NUM_HEADS", 8, "query heads", min_value=1)
            self.num_kv_heads = env_int("NUM_KV_HEADS", 4, "key/value heads (GQA)", min_value=1)
            self.mlp_mult = env_int("MLP_MULT", 4, "MLP hidden width / MODEL_DIM", min_value=1)
            self.rope_dims = env_int("ROPE_DIMS", 16, "head dims that get rotary position (partial RoPE)", min_value=0)
            self.rope_base = env_float("ROPE_BASE", 10000.0, "RoPE base frequency", min_value=1)
            self.qk_gain_init = env_float("QK_GAIN_INIT", 5.0, "initial per-head query gain")
            self.xsa_last_n = env_int("XSA_LAST_N", 11, "XSA on the last N physical layers", min_value=0)
            self.logit_softcap = env_float("LOGIT_SOFTCAP", 30.0, "logits = c*tanh(z/c)", min_value=1e-3)
            self.embed_init_std = env_float("EMBED_INIT_STD", 0.005, "std of the tied embedding at init", min_value=0)
            self.loop_start = env_int("LOOP_START", 3, "first physical layer of the recurrent span", min_value=0)
            self.loop_end = env_int("LOOP_END", 5, "last physical layer of the recurrent span (inclusive)", min_value=0)
            self.num_loops = env_int("NUM_LOOPS", 2, "extra passes over the recurrent span; 0 = no recurrence", min_value=0)
            self.parallel_start = env_int("PARALLEL_START", 8, "first physical layer with parallel residuals (>= NUM_LAYERS: none)", min_value=0)
            self.gate_window = env_int("GATE_WINDOW", 12, "leading channels the SmearGate and sparse attention gate read", min_value=1)
            self.smear_gate_enabled = env_bool("SMEAR_GATE_ENABLED", True, "SmearGate: each token's embedding mixes in the previous token's (never across a BOS)")
            self.sparse_attn_gate_enabled = env_bool("SPARSE_ATTN_GATE_ENABLED", True, "per-head sigmoid gate on the attention output, from the input's first GATE_WINDOW channels")
            self.sparse_attn_gate_scale = env_float("SPARSE_ATTN_GATE_SCALE", 0.5, "gate = sigmoid(scale * W_g x[:GATE_WINDOW])")
            self.asym_softcap_enabled = env_bool("ASYM_SOFTCAP_ENABLED", True, "learned separate softcaps for positive and negative logits (both init LOGIT_SOFTCAP)")
            self.loop_embeddings_enabled = env_bool("LOOP_EMBEDDINGS_ENABLED", True, "a learned vector per pass of the recurrent span, added to the stream entering it")
            self.doc_masked_attention_enabled = env_bool("DOC_MASKED_ATTENTION_ENABLED", True, "no token attends across a BOS (document start)")
            self.parallel_mode = env_str("PARALLEL_MODE", "lanes", "parallel residual variant: lanes (two lanes, learned routing) or single (one stream)", ("lanes", "single"))

        with config_section("optimizer"):
            self.matrix_lr = env_float("MATRIX_LR", 0.026, "Muon LR for block matrices", min_value=0)
            self.scalar_lr = env_float("SCALAR_LR", 0.02, "AdamW LR for vectors and scalars", min_value=0)
            self.tied_embed_lr = env_float("TIED_EMBED_LR", 0.03, "AdamW LR for the tied embedding", min_value=0)
            self.muon_momentum = env_float("MUON_MOMENTUM", 0.97, "Muon momentum after warm-up", min_value=0, max_value=1)
            self.muon_momentum_warmup_start = env_float("MUON_MOMENTUM_WARMUP_START", 0.92, "Muon momentum at step 0", min_value=0, max_value=1)
            self.muon_momentum_warmup_steps = env_int("MUON_MOMENTUM_WARMUP_STEPS", 1500, "steps to ramp Muon momentum", min_value=0)
            self.muon_wd = env_float("MUON_WD", 0.095, "decoupled weight decay of Muon matrices", min_value=0)
            self.muon_ns_steps = env_int("MUON_NS_STEPS", 5, "Newton-Schulz iterations", min_value=1)
            self.muon_polar_express = env_bool("MUON_POLAR_EXPRESS", True, "per-iteration Polar Express coefficients instead of the classic ones")
            self.embed_wd = env_float("EMBED_WD", 0.085, "AdamW weight decay of the embedding", min_value=0)
            self.scalar_wd = env_float("SCALAR_WD", 0.02, "AdamW weight decay of vectors and scalars", min_value=0)
            self.adam_beta1 = env_float("ADAM_BETA1", 0.9, "AdamW beta1", min_value=0, max_value=1)
            self.adam_beta2 = env_float("ADAM_BETA2", 0.99, "AdamW beta2", min_value=0, max_value=1)
            self.adam_eps = env_float("ADAM_EPS", 1e-8, "AdamW epsilon", min_value=0)
            self.grad_clip_norm = env_float("GRAD_CLIP_NORM", 0.3, "global gradient-norm clip; 0 = off", min_value=0)

        with config_section("averaging"):
            self.averaging = env_str("AVERAGING", "ema", "weights to quantize: ema, swa or none (raw)", ("ema", "swa", "none"))
            self.ema_decay = env_float("EMA_DECAY", 0.9965, "EMA decay cap; the decay ramps as min(cap, (1+t)/(10+t))", min_value=0, max_value=1)
            self.average_check_seqs = env_int("AVERAGE_CHECK_SEQS", 32, "unseen training sequences that decide between averaged and raw weights; 0 = always averaged", min_value=0)
            self.swa_every = env_int("SWA_EVERY", 50, "SWA: snapshot every N steps during warmdown", min_value=1)

        with config_section("quantization"):  # stored in the artifact; the budget search multiplies every clip sigma by one searched scale
            self.matrix_bits = env_int("MATRIX_BITS", 6, "bits of block matrices (GPTQ)", min_value=2, max_value=8)
            self.embed_bits = env_int("EMBED_BITS", 7, "bits of the tied embedding (GPTQ)", min_value=2, max_value=8)
            self.attn_clip_sigmas = env_float("ATTN_CLIP_SIGMAS", 13.0, "SDClip k of attention matrices: row scale = k*std(row)/(2^(bits-1)-1), times the budget search's scale", min_value=0.1)
            self.mlp_clip_sigmas = env_float("MLP_CLIP_SIGMAS", 12.0, "SDClip k of MLP matrices (times the budget search's scale)", min_value=0.1)
            self.embed_clip_sigmas = env_float("EMBED_CLIP_SIGMAS", 14.0, "SDClip k of the embedding (times the budget search's scale)", min_value=0.1)
            self.gptq_calibration_batches = env_int("GPTQ_CALIBRATION_BATCHES", 16, "batches of training sequences used for GPTQ Hessians", min_value=1)
            self.gptq_calibration_seqs = env_int("GPTQ_CALIBRATION_SEQS", 8, "training sequences per GPTQ calibration batch", min_value=1)
            self.gptq_block_size = env_int("GPTQ_BLOCK_SIZE", 128, "GPTQ column block", min_value=1)
            self.gptq_damp = env_float("GPTQ_DAMP", 0.01, "GPTQ damping as a fraction of mean(diag H)", min_value=0)
            self.awq_lite_enabled = env_bool("AWQ_LITE_ENABLED", True, "AWQ-lite: the most salient column groups (act_rms*mean|W|) of GPTQ'd tensors with > 65,536 values below 8 bits get 8-bit steps inside GPTQ")
            self.awq_lite_group_size = env_int("AWQ_LITE_GROUP_SIZE", 64, "AWQ-lite: columns per group (aligned blocks in the original column order)", min_value=1)
            self.awq_lite_top_k = env_int("AWQ_LITE_TOP_K", 1, "AWQ-lite: groups protected, chosen globally across the model", min_value=1)
            self.lqer_enabled = env_bool("LQER_ENABLED", True, "LQER: add a low-rank INT2 x INT4 correction of the GPTQ residual W - Q of the LQER_TOP_K tensors of largest ||W - Q||_F")
            self.lqer_rank = env_int("LQER_RANK", 4, "LQER: rank of the correction A B", min_value=1)
            self.lqer_top_k = env_int("LQER_TOP_K", 3, "LQER: tensors corrected", min_value=1)
            self.lqer_asym_group = env_int("LQER_ASYM_GROUP", 32, "LQER: values of B (row-major) per fp16 scale", min_value=1)
            self.compressor = env_str("COMPRESSOR", "rans", "artifact compressor; rans: numpy rANS with fitted tables for the ints", ("brotli", "zstd", "lzma", "rans"))
            self.artifact_target_bytes = env_int("ARTIFACT_TARGET_BYTES", 0, "total bytes to fit; 0 = 16,000,000", min_value=0)

        with config_section("evaluation"):
            self.eval_seq_len = env_int("EVAL_SEQ_LEN", 2048, "evaluation window length", min_value=1)
            self.val_batch_tokens = env_int("VAL_BATCH_TOKENS", 262_144, "tokens per evaluation forward on one rank", min_value=1)
            self.sliding_window_enabled = env_bool("SLIDING_WINDOW_ENABLED", False, "run the sliding-window evaluation; off by default: the final LoRA TTT stage does not need it and the eval budget does")
            self.eval_stride = env_int("EVAL_STRIDE", 64, "sliding window advance (targets scored per window)", min_value=1)
            self.ttt_enabled = env_bool("TTT_ENABLED", True, "run legal score-first test-time training")
            self.ttt_mode = env_str("TTT_MODE", "lora_phased", "sgd: chunked SGD of all weights over the stream; lora: per-document LoRA; lora_phased: lora plus PHASED_TTT_NUM_PHASES phases of global SGD", ("sgd", "lora", "lora_phased"))
            self.ttt_lr = env_float("TTT_LR", 0.005, "sgd mode: SGD learning rate (cosine over chunks)", min_value=0)
            self.ttt_momentum = env_float("TTT_MOMENTUM", 0.9, "SGD momentum (sgd mode and the phases' global SGD)", min_value=0, max_value=1)
            self.ttt_epochs = env_int("TTT_EPOCHS", 3, "sgd mode: passes over each scored chunk", min_value=0)
            self.ttt_chunk_tokens = env_int("TTT_CHUNK_TOKENS", 32768, "tokens per SGD chunk (sgd mode and the phases' global SGD)", min_value=1)
            self.ttt_grad_clip = env_float("TTT_GRAD_CLIP", 1.0, "SGD gradient-norm clip (sgd mode and global SGD); 0 = off", min_value=0)
            self.ttt_lora_rank = env_int("TTT_LORA_RANK", 80, "lora: adapter rank r", min_value=1)
            self.ttt_lora_alpha = env_float("TTT_LORA_ALPHA", 144.0, "lora: adapter output scale alpha/r", min_value=0)
            self.ttt_lora_lr = env_float("TTT_LORA_LR", 1e-4, "lora: AdamW learning rate (beta1 = 0)", min_value=0)
            self.ttt_lora_beta2 = env_float("TTT_LORA_BETA2", 0.99, "lora: AdamW beta2", min_value=0, max_value=1)
            self.ttt_lora_wd = env_float("TTT_LORA_WD", 0.5, "lora: AdamW weight decay", min_value=0)
            self.ttt_lora_targets = env_str("TTT_LORA_TARGETS", "q,k,v,o,mlp,head", "lora: comma list of adapted projections among q,k,v,o,mlp,head")
            self.ttt_chunk_size = env_int("TTT_CHUNK_SIZE", 48, "lora: targets scored, then trained on, per step of a document", min_value=1)
            self.ttt_short_chunks = env_str("TTT_SHORT_CHUNKS", "", "lora: smaller chunks for batches of short documents, max_len:chunk pairs, e.g. 256:8,2000:24")
            self.ttt_batch_docs = env_int("TTT_BATCH_DOCS", 64, "lora: documents per forward (one row each)", min_value=1)
            self.ttt_eval_seq_len = env_int("TTT_EVAL_SEQ_LEN", 0, "lora: context window per row; 0 = EVAL_SEQ_LEN", min_value=0)
            self.phased_ttt_num_phases = env_int("PHASED_TTT_NUM_PHASES", 1, "lora_phased: phases of global SGD on the documents scored so far", min_value=0)
            self.phased_ttt_prefix_docs = env_float("PHASED_TTT_PREFIX_DOCS", 0.05, "lora_phased: documents scored before the last phase; < 1: a fraction of the validation documents", min_value=0)
            self.phased_ttt_lr = env_float("PHASED_TTT_LR", 1e-3, "lora_phased: global SGD learning rate (cosine over chunks)", min_value=0)
            self.phased_ttt_epochs = env_int("PHASED_TTT_EPOCHS", 1, "lora_phased: global SGD passes over each chunk", min_value=0)
            self.ngram_tilt_enabled = env_bool("NGRAM_TILT_ENABLED", True, "tilt each scored distribution toward the token that most often followed the same context earlier in the stream (legal: the hint reads only earlier tokens; untilted figures logged too)")
            self.ngram_tilt_order = env_int("NGRAM_TILT_ORDER", 16, "n-gram tilt: n; the context is the previous n-1 tokens", min_value=2)
            self.ngram_tilt_threshold = env_float("NGRAM_TILT_THRESHOLD", 0.8, "n-gram tilt fires where top_count/total of the context >= this", min_value=0, max_value=1)
            self.ngram_tilt_boost = env_float("NGRAM_TILT_BOOST", 2.625, "n-gram tilt: log-boost of the hint token, p'(h) ~ p(h)*e^boost", min_value=0)
            self.val_max_tokens = env_int("VAL_MAX_TOKENS", 0, "score only the first N validation tokens (smoke runs; the score is then not comparable); 0 = all", min_value=0)
            self.eval_only = env_str("EVAL_ONLY", "", "path of a saved .ptz artifact to re-score without training (its model and quantization knobs come from it)")
            self.requantize_from = env_str("REQUANTIZE_FROM", "", "path of a saved final_model.<RUN_ID>.pt: quantize it with this run's quantization knobs and score it, without training")

    def _check_consistency(self) -> None:
        if self.model_dim % self.num_heads:
            raise ConfigError(f"MODEL_DIM={self.model_dim} must be divisible by NUM_HEADS={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"NUM_HEADS={self.num_heads} must be divisible by NUM_KV_HEADS={self.num_kv_heads}")
        if self.rope_dims > self.head_dim or self.rope_dims % 2:
            raise ConfigError(f"ROPE_DIMS={self.rope_dims} must be even and <= head dim {self.head_dim}")
        if self.num_loops and not (0 <= self.loop_start <= self.loop_end < self.num_layers):
            raise ConfigError(f"LOOP_START={self.loop_start}..LOOP_END={self.loop_end} must lie inside 0..NUM_LAYERS-1={self.num_layers - 1}")
        if self.num_loops and self.parallel_start <= self.loop_end:
            raise ConfigError(f"PARALLEL_START={self.parallel_start} must be after LOOP_END={self.loop_end}: a looped span cannot re-enter single-stream layers from two lanes")
        if self.train_batch_tokens % self.train_seq_len:
            raise ConfigError(f"TRAIN_BATCH_TOKENS={self.train_batch_tokens} must be a multiple of TRAIN_SEQ_LEN={self.train_seq_len}")
        if self.max_wallclock_seconds and self.gptq_reserve_seconds >= self.max_wallclock_seconds:
            raise ConfigError(f"GPTQ_RESERVE_SECONDS={self.gptq_reserve_seconds} must be below MAX_WALLCLOCK_SECONDS={self.max_wallclock_seconds}")
        for length, _ in self.seq_len_schedule:
            if not 0 < length <= self.train_seq_len:
                raise ConfigError(f"TRAIN_SEQ_LEN_SCHEDULE={self.train_seq_len_schedule!r}: lengths must lie in 1..TRAIN_SEQ_LEN={self.train_seq_len}")
        if self.seq_len_schedule and not self.doc_masked_attention_enabled:
            raise ConfigError("TRAIN_SEQ_LEN_SCHEDULE cuts documents into pieces through the attention mask: set DOC_MASKED_ATTENTION_ENABLED=1")
        if self.eval_only and self.requantize_from:
            raise ConfigError("EVAL_ONLY and REQUANTIZE_FROM are exclusive: set one")
        if not set(self.ttt_lora_targets.split(",")) <= set(LORA_PLACEMENTS):
            raise ConfigError(f"TTT_LORA_TARGETS={self.ttt_lora_targets!r} must be a comma list of {','.join(LORA_PLACEMENTS)}")
        try:  # [(max document length, chunk)], ascending
            self.short_chunks = sorted((int(n), int(c)) for n, c in (p.split(":") for p in self.ttt_short_chunks.split(",") if p))
        except ValueError:
            raise ConfigError(f"TTT_SHORT_CHUNKS={self.ttt_short_chunks!r} must be max_len:chunk pairs, e.g. 256:8,2000:24") from None
        self.ttt_window = self.ttt_eval_seq_len or self.eval_seq_len
        if self.ttt_mode != "sgd" and not all(1 <= c <= self.ttt_window for _, c in [(0, self.ttt_chunk_size)] + self.short_chunks):
            raise ConfigError(f"TTT_CHUNK_SIZE={self.ttt_chunk_size} and TTT_SHORT_CHUNKS chunks must lie in 1..{self.ttt_window} (the TTT window)")

    @property
    def seq_len_schedule(self) -> list[tuple[int, float]]:
        """TRAIN_SEQ_LEN_SCHEDULE as [(length, from fraction)], sorted by fraction."""
        try:
            stages = [(int(length), float(start)) for length, start in
                      (item.split("@") for item in self.train_seq_len_schedule.replace(" ", "").split(",") if item)]
        except ValueError:
            raise ConfigError(f"TRAIN_SEQ_LEN_SCHEDULE={self.train_seq_len_schedule!r} is not like 1024@0,2048@0.1") from None
        return sorted(stages, key=lambda stage: stage[1])

    def attention_span_at(self, frac: float) -> int | None:
        """Training attention span at this fraction of training: the last stage started, else None (no limit)."""
        started = [length for length, start in self.seq_len_schedule if frac >= start]
        return started[-1] if started and started[-1] < self.train_seq_len else None

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def virtual_layers(self) -> int:
        """Layer applications of one forward with looping on (evaluation, TTT): a LoRA adapter set each."""
        return len(loop_schedule(self.num_layers, self.loop_start, self.loop_end, self.num_loops, True))

    @property
    def tokenizer_file(self) -> str:
        """TOKENIZER_PATH, else the tokenizer the dataset's manifest names (relative to DATA_DIR), else FineWeb's."""
        if self.tokenizer_path:
            return self.tokenizer_path
        named = read_dataset_manifest(self.dataset_dir).get("tokenizer", {}).get("file")
        return os.path.join(self.data_dir, named or os.path.join("tokenizers", f"fineweb_{self.vocab_size}_bpe.model"))

    @property
    def dataset_dir(self) -> str:
        return os.path.join(self.data_dir, "datasets", self.dataset or f"fineweb10B_sp{self.vocab_size}")

    def as_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def artifact_config(self, sections: tuple[str, ...] = ARTIFACT_SECTIONS) -> dict:
        """{ENV_NAME: value} of the knobs in these sections: what an artifact stores about its model."""
        return {k.name: getattr(self, k.name.lower()) for k in CONFIG_REGISTRY.values() if k.section in sections}

# ========== Distributed setup and logging =============================================================================
class Done:
    """The handle of a collective that had nothing to wait for (no process group)."""

    def wait(self) -> bool:
        return True

# torch >= 2.13 names the one-tensor collectives *_single; older versions only have the *_tensor names.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

class Comm:
    """Every collective of the script, each one torch.distributed call with NCCL's semantics; gloo runs the same calls on
    CPU (torch >= 2.8), so the multi-process CPU tests run the slicing, padding and averaging the GPUs run. Without a
    process group (plain `python`) each call is the identity. async_op=True returns a handle."""

    def __init__(self, active: bool = False, store=None) -> None:
        self.active, self.store = active, store

    def all_reduce_sum(self, t: Tensor, async_op: bool = False):
        """t = sum over ranks of t, in place; returns t."""
        work = dist.all_reduce(t, op=dist.ReduceOp.SUM, async_op=async_op) if self.active else None
        return (work or Done()) if async_op else t

    def reduce_scatter_mean(self, out: Tensor, full: Tensor, async_op: bool = False):
        """out = (mean over ranks of full)[rank*n : (rank+1)*n] with n = out.size(0); full is [world*n, ...]."""
        if not self.active:
            out.copy_(full)
            return Done() if async_op else out
        work = _reduce_scatter(out, full, op=dist.ReduceOp.AVG, async_op=async_op)
        return work if async_op else out

    def all_gather_into(self, full: Tensor, local: Tensor, async_op: bool = False):
        """full[r*n : (r+1)*n] = rank r's local, n = local.size(0)."""
        if not self.active:
            full.copy_(local)
            return Done() if async_op else full
        work = _all_gather(full, local.contiguous(), async_op=async_op)
        return work if async_op else full

    def broadcast_object(self, obj, src: int = 0):
        """Rank src's (picklable) obj, on every rank."""
        if not self.active:
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src=src)
        return holder[0]

    def first_failure(self, line: str) -> tuple[str, bool]:
        """(the job's first failure line, whether it is this rank's): each failing rank offers its line to the store;
        the first stays, so a rank whose collective broke because a peer died reports the peer's error."""
        if self.store is None:
            return line, True
        try:
            first = self.store.compare_set("train_gpt_first_failure", "", line).decode()
        except (RuntimeError, OSError):  # DistError and store connection errors
            return line, True
        return first, first == line

@dataclass
class Runtime:
    """Where this process runs: rank, world size, device and collectives (through the process group if one exists)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    comm: Comm | None = None

    def __post_init__(self) -> None:
        if self.comm is None:
            self.comm = Comm(dist.is_initialized())
        if self.comm.active and (dist.get_rank(), dist.get_world_size()) != (self.rank, self.world_size):
            raise ValueError(f"Runtime(rank={self.rank}, world_size={self.world_size}) disagrees with the process "
                             f"group's rank {dist.get_rank()} of {dist.get_world_size()}")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

def setup_distributed(timeout_seconds: float) -> Runtime:
    """torchrun: a process group (NCCL on CUDA, gloo on CPU) even for one rank, so one GPU takes the 8-GPU code path; plain
    `python`: none. A collective waiting over timeout_seconds fails the job (not NCCL's default 10 minutes)."""
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size == 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        return Runtime(rank, world_size, local_rank, device)
    timeout = datetime.timedelta(seconds=timeout_seconds)
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank, world_size=world_size,
                            timeout=timeout, device_id=device if device.type == "cuda" else None)
    return Runtime(rank, world_size, local_rank, device, Comm(active=True, store=store))

class Logger:
    """One log(): console and logs/<run_id>.txt on rank 0, plus a JSON-lines copy of the metrics."""

    def __init__(self, runtime: Runtime, log_dir: str | None, run_id: str) -> None:
        self.enabled = runtime.is_main  # main() enables the rank that failed first, to log the failure
        self.text_path = self.jsonl_path = None
        if log_dir:
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

# ========== Data: shards, training loader, validation tokens, exact byte accounting ===================================
# Shard format (SPEC §2): 256 int32 header ([0]=20240520 magic, [1]=1 version, [2]=n_tokens), n_tokens uint16 ids; little-endian.
SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_INTS = 256
BOS_ID = 1
SHARD_HEADER_BYTES = SHARD_HEADER_INTS * 4
DATA_HELP = "download shards with data/cached_challenge_fineweb.py or build them with data/prepare_docs.py"
BYTE_SIDECAR_GLOB = "fineweb_val_bytes_*.bin"  # per validation token: its original UTF-8 bytes, in shard format
CASEOPS_OPERATORS = ("\ue001", "\ue002", "\ue003", "\ue004")  # TITLE, ALLCAPS, CAPNEXT, ESCAPE (data/caseops.py)
CHALLENGE_VAL_DOCS = 50_000  # documents in the challenge's FineWeb validation split

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
    files = sorted(glob.glob(os.path.join(dataset_dir, f"fineweb_{split}_[0-9]*.bin")))  # not the byte side-car
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

def read_dataset_manifest(dataset_dir: str) -> dict:
    """The manifest.json the data/ scripts write into a dataset folder, or {} when it has none."""
    path = os.path.join(dataset_dir, "manifest.json")
    if not os.path.isfile(path):
        return {}
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: unreadable manifest ({error}); rebuild the dataset or delete the file") from None

def dataset_provenance(h: Hyperparameters, val_tokens: Tensor) -> dict:
    """What the run is scored on (config event, records): manifest.json, validation documents (one BOS each), tokenizer."""
    manifest, path = read_dataset_manifest(h.dataset_dir), Path(h.dataset_dir, "manifest.json")
    source = manifest.get("source", {})
    kind = {"local documents": "local_docs", "hub": "fineweb"}.get(source.get("kind"))
    kind = kind or ("fineweb" if path.parent.name.startswith("fineweb10B_") else "unknown")
    return {"path": h.dataset_dir, "source": kind, "val_documents": int((val_tokens == BOS_ID).sum()),
            "manifest_sha256": hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None,
            "docs": source.get("path"), "docs_sha256": source.get("sha256"), "tokenizer_train_docs": manifest.get("tokenizer_docs"),
            "caseops": bool(manifest.get("caseops")), "tokenizer_sha256": hashlib.sha256(Path(h.tokenizer_file).read_bytes()).hexdigest()}

def _check_not_validation(files: list[str]) -> None:
    """Training must never read a validation shard: compare real paths with every val shard beside them."""
    folders = {os.path.dirname(os.path.realpath(f)) for f in files} | {os.path.dirname(os.path.abspath(f)) for f in files}
    val_paths = {os.path.realpath(p) for folder in folders for p in glob.glob(os.path.join(folder, "fineweb_val_*.bin"))}
    for f in files:
        if os.path.realpath(f) in val_paths or os.path.basename(os.path.realpath(f)).startswith("fineweb_val_"):
            raise DataError(f"{f}: this training file is a validation shard; remove it from the training files")

class TrainLoader:
    """Training batches: non-overlapping (seq_len+1)-token windows in a SEED-shuffled global order. Step s consumes
    the global windows [s*G, (s+1)*G) (G = sequences per step), each rank at each micro-step its own contiguous slice,
    so the data per step is the same for any world size. A background thread prepares the next micro-batch (pinned)."""

    def __init__(self, files: list[str], seq_len: int, micro_batch_seqs: int, grad_accum_steps: int,
                 runtime: Runtime, seed: int, vocab_size: int) -> None:
        if not files:
            raise DataError(f"no training shards given; {DATA_HELP}")
        _check_not_validation(files)
        self.files = list(files)
        # Plain ndarray views of the memory maps (cheaper to slice); ids are range-checked per batch, not by a full scan.
        self.shards = [np.asarray(read_shard(f)) for f in self.files]
        self.window, self.micro_batch_seqs, self.grad_accum_steps = seq_len + 1, micro_batch_seqs, grad_accum_steps
        self.seed, self.vocab_size, self.device = seed, vocab_size, runtime.device
        self.pin_memory = torch.cuda.is_available() and runtime.device.type == "cuda"
        # A window never crosses a shard end; its count per shard is the same for any phase in [0, seq_len] (fixed epochs).
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
                with contextlib.suppress(queue.Full):
                    out.put(item, timeout=0.05)
                    break
            if isinstance(item[1], BaseException):
                return
            micro_batch += 1

    def _start_worker(self) -> None:
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._worker = threading.Thread(target=self._produce, args=(self.micro_batches_done, self._stop, self._queue),
                                        name="train-loader", daemon=True)
        self._worker.start()

    def close(self) -> None:
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
        return {"micro_batches_done": self.micro_batches_done, "seed": self.seed, "sequences_per_step": self.sequences_per_step}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed or state["sequences_per_step"] != self.sequences_per_step:
            raise DataError(f"loader state from SEED={state['seed']}, {state['sequences_per_step']} sequences/step does not "
                            f"match this loader (SEED={self.seed}, {self.sequences_per_step}); resume with the same config")
        self.close()
        self.micro_batches_done = int(state["micro_batches_done"])
        self._start_worker()

@dataclass
class ByteTables:
    """Per-token byte counts for bpb (SPEC §2): bytes(t | prev p) = base[t] + (space[t] and not boundary[p])."""
    base_bytes: Tensor        # int16 [V]: UTF-8 bytes of the piece without its leading '▁'; 1 for <0xNN>; 0 for control
    has_leading_space: Tensor  # bool [V]: the piece starts with '▁'
    is_boundary: Tensor       # bool [V]: control/unknown/unused pieces (no space is counted after them)

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
    # The byte rule charges a word's space to its '▁' piece; a space BPE could not merge is the standalone '▁' piece.
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

def is_caseops(sp, manifest: dict) -> bool:
    """CaseOps data (FRONTIER §6): the manifest says so, or the tokenizer has the case operator pieces."""
    return bool(manifest.get("caseops")) or any(sp.id_to_piece(sp.piece_to_id(op)) == op for op in CASEOPS_OPERATORS)

def validation_target_bytes(dataset_dir: str, val_tokens: Tensor, tables: ByteTables, caseops: bool, log=log_nothing) -> Tensor:
    """Bytes of every target (int32 [len(val_tokens) - 1]; target i is val_tokens[i+1]), the bpb denominator: from the
    dataset's byte side-car if any (entry j = original UTF-8 bytes of token j), else the tokenizer's tables. CaseOps
    pieces spell the transformed text, not the original, so a CaseOps dataset must have the side-car."""
    sidecars = sorted(glob.glob(os.path.join(dataset_dir, BYTE_SIDECAR_GLOB)))
    if not sidecars:
        if caseops:
            raise DataError(f"{dataset_dir}: CaseOps dataset without a byte side-car ({BYTE_SIDECAR_GLOB}), so its bytes cannot be "
                            "counted; rebuild it with data/prepare_docs.py --caseops or data/cached_challenge_fineweb.py --variant sp8192-caseops")
        log("bytes: tokenizer tables")
        return tables.target_bytes(val_tokens[:-1], val_tokens[1:])
    counts = np.concatenate([read_shard(path) for path in sidecars])
    if len(counts) != len(val_tokens):
        raise DataError(f"{sidecars[0]}: the byte side-car has {len(counts)} entries for {len(val_tokens)} validation tokens; "
                        "they must align one to one, rebuild the dataset")
    if counts[val_tokens.numpy() == BOS_ID].any():  # BOS spells no text: a nonzero count there means misalignment
        raise DataError(f"{sidecars[0]}: the byte side-car gives BOS tokens bytes, so it is not aligned with the tokens; rebuild the dataset")
    log(f"bytes: side-car {sidecars[0]}" + (f" (+{len(sidecars) - 1} more)" if len(sidecars) > 1 else ""))
    if caseops and (val_docs := int((val_tokens == BOS_ID).sum())) < CHALLENGE_VAL_DOCS:
        log(f"WARNING: CaseOps validation split of {val_docs} documents, not the challenge's {CHALLENGE_VAL_DOCS:,}: not a comparable score")
    return torch.from_numpy(counts[1:].astype(np.int32))

# ========== Model =====================================================================================================
def select_attention_backend(device: torch.device, unavailable: list[str] | None = None, doc_masked: bool = False) -> str:
    """On CUDA the first that works of FA3 (flash_attn_interface) and SDPA with cuDNN; with document masking FlexAttention
    with a block mask (forward+backward 9 % slower than cuDNN's unmasked causal kernel at B=48, documents of 50-1,500
    tokens). FA4 is not used: torch 2.11's SDPA hook for it fails on flash-attn-4 4.0.0b36, its dense kernel is 22 %
    slower forward, and its varlen kernel loses steps at the per-GPU batch (docs/BENCHMARKS.md §5.11). SDPA's default
    on CPU. Why each skipped one is unusable is appended to `unavailable`."""
    unavailable = [] if unavailable is None else unavailable
    if device.type != "cuda":
        return "sdpa"
    if doc_masked:
        unavailable.append("fa3/cudnn: document-masked attention runs on FlexAttention")
        return "flex"
    try:
        import flash_attn_interface  # noqa: F401
        return "fa3"
    except ImportError as e:
        unavailable.append(f"fa3: {e}")
    return "sdpa_cudnn"

def document_segments(input_ids: Tensor, span: int | None) -> Tensor:
    """Segment id per position [B,T]: its document (count of BOS so far), with a span also its piece (position - doc start) // span."""
    starts = input_ids == BOS_ID
    segments = torch.cumsum(starts, dim=1)
    if span is None:
        return segments
    positions = torch.arange(input_ids.size(1), device=input_ids.device).expand_as(input_ids)
    doc_start = torch.cummax(torch.where(starts, positions, 0), dim=1).values
    return segments * input_ids.size(1) + (positions - doc_start) // span

def attention_mask(segments: Tensor, backend: str, block: int = 128):
    """What causal_attention takes to keep each query in its segment: for SDPA the segment ids; for FlexAttention a
    BlockMask (one per forward, shared by every layer) from block-level segment ranges, since segment ids never decrease
    along a row: kv block j is skipped for query block i when its last segment precedes i's first, kept whole when j < i
    and both lie in one segment, else masked element-wise (8x cheaper than create_block_mask's pairwise scan)."""
    if backend != "flex":
        return segments
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask
    B, T = segments.shape

    def same_segment_causal(b, h, q, kv):
        return (q >= kv) & (segments[b, q] == segments[b, kv])
    if T % block:
        return create_block_mask(same_segment_causal, B, None, T, T, device=segments.device, _compile=True)
    ranges = segments.view(B, T // block, block)
    lo, hi = ranges[..., 0], ranges[..., -1]  # [B, blocks]
    causal = torch.ones(T // block, T // block, dtype=torch.bool, device=segments.device).tril()
    live = causal & (hi[:, None, :] >= lo[:, :, None])  # [B, q block, kv block]
    one = lo == hi
    full = causal.tril(-1) & (one[:, :, None] & one[:, None, :]) & (lo[:, :, None] == lo[:, None, :])

    def listed(blocks: Tensor) -> tuple[Tensor, Tensor]:  # (counts [B,1,n], indices [B,1,n,n]) with listed blocks first
        return blocks.sum(-1, dtype=torch.int32)[:, None], torch.argsort((~blocks).int(), dim=-1, stable=True).int()[:, None]
    return BlockMask.from_kv_blocks(*listed(live & ~full), *listed(full), BLOCK_SIZE=block, mask_mod=same_segment_causal)

def causal_attention(q: Tensor, k: Tensor, v: Tensor, backend: str, mask=None) -> Tensor:
    """Causal GQA attention, q [B,T,H,D], k/v [B,T,KV,D] -> [B,T,H,D]; with a mask (attention_mask) within segments."""
    if mask is not None:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if backend == "flex" and torch.compiler.is_compiling():
            from torch.nn.attention.flex_attention import flex_attention
            y = flex_attention(q, k, v, block_mask=mask, enable_gqa=True)
        elif backend == "flex":  # eager forwards (GPTQ calibration, weight choice, COMPILE=none): its own compiled copy
            with torch.compiler.set_stance("default"):
                y = compiled_flex_attention()(q, k, v, block_mask=mask, enable_gqa=True)
        else:  # segment ids: the dense boolean mask (CPU, tests)
            T = q.size(2)
            causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
            allowed = (mask[:, None, :, None] == mask[:, None, None, :]) & causal
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=q.size(1) != k.size(1))
        return y.transpose(1, 2)
    if backend == "fa3":
        import flash_attn_interface
        out = flash_attn_interface.flash_attn_func(q, k, v, causal=True)
        return out[0] if isinstance(out, tuple) else out
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    gqa = q.size(1) != k.size(1)
    if backend == "sdpa_cudnn":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        # cuDNN takes GQA natively (measured on H100: 396 TFLOP/s forward vs 273 with repeated K/V).
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return y.transpose(1, 2)

@functools.cache
def compiled_flex_attention():
    """FlexAttention fuses only when compiled: eager, it materialises the [B,H,T,T] scores (the weight choice and GPTQ
    calibration took 5.5-7.1 s and reserved 8.2-9.6 s of a 200 s budget so; 1.6 s and 4.0 s compiled: BENCHMARKS §5.11)."""
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)

def rms_norm(x: Tensor) -> Tensor:
    """RMSNorm without learned weights (there are none anywhere in this model)."""
    return F.rms_norm(x, (x.size(-1),))

class RMSNorm(nn.Module):
    """RMSNorm as a module, so that GPTQ calibration can hook its output (the tied head's input)."""

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x)

@dataclass(frozen=True)
class Role:
    """How a parameter is trained and stored, declared once where it is created; the optimizers,
    GPTQ, the Hessian hooks and the tests all read it (never guessed from shapes or names).
    optimizer: muon (block matrices) | embed (AdamW at TIED_EMBED_LR) | scalar (AdamW at SCALAR_LR)
    quant:     attn | mlp | embed (GPTQ with that group's bits and clip sigmas) | gate (int8, absmax
               per row) | fp16 (stored as is)
    hessian:   GPTQ Hessian source: input (the owning linear's input) | head (the final-norm output)"""
    optimizer: str
    quant: str
    hessian: str = ""

    def __post_init__(self) -> None:
        if self.optimizer not in ("muon", "embed", "scalar") or self.quant not in ("attn", "mlp", "embed", "gate", "fp16") \
                or self.hessian not in ("", "input", "head") or (self.quant in GPTQ_GROUPS) != bool(self.hessian):
            raise ValueError(f"invalid {self}: a GPTQ group (attn/mlp/embed) needs a Hessian source and nothing else has one")

GPTQ_GROUPS = ("attn", "mlp", "embed")  # quant groups that GPTQ quantizes, each with its own bits and clip sigmas
SCALAR = Role("scalar", "fp16")  # gains, mixes, scales: AdamW, stored in fp16

def declare(module: nn.Module, name: str, value: Tensor, role: Role) -> nn.Parameter:
    """Register `value` as parameter `name` of `module` with its role (module.roles, unlike Parameter attributes, survives deepcopy)."""
    param = nn.Parameter(value)
    module.register_parameter(name, param)
    module.__dict__.setdefault("roles", {})[name] = role
    return param

class CastedLinear(nn.Linear):
    """fp32 master weights computed in the activations' dtype; a block matrix by default (Muon, GPTQ group `quant`, input Hessian)."""

    def __init__(self, in_features: int, out_features: int, quant: str, zero_init: bool = False, role: Role | None = None) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.roles = {"weight": role or Role("muon", quant, "input")}
        (nn.init.zeros_ if zero_init else nn.init.orthogonal_)(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype))

def rotary_tables(seq_len: int, rope_dims: int, base: float) -> tuple[Tensor, Tensor]:
    """cos/sin [seq_len, rope_dims/2] for the rotary part of each head."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rope_dims, 2, dtype=torch.float64) / rope_dims))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()

def apply_partial_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first rope_dims dims of each head (x [B,T,H,D]); the other dims carry no position."""
    rope_dims = 2 * cos.size(-1)
    if rope_dims == 0:
        return x
    T = x.size(1)
    cos, sin = cos[None, :T, None, :].to(x.dtype), sin[None, :T, None, :].to(x.dtype)
    x1, x2, rest = x[..., : rope_dims // 2], x[..., rope_dims // 2 : rope_dims], x[..., rope_dims:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin, rest), dim=-1)

def remove_self_value(y: Tensor, v: Tensor) -> Tensor:
    """XSA: y -= (y . v_hat) v_hat per head, v_hat the normalised value of the head's KV group at the same position."""
    B, T, H, D = y.shape
    kv_heads = v.size(2)
    y = y.view(B, T, kv_heads, H // kv_heads, D)
    v_hat = (v * torch.rsqrt(v.square().sum(dim=-1, keepdim=True) + 1e-12)).unsqueeze(3)
    y = y - (y * v_hat).sum(dim=-1, keepdim=True) * v_hat
    return y.view(B, T, H, D)

class Attention(nn.Module):
    def __init__(self, h: Hyperparameters, use_xsa: bool, backend: str) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = h.num_heads, h.num_kv_heads, h.head_dim
        self.use_xsa, self.backend = use_xsa, backend
        self.c_q = CastedLinear(h.model_dim, h.num_heads * h.head_dim, "attn")
        self.c_k = CastedLinear(h.model_dim, h.num_kv_heads * h.head_dim, "attn")
        self.c_v = CastedLinear(h.model_dim, h.num_kv_heads * h.head_dim, "attn")
        self.proj = CastedLinear(h.num_heads * h.head_dim, h.model_dim, "attn", zero_init=True)
        declare(self, "q_gain", torch.full((h.num_heads,), h.qk_gain_init), SCALAR)
        self.gate_scale = h.sparse_attn_gate_scale if h.sparse_attn_gate_enabled else None
        if self.gate_scale is not None:  # zero init: every head starts at sigmoid(0) = 0.5
            declare(self, "gate_w", torch.zeros(h.num_heads, h.gate_window), Role("scalar", "gate"))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask=None, lora: LoRATerms | None = None) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self.c_q(x), self.c_k(x), self.c_v(x)
        if lora is not None:  # TTT adapters read the normed block input x (as do O and the MLP's)
            q, k, v = lora.add("q", x, q), lora.add("k", x, k), lora.add("v", x, v)
        q, k, v = (t.view(B, T, -1, self.head_dim) for t in (q, k, v))  # H, KV, KV heads
        q = apply_partial_rope(rms_norm(q), cos, sin) * self.q_gain.to(x.dtype)[None, None, :, None]
        k = apply_partial_rope(rms_norm(k), cos, sin)
        y = causal_attention(q, k, v, self.backend, mask)
        if self.use_xsa:
            y = remove_self_value(y, v)
        if self.gate_scale is not None:  # sparse head gate: y_h *= sigmoid(scale * W_g[h] . x[:window])
            gate = torch.sigmoid(self.gate_scale * F.linear(x[..., : self.gate_w.size(1)], self.gate_w.to(x.dtype)))
            y = y * gate[..., None]
        out = self.proj(y.reshape(B, T, self.num_heads * self.head_dim))
        return out if lora is None else lora.add("o", x, out)  # O: a bypass from x, not a term of y

class MLP(nn.Module):
    def __init__(self, h: Hyperparameters) -> None:
        super().__init__()
        self.up = CastedLinear(h.model_dim, h.mlp_mult * h.model_dim, "mlp")
        self.down = CastedLinear(h.mlp_mult * h.model_dim, h.model_dim, "mlp", zero_init=True)
        self.fused = fused_kernels_enabled(h) and h.model_dim % 8 == 0  # TMA: 16-byte aligned rows

    def forward(self, x: Tensor, lora: LoRATerms | None = None) -> Tensor:
        # GPTQ calibration hooks the two linears' inputs: those calls take the plain path.
        if self.fused and triton_runs_on(x) and not (self.up._forward_hooks or self.down._forward_hooks):
            y = fused_leaky_relu_square_mlp(x, self.up.weight.to(x.dtype), self.down.weight.to(x.dtype))
        else:
            y = self.down(F.leaky_relu(self.up(x), negative_slope=0.5).square())
        return y if lora is None else lora.add("mlp", x, y)  # a bypass outside the fused kernel

class Block(nn.Module):
    """One physical layer. `mode` is how its two branches meet the residual stream:
    sequential: u = mix(x, x0); x = u + attn(u); x = x + mlp(x)
    single:     u = mix(x, x0); x = u + attn(u) + mlp(u)                       (one stream, parallel)
    lanes:      a = attn(mix(lane0, x0)); m = mlp(lane1); lane_j = r_j*lane_j + a_j*a + b_j*m
    where mix(x, x0) = m0*x + m1*x0 per channel, and each branch reads its input through RMSNorm
    times the layer's LN scale 1/sqrt(layer+1)."""

    def __init__(self, h: Hyperparameters, layer: int, backend: str) -> None:
        super().__init__()
        self.layer = layer
        self.mode = "sequential" if layer < h.parallel_start else ("lanes" if h.parallel_mode == "lanes" else "single")
        self.attn = Attention(h, use_xsa=layer >= h.num_layers - h.xsa_last_n, backend=backend)
        self.mlp = MLP(h)
        dim = h.model_dim
        declare(self, "attn_scale", torch.ones(dim), SCALAR)
        declare(self, "mlp_scale", torch.ones(dim), SCALAR)
        declare(self, "resid_mix", torch.stack((torch.ones(dim), torch.zeros(dim))), SCALAR)  # (m0, m1) per channel
        # A buffer, not a Python float, so one compiled graph serves every layer.
        self.register_buffer("ln_scale", torch.tensor(1.0 / math.sqrt(layer + 1)), persistent=False)
        if self.mode == "lanes":
            declare(self, "lane_resid", torch.full((2,), 1.1), SCALAR)
            declare(self, "lane_attn", torch.ones(2), SCALAR)
            declare(self, "lane_mlp", torch.ones(2), SCALAR)

    def _mix(self, x: Tensor, x0: Tensor) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        return mix[0] * x + mix[1] * x0

    def _attn(self, x: Tensor, cos: Tensor, sin: Tensor, mask, lora: LoRATerms | None) -> Tensor:
        return self.attn_scale.to(x.dtype) * self.attn(rms_norm(x) * self.ln_scale.to(x.dtype), cos, sin, mask, lora)

    def _mlp(self, x: Tensor, lora: LoRATerms | None) -> Tensor:
        return self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x) * self.ln_scale.to(x.dtype), lora)

    def forward(self, x: Tensor, x0: Tensor, cos: Tensor, sin: Tensor, lane1: Tensor | None = None,
                skip: Tensor | None = None, skip_weight: Tensor | None = None, skip_gate: Tensor | None = None, mask=None, lora: LoRATerms | None = None):
        if skip is not None:
            # U-Net skip (into lane0): s = w*skip; x = s + sigmoid(g)*(x - s); here, in the compiled region, it fuses.
            s = skip_weight.to(x.dtype) * skip
            x = s + torch.sigmoid(skip_gate).to(x.dtype) * (x - s)
        if self.mode == "sequential":
            x = self._mix(x, x0)
            x = x + self._attn(x, cos, sin, mask, lora)
            return x + self._mlp(x, lora)
        if self.mode == "single":
            u = self._mix(x, x0)
            return u + self._attn(u, cos, sin, mask, lora) + self._mlp(u, lora)
        if lane1 is None:  # the first lanes layer splits the stream into two equal lanes
            lane1 = x
        a = self._attn(self._mix(x, x0), cos, sin, mask, lora)
        m = self._mlp(lane1, lora)
        r, wa, wm = (p.to(x.dtype) for p in (self.lane_resid, self.lane_attn, self.lane_mlp))
        return r[0] * x + wa[0] * a + wm[0] * m, r[1] * lane1 + wa[1] * a + wm[1] * m

def softcap(z: Tensor, cap_pos: Tensor, cap_neg: Tensor) -> Tensor:
    """Logit softcap in fp32 (or fp64): c+ * tanh(z/c+) for z > 0, c- * tanh(z/c-) otherwise."""
    z = z if z.dtype == torch.float64 else z.float()
    return torch.where(z > 0, cap_pos * torch.tanh(z / cap_pos), cap_neg * torch.tanh(z / cap_neg))

def softcap_cross_entropy(z: Tensor, target_ids: Tensor, cap_pos: Tensor, cap_neg: Tensor,
                          hint_ids: Tensor | None = None, fused: bool = False) -> tuple[Tensor, Tensor | None]:
    """Per-token fp32 loss of softcapped logits: nll = logsumexp(zc) - zc[target], zc = softcap(z), z [N, V] raw logits
    (any float dtype), targets [N], caps 0-dim tensors (they get gradients). With hint_ids [N] also -log p(hint) from the
    same distribution (no grad). fused=True: the Triton kernel where Triton can run; this body is its reference."""
    if fused and triton_runs_on(z):
        nll, _, hint_nll = torch.ops.pgolf.softcap_ce(z.contiguous(), target_ids, cap_pos, cap_neg, hint_ids)
        return nll, (None if hint_ids is None else hint_nll.detach())
    zc = softcap(z, cap_pos, cap_neg)
    lse = torch.logsumexp(zc, dim=-1)
    nll = lse - zc.gather(1, target_ids[:, None]).squeeze(1)
    hint_nll = None if hint_ids is None else (lse - zc.gather(1, hint_ids[:, None]).squeeze(1)).detach()
    return nll, hint_nll

# --------------------------------------------------------------------------------------------------
# Kernels (Triton): fused LeakyReLU(0.5)^2 MLP and fused softcapped cross-entropy. Each replaces a plain PyTorch
# expression that stays the CPU path and the tests' reference:
#   MLP.forward:            y = down(leaky_relu(up(x), 0.5)^2)
#   softcap_cross_entropy:  nll = logsumexp(zc) - zc[target], zc = softcap(z)
# They run where Triton can (CUDA tensors; any tensor under TRITON_INTERPRET=1) unless FUSED_KERNELS=off; Triton is
# imported on first use. The launches sit in torch.library ops: torch.compile sees one opaque op, not Triton.
# --------------------------------------------------------------------------------------------------
def triton_available() -> bool:
    """Triton >= 3.4 is installed (host-side TMA descriptors, autotune result caching); not imported here."""
    try:
        return tuple(int(p) for p in importlib.metadata.version("triton").split(".")[:2]) >= (3, 4)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False

def fused_kernels_enabled(h: Hyperparameters) -> bool:
    return h.fused_kernels == "auto" and triton_available()

def triton_runs_on(x: Tensor) -> bool:
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"

def kernel_path(h: Hyperparameters, device: torch.device) -> str:
    """The path the MLP and the cross-entropy take on this device, for the log."""
    if h.fused_kernels == "off":
        return "torch (FUSED_KERNELS=off)"
    if not triton_available():
        return "torch (no triton >= 3.4: pip install triton)"
    return "triton" if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1" else "torch (no CUDA)"

@functools.cache
def triton_kernels():
    """The Triton kernels, defined (and JIT-compiled per shape) on first use."""
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor
    if "SHIPPED_SOURCE" in globals():  # the shipped copy runs exec'd text: let Triton's inspect read it
        linecache.cache["<string>"] = (len(SHIPPED_SOURCE), None, SHIPPED_SOURCE.splitlines(True), "<string>")
    interpret = os.environ.get("TRITON_INTERPRET") == "1"  # one config: autotuning needs a GPU

    def tile_shapes(args):  # autotune pre-hook: the TMA descriptors take the tile of the config run
        args["a"].block_shape, args["b"].block_shape = [args["BM"], args["BK"]], [args["BN"], args["BK"]]
        for name in ("pre", "post", "dpre"):
            args[name].block_shape = [args["BM"], args["BN"]]

    @triton.autotune([triton.Config(dict(BM=bm, BN=bn, BK=64, GROUP_M=8), num_stages=st, num_warps=w, pre_hook=tile_shapes)
                      for bm, bn, st, w in ((128, 128, 4, 8), (128, 256, 3, 8), (128, 128, 3, 4), (64, 256, 4, 4))
                      ][: 1 if interpret else None], key=["N", "K", "BACKWARD", "WRITE_PRE"], cache_results=True)
    @triton.jit
    def mlp_matmul(a, b, pre, post, dpre, M, N, K: tl.constexpr, BACKWARD: tl.constexpr, WRITE_PRE: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
        """acc = a @ b^T on one [BM, BN] tile (tiles visited in bands of GROUP_M rows so b stays in L2).
        Forward: pre = acc, post = leaky(pre)^2. Backward (acc = dL/dpost, pre read back):
        dpre = acc * (2 pre if pre > 0 else pre / 2), and post recomputed for the down weight's grad."""
        pid, num_n = tl.program_id(0), tl.cdiv(N, BN)
        first_m = pid // (GROUP_M * num_n) * GROUP_M
        band_rows = tl.minimum(tl.cdiv(M, BM) - first_m, GROUP_M)
        om = (first_m + pid % (GROUP_M * num_n) % band_rows) * BM
        on = (pid % (GROUP_M * num_n) // band_rows) * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            acc = tl.dot(a.load([om, k]), b.load([on, k]).T, acc)
        if BACKWARD:
            h = pre.load([om, on]).to(tl.float32)
            dpre.store([om, on], (acc * tl.where(h > 0, 2.0 * h, 0.5 * h)).to(dpre.dtype))
        else:
            h = acc.to(post.dtype)  # pre is rounded like the plain path's linear output
            if WRITE_PRE:
                pre.store([om, on], h)
            h = h.to(tl.float32)
        act = tl.where(h > 0, h, 0.5 * h)
        post.store([om, on], (act * act).to(post.dtype))

    def mlp(a: Tensor, b: Tensor, pre: Tensor | None, write_pre: bool) -> tuple[Tensor, Tensor, Tensor]:
        """(post, pre, dpre) for a [M, K] and b [N, K]; pre given = backward. Unused outputs are empty."""
        a, b = ((t if t.data_ptr() % 16 == 0 else t.clone()) for t in (a.contiguous(), b.contiguous()))  # TMA
        (M, K), N = a.shape, b.size(0)
        backward = pre is not None
        post = a.new_empty(M, N)
        pre = pre if backward else a.new_empty(M, N) if write_pre else a.new_empty(0)
        dpre = a.new_empty(M, N) if backward else a.new_empty(0)
        desc = [TensorDescriptor.from_tensor(t if t.numel() else post, [1, 1]) for t in (a, b, pre, post, dpre)]
        grid = lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)  # noqa: E731
        mlp_matmul[grid](*desc, M, N, K, BACKWARD=backward, WRITE_PRE=write_pre)
        return post, pre, dpre

    # The kernels' softcap: c = cap_pos if x > 0 else cap_neg, u = x/c, e = exp(-2|u|) (no overflow); tanh(u) =
    # sign(u)(1-e)/(1+e), sech(u)^2 = 4e/(1+e)^2, written out in each kernel (the interpreter cannot call a nested jit).
    ce_configs = [triton.Config(dict(BLOCK=b), num_warps=w) for b, w in ((1024, 4), (2048, 8), (4096, 8), (8192, 16))]

    @triton.autotune(ce_configs[: 1 if interpret else None], key=["V", "HAS_HINT"], cache_results=True)
    @triton.jit
    def ce_forward(z, targets, hints, cap_pos_ptr, cap_neg_ptr, nll, lse_out, hint_nll, V: tl.constexpr, stride,
                   HAS_HINT: tl.constexpr, BLOCK: tl.constexpr):
        """One row in one read of z: lse = logsumexp(zc) by online max/sum over BLOCK chunks, picking up zc[target] and zc[hint]."""
        row = tl.program_id(0).to(tl.int64)
        z_row = z + row * stride
        cap_pos, cap_neg = tl.load(cap_pos_ptr).to(tl.float32), tl.load(cap_neg_ptr).to(tl.float32)
        inv_pos, inv_neg = 1.0 / cap_pos, 1.0 / cap_neg
        target, hint = tl.load(targets + row), tl.load(hints + row)
        m, s, z_target, z_hint = -float("inf"), 0.0, 0.0, 0.0  # running max, sum of exp(zc - m)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(z_row + cols, mask=cols < V, other=0.0).to(tl.float32)
            e = tl.exp(-2.0 * tl.abs(x) * tl.where(x > 0, inv_pos, inv_neg))
            zc = tl.where(cols < V, tl.where(x > 0, cap_pos, -cap_neg) * (1.0 - e) / (1.0 + e), -float("inf"))
            m_new = tl.maximum(m, tl.max(zc, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(zc - m_new), 0)
            m = m_new
            z_target += tl.sum(tl.where(cols == target, zc, 0.0), 0)
            if HAS_HINT:
                z_hint += tl.sum(tl.where(cols == hint, zc, 0.0), 0)
        lse = m + tl.log(s)
        tl.store(lse_out + row, lse)
        tl.store(nll + row, lse - z_target)
        if HAS_HINT:
            tl.store(hint_nll + row, lse - z_hint)

    @triton.autotune(ce_configs[: 1 if interpret else None], key=["V"], cache_results=True)
    @triton.jit
    def ce_backward(z, targets, cap_pos_ptr, cap_neg_ptr, lse_in, grad_nll, dz, dcaps, N, V: tl.constexpr, stride, BLOCK: tl.constexpr):
        """One row, zc recomputed from z: dnll/dzc = g (softmax(zc) - onehot(target)); dz = dzc sech^2(u);
        dcap = dzc d(c tanh(x/c))/dc = dzc (tanh(u) - u sech^2(u)), summed per row for each cap."""
        row = tl.program_id(0).to(tl.int64)
        z_row, dz_row = z + row * stride, dz + row * stride
        cap_pos, cap_neg = tl.load(cap_pos_ptr).to(tl.float32), tl.load(cap_neg_ptr).to(tl.float32)
        inv_pos, inv_neg = 1.0 / cap_pos, 1.0 / cap_neg
        g, lse, target = tl.load(grad_nll + row), tl.load(lse_in + row), tl.load(targets + row)
        dcap_pos, dcap_neg = tl.zeros([BLOCK], tl.float32), tl.zeros([BLOCK], tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(z_row + cols, mask=cols < V, other=0.0).to(tl.float32)
            c = tl.where(x > 0, cap_pos, cap_neg)
            u = x * tl.where(x > 0, inv_pos, inv_neg)
            e = tl.exp(-2.0 * tl.abs(u))
            tanh, sech2 = tl.where(x > 0, 1.0 - e, e - 1.0) / (1.0 + e), 4.0 * e / ((1.0 + e) * (1.0 + e))
            dzc = g * (tl.exp(c * tanh - lse) - tl.where(cols == target, 1.0, 0.0))
            tl.store(dz_row + cols, (dzc * sech2).to(dz.dtype.element_ty), mask=cols < V)
            dcap = tl.where(cols < V, dzc * (tanh - u * sech2), 0.0)
            dcap_pos += tl.where(x > 0, dcap, 0.0)
            dcap_neg += tl.where(x > 0, 0.0, dcap)
        tl.store(dcaps + row, tl.sum(dcap_pos, 0))
        tl.store(dcaps + N + row, tl.sum(dcap_neg, 0))

    return dict(mlp=mlp, mlp_matmul=mlp_matmul, ce_forward=ce_forward, ce_backward=ce_backward)

@torch.library.custom_op("pgolf::mlp_up", mutates_args=(), device_types=None)
def mlp_up(x: Tensor, w_up: Tensor, write_pre: bool) -> tuple[Tensor, Tensor]:
    """(post, pre) = (leaky_relu(x @ w_up^T, 0.5)^2, x @ w_up^T); pre is empty unless write_pre."""
    post, pre, _ = triton_kernels()["mlp"](x, w_up, None, write_pre)
    return post, pre

@mlp_up.register_fake
def _(x, w_up, write_pre):
    return x.new_empty(x.size(0), w_up.size(0)), x.new_empty((x.size(0), w_up.size(0)) if write_pre else (0,))

@torch.library.custom_op("pgolf::mlp_act_grad", mutates_args=(), device_types=None)
def mlp_act_grad(dy: Tensor, w_down: Tensor, pre: Tensor) -> tuple[Tensor, Tensor]:
    """(dpre, post): dpre = (dy @ w_down) * act'(pre), and post = act(pre) recomputed."""
    post, _, dpre = triton_kernels()["mlp"](dy, w_down.t(), pre, False)
    return dpre, post

@mlp_act_grad.register_fake
def _(dy, w_down, pre):
    return torch.empty_like(pre), torch.empty_like(pre)

class FusedLeakyReLUSquareMLP(torch.autograd.Function):
    """y = down(leaky_relu(x @ up^T, 0.5)^2), activation in the matmul epilogues; keeps only pre, recomputes post in backward."""

    @staticmethod
    def forward(ctx, x: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
        post, pre = torch.ops.pgolf.mlp_up(x, w_up, True)
        ctx.save_for_backward(x, w_up, w_down, pre)
        return F.linear(post, w_down)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, w_up, w_down, pre = ctx.saved_tensors
        dpre, post = torch.ops.pgolf.mlp_act_grad(dy, w_down, pre)
        _, up, down = ctx.needs_input_grad  # frozen weights (LoRA TTT): the input's gradient alone
        return dpre @ w_up, dpre.t() @ x if up else None, dy.t() @ post if down else None

def fused_leaky_relu_square_mlp(x: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    """MLP.forward's expression through the Triton kernels; x [..., d], weights in x's dtype."""
    flat = x.reshape(-1, x.size(-1))
    if torch.is_grad_enabled() and (x.requires_grad or w_up.requires_grad or w_down.requires_grad):
        y = FusedLeakyReLUSquareMLP.apply(flat, w_up, w_down)
    else:  # no backward to come: pre is not written
        y = F.linear(torch.ops.pgolf.mlp_up(flat, w_up, False)[0], w_down)
    return y.view(*x.shape[:-1], w_down.size(0))

@torch.library.custom_op("pgolf::softcap_ce", mutates_args=(), device_types=None)
def softcap_ce(z: Tensor, target_ids: Tensor, cap_pos: Tensor, cap_neg: Tensor,
               hint_ids: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(nll, lse, hint_nll) per row of z [N, V] (contiguous); hint_nll is empty without hints."""
    N, V = z.shape
    nll, lse = (torch.empty(N, device=z.device) for _ in range(2))
    hint_nll = torch.empty(N if hint_ids is not None else 0, device=z.device)
    triton_kernels()["ce_forward"][(N,)](z, target_ids, target_ids if hint_ids is None else hint_ids, cap_pos, cap_neg,
                                         nll, lse, hint_nll, V, z.stride(0), HAS_HINT=hint_ids is not None)
    return nll, lse, hint_nll

@softcap_ce.register_fake
def _(z, target_ids, cap_pos, cap_neg, hint_ids):
    N = z.size(0)
    return (z.new_empty(N, dtype=torch.float32), z.new_empty(N, dtype=torch.float32),
            z.new_empty(N if hint_ids is not None else 0, dtype=torch.float32))

@torch.library.custom_op("pgolf::softcap_ce_backward", mutates_args=(), device_types=None)
def softcap_ce_backward(z: Tensor, target_ids: Tensor, cap_pos: Tensor, cap_neg: Tensor, lse: Tensor,
                        grad_nll: Tensor) -> tuple[Tensor, Tensor]:
    """(dz, dcaps [2]) of sum(grad_nll * nll): one more pass over z, no fp32 [N, V] tensor."""
    N, V = z.shape
    dz, dcaps = torch.empty_like(z), torch.empty(2, N, device=z.device)
    triton_kernels()["ce_backward"][(N,)](z, target_ids, cap_pos, cap_neg, lse, grad_nll.float().contiguous(),
                                          dz, dcaps, N, V, z.stride(0))
    return dz, dcaps.sum(dim=1)

@softcap_ce_backward.register_fake
def _(z, target_ids, cap_pos, cap_neg, lse, grad_nll):
    return torch.empty_like(z), z.new_empty(2, dtype=torch.float32)

def _softcap_ce_setup(ctx, inputs, output) -> None:
    z, target_ids, cap_pos, cap_neg, _ = inputs
    ctx.save_for_backward(z, target_ids, cap_pos, cap_neg, output[1])

def _softcap_ce_grad(ctx, grad_nll, grad_lse, grad_hint):
    z, target_ids, cap_pos, cap_neg, lse = ctx.saved_tensors
    dz, dcaps = torch.ops.pgolf.softcap_ce_backward(z, target_ids, cap_pos, cap_neg, lse, grad_nll)
    return dz, None, dcaps[0].to(cap_pos.dtype).view_as(cap_pos), dcaps[1].to(cap_neg.dtype).view_as(cap_neg), None

softcap_ce.register_autograd(_softcap_ce_grad, setup_context=_softcap_ce_setup)
# ------------------------------------------------------------------------------------ end of Kernels

class SoftcapHead(nn.Module):
    """Tied output head and loss: logits = softcap(h @ E^T) in fp32 (matmul in the activations' dtype), cross-entropy if
    targets are given. Parameterless (E and the caps (c+, c-) are passed in) so that it can be compiled on its own."""

    def __init__(self, fused: bool = False) -> None:
        super().__init__()
        self.fused = fused

    def forward(self, hidden: Tensor, embedding: Tensor, caps: Tensor, target_ids: Tensor | None, reduction: str,
                hint_ids: Tensor | None = None, lora: LoRATerms | None = None) -> Tensor | tuple[Tensor, Tensor]:
        z = F.linear(hidden, embedding.to(hidden.dtype))
        if lora is not None:  # the TTT head adapter adds to the logits before the softcap
            z = lora.add("head", hidden, z)
        if target_ids is None:
            return softcap(z, caps[0], caps[1])
        if hint_ids is not None and reduction != "none":
            raise ValueError(f"hint_ids need reduction='none' (got {reduction!r}): the hint nll is per token")
        nll, hint_nll = softcap_cross_entropy(z.flatten(0, 1), target_ids.flatten(), caps[0], caps[1],
                                              None if hint_ids is None else hint_ids.flatten(), fused=self.fused)
        if reduction == "none":
            return nll.view_as(target_ids) if hint_ids is None else (nll.view_as(target_ids), hint_nll.view_as(hint_ids))
        return nll.sum() if reduction == "sum" else nll.mean()

@contextlib.contextmanager
def looping_enabled(model: nn.Module):
    """Evaluation, GPTQ calibration and TTT always run with depth recurrence; the previous flag is restored afterwards."""
    previous, model.looping = model.looping, True
    try:
        yield model
    finally:
        model.looping = previous

def loop_schedule(num_layers: int, loop_start: int, loop_end: int, num_loops: int, looping: bool) -> list[int]:
    """Virtual layer order: with looping, loop_start..loop_end run num_loops+1 times, e.g. 0,1,2,3,4,5,3,4,5,3,4,5,6,...,10."""
    order = list(range(num_layers))
    if not looping or num_loops == 0:
        return order
    span = order[loop_start : loop_end + 1]
    return order[:loop_start] + span * (num_loops + 1) + order[loop_end + 1 :]

class GPT(nn.Module):
    """The model; forward() is the one forward path of training, evaluation, GPTQ calibration and TTT; `looping` switches recurrence."""

    def __init__(self, h: Hyperparameters, backend: str = "sdpa") -> None:
        super().__init__()
        self.h = h
        self.looping = False
        self.tok_emb = nn.Embedding(h.vocab_size, h.model_dim)
        nn.init.normal_(self.tok_emb.weight, mean=0.0, std=h.embed_init_std)
        self.tok_emb.roles = {"weight": Role("embed", "embed", "head")}  # tied: its GPTQ Hessian is the head's input
        self.blocks = nn.ModuleList(Block(h, layer, backend) for layer in range(h.num_layers))
        self.final_norm = RMSNorm()
        self.head = SoftcapHead(fused=fused_kernels_enabled(h))
        num_skips = max(len(self.virtual_order(looping)) // 2 for looping in (False, True))
        declare(self, "skip_weights", torch.ones(num_skips, h.model_dim), SCALAR)
        declare(self, "skip_gates", torch.zeros(num_skips, h.model_dim), SCALAR)
        caps = torch.full((2,), h.logit_softcap)  # (c+, c-): learned when asymmetric, a constant otherwise
        if h.asym_softcap_enabled:
            declare(self, "softcap_caps", caps, SCALAR)
        else:
            self.register_buffer("softcap_caps", caps, persistent=False)
        if h.smear_gate_enabled:  # lambda = 0 at init: the identity
            declare(self, "smear_w", torch.zeros(h.gate_window), SCALAR)
            declare(self, "smear_lambda", torch.zeros(()), SCALAR)
        if h.loop_embeddings_enabled and h.num_loops:
            declare(self, "loop_embeddings", torch.zeros(h.num_loops + 1, h.model_dim), SCALAR)
        self.attention_span: int | None = None  # TRAIN_SEQ_LEN_SCHEDULE's current span (training only)
        cos, sin = rotary_tables(max(h.train_seq_len, h.eval_seq_len, h.ttt_window), h.rope_dims, h.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.compute_dtype = torch.float32

    def virtual_order(self, looping: bool | None = None) -> list[int]:
        h = self.h
        looping = self.looping if looping is None else looping
        return loop_schedule(h.num_layers, h.loop_start, h.loop_end, h.num_loops, looping)

    def smear(self, e: Tensor, input_ids: Tensor) -> Tensor:
        """SmearGate: e_t += lambda * sigmoid(w . e_t[:window]) * e_{t-1}, nothing at t = 0 and nothing
        where token t is BOS, so a document never takes from the one before it."""
        gate = self.smear_lambda * torch.sigmoid(e[..., : self.smear_w.numel()] @ self.smear_w)
        previous = F.pad(e[:, :-1], (0, 0, 1, 0))
        return e + (gate * (input_ids != BOS_ID))[..., None] * previous

    def embed(self, input_ids: Tensor) -> Tensor:
        """The stream entering the first block: RMSNorm(E[ids]), SmearGate'd (compiled as one region)."""
        e = self.tok_emb(input_ids)
        return rms_norm(self.smear(e, input_ids) if self.h.smear_gate_enabled else e).to(self.compute_dtype)

    def hidden(self, input_ids: Tensor, lora: DocumentLoRA | None = None) -> Tensor:
        """Final normalised hidden states [B,T,d] (the tied head's input); lora: TTT adapters per virtual layer."""
        x = x0 = self.embed(input_ids)
        cos, sin, lane1, mask = self.rope_cos, self.rope_sin, None, None
        if self.h.doc_masked_attention_enabled and lora is None:  # a LoRA TTT row is one document's window: causal is exact
            mask = attention_mask(document_segments(input_ids, self.attention_span), self.blocks[0].attn.backend)
        order = self.virtual_order()
        num_encoder = len(order) // 2
        skips: list[Tensor] = []
        passes = 0
        for i, layer in enumerate(order):
            block = self.blocks[layer]
            if layer == self.h.loop_start and hasattr(self, "loop_embeddings"):  # entering pass `passes` of the span
                x = x + self.loop_embeddings[passes].to(x.dtype)
                passes += 1
            skip = {}
            if i >= num_encoder and skips:  # U-Net skips are popped LIFO by the second half
                j = i - num_encoder
                skip = dict(skip=skips.pop(), skip_weight=self.skip_weights[j], skip_gate=self.skip_gates[j])
            terms = None if lora is None else lora.layers[i]  # one adapter set per virtual layer, not per physical one
            if block.mode == "lanes":
                x, lane1 = block(x, x0, cos, sin, lane1, **skip, mask=mask, lora=terms)
            else:
                x = block(x, x0, cos, sin, **skip, mask=mask, lora=terms)
            if i < num_encoder:
                skips.append(x)
        if lane1 is not None:
            x = 0.5 * (x + lane1)
        return self.final_norm(x)

    def forward(self, input_ids: Tensor, target_ids: Tensor | None = None, reduction: str = "mean",
                hint_ids: Tensor | None = None, lora: DocumentLoRA | None = None,
                columns: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Logits [B,T,V] without targets; else the fp32 cross-entropy ('mean', 'sum' or per-token 'none');
        with hint_ids (and 'none') the pair (nll, -log p(hint)) from the same logits (n-gram tilt);
        with lora (a DocumentLoRA, one document per row) the TTT adapters' terms are added on the way.
        columns [B,K]: every position runs through the blocks, but the head reads only these positions of each
        row (targets and hints given at them, [B,K]): LoRA TTT scores a chunk's <= 48 of 2048 positions."""
        hidden = self.hidden(input_ids, lora)
        if columns is not None:
            hidden = hidden.gather(1, columns[..., None].expand(-1, -1, hidden.size(-1)))
        return self.head(hidden, self.tok_emb.weight, self.softcap_caps, target_ids, reduction, hint_ids,
                         None if lora is None else lora.head)

    def parameter_roles(self) -> dict[str, Role]:
        """{state_dict name: Role} of every parameter, as declared where each was created."""
        roles = {}
        for module_name, module in self.named_modules():
            declared = module.__dict__.get("roles", {})
            for name, _ in module.named_parameters(recurse=False):
                full = f"{module_name}.{name}" if module_name else name
                if name not in declared:
                    raise TypeError(f"parameter {full} has no declared Role; create it with declare() or CastedLinear")
                roles[full] = declared[name]
        return roles

    def params_for(self, optimizer: str) -> list[nn.Parameter]:
        """Parameters whose Role names this optimizer group, in a fixed (state_dict) order."""
        params = dict(self.named_parameters())
        return [params[name] for name, role in self.parameter_roles().items() if role.optimizer == optimizer]

# ========== Optimizers: row-normalised Muon (distributed over banks of same-shape matrices) + AdamW ===================
NS_CLASSIC = (3.4445, -4.7750, 2.0315)  # classic quintic Newton-Schulz coefficients (a, b, c), the same for every iteration
NS_POLAR_EXPRESS = (  # "Polar Express" (Amsel et al., 2025): per-iteration coefficients that converge faster
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)

def newton_schulz(g: Tensor, steps: int, polar_express: bool) -> Tensor:
    """Approximate orthogonalisation of a batch of matrices g [n, rows, cols]:
    X = g/||g||_F; repeat X = a X + (b A + c A^2) X with A = X X^T. bf16 on GPU, fp32 on CPU."""
    x = g.to(torch.bfloat16) if g.is_cuda else g.clone()
    transposed = x.size(-2) > x.size(-1)
    if transposed:
        x = x.mT
    # Polar Express's coefficients assume a spectrum shrunk by a 2% safety factor (1.02, as in modded-nanogpt, their source).
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * (1.02 if polar_express else 1.0) + 1e-7)
    for i in range(steps):
        a, b, c = NS_POLAR_EXPRESS[min(i, len(NS_POLAR_EXPRESS) - 1)] if polar_express else NS_CLASSIC
        A = x @ x.mT
        x = a * x + (b * A + c * (A @ A)) @ x
    if transposed:
        x = x.mT
    return x.to(g.dtype)

class MuonBank:
    """Same-shape matrices trained together. Gradients are stacked into one [n_pad, rows, cols] tensor (n_pad = n rounded
    up to the world size); each rank owns n_pad/world of them (momentum, orthogonalisation); updates are all-gathered."""

    def __init__(self, params: list[nn.Parameter], runtime: Runtime) -> None:
        self.params, world = params, runtime.world_size
        self.n_pad = math.ceil(len(params) / world) * world
        self.n_local = self.n_pad // world
        self.shape = tuple(params[0].shape)  # (rows, cols)
        self.momentum = params[0].new_zeros(self.n_local, *self.shape)

    def stacked_grads(self) -> Tensor:
        g = self.params[0].new_zeros(self.n_pad, *self.shape)
        for i, p in enumerate(self.params):
            if p.grad is not None:
                g[i].copy_(p.grad)
        return g

class Optimizers:
    """One step of the whole optimizer: gradient averaging across ranks (no DDP), global norm clip, row-normalised Muon
    on the block matrices (sharded by banks), AdamW on the rest. Muon (SPEC §4): b = mu*b + g; u = g + mu*b (Nesterov);
    each row of u divided by its L2 norm; u = NewtonSchulz(u) * sqrt(max(1, rows/cols)); W *= 1 - lr*wd; W -= lr*u."""

    def __init__(self, model: GPT, h: Hyperparameters, runtime: Runtime) -> None:
        self.h, self.runtime = h, runtime
        by_shape: dict[tuple[int, int], list[nn.Parameter]] = {}
        for p in model.params_for("muon"):
            by_shape.setdefault(tuple(p.shape), []).append(p)
        # Largest banks first: their all-gather then overlaps the orthogonalisation of the smaller ones.
        self.banks = [MuonBank(ps, runtime) for _, ps in sorted(by_shape.items(), key=lambda kv: -kv[0][0] * kv[0][1] * len(kv[1]))]
        embed, scalars = model.params_for("embed"), model.params_for("scalar")
        self.adam_params = embed + scalars
        self.adam = torch.optim.AdamW(
            [dict(params=embed, lr=h.tied_embed_lr, base_lr=h.tied_embed_lr, weight_decay=h.embed_wd),
             dict(params=scalars, lr=h.scalar_lr, base_lr=h.scalar_lr, weight_decay=h.scalar_wd)],
            betas=(h.adam_beta1, h.adam_beta2), eps=h.adam_eps, foreach=True)

    @torch.no_grad()
    def step(self, lr_mult: float, muon_momentum: float) -> Tensor:
        """One update from every parameter's accumulated .grad; returns the global grad norm as a tensor (no host sync)."""
        comm, world = self.runtime.comm, self.runtime.world_size
        # 1) Launch averaging: banks reduce-scattered (a rank gets the mean gradient of the matrices it owns), AdamW in one all-reduce.
        local_grads = [torch.empty_like(bank.momentum) for bank in self.banks]
        pending = [comm.reduce_scatter_mean(g, bank.stacked_grads(), async_op=True) for g, bank in zip(local_grads, self.banks)]
        adam_grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.adam_params]
        flat = torch.cat([g.flatten() for g in adam_grads])
        pending.append(comm.all_reduce_sum(flat, async_op=True))
        for work in pending:
            work.wait()
        flat /= world
        # 2) Global gradient norm over all parameters (each rank holds distinct bank slices; padding is zero).
        bank_sq = torch.stack([g.square().sum() for g in local_grads]).sum() if local_grads else flat.new_zeros(())
        grad_norm = torch.sqrt(comm.all_reduce_sum(bank_sq) + flat.square().sum())
        clip = self.h.grad_clip_norm
        coef = torch.clamp(clip / (grad_norm + 1e-6), max=1.0) if clip > 0 else torch.ones_like(grad_norm)
        # 3) AdamW on the averaged, clipped gradients.
        for p, g in zip(self.adam_params, flat.split([p.numel() for p in self.adam_params])):
            p.grad = (g * coef).view_as(p).to(p.dtype)
        for group in self.adam.param_groups:
            group["lr"] = group["base_lr"] * lr_mult
        self.adam.step()
        # 4) Muon: orthogonalise the local slice of bank k while bank k-1's all-gather runs.
        lr = self.h.matrix_lr * lr_mult
        in_flight = None
        for bank, g in zip(self.banks, local_grads):
            update = self._muon_update(bank, g * coef, muon_momentum)
            updates = update.new_empty(bank.n_pad, *bank.shape)
            gathered = (bank, updates, comm.all_gather_into(updates, update, async_op=True))
            if in_flight is not None:
                self._apply(*in_flight, lr)
            in_flight = gathered
        if in_flight is not None:
            self._apply(*in_flight, lr)
        return grad_norm

    def _muon_update(self, bank: MuonBank, g: Tensor, momentum: float) -> Tensor:
        bank.momentum.mul_(momentum).add_(g)
        u = g + momentum * bank.momentum
        u = u / (u.norm(dim=-1, keepdim=True) + 1e-7)  # row normalisation (MuonEq-R)
        u = newton_schulz(u, self.h.muon_ns_steps, self.h.muon_polar_express)
        return u * math.sqrt(max(1.0, bank.shape[0] / bank.shape[1]))

    def _apply(self, bank: MuonBank, updates: Tensor, work, lr: float) -> None:
        work.wait()
        torch._foreach_mul_(bank.params, 1.0 - lr * self.h.muon_wd)
        torch._foreach_add_(bank.params, list(updates[: len(bank.params)].unbind(0)), alpha=-lr)

    def zero_grad(self) -> None:
        for p in [p for bank in self.banks for p in bank.params] + self.adam_params:
            p.grad = None

    def state_dict(self) -> dict:
        return {"adam": copy.deepcopy(self.adam.state_dict()), "muon": [bank.momentum.clone() for bank in self.banks]}

    def load_state_dict(self, state: dict) -> None:
        self.adam.load_state_dict(copy.deepcopy(state["adam"]))
        for bank, buf in zip(self.banks, state["muon"]):
            bank.momentum.copy_(buf)

# ========== Schedule and weight averaging =============================================================================
def training_progress(step: int, elapsed: float, budget: float, iterations: int) -> float:
    """Fraction of training done (drives warmdown, looping, SWA): of the time budget, or of ITERATIONS when budget = inf."""
    return elapsed / budget if math.isfinite(budget) else step / iterations

def lr_multiplier(frac: float, warmdown_frac: float, min_lr: float) -> float:
    """1 until frac reaches 1 - warmdown_frac, then linear down to min_lr at frac = 1."""
    if warmdown_frac <= 0 or frac < 1.0 - warmdown_frac:
        return 1.0
    remaining = max(0.0, 1.0 - frac) / warmdown_frac
    return min_lr + (1.0 - min_lr) * remaining

def muon_momentum_at(step: int, h: Hyperparameters) -> float:
    """Linear ramp from MUON_MOMENTUM_WARMUP_START to MUON_MOMENTUM over MUON_MOMENTUM_WARMUP_STEPS."""
    if h.muon_momentum_warmup_steps <= 0:
        return h.muon_momentum
    t = min(1.0, step / h.muon_momentum_warmup_steps)
    return h.muon_momentum_warmup_start + t * (h.muon_momentum - h.muon_momentum_warmup_start)

def ema_decay_at(step: int, cap: float) -> float:
    """EMA decay min(cap, (1+step)/(10+step)): the ramp keeps a short run's average off the initialisation."""
    return min(cap, (1.0 + step) / (10.0 + step))

class WeightAverager:
    """fp32 average of all parameters: EMA every step, SWA (mean of snapshots every SWA_EVERY warmdown steps) or none."""

    def __init__(self, model: nn.Module, h: Hyperparameters) -> None:
        self.mode, self.cap, self.swa_every = h.averaging, h.ema_decay, h.swa_every
        self.params = [p for p in model.parameters()]
        self.average = [p.detach().float().clone() for p in self.params] if self.mode != "none" else []
        self.snapshots = 0

    @torch.no_grad()
    def update(self, step: int, in_warmdown: bool) -> None:
        current = [p.detach().float() for p in self.params]
        if self.mode == "ema":
            torch._foreach_lerp_(self.average, current, 1.0 - ema_decay_at(step, self.cap))
        elif self.mode == "swa" and in_warmdown and step % self.swa_every == 0:
            self.snapshots += 1
            if self.snapshots == 1:
                torch._foreach_copy_(self.average, current)
            else:
                torch._foreach_lerp_(self.average, current, 1.0 / self.snapshots)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the average into `model` (no-op for mode none, or SWA before its first snapshot)."""
        if self.mode == "none" or (self.mode == "swa" and self.snapshots == 0):
            return
        for p, avg in zip(model.parameters(), self.average):
            p.copy_(avg.to(p.dtype))

# ========== Quantization and packing: GPTQ (int6 matrices, int7 embedding) with SDClip, compression, shipped code ====
# Pipeline: collect_hessians -> quantize_and_pack (GPTQ + SDClip, budget search, serialise, byte shuffle, compress)
# -> load_artifact (exact inverse). Layout before compression: uint32 header length | JSON header (names, kinds,
# shapes) | int8 values of every quantized tensor, in header order | byte-shuffled fp16 section (row scales, then
# small tensors). Compressed blob (brotli/zstd/lzma): 1-byte tag | uint32 chunk count | uint32 chunk sizes | chunks;
# rans: see its comment below.

CLIP_SCALE_RANGE = (0.25, 4.0)       # budget search range of the multiplier on the clip sigmas
BUDGET_AIM = 0.998                   # aim 0.2% under the target: the size model drifts ~0.1% between scales
BUDGET_TOLERANCE = 0.003             # accept any size in [target*(1-tol), target]
AWQ_MIN_VALUES = 65_536             # AWQ-lite candidates: GPTQ'd tensors with more values than this
BUDGET_ATTEMPTS = 4                  # GPTQ+compress rounds before settling for the best fit found
COMPRESS_CHUNK_BYTES = 1 << 20       # independent chunks, compressed in parallel child processes
COMPRESSOR_TAGS = {"brotli": b"B", "zstd": b"Z", "lzma": b"L", "rans": b"R"}
COMPRESSOR_MODULES = {"brotli": "brotli", "zstd": "zstandard", "lzma": "lzma", "rans": "numpy"}  # = pip package names

# The one place that sets compressor levels, run per chunk in a bare child (brotli and lzma hold the GIL; it starts in ~50 ms).
COMPRESS_CHILD_PROGRAM = """
import sys
name, data = sys.argv[1], sys.stdin.buffer.read()
if name == "brotli":
    import brotli
    out = brotli.compress(data, quality=11, lgwin=24)
elif name == "zstd":
    import zstandard
    out = zstandard.ZstdCompressor(level=22).compress(data)
else:
    import lzma
    out = lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)
sys.stdout.buffer.write(out)
"""

class ArtifactBudgetError(RuntimeError):
    """The model cannot fit the artifact budget even at the coarsest quantization searched."""

def collect_hessians(model: GPT, batches, runtime: Runtime) -> dict[str, Tensor]:
    """H = sum X^T X (fp32) of each GPTQ'd parameter's Hessian source (Role.hessian: its linear's input, or for the tied
    embedding the final-norm output) on (x, y) training batches with looping on, by hooks on the model's own forward, run
    eagerly (compiled regions would bypass them); looped layers add every call. Summed over ranks; state_dict names."""
    hessians: dict[str, Tensor] = {}

    def accumulate(name: str, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.size(-1)).float()
        if name not in hessians:
            hessians[name] = torch.zeros(x.size(1), x.size(1), device=x.device)
        hessians[name].addmm_(x.T, x)

    hooks = []
    for name, role in model.parameter_roles().items():
        if role.hessian == "input":
            owner = model.get_submodule(name.rpartition(".")[0])
            hooks.append(owner.register_forward_hook(lambda m, inputs, out, name=name: accumulate(name, inputs[0])))
        elif role.hessian == "head":
            hooks.append(model.final_norm.register_forward_hook(lambda m, inputs, out, name=name: accumulate(name, out)))
    try:
        with looping_enabled(model), torch.no_grad(), torch.compiler.set_stance("force_eager"):
            for x, y in batches:
                model(x, y)
    finally:
        for hook in hooks:
            hook.remove()
    names = sorted(hessians)  # one collective for all matrices: flatten, sum, split back
    flat = runtime.comm.all_reduce_sum(torch.cat([hessians[n].flatten() for n in names]))
    for name, part in zip(names, flat.split([hessians[n].numel() for n in names])):
        hessians[name] = part.view_as(hessians[name])
    return hessians

@dataclass
class GPTQPlan:
    """Scale-independent GPTQ work of matrices sharing one Hessian (q/k/v share their input), rows stacked."""
    names: list[str]
    row_counts: list[int]
    weight: Tensor        # [rows, cols] fp32, dead columns zeroed, original column order
    perm: Tensor          # act-order: columns by descending diag(H)
    hinv_upper: Tensor    # U with U^T U = H_perm^-1 (damped)
    bits: int
    clip_sigmas: float
    awq: dict[str, list[list[int]]] = field(default_factory=dict)  # AWQ-lite: name -> protected [start, end) columns

def plan_gptq(weight: Tensor, hessian: Tensor, damp: float) -> tuple[Tensor, Tensor, Tensor]:
    """(weight with dead columns zeroed, act-order permutation, upper Cholesky of the damped H^-1)."""
    weight, hessian = weight.float().clone(), hessian.float().clone()
    dead = hessian.diagonal() == 0
    hessian[dead, dead] = 1.0  # a column that never sees input: any value is harmless once zeroed
    weight[:, dead] = 0.0
    perm = torch.argsort(hessian.diagonal(), descending=True)
    hessian = hessian[perm][:, perm]
    eye = torch.eye(hessian.size(0), device=hessian.device)
    damping = damp * hessian.diagonal().mean()
    # H += damp*mean(diag H)*I; grow the damping tenfold if rounding left H not positive definite.
    for _ in range(5):
        chol, info = torch.linalg.cholesky_ex(hessian + damping * eye)
        if info == 0:
            break
        damping = 10 * damping + 1e-8
    else:
        raise RuntimeError("GPTQ: Hessian is not positive definite even after heavy damping")
    hinv_upper = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
    return weight, perm, hinv_upper

def sdclip_scales(weight: Tensor, bits: int, clip_sigmas: float) -> Tensor:
    """Row scale = k*std(row)/(2^(bits-1)-1), fp16-rounded as stored; >= 2^-24 so that all-zero rows quantize to 0."""
    scale = clip_sigmas * weight.float().std(dim=1) / (2 ** (bits - 1) - 1)
    return scale.clamp_min(2.0 ** -24).half().float()

def quantize_rtn(weight: Tensor, scale: Tensor, bits: int) -> Tensor:
    """Round to nearest: q = clamp(round(w/scale), -qmax, qmax)."""
    qmax = 2 ** (bits - 1) - 1
    return torch.clamp(torch.round(weight / scale[:, None]), -qmax, qmax)

def gptq_quantize(weight: Tensor, perm: Tensor, hinv_upper: Tensor, scale: Tensor, bits: int,
                  block_size: int, fine: Tensor | None = None) -> Tensor:
    """GPTQ (Frantar et al. 2022): quantize columns in act-order; each column's error / U_jj is pushed onto the later
    columns along row j of U (within the block at once, after it as one matmul). fine: optional [rows, cols] steps of
    AWQ-lite's protected entries (0 elsewhere), coded in +-127. Returns int8 [rows, cols] in the original column order."""
    fine = torch.zeros_like(weight) if fine is None else fine
    step = torch.where(fine > 0, fine, scale[:, None])[:, perm]
    limit = torch.where(fine > 0, 127.0, float(2 ** (bits - 1) - 1))[:, perm]
    w = weight[:, perm].clone()
    q = torch.empty_like(w)
    cols = w.size(1)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        u_block = hinv_upper[start:end, start:end]
        errors = torch.empty_like(w[:, start:end])
        for j in range(end - start):
            col, s, qmax = w[:, start + j], step[:, start + j], limit[:, start + j]
            q_col = torch.clamp(torch.round(col / s), -qmax, qmax)
            q[:, start + j] = q_col
            err = (col - q_col * s) / u_block[j, j]
            w[:, start + j:end] -= err[:, None] * u_block[j, j:][None, :]
            errors[:, j] = err
        w[:, end:] -= errors @ hinv_upper[start:end, end:]
    return q[:, torch.argsort(perm)].to(torch.int8)

def gptq_settings(quant: str, h: Hyperparameters) -> tuple[int, float]:
    """(bits, clip sigmas) of a GPTQ quant group (Role.quant in GPTQ_GROUPS)."""
    return {"attn": (h.matrix_bits, h.attn_clip_sigmas), "mlp": (h.matrix_bits, h.mlp_clip_sigmas),
            "embed": (h.embed_bits, h.embed_clip_sigmas)}[quant]

def plan_quantization(state: dict[str, Tensor], roles: dict[str, Role], hessians: dict[str, Tensor],
                      h: Hyperparameters, device: torch.device) -> list[GPTQPlan]:
    """One GPTQPlan per (quant group, distinct Hessian) of the GPTQ'd tensors: q/k/v rows are quantized together."""
    groups: list[tuple[str, Tensor, list[str]]] = []
    for name in state:
        quant = roles[name].quant
        if quant not in GPTQ_GROUPS:
            continue
        if name not in hessians or state[name].ndim != 2:
            raise KeyError(f"{name}: a GPTQ'd parameter needs a 2-D weight and a Hessian from collect_hessians")
        hessian = hessians[name].to(device)
        same = next((g for g in groups if g[0] == quant and g[1].shape == hessian.shape and torch.equal(g[1], hessian)), None)
        if same is None:
            groups.append((quant, hessian, [name]))
        else:
            same[2].append(name)
    plans, candidates, size = [], [], h.awq_lite_group_size
    for quant, hessian, names in groups:
        weight = torch.cat([state[n].to(device).float() for n in names])
        weight, perm, hinv_upper = plan_gptq(weight, hessian, h.gptq_damp)
        plans.append(GPTQPlan(names, [state[n].size(0) for n in names], weight, perm, hinv_upper, *gptq_settings(quant, h)))
        for name, w in zip(names, weight.split(plans[-1].row_counts)):
            if h.awq_lite_enabled and w.numel() > AWQ_MIN_VALUES and plans[-1].bits < 8:
                # AWQ-lite salience[c] = act_rms[c] * mean_r |W[r,c]|, act_rms ~ sqrt(H_cc): H sums every call of a
                # looped layer (GPTQ's objective counts each), so its columns weigh once per call; scores per aligned group.
                scores = (hessian.diagonal().sqrt() * w.abs().mean(0))[: w.size(1) // size * size].view(-1, size).sum(1)
                candidates += [(float(score), name, len(plans) - 1, i * size) for i, score in enumerate(scores)]
    for _, name, i, start in sorted(candidates, reverse=True)[: h.awq_lite_top_k]:
        plans[i].awq.setdefault(name, []).append([start, start + size])
    return plans

def quantize_absmax_rows(weight: Tensor, top: float = 127, low: int = -127, high: int = 127) -> dict:
    """Ints per row, scale max|row|/top, codes clamp(round(w/scale), low, high): int8 gates (too small for SDClip), LQER factors."""
    scale = (weight.float().abs().amax(dim=1) / top).clamp_min(2.0 ** -24).half()
    return {"q": torch.clamp(torch.round(weight.float() / scale.float()[:, None]), low, high).to(torch.int8).cpu(),
            "scale": scale.cpu()}

def plan_scales(plan: GPTQPlan, clip_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(row scales, 8-bit row scales, fine steps [rows, cols]) of a plan: SDClip per row at clip sigmas x the searched
    multiplier; AWQ-lite's columns (plan.awq) keep that clip range with 8-bit steps (fine = k*std(row)/127, else 0)."""
    scale, fine_scale = (sdclip_scales(plan.weight, bits, plan.clip_sigmas * clip_scale) for bits in (plan.bits, 8))
    fine = torch.zeros_like(plan.weight)
    for name, part, s_part in zip(plan.names, fine.split(plan.row_counts), fine_scale.split(plan.row_counts)):
        for start, end in plan.awq.get(name, []):
            part[:, start:end] = s_part[:, None]  # split() gives views: this writes into fine
    return scale, fine_scale, fine

def quantize_state(state: dict[str, Tensor], roles: dict[str, Role], plans: list[GPTQPlan], clip_scale: float,
                   block_size: int) -> dict[str, dict]:
    """Every tensor as its Role says, on CPU: GPTQ groups at this clip scale and gates as {"q": int8, "scale": fp16 per
    row}, the rest as {"fp16": tensor}; AWQ-lite adds "awq" ([start, end) columns) and "awq_scale" (fp16 per row)."""
    quantized: dict[str, dict] = {}
    for plan in plans:
        scale, fine_scale, fine = plan_scales(plan, clip_scale)
        q = gptq_quantize(plan.weight, plan.perm, plan.hinv_upper, scale, plan.bits, block_size, fine)
        for name, q_part, s_part, f_part in zip(plan.names, *(t.split(plan.row_counts) for t in (q, scale, fine_scale))):
            quantized[name] = {"q": q_part.cpu(), "scale": s_part.half().cpu()}
            if name in plan.awq:
                quantized[name].update(awq=plan.awq[name], awq_scale=f_part.half().cpu())
    for name, tensor in state.items():
        if roles[name].quant == "gate":
            quantized[name] = quantize_absmax_rows(tensor)
        elif name not in quantized:
            quantized[name] = {"fp16": tensor.detach().half().cpu()}
    return {name: quantized[name] for name in state}

def lqer_correct(quantized: dict[str, dict], plans: list[GPTQPlan], h: Hyperparameters) -> list[str]:
    """LQER, asymmetric: the LQER_TOP_K GPTQ'd tensors of largest ||E||_F, E = W - Q (Q AWQ-aware), get E ~ A B,
    a rank-r SVD: A = U_r S_r as INT2 (one scale max|A|/1.5, codes -2..1, 4 per byte at bits 2i as code + 2:
    entry <name>.lqer_a), B = V_r^T as INT4 in row-major groups of g (scale max|group|/7.5, codes -8..7: entry
    <name>.lqer_b [r*cols/g, g]; packing A, not B, came out smallest under brotli and rans). Returns the names."""
    residuals = {name: w - dequantize_entry(quantized[name]).to(w.device)
                 for plan in plans for name, w in zip(plan.names, plan.weight.split(plan.row_counts))}
    chosen = sorted(residuals, key=lambda n: -float(residuals[n].norm()))[: h.lqer_top_k]
    for name in chosen:
        u, s, vh = torch.linalg.svd(residuals[name], full_matrices=False)
        a, b = u[:, : h.lqer_rank] * s[: h.lqer_rank], vh[: h.lqer_rank]
        group = math.gcd(h.lqer_asym_group, b.numel())  # a group must divide r*cols
        qa = quantize_absmax_rows(a.reshape(1, -1), 1.5, -2, 1)
        codes = F.pad(qa["q"].view(-1).int() + 2, (0, -a.numel() % 4)).view(-1, 4) << torch.arange(0, 8, 2, dtype=torch.int32)
        quantized[f"{name}.lqer_a"] = {"q": codes.sum(1).to(torch.uint8).view(torch.int8)[None], "scale": qa["scale"]}
        quantized[f"{name}.lqer_b"] = quantize_absmax_rows(b.reshape(-1, group), 7.5, -8, 7)
    return chosen

def dequantize_entry(entry: dict) -> Tensor:
    """fp32 of one entry: q * scale per row (AWQ-lite's columns at their own per-row scale); fp16 as is."""
    if "q" not in entry:
        return entry["fp16"].float()
    scale = entry["scale"].float()[:, None].expand(entry["q"].shape).clone()
    for start, end in entry.get("awq", []):
        scale[:, start:end] = entry["awq_scale"].float()[:, None]
    return entry["q"].float() * scale

def dequantize_state(quantized: dict[str, dict]) -> dict[str, Tensor]:
    """Every entry through dequantize_entry; LQER's factor entries are folded in: W = Q + A B."""
    state = {name: dequantize_entry(entry) for name, entry in quantized.items() if not name.endswith(".lqer_a")}
    for name in [n for n in quantized if n.endswith(".lqer_a")]:
        parent = name.removesuffix(".lqer_a")
        b = state.pop(f"{parent}.lqer_b").view(-1, state[parent].size(1))
        codes = (quantized[name]["q"].view(torch.uint8).view(-1, 1).int() >> torch.arange(0, 8, 2, dtype=torch.int32)) & 3
        a = (codes.view(-1)[: state[parent].size(0) * b.size(0)] - 2).float() * quantized[name]["scale"].float()
        state[parent] = state[parent] + a.view(-1, b.size(0)) @ b
    return state

def byte_shuffle(array: np.ndarray) -> bytes:
    """Regroup bytes by position in their element (all low bytes, then high bytes...): smooth and noisy bytes compress apart."""
    return np.ascontiguousarray(array.reshape(-1).view(np.uint8).reshape(-1, array.itemsize).T).tobytes()

def byte_unshuffle(data: bytes, dtype) -> np.ndarray:
    itemsize = np.dtype(dtype).itemsize
    planes = np.frombuffer(data, dtype=np.uint8).reshape(itemsize, -1)
    return np.ascontiguousarray(planes.T).reshape(-1).view(dtype)

def serialize(quantized: dict[str, dict]) -> bytes:
    """Raw layout (section comment): smaller than torch.save (pickle, zip headers, 64-byte alignment per tensor)."""
    header, int8_parts, fp16_scales, fp16_values = [], [], [], []
    for name, entry in quantized.items():
        if "q" in entry:  # AWQ-lite's column ranges ride in the header, its per-row scales after the row scales
            header.append([name, "q", list(entry["q"].shape)] + ([entry["awq"]] if "awq" in entry else []))
            int8_parts.append(entry["q"].numpy().reshape(-1))
            fp16_scales += [entry["scale"].numpy().reshape(-1)] + ([entry["awq_scale"].numpy()] if "awq" in entry else [])
        else:
            header.append([name, "fp16", list(entry["fp16"].shape)])
            fp16_values.append(entry["fp16"].numpy().reshape(-1))
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    fp16 = np.concatenate(fp16_scales + fp16_values) if fp16_scales or fp16_values else np.zeros(0, np.float16)
    int8 = np.concatenate(int8_parts) if int8_parts else np.zeros(0, np.int8)
    return len(header_bytes).to_bytes(4, "little") + header_bytes + int8.tobytes() + byte_shuffle(fp16)

def deserialize(data: bytes) -> dict[str, dict]:
    header_len = int.from_bytes(data[:4], "little")
    header = json.loads(data[4 : 4 + header_len])
    offset = 4 + header_len
    int8_total = sum(math.prod(shape) for _, kind, shape, *_ in header if kind == "q")
    int8 = np.frombuffer(data, dtype=np.int8, count=int8_total, offset=offset)
    fp16 = byte_unshuffle(data[offset + int8_total :], np.float16)
    quantized, i8, f16 = {}, 0, 0
    for name, kind, shape, *awq in header:
        if kind == "q":  # scales come first in the fp16 section, one per row (twice with AWQ-lite columns)
            n = math.prod(shape)
            quantized[name] = {"q": torch.from_numpy(int8[i8 : i8 + n].copy()).view(shape),
                               "scale": torch.from_numpy(fp16[f16 : f16 + shape[0]].copy())}
            if awq:
                quantized[name].update(awq=awq[0], awq_scale=torch.from_numpy(fp16[f16 + shape[0] : f16 + 2 * shape[0]].copy()))
            i8, f16 = i8 + n, f16 + shape[0] * (1 + len(awq))
    for name, kind, shape, *_ in header:
        if kind == "fp16":
            n = math.prod(shape)
            quantized[name] = {"fp16": torch.from_numpy(fp16[f16 : f16 + n].copy()).view(shape)}
            f16 += n
    return {name: quantized[name] for name, *_ in header}

def require_compressor(name: str):
    """Import a compressor's module lazily; a missing optional package is a one-line error."""
    if name not in COMPRESSOR_TAGS:
        raise ValueError(f"unknown compressor {name!r}; use one of {', '.join(COMPRESSOR_TAGS)}")
    module = COMPRESSOR_MODULES[name]
    try:
        return __import__(module)
    except ImportError:
        raise RuntimeError(f"COMPRESSOR={name} needs the '{module}' package: pip install {module}") from None

def compress(data: bytes, compressor: str) -> bytes:
    """Fixed-size chunks (output independent of the machine) compressed in parallel child processes, one per core."""
    from concurrent.futures import ThreadPoolExecutor
    require_compressor(compressor)
    if compressor == "rans":
        return rans_compress(data)
    chunks = [data[i : i + COMPRESS_CHUNK_BYTES] for i in range(0, len(data), COMPRESS_CHUNK_BYTES)] or [b""]

    def run_child(chunk: bytes) -> bytes:
        done = subprocess.run([sys.executable, "-c", COMPRESS_CHILD_PROGRAM, compressor], input=chunk, capture_output=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{compressor} compression child failed: {done.stderr.decode(errors='replace').strip()}")
        return done.stdout

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        packed = list(pool.map(run_child, chunks))
    sizes = b"".join(len(p).to_bytes(4, "little") for p in packed)
    return COMPRESSOR_TAGS[compressor] + len(packed).to_bytes(4, "little") + sizes + b"".join(packed)

def decompress(blob: bytes) -> bytes:
    compressor = next((name for name, tag in COMPRESSOR_TAGS.items() if blob[:1] == tag), None)
    if compressor is None:
        raise ValueError(f"not an artifact: unknown compressor tag {blob[:1]!r}")
    if compressor == "rans":
        return rans_decompress(blob)
    module = require_compressor(compressor)
    decode = module.ZstdDecompressor().decompress if compressor == "zstd" else module.decompress
    count = int.from_bytes(blob[1:5], "little")
    ends = (5 + 4 * count + np.cumsum(np.frombuffer(blob, "<u4", count, 5), dtype=np.int64)).tolist()
    return b"".join(decode(blob[a:b]) for a, b in zip([5 + 4 * count] + ends, ends))

# rANS coder for the quantized ints (COMPRESSOR=rans; numpy only): the columns (or rows) of each int tensor are clustered
# into k classes of similar value distributions (k = 1 when classes do not pay for their labels), each with a symbol
# table; all ints go through one interleaved rANS stream at ~the entropy under those tables, the rest through lzma.
# Blob: b"R" | uint32 side length | lzma(side) | uint64 lane states | uint32 words.
RANS_LANES = 1024                    # interleaved states: numpy steps = ints / lanes; 8 bytes each
RANS_CLASSES = (1, 2, 4, 8)          # class counts tried per tensor and axis
# Table counts as uint8 codes (0 = absent, else 1 + index of the level <= count): exact below 16, else a 3-bit mantissa (~0.03% more bits).
COUNT_LEVELS = np.array(sorted(set(range(1, 16)) | {m << e for m in range(8, 16) for e in range(1, 26)}))

def code_frequencies(codes: np.ndarray) -> np.ndarray:
    """rANS frequencies [tables, symbols] summing to 2^16, >= 1 per symbol present; integers only (any machine agrees)."""
    v = np.where(codes > 0, COUNT_LEVELS[np.maximum(codes.astype(np.int64) - 1, 0)], 0)
    v[:, 0] += v.sum(1) == 0  # an empty class still needs a valid table
    f = np.where(v > 0, np.maximum(v * 65536 // v.sum(1, keepdims=True), 1), 0)
    f[np.arange(len(f)), v.argmax(1)] += 65536 - f.sum(1)
    return f

def fit_classes(sym: np.ndarray, alphabet: int) -> tuple[int, np.ndarray, np.ndarray]:
    """(axis, labels, table codes) of the cheapest class model of an int tensor [R, C] of symbols
    0..alphabet-1: classes of its columns (axis 1) or rows (axis 0), k in RANS_CLASSES, found by Lloyd
    iterations on code length; cost = code length + labels (log2 k bits) + tables (~4 bits/entry)."""
    best, values = None, np.arange(alphabet)
    for axis in (1, 0):
        lines = sym.shape[axis]
        index = sym + alphabet * (np.arange(lines)[None, :] if axis else np.arange(lines)[:, None])
        hist = np.bincount(index.ravel(), minlength=lines * alphabet).reshape(lines, alphabet).astype(np.float64)
        spread = hist @ np.abs(values - hist.sum(0) @ values / max(sym.size, 1))  # sum |s - tensor mean| per line
        for k in RANS_CLASSES:
            labels = np.argsort(np.argsort(spread, kind="stable"), kind="stable") * k // max(lines, 1)
            for _ in range(6 if k > 1 else 0):  # Lloyd: class tables, then each line to its cheapest class
                counts = np.eye(k)[labels].T @ hist + 0.5
                labels = np.argmin(hist @ -np.log2(counts / counts.sum(1, keepdims=True)).T, 1)
            counts = np.eye(k)[labels].T @ hist
            codes = np.searchsorted(COUNT_LEVELS, counts, side="right").astype(np.uint8)
            bits = lines * math.log2(k) + 4 * np.count_nonzero(codes) \
                - (counts * np.log2(code_frequencies(codes).clip(1) / 65536)).sum()
            if best is None or bits < best[0]:
                best = (bits, axis, labels, codes)
    return best[1:]

def rans_encode(freq: np.ndarray, start: np.ndarray) -> bytes:
    """Interleaved rANS (Duda 2013) over [steps, lanes]: uint64 state x in [2^32, 2^64); a symbol of
    frequency f/2^16 starting at c maps x -> (x // f) * 2^16 + x % f + c, after emitting x's low 32 bits
    if x >= f * 2^48 (so x stays < 2^64). The last step is coded first, so the decoder runs forward."""
    x = np.full(freq.shape[1], 1 << 32, np.uint64)
    words = [np.zeros(0, np.uint32)]
    for f, c in zip(freq[::-1], start[::-1]):
        emit = x >> 48 >= f
        words.append(x[emit].astype(np.uint32))
        x[emit] >>= 32
        quotient, remainder = np.divmod(x, f)
        x = (quotient << 16) + remainder + c
    return x.astype("<u8").tobytes() + np.concatenate(words[::-1]).astype("<u4").tobytes()

def rans_decode(data: bytes, tables: np.ndarray, freq: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Inverse of rans_encode: symbols [steps, lanes] given their tables [steps, lanes]; freq and start [tables, 256]."""
    x = np.frombuffer(data, "<u8", tables.shape[1]).astype(np.uint64)
    words = np.frombuffer(data, "<u4", offset=8 * tables.shape[1]).astype(np.uint64)
    owner = np.repeat(np.arange(freq.size, dtype=np.uint32), freq.ravel().astype(np.int64))  # slot -> table*256 + symbol
    freq, start, out, at = freq.ravel(), start.ravel(), np.empty(tables.shape, np.uint32), 0
    for step, slots_at in enumerate(tables.astype(np.uint64) << 16):
        slot = x & 0xFFFF
        out[step] = j = owner[slots_at + slot]
        x = freq[j] * (x >> 16) + slot - start[j]
        need = x < 1 << 32
        n = int(np.count_nonzero(need))
        x[need] = x[need] << 32 | words[at : at + n]
        at += n
    return (out & 255).astype(np.int16)

def rans_tables(models: list, shapes: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(table of every int [steps, lanes], freq [tables, 256], start); a last table of one certain symbol pads the last step."""
    codes = np.zeros((sum(len(m[2]) for m in models) + 1, 256), np.uint8)
    codes[-1, 0], parts, base = 1, [np.zeros(0, np.int32)], 0
    for (axis, labels, table_codes), shape in zip(models, shapes):
        codes[base : base + len(table_codes), : table_codes.shape[1]] = table_codes
        parts.append(np.broadcast_to((base + (labels[None, :] if axis else labels[:, None])).astype(np.int32), shape).ravel())
        base += len(table_codes)
    ids = np.concatenate(parts)
    lanes = min(RANS_LANES, max(1, len(ids) >> 14))  # >= 2^14 ints per lane: the flush costs < 0.004 bit/int
    freq = code_frequencies(codes).astype(np.uint32)
    return np.concatenate([ids, np.full(-len(ids) % lanes, base, np.int32)]).reshape(-1, lanes), freq, np.cumsum(freq, 1) - freq

def rans_compress(data: bytes) -> bytes:
    """COMPRESSOR=rans on a serialize() payload. Side bytes per int tensor: axis, k, -lowest value (the
    symbols are ints - min(ints, 0)), alphabet size - 1, labels (log2 k bits each), the tables' codes."""
    header_end = 4 + int.from_bytes(data[:4], "little")
    begin, meta, models, shapes, symbols = header_end, bytearray(), [], [], [np.zeros(0, np.int16)]
    for _, kind, shape, *_ in json.loads(data[4:header_end]):
        if kind == "q":
            q = np.frombuffer(data, np.int8, math.prod(shape), begin).astype(np.int16).reshape(shape[0], math.prod(shape[1:]))
            begin, low = begin + q.size, int(q.min(initial=0))
            axis, labels, codes = fit_classes(q - low, int(q.max(initial=0)) - low + 1)
            bits = np.packbits((labels[:, None] >> np.arange(len(codes).bit_length() - 1)) & 1)
            meta += bytes([axis, len(codes), -low, codes.shape[1] - 1]) + bits.tobytes() + codes.tobytes()
            models.append((axis, labels, codes))
            shapes.append(q.shape)
            symbols.append((q - low).ravel())
    rest = data[:header_end] + data[begin:]
    ids, freq, start = rans_tables(models, shapes)
    j = ids * 256
    j.reshape(-1)[: begin - header_end] += np.concatenate(symbols)
    side = lzma.compress(len(rest).to_bytes(4, "little") + rest + bytes(meta), preset=9 | lzma.PRESET_EXTREME)
    return b"R" + len(side).to_bytes(4, "little") + side + rans_encode(freq.ravel()[j], start.ravel()[j])

def rans_decompress(blob: bytes) -> bytes:
    """Inverse of rans_compress: the exact serialize() payload."""
    side_end = 5 + int.from_bytes(blob[1:5], "little")
    side = lzma.decompress(blob[5:side_end])
    rest_end = 4 + int.from_bytes(side[:4], "little")
    rest, meta, at = side[4:rest_end], side[rest_end:], 0
    header_end = 4 + int.from_bytes(rest[:4], "little")
    shapes = [(s[0], math.prod(s[1:])) for _, kind, s, *_ in json.loads(rest[4:header_end]) if kind == "q"]
    models, lows = [], []
    for shape in shapes:
        axis, k, alphabet = meta[at], meta[at + 1], meta[at + 3] + 1
        lines, width = shape[axis], k.bit_length() - 1
        label_bytes = (lines * width + 7) // 8
        bits = np.unpackbits(np.frombuffer(meta, np.uint8, label_bytes, at + 4), count=lines * width)
        codes = np.frombuffer(meta, np.uint8, k * alphabet, at + 4 + label_bytes).reshape(k, alphabet)
        models.append((axis, bits.reshape(lines, width).astype(np.int64) @ (1 << np.arange(width)), codes))
        lows.append(-meta[at + 2])
        at += 4 + label_bytes + k * alphabet
    ids, freq, start = rans_tables(models, shapes)
    sizes = [math.prod(shape) for shape in shapes]
    ints = rans_decode(blob[side_end:], ids, freq, start).ravel()[: sum(sizes)] + np.repeat(np.array(lows, np.int16), sizes)
    return rest[:header_end] + ints.astype(np.int8).tobytes() + rest[header_end:]

def int_entropy_bytes(q: Tensor) -> float:
    """n*H/8 bytes (H: order-0 entropy of the ints), the budget search's size model; brotli-11 lands a stable ~1% above it."""
    counts = torch.bincount(q.reshape(-1).to(torch.int64) + 128, minlength=256).double()
    p = counts[counts > 0] / q.numel()
    return float(-(p * p.log2()).sum()) * q.numel() / 8

def rtn_entropy_bytes(plans: list[GPTQPlan], clip_scale: float) -> float:
    """Entropy bytes of every tensor rounded to nearest at this clip scale (per tensor: the coder adapts to each)."""
    total = 0.0
    for plan in plans:
        scale, _, fine = plan_scales(plan, clip_scale)
        q = torch.where(fine > 0, torch.clamp(torch.round(plan.weight / fine.clamp_min(2.0 ** -24)), -127, 127),
                        quantize_rtn(plan.weight, scale, plan.bits))
        total += sum(int_entropy_bytes(part) for part in q.split(plan.row_counts))
    return total

def byte_groups(quantized: dict[str, dict], roles: dict[str, Role]) -> dict[str, dict]:
    """Values and order-0 entropy bytes of their ints per quant group (fp16 at 2 bytes/value): where the bytes go."""
    groups: dict[str, dict] = {}
    for name, entry in quantized.items():
        group = groups.setdefault(roles[name].quant if name in roles else "lqer", {"values": 0, "entropy_bytes": 0.0})
        values = entry["q"] if "q" in entry else entry["fp16"]
        group["values"] += values.numel()
        group["entropy_bytes"] += int_entropy_bytes(values) if "q" in entry else 2.0 * values.numel()
    return groups

def search_clip_scale(predict, target: float) -> float:
    """Bisect log(clip scale) for predict(scale) = target (a wider step: fewer levels, lower entropy); the upper bound if none fits."""
    low, high = (math.log(x) for x in CLIP_SCALE_RANGE)
    if predict(math.exp(low)) <= target:
        return math.exp(low)
    for _ in range(20):  # 2^-20 of the log range: far finer than the size model
        mid = 0.5 * (low + high)
        low, high = (mid, high) if predict(math.exp(mid)) > target else (low, mid)
    return math.exp(high)

def quantize_and_pack(model: nn.Module, hessians: dict[str, Tensor], h: Hyperparameters, reserved_bytes: int,
                      log=log_nothing) -> tuple[bytes, dict]:
    """GPTQ-quantize the weights to fit the budget; return (compressed blob, report). target = (ARTIFACT_TARGET_BYTES or
    16,000,000) - reserved_bytes (code, config header). A global multiplier on the clip sigmas is searched: size(scale) ~ c
    * sum_t n_t*H(RTN ints at scale) + fp16 part + LQER/AWQ-lite side bytes (last round's), H the order-0 entropy (cheap), c
    calibrated on each exact GPTQ + compression round (coder overhead, GPTQ's wider ints); typically two rounds.
    Scale-independent GPTQ work is done once, on the Hessians' device. Deterministic: one rank runs it."""
    started = time.perf_counter()
    state = {name: t.detach() for name, t in model.state_dict().items()}
    device = next(iter(hessians.values())).device if hessians else torch.device("cpu")
    target = (h.artifact_target_bytes or ARTIFACT_LIMIT_BYTES) - reserved_bytes
    if target <= 0:
        raise ArtifactBudgetError(f"code and header alone ({reserved_bytes} bytes) exceed the artifact budget")
    roles = model.parameter_roles()
    plans = plan_quantization(state, roles, hessians, h, device)

    # What GPTQ does not touch (fp16 tensors, int8 gates) does not move with the scale: measure it once.
    side = {n: e for n, e in quantize_state(state, roles, [], 1.0, h.gptq_block_size).items() if roles[n].quant not in GPTQ_GROUPS}
    side_bytes = len(compress(serialize(side), h.compressor)) if side else 0
    ratio, fixed_bytes, attempts, best = 1.0, 0.0, [], None
    gptq_seconds = compress_seconds = 0.0
    for attempt in range(BUDGET_ATTEMPTS):
        clip_scale = search_clip_scale(lambda s: ratio * rtn_entropy_bytes(plans, s) + side_bytes + fixed_bytes, BUDGET_AIM * target)
        t0 = time.perf_counter()
        quantized = quantize_state(state, roles, plans, clip_scale, h.gptq_block_size)
        corrected = lqer_correct(quantized, plans, h) if h.lqer_enabled else []
        t1 = time.perf_counter()
        blob = compress(serialize(quantized), h.compressor)
        t2 = time.perf_counter()
        gptq_seconds, compress_seconds = gptq_seconds + t1 - t0, compress_seconds + t2 - t1
        attempts.append({"clip_scale": clip_scale, "model_bytes": len(blob)})
        log(f"quant:attempt {attempt + 1} clip_scale:{clip_scale:.4f} model_bytes:{len(blob)} target:{target} "
            f"gptq:{t1 - t0:.1f}s {h.compressor}:{t2 - t1:.1f}s")
        fits = len(blob) <= target
        if fits and (best is None or len(blob) > len(best[1])):
            best = (clip_scale, blob, quantized, corrected)
        if fits and (len(blob) >= (1 - BUDGET_TOLERANCE) * target or clip_scale <= CLIP_SCALE_RANGE[0] * 1.001):
            break  # close enough, or already at the finest scale searched
        if not fits and clip_scale >= CLIP_SCALE_RANGE[1] * 0.999:
            raise ArtifactBudgetError(
                f"model needs {len(blob)} bytes > target {target} even at {CLIP_SCALE_RANGE[1]}x clip sigmas; "
                f"lower MATRIX_BITS/EMBED_BITS or shrink the model")
        # Bytes hardly moving with the scale: LQER's factors (ints' entropy + fp16 scales), AWQ-lite's per-row scales.
        fixed_bytes = sum(int_entropy_bytes(e["q"]) + 2 * e["scale"].numel() for n, e in quantized.items() if n not in state) \
            + sum(2 * e["awq_scale"].numel() for e in quantized.values() if "awq" in e)
        ratio = (len(blob) - side_bytes - fixed_bytes) / rtn_entropy_bytes(plans, clip_scale)
    if best is None:
        raise ArtifactBudgetError(f"no attempt fit {target} bytes: {attempts}")
    clip_scale, blob, quantized, corrected = best
    report = {
        "model_bytes": len(blob), "reserved_bytes": reserved_bytes, "total_bytes": len(blob) + reserved_bytes,
        "target_bytes": target, "clip_scale": clip_scale,
        "clip_sigmas": {group: gptq_settings(group, h)[1] * clip_scale for group in GPTQ_GROUPS},
        "bits": {name: gptq_settings(roles[name].quant, h)[0] if roles[name].quant in GPTQ_GROUPS
                 else 8 if roles[name].quant == "gate" else 16 for name in state},
        "gptq_seconds": gptq_seconds, "compress_seconds": compress_seconds,
        "total_seconds": time.perf_counter() - started, "compressor": h.compressor, "attempts": attempts,
        "groups": byte_groups(quantized, roles), "lqer": corrected,
        "awq_lite": {name: cols for plan in plans for name, cols in plan.awq.items()},
    }
    sigmas = " ".join(f"{group} k {k:.2f}" for group, k in report["clip_sigmas"].items())
    log(f"quant:chose clip_scale:{clip_scale:.4f} (effective clip sigmas: {sigmas}) model_bytes:{len(blob)} "
        f"target:{target} in {report['total_seconds']:.1f}s awq_lite:{report['awq_lite']} lqer:{corrected}")
    log("quant:groups " + " | ".join(f"{role} {g['values']} values {8 * g['entropy_bytes'] / max(g['values'], 1):.3f} "
                                     f"bits/value {g['entropy_bytes']:.0f} entropy bytes" for role, g in report["groups"].items()))
    return blob, report

def load_artifact(blob: bytes, model: nn.Module) -> None:
    """Decompress, unshuffle and dequantize an artifact's weights into `model` (in place; every key required)."""
    state = dequantize_state(deserialize(decompress(blob)))
    reference = model.state_dict()
    missing, unexpected = sorted(reference.keys() - state.keys()), sorted(state.keys() - reference.keys())
    wrong = [n for n in reference.keys() & state.keys() if reference[n].shape != state[n].shape]
    if missing or unexpected or wrong:
        raise ArtifactError(f"the artifact's weights do not fit this script's model (missing {missing[:3]}, unexpected "
                            f"{unexpected[:3]}, other shapes {wrong[:3]}); it was written by another version of train_gpt.py")
    model.load_state_dict({name: t.to(reference[name].dtype) for name, t in state.items()}, strict=True)

# An artifact file: magic | uint32 length | zlib(JSON of the model and quantization knobs) | weights blob. The config lets
# EVAL_ONLY rebuild the model with no other env var; its few hundred bytes count toward the 16,000,000 like the rest.
ARTIFACT_MAGIC = b"PGA1"

class ArtifactError(RuntimeError):
    """An unreadable or mismatched artifact / saved weights file; the message names the file."""

def pack_artifact(config: dict, blob: bytes) -> bytes:
    header = zlib.compress(json.dumps(config, sort_keys=True).encode(), 9)
    return ARTIFACT_MAGIC + len(header).to_bytes(4, "little") + header + blob

def read_artifact(path: str) -> tuple[dict, bytes]:
    """(config, weights blob) of an artifact file; ArtifactError naming the file for anything else."""
    if not os.path.isfile(path):
        raise ArtifactError(f"{path}: artifact not found; EVAL_ONLY takes the path of a final_model.<RUN_ID>.ptz written by train_gpt.py")
    data = Path(path).read_bytes()
    if data[:4] != ARTIFACT_MAGIC:
        raise ArtifactError(f"{path}: not an artifact of train_gpt.py (no {ARTIFACT_MAGIC.decode()} header); "
                            "EVAL_ONLY takes a final_model.<RUN_ID>.ptz")
    length = int.from_bytes(data[4:8], "little")
    try:
        config = json.loads(zlib.decompress(data[8 : 8 + length]))
    except (zlib.error, ValueError):
        raise ArtifactError(f"{path}: the artifact's config header is corrupt; the file is truncated or damaged") from None
    return config, data[8 + length :]

def read_saved_weights(path: str) -> tuple[dict, dict]:
    """(model config, state dict) of a final_model.<RUN_ID>.pt (the averaged, unquantized weights)."""
    if not os.path.isfile(path):
        raise ArtifactError(f"{path}: saved weights not found; REQUANTIZE_FROM takes a final_model.<RUN_ID>.pt written by train_gpt.py")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return saved["config"], saved["state_dict"]
    except Exception as error:  # torch raises many kinds for a foreign file
        raise ArtifactError(f"{path}: not a final_model.<RUN_ID>.pt of train_gpt.py ({type(error).__name__}); "
                            "REQUANTIZE_FROM takes the .pt saved next to an artifact") from None

# The shipped copy runs `exec(SHIPPED_SOURCE)` in its module namespace: __name__ and __file__ are the launcher's, as here.
SHIPPED_STUB = '# coding: latin-1\nimport lzma as L\nSHIPPED_SOURCE=L.decompress("{payload}".encode("latin-1")).decode()\nexec(SHIPPED_SOURCE)\n'

def read_script_source() -> str:
    """This script's source: the readable file, or the minified source when running the shipped copy."""
    return globals().get("SHIPPED_SOURCE") or Path(__file__).read_text(encoding="utf-8")

def minify_source(source: str) -> str:
    """Docstrings dropped, code re-printed by ast.unparse (no comments, canonical spacing); idempotent."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree) + "\n"

def latin1_literal(data: bytes) -> str:
    """Bytes as the inside of a "..." latin-1 literal: 1 char per byte but NUL, newlines, quote, backslash (~3% vs base85's 25%)."""
    escapes = {0: "\\x00", 10: "\\n", 13: "\\r", 34: '\\"', 92: "\\\\"}
    return "".join(escapes.get(b, chr(b)) for b in data)

def build_submission_code(source: str) -> bytes:
    """The shipped copy: minified, lzma'd (stdlib; FORMAT_ALONE has the smallest header), in a self-extracting exec stub."""
    packed = lzma.compress(minify_source(source).encode("utf-8"), format=lzma.FORMAT_ALONE, preset=9 | lzma.PRESET_EXTREME)
    return SHIPPED_STUB.replace("{payload}", latin1_literal(packed)).encode("latin-1")

# ========== Evaluation and test-time training =========================================================================
@dataclass
class EvalResult:
    stage: str
    loss: float          # mean nats per scored target
    bpb: float           # sum(nats) / (ln 2 * sum(bytes))
    tokens: int          # scored targets
    bytes: int           # their UTF-8 bytes
    seconds: float
    untilted: EvalResult | None = None  # with the n-gram tilt on: the same scores untilted (the A/B)
    gated: int = 0                      # scored targets where the n-gram tilt fired

# A scoring plan is an int64 tensor of windows (start, score_from, score_to) in target indices (target i is
# val_tokens[i+1], predicted from val_tokens[:i+1]): a window feeds the model val_tokens[start:score_to] (at most
# EVAL_SEQ_LEN) and scores targets [score_from, score_to). Positions past score_to are padding: a window never reads
# past its last target, and every forward has the static shape [batch, EVAL_SEQ_LEN].
PAD_ID = 0

def plain_windows(num_targets: int, seq_len: int) -> Tensor:
    """Non-overlapping windows of seq_len targets; the last one holds the tail (may be shorter)."""
    starts = torch.arange(0, num_targets, seq_len)
    return torch.stack((starts, starts, (starts + seq_len).clamp(max=num_targets)), dim=1)

def sliding_windows(num_targets: int, seq_len: int, stride: int) -> Tensor:
    """The first window scores its seq_len targets; each later one ends `stride` further and scores only those new targets,
    so every target sees >= seq_len - stride tokens of context (stride <= seq_len); the last ends at the last target."""
    stride = min(stride, seq_len)
    first_end = min(seq_len, num_targets)
    later_ends = torch.arange(first_end + stride, num_targets + stride, stride).clamp(max=num_targets)
    ends = torch.cat((torch.tensor([first_end]), later_ends))
    starts_of_span = torch.cat((torch.zeros(1, dtype=torch.long), ends[:-1]))
    return torch.stack(((ends - seq_len).clamp(min=0), starts_of_span, ends), dim=1)

def split_at_chunks(windows: Tensor, chunk_tokens: int, seq_len: int) -> Tensor:
    """Cut a sliding plan's scored spans at multiples of chunk_tokens so each window scores one TTT chunk's targets; a
    piece's window still ends where its span ends (same context). No change when the stride divides window and chunk."""
    boundaries = torch.arange(0, int(windows[-1, 2]), chunk_tokens)
    cuts = torch.cat((windows[:, 1], boundaries, windows[-1:, 2])).unique()  # sorted
    ends = cuts[1:]
    return torch.stack(((ends - seq_len).clamp(min=0), cuts[:-1], ends), dim=1)

def window_batch(tokens: Tensor, windows: Tensor, seq_len: int) -> tuple[Tensor, Tensor, Tensor]:
    """(inputs, targets, scored mask) [len(windows), seq_len]: position j holds target start+j; at or past score_to PAD_ID."""
    positions = windows[:, :1] + torch.arange(seq_len, device=tokens.device)
    real = positions < windows[:, 2:]
    scored = real & (positions >= windows[:, 1:2])
    positions = torch.where(real, positions, 0)  # keep the gather in range
    inputs = torch.where(real, tokens[positions], PAD_ID)
    targets = torch.where(real, tokens[positions + 1], PAD_ID)
    return inputs, targets, scored

def pad_windows(windows: Tensor, count: int) -> Tensor:
    """Append empty rows (0, 0, 0) (windows) or (0, 0) (documents): all padding, nothing scored. Keeps batch shapes static."""
    missing = count - windows.size(0)
    return torch.cat((windows, windows.new_zeros(missing, windows.size(1)))) if missing > 0 else windows

def rank_share(begin: int, end: int, runtime: Runtime) -> tuple[int, int]:
    """This rank's contiguous part of the index range [begin, end)."""
    n = end - begin
    return begin + n * runtime.rank // runtime.world_size, begin + n * (runtime.rank + 1) // runtime.world_size

# N-gram tilt (FRONTIER §1). The hint of target i (= val_tokens[i+1]) is the token that most often followed the same
# NGRAM_TILT_ORDER-1 tokens val_tokens[i-order+2 : i+1] earlier in the stream (across documents; ties: the first to
# reach the top count), read BEFORE the update with target i, so it depends on val_tokens[:i+1] only; it fires where
# top_count/total >= NGRAM_TILT_THRESHOLD. There p'(a) = p(a)*e^(b*[a=h]) / Z, Z = 1 + p(h)*(e^b - 1): nll' = nll -
# b*[y=h] + log1p(p(h)*expm1(b)). Training and TTT updates use the untilted loss.
def run_begins(sorted_keys: Tensor) -> Tensor:
    """bool per slot of a sorted 1-D tensor: a run of equal keys begins here."""
    new = torch.ones_like(sorted_keys, dtype=torch.bool)
    new[1:] = sorted_keys[1:] != sorted_keys[:-1]
    return new

def run_start_slots(new: Tensor) -> Tensor:
    """int32 per slot: the slot where its run begins (new = run_begins(...))."""
    return torch.arange(new.numel(), device=new.device, dtype=torch.int32)[new][torch.cumsum(new, 0) - 1]

HINT_SORT_TARGETS = 4_000_000  # keys of the hint pass sorted at once (about): bounds its memory, not its result

def sorted_by_class(ids: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
    """(sorted ids, their positions) per class of the (non-negative) ids' low bits: the fewest power-of-two classes of
    ~HINT_SORT_TARGETS keys (one class, one sort, for a short stream). Equal ids share a class and the sort is stable,
    so each context's occurrences stay in stream order, while a sort holds one class, not the stream (47.9 M keys in one
    sort: 2.4 GB of GPU memory). Classes are as even as the low bits (3.0-3.4 M keys each on a FineWeb-sized stream)."""
    parts = 1 << min(15, max(0, math.ceil(math.log2(ids.numel() / HINT_SORT_TARGETS))))  # int16 residues
    if parts == 1:
        yield torch.sort(ids, stable=True)
        return
    residue = (ids & (parts - 1)).to(torch.int16)
    for b in range(parts):
        positions = torch.nonzero(residue == b).flatten()
        sorted_ids, order = torch.sort(ids[positions], stable=True)
        yield sorted_ids, positions[order]

def window_ids(tokens: Tensor, length: int) -> Tensor:
    """int64 ids with ids[p] == ids[q] exactly when tokens[p:p+length] == tokens[q:q+length], by prefix doubling: the
    window of span+step tokens at p is packed as id[p]*base + id[p+step], re-ranked densely (a sort per residue class,
    each class's ranks after the earlier classes') only where that would overflow. No hashing: contexts never collide."""
    ids, span = tokens, 1
    while span < length:
        step, base = min(span, length - span), int(ids.max()) + 1
        if base > 2**31:
            ranks, base = torch.empty_like(ids, dtype=torch.int32), 0
            for sorted_ids, positions in sorted_by_class(ids):
                dense = torch.cumsum(run_begins(sorted_ids), 0, dtype=torch.int32) + (base - 1)
                ranks[positions] = dense
                base = int(dense[-1]) + 1 if dense.numel() else base
            ids = ranks
        ids = ids[:-step].long() * base + ids[step:]
        span += step
    return ids

@torch.no_grad()
def ngram_hints(tokens: Tensor, order: int, threshold: float) -> tuple[Tensor, Tensor]:
    """(hints int32, gates bool) per target of `tokens` (hint 0, no gate: context incomplete or new). Vectorised: a stable
    sort by context groups each context's occurrences in stream order (contexts seen once dropped); a second by (context,
    follower) gives running pair counts; the running top is a cummax per run; read-before-update a one-slot shift."""
    num_targets, k = tokens.numel() - 1, order - 1
    if num_targets < k:
        hints = torch.zeros(max(num_targets, 0), dtype=torch.int32, device=tokens.device)
        return hints, hints.bool()
    ids, vocab = window_ids(tokens[:num_targets], k), int(tokens.max()) + 1  # window p = context of target p+k-1
    hints = torch.zeros(num_targets, dtype=torch.int32, device=tokens.device)
    gates = torch.zeros(num_targets, dtype=torch.bool, device=tokens.device)
    for sorted_ids, by_context in sorted_by_class(ids):  # a context's occurrences share a class
        new = run_begins(sorted_ids)
        del sorted_ids
        repeated = ~(new & torch.cat((new[1:], new.new_ones(1))))  # not a run of one
        by_context, new = by_context[repeated], new[repeated]
        follower = tokens[by_context + k]
        sorted_pairs, by_pair = torch.sort(torch.cumsum(new, 0) * vocab + follower, stable=True)
        count = torch.empty_like(by_pair, dtype=torch.int32)  # the pair's count after the update with this slot
        idx = torch.arange(count.numel(), device=count.device, dtype=torch.int32)
        count[by_pair] = idx - run_start_slots(run_begins(sorted_pairs)) + 1
        start = run_start_slots(new)
        total = idx - start + 1
        top = torch.cummax(start + count, 0).values - start  # start+count stays below the next run's start
        # The top token is the follower of the run's latest record (`pair_count > top_count`): ties keep the earlier one.
        leader = torch.cummax(torch.where(count > torch.where(new, 0, top.roll(1)), idx, 0), 0).values
        gate = ~new & (top.roll(1).double() / total.roll(1).double() >= threshold)  # the state after slot q-1
        hints[by_context + k - 1] = torch.where(new, 0, follower[leader].roll(1)).to(torch.int32)
        gates[by_context + k - 1] = gate
    return hints, gates

@dataclass
class NgramTilt:
    """A stream's hints (ngram_hints) and the boost; gather() and apply() serve every scoring path."""
    hints: Tensor  # int32 [num_targets]
    gates: Tensor  # bool [num_targets]
    boost: float

    def gather(self, positions: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """(hint_ids int64, gates) at target indices `positions`; no gate where not `valid`."""
        positions = torch.where(valid, positions, 0)
        return self.hints[positions].long(), self.gates[positions] & valid

    def apply(self, nll: Tensor, hint_nll: Tensor, target_ids: Tensor, hint_ids: Tensor, gates: Tensor) -> Tensor:
        """nll' = nll - b*[y=h] + log1p(p(h)*expm1(b)) where gated, else nll; hint_nll = -log p(h) from the same logits."""
        tilted = nll - self.boost * (target_ids == hint_ids) + torch.log1p(torch.exp(-hint_nll) * math.expm1(self.boost))
        return torch.where(gates, tilted, nll)

def ngram_tilt(tokens: Tensor, h: Hyperparameters) -> NgramTilt | None:
    """The stream's tilt on tokens' device, or None when NGRAM_TILT_ENABLED=0. Every rank builds all hints itself: a
    hint depends on every earlier occurrence of its context (sorts of the whole stream, per residue class: 0.24 s and
    1.1 GB on one H100 for 47.9 M tokens), and sharing would cost collectives as large as the result."""
    if not h.ngram_tilt_enabled:
        return None
    return NgramTilt(*ngram_hints(tokens, h.ngram_tilt_order, h.ngram_tilt_threshold), h.ngram_tilt_boost)

def score_batch(model: nn.Module, tokens: Tensor, target_bytes: Tensor, batch: Tensor, seq_len: int, totals: Tensor,
                tilt: NgramTilt | None = None, lora: DocumentLoRA | None = None, span: int | None = None) -> tuple[Tensor, Tensor]:
    """Add (nats, bytes, count, untilted nats, gated count) of the scored targets of windows `batch` to `totals`
    (float64 [5]) from one forward, nats tilted if tilt is given. Returns (untilted nll, scored mask) per position, or
    with `span` (no window scores more than span targets) per column of a run of span columns holding each row's
    scored positions: the head then reads those columns only. The nll keeps its graph under grad (LoRA TTT trains on it after scoring)."""
    inputs, targets, scored = window_batch(tokens, batch, seq_len)
    positions = (batch[:, :1] + torch.arange(seq_len, device=tokens.device)).clamp(max=target_bytes.numel() - 1)
    columns = None
    if span is not None and span < seq_len:  # [first, first + span) holds [score_from, score_to) - start
        first = (batch[:, 1] - batch[:, 0]).clamp(0, seq_len - span)
        columns = first[:, None] + torch.arange(span, device=tokens.device)
        targets, scored, positions = (t.gather(1, columns) for t in (targets, scored, positions))
    if tilt is None:
        untilted = model(inputs, targets, reduction="none", lora=lora, columns=columns)
        nll, gates = untilted.detach(), torch.zeros_like(scored)
    else:
        hint_ids, gates = tilt.gather(positions, scored)
        untilted, hint_nll = model(inputs, targets, reduction="none", hint_ids=hint_ids, lora=lora, columns=columns)
        nll = tilt.apply(untilted.detach(), hint_nll, targets, hint_ids, gates)
    totals += torch.stack((torch.where(scored, nll.double(), 0.0).sum(),
                           torch.where(scored, target_bytes[positions], 0).sum().double(),
                           scored.sum().double(), torch.where(scored, untilted.detach().double(), 0.0).sum(),
                           gates.sum().double()))
    return untilted, scored

def score_windows(model: nn.Module, tokens: Tensor, target_bytes: Tensor, windows: Tensor, seq_len: int,
                  batch_windows: int, totals: Tensor, tilt: NgramTilt | None = None) -> None:
    """score_batch over a plan, in forwards of exactly batch_windows windows. Call under no_grad."""
    for i in range(0, windows.size(0), batch_windows):
        score_batch(model, tokens, target_bytes, pad_windows(windows[i : i + batch_windows], batch_windows), seq_len, totals, tilt)

def eval_result(stage: str, totals: Tensor, seconds: float, tilted: bool = False) -> EvalResult:
    nats, num_bytes, count, untilted_nats, gated = totals.tolist()
    result, untilted = (EvalResult(name, n / count, n / (math.log(2) * num_bytes), int(count), int(num_bytes), seconds)
                        for name, n in ((stage, nats), (f"{stage}_untilted", untilted_nats)))
    result.untilted, result.gated = (untilted, int(gated)) if tilted else (None, 0)
    return result

def scoring_inputs(val_tokens: Tensor, target_bytes: Tensor, h: Hyperparameters,
                   runtime: Runtime) -> tuple[Tensor, Tensor, NgramTilt | None, Tensor]:
    """Where every scoring path starts: the stream and its target bytes on the device, its n-gram tilt, zeroed totals."""
    tokens, target_bytes = val_tokens.to(runtime.device), target_bytes.to(runtime.device)
    return tokens, target_bytes, ngram_tilt(tokens, h), torch.zeros(5, dtype=torch.float64, device=runtime.device)

def eval_windows(model: nn.Module, val_tokens: Tensor, target_bytes: Tensor, h: Hyperparameters,
                 runtime: Runtime, stage: str, windows: Tensor) -> EvalResult:
    """Score a plan: windows split over ranks, VAL_BATCH_TOKENS per forward, sums all-reduced in float64."""
    t0 = synchronize(runtime)
    tokens, target_bytes, tilt, totals = scoring_inputs(val_tokens, target_bytes, h, runtime)
    begin, end = rank_share(0, windows.size(0), runtime)
    # Static shapes, but no padding beyond the largest rank's share (tiny validation sets on CPU).
    batch_windows = max(1, min(h.val_batch_tokens // h.eval_seq_len, math.ceil(windows.size(0) / runtime.world_size)))
    with looping_enabled(model), torch.no_grad():
        score_windows(model, tokens, target_bytes, windows[begin:end].to(runtime.device), h.eval_seq_len, batch_windows, totals, tilt)
    runtime.comm.all_reduce_sum(totals)
    return eval_result(stage, totals, synchronize(runtime) - t0, tilt is not None)

def eval_plain(model: nn.Module, val_tokens: Tensor, target_bytes: Tensor, h: Hyperparameters,
               runtime: Runtime, stage: str = "plain") -> EvalResult:
    """Non-overlapping EVAL_SEQ_LEN windows over the whole stream, tail included."""
    return eval_windows(model, val_tokens, target_bytes, h, runtime, stage, plain_windows(val_tokens.numel() - 1, h.eval_seq_len))

def eval_sliding(model: nn.Module, val_tokens: Tensor, target_bytes: Tensor, h: Hyperparameters,
                 runtime: Runtime, stage: str = "sliding") -> EvalResult:
    """EVAL_SEQ_LEN windows advanced by EVAL_STRIDE; every target scored once with >= len - stride context."""
    windows = sliding_windows(val_tokens.numel() - 1, h.eval_seq_len, h.eval_stride)
    return eval_windows(model, val_tokens, target_bytes, h, runtime, stage, windows)

def all_reduce_grads(params: list[nn.Parameter], runtime: Runtime) -> None:
    """Sum gradients over ranks in one flat buffer (one collective instead of one per tensor)."""
    if not runtime.comm.active:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = runtime.comm.all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]))
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p)

def train_on_chunk(model: nn.Module, params: list[nn.Parameter], optimizer: torch.optim.Optimizer,
                   tokens: Tensor, chunk_begin: int, chunk_end: int, lr: float, h: Hyperparameters,
                   runtime: Runtime, epochs: int, seq_len: int) -> None:
    """`epochs` SGD steps on the mean loss of the (already scored) targets [chunk_begin, chunk_end). Its seq_len
    sequences are split over ranks, each rank dividing its summed losses by the chunk's target count, so the summed
    gradients are the chunk's mean-loss gradient for any world size."""
    sequences = plain_windows(chunk_end - chunk_begin, seq_len) + chunk_begin
    per_rank = math.ceil(sequences.size(0) / runtime.world_size)  # equal on every rank: same collectives
    mine = pad_windows(sequences[runtime.rank * per_rank : (runtime.rank + 1) * per_rank], per_rank).to(tokens.device)
    # Micro-batches of as many tokens as a training micro-batch, so TTT fits where training fits.
    micro = max(1, min(per_rank, h.micro_batch_seqs * h.train_seq_len // seq_len))
    num_targets = chunk_end - chunk_begin
    for group in optimizer.param_groups:
        group["lr"] = lr
    for _ in range(epochs):
        optimizer.zero_grad(set_to_none=True)
        for i in range(0, per_rank, micro):
            inputs, targets, trained = window_batch(tokens, pad_windows(mine[i : i + micro], micro), seq_len)
            nll = model(inputs, targets, reduction="none")
            (torch.where(trained, nll, 0.0).sum() / num_targets).backward()
        all_reduce_grads(params, runtime)
        if h.ttt_grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, h.ttt_grad_clip)
        optimizer.step()

def eval_ttt(model: nn.Module, val_tokens: Tensor, target_bytes: Tensor, h: Hyperparameters,
             runtime: Runtime, log=log_nothing, stage: str = "ttt") -> EvalResult:
    """Legal score-first test-time training (SPEC §7): each TTT_CHUNK_TOKENS chunk of targets is scored with the sliding
    plan under no_grad (the result), then trained on with SGD (momentum TTT_MOMENTUM, TTT_EPOCHS steps, clip
    TTT_GRAD_CLIP, LR TTT_LR cosine over chunks), except the last. So each target is scored by weights that have only
    seen earlier chunks. CHANGES THE MODEL'S WEIGHTS IN PLACE: run it last, or on a copy."""
    t0 = synchronize(runtime)
    tokens, target_bytes, tilt, totals = scoring_inputs(val_tokens, target_bytes, h, runtime)
    num_targets, seq_len, chunk_tokens = tokens.numel() - 1, h.eval_seq_len, h.ttt_chunk_tokens
    windows = split_at_chunks(sliding_windows(num_targets, seq_len, h.eval_stride), chunk_tokens, seq_len)
    chunk_begins = list(range(0, num_targets, chunk_tokens))
    num_chunks = len(chunk_begins)
    # Window index range of each chunk (each window scores targets of a single chunk).
    window_bounds = torch.searchsorted(windows[:, 1].contiguous(), torch.tensor(chunk_begins + [num_targets])).tolist()
    windows = windows.to(runtime.device)
    # One batch size for every chunk (static shapes): the largest per-rank share, capped by VAL_BATCH_TOKENS.
    largest_share = max(math.ceil((b - a) / runtime.world_size) for a, b in zip(window_bounds, window_bounds[1:]))
    batch_windows = max(1, min(h.val_batch_tokens // seq_len, largest_share))
    params = list(model.requires_grad_(True).parameters())
    optimizer = torch.optim.SGD(params, lr=h.ttt_lr, momentum=h.ttt_momentum)
    log_every = max(1, num_chunks // 20)
    try:
        with looping_enabled(model):
            for c, chunk_begin in enumerate(chunk_begins):
                begin, end = rank_share(window_bounds[c], window_bounds[c + 1], runtime)
                with torch.no_grad():
                    score_windows(model, tokens, target_bytes, windows[begin:end], seq_len, batch_windows, totals, tilt)
                if c < num_chunks - 1:
                    lr = h.ttt_lr * 0.5 * (1 + math.cos(math.pi * c / max(num_chunks - 1, 1)))
                    chunk_end = min(chunk_begin + chunk_tokens, num_targets)
                    train_on_chunk(model, params, optimizer, tokens, chunk_begin, chunk_end, lr, h, runtime, h.ttt_epochs, seq_len)
                if (c + 1) % log_every == 0 or c == num_chunks - 1:
                    running = eval_result(stage, runtime.comm.all_reduce_sum(totals.clone()), 0.0)
                    log(f"{stage} chunk:{c + 1}/{num_chunks} running_bpb:{running.bpb:.6f} elapsed:{time.perf_counter() - t0:.1f}s")
    finally:
        optimizer.zero_grad(set_to_none=True)
    runtime.comm.all_reduce_sum(totals)
    return eval_result(stage, totals, synchronize(runtime) - t0, tilt is not None)

# Per-document LoRA TTT (FRONTIER §5). A document runs from a BOS (or the stream's start) to the next BOS, its last
# target: document [s, e) holds targets s..e-1, so documents partition the targets plain/sliding score. Each is scored
# in chunks of C targets, in order; the chunk ending at local target c is one row of a forward reading the document's
# tokens [max(0, c-T), c) (T = TTT window) with per-document adapters: that gives its score, then one AdamW step of the
# adapters on the chunk's mean loss follows. The last chunk is scored only.
LORA_PLACEMENTS = ("q", "k", "v", "o", "mlp", "head")
MIN_WINDOW_BUCKET = 128  # shortest forward: the GPU is latency-bound below, and it is FlexAttention's mask block
MIN_ROWS = 2  # rows a LoRA forward keeps: one row would be a second compiled graph per block variant (dynamo specializes 1)
CHALLENGE_VAL_TOKENS = 47_851_520  # FineWeb validation tokens with the records' CaseOps tokenizer (40,540,160 with sp8192)

@dataclass
class LoRATerms:
    """TTT adapters of one virtual layer (or the head), per document row: term(x) = (x A^T) B^T * alpha/r, A [docs,r,in], B [docs,out,r]."""
    factors: dict[str, tuple[Tensor, Tensor]]
    scale: float

    def add(self, name: str, x: Tensor, y: Tensor) -> Tensor:
        """y + placement `name`'s term of x [rows, T, in] (the first rows of the batch); y where this slot has no such adapter."""
        if name not in self.factors:
            return y
        a, b = (f[: x.size(0)].to(x.dtype) for f in self.factors[name])
        return y + torch.bmm(torch.bmm(x, a.transpose(1, 2)) * self.scale, b.transpose(1, 2))

class DocumentLoRA:
    """Adapters for TTT_BATCH_DOCS documents at the TTT_LORA_TARGETS placements of every virtual layer and the head. A,
    drawn from U(+-1/sqrt(in)), is kept between batches (warm start: it has only trained on documents scored earlier);
    reset() zeroes B, so a batch starts from the base model."""

    def __init__(self, h: Hyperparameters, num_layers: int, device: torch.device, seed: int) -> None:
        d, kv, rank, docs = h.model_dim, h.num_kv_heads * h.head_dim, h.ttt_lora_rank, h.ttt_batch_docs
        shapes = dict(q=(d, d), k=(d, kv), v=(d, kv), o=(d, d), mlp=(d, d), head=(d, h.vocab_size))
        generator, targets, scale = torch.Generator(device).manual_seed(seed), h.ttt_lora_targets.split(","), h.ttt_lora_alpha / rank

        def pair(n_in: int, n_out: int) -> tuple[Tensor, Tensor]:
            a = torch.empty(docs, rank, n_in, device=device).uniform_(-n_in ** -0.5, n_in ** -0.5, generator=generator)
            # Parameters, not plain tensors: dynamo keeps no aliasing guards on them, whose recompile diagnostics crash
            # (torch 2.11-2.13) when a call without adapters meets a graph compiled with them.
            return nn.Parameter(a), nn.Parameter(torch.zeros(docs, n_out, rank, device=device))
        self.layers = [LoRATerms({t: pair(*shapes[t]) for t in targets if t != "head"}, scale) for _ in range(num_layers)]
        self.head = LoRATerms({t: pair(*shapes[t]) for t in targets if t == "head"}, scale)

    def parameters(self) -> list[Tensor]:
        return [f for terms in (*self.layers, self.head) for pair in terms.factors.values() for f in pair]

    @torch.no_grad()
    def reset(self) -> None:
        for b in self.parameters()[1::2]:  # the parameters are (A, B) pairs
            b.zero_()

def document_spans(tokens: Tensor) -> Tensor:
    """[documents, 2] (start, end) target ranges: documents start at the stream's start and at every BOS."""
    num_targets = tokens.numel() - 1
    starts = torch.cat((torch.zeros(1, dtype=torch.long), (tokens[1:num_targets] == BOS_ID).nonzero().flatten() + 1))
    spans = torch.stack((starts, torch.cat((starts[1:], torch.tensor([num_targets])))), dim=1)
    return spans[spans[:, 1] > spans[:, 0]]

def longest_first(docs: Tensor) -> Tensor:
    """Document spans [n, 2] sorted by length, longest first, ties in their given order."""
    return docs[torch.sort(docs[:, 0] - docs[:, 1], stable=True).indices]

def lora_plan(docs: Tensor, h: Hyperparameters) -> tuple[int, list[tuple[int, int]]]:
    """(chunk C, (rows, forward length) per chunk) of a batch, longest document first: C is TTT_CHUNK_SIZE, or the
    TTT_SHORT_CHUNKS chunk of the first max_len >= its longest document. Chunk c's windows are padded to the next power of
    two >= min((c+1)C, T) (>= MIN_WINDOW_BUCKET); at full windows the batch keeps max(MIN_ROWS, len(docs) // 4**k) rows, the
    largest k that holds the documents still scored: few shapes, and the longest documents' tail skips finished rows."""
    lengths = (docs[:, 1] - docs[:, 0]).tolist()
    longest = max(lengths)
    chunk = next((c for n, c in h.short_chunks if longest <= n), h.ttt_chunk_size)
    plan, rows = [], len(docs)
    for c, end in enumerate(range(chunk, longest + chunk, chunk)):
        seq_len = min(h.ttt_window, max(MIN_WINDOW_BUCKET, 1 << (min(end, h.ttt_window) - 1).bit_length()))
        live = sum(n > c * chunk for n in lengths)
        while seq_len == h.ttt_window and rows > MIN_ROWS and live <= max(MIN_ROWS, rows // 4):
            rows = max(MIN_ROWS, rows // 4)
        plan.append((rows, seq_len))
    return chunk, plan

def lora_ttt_schedule(docs: Tensor, h: Hyperparameters, world_size: int) -> list[list[list[Tensor]]]:
    """segments[k][rank] = that rank's batches (documents [TTT_BATCH_DOCS, 2], longest first, ties in stream order, (0, 0)
    rows padding) before phase boundary k; in lora_phased the first PHASED_TTT_PREFIX_DOCS form PHASED_TTT_NUM_PHASES equal
    segments. Each batch goes to the rank with the least work (rows x length): a static split, never timing-dependent."""
    ranked = longest_first(docs)
    phases = h.phased_ttt_num_phases if h.ttt_mode == "lora_phased" else 0
    prefix = min(len(docs), round(h.phased_ttt_prefix_docs * len(docs)) if h.phased_ttt_prefix_docs < 1 else int(h.phased_ttt_prefix_docs))
    bounds = [0] + [prefix * k // phases for k in range(1, phases + 1)] + [len(docs)]
    segments = []
    for a, b in zip(bounds, bounds[1:]):
        load, mine = [0] * world_size, [[] for _ in range(world_size)]
        for i in range(a, b, h.ttt_batch_docs):
            batch = pad_windows(ranked[i : min(i + h.ttt_batch_docs, b)], h.ttt_batch_docs)
            rank = load.index(min(load))
            mine[rank].append(batch)
            load[rank] += sum(rows * seq_len for rows, seq_len in lora_plan(batch, h)[1])
        segments.append(mine)
    return segments

def lora_ttt_batch(model: nn.Module, tokens: Tensor, target_bytes: Tensor, docs: Tensor, lora: DocumentLoRA,
                   h: Hyperparameters, totals: Tensor, tilt: NgramTilt | None) -> None:
    """Score one batch of documents (a row each) chunk by chunk: each chunk's forward adds its score to totals, then the
    adapters take one AdamW step (beta1 = 0) on each document's chunk mean loss, unless it is its last. B and the optimizer
    start afresh; A is kept. Where the plan drops rows, the forward runs the first rows (the adapters' first rows): the
    dropped ones get no gradient and only weight decay, as padding rows did."""
    docs = longest_first(docs)  # live rows lead
    lora.reset()
    optimizer = torch.optim.AdamW(lora.parameters(), lr=h.ttt_lora_lr, betas=(0.0, h.ttt_lora_beta2), eps=1e-10,
                                  weight_decay=h.ttt_lora_wd, fused=tokens.is_cuda)
    chunk, plan = lora_plan(docs, h)
    starts, lengths = docs[:, 0].to(tokens.device), (docs[:, 1] - docs[:, 0]).to(tokens.device)  # no host sync below
    for c, (rows, seq_len) in enumerate(plan):
        starts, lengths = starts[:rows], lengths[:rows]
        end = lengths.clamp(max=(c + 1) * chunk)
        windows = torch.stack((starts + (end - h.ttt_window).clamp(min=0), starts + c * chunk, starts + end), dim=1)
        windows = torch.where((lengths > c * chunk)[:, None], windows, 0)
        nll, scored = score_batch(model, tokens, target_bytes, windows, seq_len, totals, tilt, lora, span=chunk)
        if c < len(plan) - 1:  # some document goes on: train on the chunks that are not a document's last
            trained = scored & (lengths > (c + 1) * chunk)[:, None]
            (torch.where(trained, nll, 0.0).sum(1) / trained.sum(1).clamp(min=1)).sum().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

def global_sgd(model: nn.Module, tokens: Tensor, docs: Tensor, h: Hyperparameters, runtime: Runtime) -> None:
    """A phase's global SGD of all weights (momentum TTT_MOMENTUM, PHASED_TTT_EPOCHS steps per TTT_CHUNK_TOKENS chunk, LR
    PHASED_TTT_LR cosine over chunks, clip TTT_GRAD_CLIP) on the scored documents `docs` in stream order. Each keeps its
    true targets: each document but the last ends at the next one's BOS; the last one's final target is appended."""
    last = int(docs[-1, 1])
    stream = torch.cat([tokens[s:e] for s, e in docs.tolist()] + [tokens[last : last + 1]])
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=h.phased_ttt_lr, momentum=h.ttt_momentum)
    begins = range(0, stream.numel() - 1, h.ttt_chunk_tokens)
    model.requires_grad_(True)
    for c, begin in enumerate(begins):
        lr = h.phased_ttt_lr * 0.5 * (1 + math.cos(math.pi * c / len(begins)))
        end = min(begin + h.ttt_chunk_tokens, stream.numel() - 1)
        train_on_chunk(model, params, optimizer, stream, begin, end, lr, h, runtime, h.phased_ttt_epochs, h.ttt_window)
    optimizer.zero_grad(set_to_none=True)
    model.requires_grad_(False)

def eval_lora_ttt(model: nn.Module, val_tokens: Tensor, target_bytes: Tensor, h: Hyperparameters,
                  runtime: Runtime, log=log_nothing, stage: str = "ttt") -> EvalResult:
    """Score-first per-document LoRA TTT; in lora_phased also global SGD of the base model at each phase boundary on every
    document all ranks have scored (one all-reduce); later documents are scored by the updated model with fresh adapters.
    Every target is scored once, before any update that has seen it. Changes the weights in place."""
    t0 = synchronize(runtime)
    tokens, target_bytes, tilt, totals = scoring_inputs(val_tokens, target_bytes, h, runtime)
    docs = document_spans(val_tokens.cpu())
    segments = [s for s in lora_ttt_schedule(docs, h, runtime.world_size) if any(s)]  # an empty phase does nothing
    scored = torch.zeros(len(docs), dtype=torch.int32)  # by this rank, per document
    model.requires_grad_(False)  # only the adapters get gradients while scoring
    try:
        with looping_enabled(model):
            for k, segment in enumerate(segments):
                t_phase = time.perf_counter()
                lora = DocumentLoRA(h, h.virtual_layers, runtime.device, seed=h.seed + k)  # fresh after each phase
                for i, batch in enumerate(segment[runtime.rank]):
                    lora_ttt_batch(model, tokens, target_bytes, batch, lora, h, totals, tilt)
                    scored[torch.searchsorted(docs[:, 0].contiguous(), batch[batch[:, 1] > batch[:, 0], 0])] += 1
                    log(f"{stage} phase:{k + 1} batch:{i + 1}/{len(segment[runtime.rank])} longest:{int((batch[:, 1] - batch[:, 0]).max())} "
                        f"elapsed:{time.perf_counter() - t0:.1f}s", console=False)
                del lora
                done = runtime.comm.all_reduce_sum(scored.to(runtime.device, copy=True)).cpu() > 0  # the documents every rank has scored
                t_sgd = time.perf_counter()
                if int(done.sum()) < len(docs):  # a phase boundary: global SGD on all documents scored so far
                    global_sgd(model, tokens, docs[done], h, runtime)
                running = eval_result(stage, runtime.comm.all_reduce_sum(totals.clone()), 0.0)
                synchronize(runtime)
                log(f"{stage} phase:{k + 1}/{len(segments)} docs:{int(done.sum())}/{len(docs)} running_bpb:{running.bpb:.6f} "
                    f"scoring:{t_sgd - t_phase:.1f}s global_sgd:{time.perf_counter() - t_sgd:.1f}s elapsed:{time.perf_counter() - t0:.1f}s")
    finally:
        model.requires_grad_(True)
    runtime.comm.all_reduce_sum(totals)
    seconds = synchronize(runtime) - t0
    log(f"{stage} projection (not a measurement): {seconds * CHALLENGE_VAL_TOKENS / tokens.numel() * runtime.world_size / 8:.0f}s for "
        f"{CHALLENGE_VAL_TOKENS:,} tokens on 8 GPUs, linear from {tokens.numel():,} tokens in {seconds:.1f}s on {runtime.world_size} {runtime.device.type} process(es)")
    return eval_result(stage, totals, seconds, tilt is not None)

# ========== Main ======================================================================================================
class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""

def build_model(h: Hyperparameters, runtime: Runtime, backend: str) -> GPT:
    """A fresh model on the runtime device, computing in bf16 on GPU and fp32 on CPU."""
    torch.manual_seed(h.seed)
    model = GPT(h, backend).to(runtime.device)
    model.compute_dtype = torch.bfloat16 if runtime.device.type == "cuda" else torch.float32
    return model

def compile_model(model: GPT, h: Hyperparameters, runtime: Runtime, dynamic: bool | None = False) -> str:
    """Regional compilation (each block, the head) compiles in seconds and serves every layer; full traces the unrolled
    model. Returns the mode. Static shapes by default; dynamic=None (dynamo's automatic dynamic shapes: a shape that
    changes recompiles once, symbolic) for LoRA TTT, whose (rows, window) shapes would each cost a compile of every
    block variant (~60 s on H100). From empty caches: a run's graphs are its own."""
    mode = h.compile
    if mode == "auto":
        mode = "regional" if runtime.device.type == "cuda" else "none"
    if mode == "none":
        return mode
    import torch._dynamo
    torch._dynamo.reset()
    torch._dynamo.config.cache_size_limit = 128  # block variants x looping x eval/train shapes x LoRA TTT window lengths
    if mode == "regional":
        for block in model.blocks:
            block.compile(dynamic=dynamic)
        model.head.compile(dynamic=dynamic)
        model.embed = torch.compile(GPT.embed.__get__(model), dynamic=dynamic)  # fuses the SmearGate's elementwise work
    else:
        model.compile(dynamic=dynamic)
    return mode

def batch_layout(h: Hyperparameters, runtime: Runtime) -> tuple[int, int]:
    """(sequences per micro-batch per rank, accumulation steps): the largest micro-batch <= MICRO_BATCH_SEQS dividing the share."""
    global_seqs = h.train_batch_tokens // h.train_seq_len
    if global_seqs % runtime.world_size:
        raise ConfigError(f"TRAIN_BATCH_TOKENS={h.train_batch_tokens} gives {global_seqs} sequences, not divisible by the world size {runtime.world_size}")
    per_rank = global_seqs // runtime.world_size
    micro = max(d for d in range(1, min(h.micro_batch_seqs, per_rank) + 1) if per_rank % d == 0)
    return micro, per_rank // micro

def train_step(model: GPT, optimizers: Optimizers, loader: TrainLoader, grad_accum_steps: int,
               lr_mult: float, muon_momentum: float) -> Tensor:
    """Forward/backward over the accumulated micro-batches, then one optimizer step; returns the mean loss."""
    total = torch.zeros((), device=next(model.parameters()).device)
    for _ in range(grad_accum_steps):
        x, y = loader.next_batch()
        loss = model(x, y)
        (loss / grad_accum_steps).backward()
        total += loss.detach()
    optimizers.step(lr_mult, muon_momentum)
    optimizers.zero_grad()
    return total / grad_accum_steps

def warm_up_and_reset(model: GPT, optimizers: Optimizers, loader: TrainLoader, h: Hyperparameters, grad_accum_steps: int) -> None:
    """WARMUP_STEPS real steps per graph variant (without and with looping) so that all compilation happens here, then
    the initial weights, optimizer state and data position are restored: warm-up never trains the model."""
    if h.warmup_steps == 0:
        return
    model_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer_state, loader_state = optimizers.state_dict(), loader.state_dict()
    for looping in ([False, True] if h.num_loops else [False]):
        model.looping = looping
        for _ in range(h.warmup_steps):
            train_step(model, optimizers, loader, grad_accum_steps, 1.0, muon_momentum_at(0, h))
    model.looping = False
    model.load_state_dict(model_state)
    optimizers.load_state_dict(optimizer_state)
    loader.load_state_dict(loader_state)

def synchronize(runtime: Runtime) -> float:
    """Wait for the device's queued work; return time.perf_counter() after it (a clock reading on finished work)."""
    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)
    return time.perf_counter()

def log_eval(log: Logger, result: EvalResult) -> EvalResult:
    log(f"{result.stage} val_loss:{result.loss:.6f} val_bpb:{result.bpb:.6f} eval_time:{result.seconds * 1000:.0f}ms")
    log.metrics(event="eval", stage=result.stage, val_loss=result.loss, val_bpb=result.bpb,
                eval_time_ms=result.seconds * 1000, tokens=result.tokens, bytes=result.bytes)
    if result.untilted is not None:
        log_eval(log, result.untilted)
        log(f"ngram_tilt {result.stage} gated:{result.gated}/{result.tokens} ({result.gated / result.tokens:.2%})")
        log.metrics(event="ngram_tilt", stage=result.stage, gated=result.gated, scored=result.tokens)
    return result

def log_timing(log: Logger, name: str, seconds: float) -> None:
    log(f"timing {name}: {seconds:.1f}s")
    log.metrics(event="timing", name=name, seconds=seconds)

def train(model: GPT, h: Hyperparameters, runtime: Runtime, log: Logger, val_tokens: Tensor,
          val_target_bytes: Tensor) -> tuple[TrainLoader, WeightAverager, float]:
    """The training loop under the wallclock budget; returns (loader, averager, training seconds)."""
    micro_seqs, grad_accum_steps = batch_layout(h, runtime)
    log(f"world_size:{runtime.world_size} grad_accum_steps:{grad_accum_steps} micro_batch_seqs:{micro_seqs} "
        f"global_batch_tokens:{h.train_batch_tokens}")
    loader = TrainLoader(list_shards(h.dataset_dir, "train"), h.train_seq_len, micro_seqs, grad_accum_steps, runtime, h.seed, h.vocab_size)
    optimizers = Optimizers(model, h, runtime)

    t0 = synchronize(runtime)
    warm_up_and_reset(model, optimizers, loader, h, grad_accum_steps)
    log_timing(log, "compile_warmup", synchronize(runtime) - t0)

    averager = WeightAverager(model, h)
    budget = float("inf")
    if h.max_wallclock_seconds > 0:
        measured = measure_calibration_seconds(model, h, runtime)
        reserve = max(h.gptq_reserve_seconds, measured)
        budget = h.max_wallclock_seconds - reserve
        log(f"budget: {budget:.1f}s of training; {reserve:.1f}s reserved for the weight choice and GPTQ calibration "
            f"(measured ~{measured:.1f}s, GPTQ_RESERVE_SECONDS={h.gptq_reserve_seconds:g})")
        log.metrics(event="budget", train_budget_s=budget, reserve_s=reserve, measured_calibration_s=measured)
        if budget <= 0:
            raise ConfigError(f"MAX_WALLCLOCK_SECONDS={h.max_wallclock_seconds:g} leaves no training time after the "
                              f"{reserve:.1f}s calibration reserve; raise it or lower GPTQ_CALIBRATION_BATCHES")
    training_seconds, elapsed, step = 0.0, 0.0, 0
    t_resume = synchronize(runtime)
    while step < h.iterations:
        frac = training_progress(step, elapsed, budget, h.iterations)  # on the clock all ranks agreed on after the last step
        if h.num_loops and not model.looping and frac >= h.enable_looping_at:
            model.looping = True
            log(f"looping:on step:{step} train_time:{elapsed * 1000:.0f}ms order:{model.virtual_order()}")
        span = h.attention_span_at(frac)
        if span != model.attention_span:
            model.attention_span = span
            log(f"attention_span:{span or h.train_seq_len} step:{step} train_time:{elapsed * 1000:.0f}ms")
        lr_mult = lr_multiplier(frac, h.warmdown_frac, h.min_lr)
        loss = train_step(model, optimizers, loader, grad_accum_steps, lr_mult, muon_momentum_at(step, h))
        step += 1
        averager.update(step, in_warmdown=frac >= 1.0 - h.warmdown_frac)
        # One small all-reduce per step: the same clock on every rank (same stop/looping decisions), mean loss, divergence.
        stats = torch.tensor([training_seconds + time.perf_counter() - t_resume, float(loss),
                              float(not torch.isfinite(loss))], device=runtime.device, dtype=torch.float64)
        stats = runtime.comm.all_reduce_sum(stats) / runtime.world_size
        step_seconds, elapsed = float(stats[0]) - elapsed, float(stats[0])
        mean_loss, diverged = float(stats[1]), float(stats[2]) > 0
        if diverged:
            raise TrainingDiverged(f"train loss is {float(loss)} at step {step}: the run diverged; "
                                   f"lower MATRIX_LR/SCALAR_LR/TIED_EMBED_LR or check the data")
        last = elapsed + step_seconds > budget or step >= h.iterations  # stop before a step like the last would overrun
        if step <= 5 or step % h.train_log_every == 0 or last:
            tokens_per_s = step * h.train_batch_tokens / max(elapsed, 1e-9)
            log(f"step:{step}/{h.iterations} train_loss:{mean_loss:.4f} train_time:{elapsed * 1000:.0f}ms "
                f"step_avg:{elapsed * 1000 / step:.2f}ms tok/s:{tokens_per_s:.0f}")
            log.metrics(event="step", step=step, train_loss=mean_loss, train_time_ms=elapsed * 1000,
                        step_avg_ms=elapsed * 1000 / step, tok_s=tokens_per_s, lr_mult=lr_mult, looping=model.looping,
                        attention_span=model.attention_span or h.train_seq_len)
        if h.val_loss_every and step % h.val_loss_every == 0 and not last:
            training_seconds = elapsed  # the clock pauses during validation
            log_eval(log, eval_plain(model, val_tokens, val_target_bytes, h, runtime, stage=f"step{step}"))
            t_resume = synchronize(runtime)
            continue
        if last:
            training_seconds = elapsed
            break
    model.attention_span = None  # evaluation and calibration see whole documents
    log_timing(log, "training", training_seconds)
    log(f"stopped at step {step}: train_time:{training_seconds * 1000:.0f}ms")
    if h.asym_softcap_enabled:
        caps = model.softcap_caps.detach().tolist()
        log(f"softcap caps: positive {caps[0]:.3f} negative {caps[1]:.3f}")
    return loader, averager, training_seconds

@torch.no_grad()
def held_out_train_loss(model: GPT, batches: list[tuple[Tensor, Tensor]], runtime: Runtime) -> float:
    """Mean loss on training batches the model has not trained on, averaged over ranks (eager)."""
    with looping_enabled(model), torch.compiler.set_stance("force_eager"):
        losses = torch.stack([model(x, y) for x, y in batches]).mean()
    return float(runtime.comm.all_reduce_sum(losses.double())) / runtime.world_size

def choose_averaged_weights(model: GPT, averager: WeightAverager, loader: TrainLoader, h: Hyperparameters,
                            runtime: Runtime, log: Logger) -> str:
    """Load the averaged weights unless the raw ones do better on AVERAGE_CHECK_SEQS unseen training sequences
    (averaging helps long runs, can lag very short ones). Returns what the model now holds: "raw", "ema" or "swa"."""
    if h.averaging == "none" or (h.averaging == "swa" and averager.snapshots == 0):
        return "raw"
    if h.average_check_seqs == 0:
        averager.copy_to(model)
        return h.averaging
    per_rank = max(1, h.average_check_seqs // runtime.world_size)
    batches = []
    while sum(x.size(0) for x, _ in batches) < per_rank:
        x, y = loader.next_batch()
        take = min(8, per_rank - sum(b.size(0) for b, _ in batches))
        batches.append((x[:take], y[:take]))
    raw_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    raw_loss = held_out_train_loss(model, batches, runtime)
    averager.copy_to(model)
    averaged_loss = held_out_train_loss(model, batches, runtime)
    keep_raw = raw_loss < averaged_loss
    if keep_raw:
        model.load_state_dict(raw_state)
    log(f"weights: {'raw' if keep_raw else h.averaging} (held-out train loss raw:{raw_loss:.4f} {h.averaging}:{averaged_loss:.4f})")
    log.metrics(event="weight_choice", chosen="raw" if keep_raw else h.averaging, raw_loss=raw_loss, averaged_loss=averaged_loss)
    return "raw" if keep_raw else h.averaging

def measure_calibration_seconds(model: GPT, h: Hyperparameters, runtime: Runtime) -> float:
    """The cost of the weight choice and GPTQ calibration after training, measured before the clock on random tokens (eager
    forwards, timed on their second run): 1.25 x the estimate + 1 s (loader reads, the averaged-weights copy)."""
    def timed(fn) -> float:
        for _ in range(2):
            t0 = synchronize(runtime)
            fn()
        return synchronize(runtime) - t0

    x = torch.randint(0, h.vocab_size, (h.gptq_calibration_seqs, h.train_seq_len), device=runtime.device)
    hessian_batch = timed(lambda: collect_hessians(model, [(x, x)], runtime))
    check_batch = timed(lambda: held_out_train_loss(model, [(x[:8], x[:8])], runtime))
    check_batches = math.ceil(max(1, h.average_check_seqs // runtime.world_size) / 8) if h.averaging != "none" and h.average_check_seqs else 0
    estimate = max(1, h.gptq_calibration_batches // runtime.world_size) * hessian_batch + 2 * check_batches * check_batch
    return 1.25 * estimate + 1.0

def calibration_batches(loader: TrainLoader, h: Hyperparameters, runtime: Runtime):
    """GPTQ_CALIBRATION_BATCHES batches of GPTQ_CALIBRATION_SEQS training sequences, split over ranks: 16 x 8 x 2048 =
    262k tokens by default (#1855's value, in issue 11's measured defaults), inside the training clock (X^T X: fp32, eager)."""
    for _ in range(max(1, h.gptq_calibration_batches // runtime.world_size)):
        x, y = loader.next_batch()
        yield x[: h.gptq_calibration_seqs], y[: h.gptq_calibration_seqs]

def random_documents(lengths: list[int], h: Hyperparameters) -> tuple[Tensor, Tensor]:
    """(tokens, target bytes): random ids, never validation data, in documents of the given target counts (a BOS each;
    the last target of each is the next BOS), one byte per target."""
    tokens = torch.randint(BOS_ID + 1, h.vocab_size, (sum(lengths) + 1,), generator=torch.Generator().manual_seed(h.seed))
    tokens[torch.tensor([0] + lengths[:-1]).cumsum(0)] = BOS_ID
    return tokens, torch.ones(tokens.numel() - 1, dtype=torch.int32)

def warm_up_evaluation(model: GPT, h: Hyperparameters, runtime: Runtime) -> dict[str, float]:
    """Run the final evaluation's stages once on random tokens, so that every graph compiles before the eval clock starts,
    as the records do (FRONTIER §5); the artifact's weights replace the model's afterwards. Every stage pads its forwards
    to fixed shapes, so these streams give them all: plain and sliding one full batch per rank, SGD TTT two chunks, LoRA
    TTT a batch per rank whose rows drop B -> B/4 -> ... -> MIN_ROWS at full windows, and global SGD. Returns the seconds
    of each part."""
    seconds, t0 = {}, time.perf_counter()

    def lap(part: str) -> None:
        nonlocal t0
        synchronize(runtime)
        seconds[part], t0 = time.perf_counter() - t0, time.perf_counter()
    windows = h.val_batch_tokens // h.eval_seq_len * runtime.world_size  # one full forward on every rank
    eval_plain(model, *random_documents([windows * h.eval_seq_len], h), h, runtime)
    lap("plain")
    if h.sliding_window_enabled:
        eval_sliding(model, *random_documents([windows * h.eval_stride + h.eval_seq_len], h), h, runtime)
        lap("sliding")
    if h.ttt_enabled and h.ttt_mode == "sgd":
        eval_ttt(model, *random_documents([2 * h.ttt_chunk_tokens], h), h, runtime)
        lap("sgd_ttt")
    elif h.ttt_enabled:
        lengths, rows, extra = [], h.ttt_batch_docs, 2  # each group ends two chunks after the one before it
        while rows > MIN_ROWS:
            lengths += [h.ttt_window + extra * h.ttt_chunk_size] * (rows - max(MIN_ROWS, rows // 4))
            rows, extra = max(MIN_ROWS, rows // 4), extra + 2
        tokens, target_bytes = random_documents(lengths + [h.ttt_window + extra * h.ttt_chunk_size] * rows, h)
        docs = document_spans(tokens)
        tokens, target_bytes, tilt, totals = scoring_inputs(tokens, target_bytes, h, runtime)
        model.requires_grad_(False)
        with looping_enabled(model):
            lora_ttt_batch(model, tokens, target_bytes, docs, DocumentLoRA(h, h.virtual_layers, runtime.device, h.seed), h,
                           totals, tilt)
            lap("lora")
            if h.ttt_mode == "lora_phased":
                global_sgd(model, tokens, docs, h, runtime)
                lap("global_sgd")
        model.requires_grad_(True)
    return seconds

def evaluate_artifact(path: str, h: Hyperparameters, runtime: Runtime, log: Logger, backend: str,
                      val_tokens: Tensor, val_target_bytes: Tensor) -> tuple[EvalResult, dict]:
    """Score an artifact file as the rules count it: the eval clock runs from reading the file to the last score of
    plain, sliding, TTT (last: it changes the weights). Compilation runs before it, on random tokens (warm_up_evaluation).
    Returns (final result, timing fields for the final event)."""
    read_artifact(path)  # a bad path fails now, not after the warm-up
    model = build_model(h, runtime, backend)
    warmup_seconds = 0.0
    if compile_model(model, h, runtime, dynamic=None if h.ttt_enabled and h.ttt_mode != "sgd" else False) != "none":
        parts = warm_up_evaluation(model, h, runtime)
        warmup_seconds = sum(parts.values())
        log(f"eval warm-up (compile on random tokens, before the eval clock): {warmup_seconds:.1f}s ("
            + ", ".join(f"{part} {t:.1f}s" for part, t in parts.items()) + ")")
    t0 = synchronize(runtime)
    _, blob = read_artifact(path)
    load_artifact(blob, model)
    result = log_eval(log, eval_plain(model, val_tokens, val_target_bytes, h, runtime, stage="quantized"))
    if h.sliding_window_enabled:
        result = log_eval(log, eval_sliding(model, val_tokens, val_target_bytes, h, runtime, stage="quantized_sliding"))
    if h.ttt_enabled:
        ttt = eval_ttt if h.ttt_mode == "sgd" else eval_lora_ttt
        result = log_eval(log, ttt(model, val_tokens, val_target_bytes, h, runtime, log=log, stage="quantized_ttt"))
    eval_seconds = synchronize(runtime) - t0
    on_record_hardware = runtime.world_size == 8 and runtime.device.type == "cuda"
    # Fewer ranks: a linear-scaling projection to 8 GPUs (labelled as such, never a measurement).
    projected = eval_seconds if on_record_hardware else eval_seconds * runtime.world_size / 8
    where = f"{runtime.world_size} GPU(s)" if runtime.device.type == "cuda" else f"{runtime.world_size} CPU process(es)"
    label = "" if on_record_hardware else f" (measured on {where}; 8-GPU projection: {projected:.1f}s)"
    over = " OVER THE 600s LIMIT" if projected > EVAL_LIMIT_SECONDS else ""
    log(f"total eval time: {eval_seconds:.1f}s of the {EVAL_LIMIT_SECONDS:.0f}s budget{label}{over}")
    return result, dict(eval_time_s=eval_seconds, eval_warmup_s=warmup_seconds, eval_time_8gpu_s=projected,
                        eval_time_projected=not on_record_hardware, eval_over_budget=projected > EVAL_LIMIT_SECONDS)

def git_commit(folder: Path) -> str | None:
    """The checkout's commit (with '+dirty' when files differ), for reproducing a run from its log."""
    try:
        commit = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode:
        return None
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")

def run(h: Hyperparameters, runtime: Runtime, log: Logger, run_id: str) -> None:
    source = read_script_source()  # the readable file, or the shipped copy's own source
    log(source, console=False)  # the log reproduces the run
    log(f"run_id:{run_id} python:{sys.version.split()[0]} torch:{torch.__version__} device:{runtime.device}"
        + (f" ({torch.cuda.get_device_name(runtime.device)})" if runtime.device.type == "cuda" else ""))
    log("\n".join(f"  {name}={value}" for name, value in h.as_dict().items()))
    unavailable: list[str] = []
    backend = select_attention_backend(runtime.device, unavailable, h.doc_masked_attention_enabled)
    log(f"attention_backend:{backend} kernels:{kernel_path(h, runtime.device)}"
        + "".join(f"\n  attention {reason}" for reason in unavailable))

    tokenizer_file = h.tokenizer_file
    log(f"dataset:{h.dataset_dir} tokenizer:{tokenizer_file}")
    sp = load_tokenizer(tokenizer_file, h.vocab_size)
    caseops = is_caseops(sp, read_dataset_manifest(h.dataset_dir))
    val_tokens = load_validation_tokens(h.dataset_dir, h.vocab_size)
    val_target_bytes = validation_target_bytes(h.dataset_dir, val_tokens, build_byte_tables(sp, h.vocab_size), caseops, log)
    provenance = dataset_provenance(h, val_tokens)  # before VAL_MAX_TOKENS: the split as built
    log(f"data_provenance: {json.dumps(provenance)}")
    if h.val_max_tokens and val_tokens.numel() > h.val_max_tokens:
        val_tokens, val_target_bytes = val_tokens[: h.val_max_tokens], val_target_bytes[: h.val_max_tokens - 1]
        log(f"WARNING: VAL_MAX_TOKENS={h.val_max_tokens}: scoring a prefix of the validation set; not a comparable score")
    val_bytes = int(val_target_bytes.sum(dtype=torch.int64))
    log(f"val_tokens:{val_tokens.numel()} val_bytes:{val_bytes}")
    val_target_bytes = val_target_bytes.to(runtime.device)

    model = build_model(h, runtime, backend)
    num_params = sum(p.numel() for p in model.parameters())
    log(f"model_params:{num_params}")
    micro_seqs, grad_accum_steps = batch_layout(h, runtime)
    log.metrics(event="config", **h.as_dict(), world_size=runtime.world_size, grad_accum_steps=grad_accum_steps,
                device_name=torch.cuda.get_device_name(runtime.device) if runtime.device.type == "cuda" else "cpu",
                torch_version=torch.__version__, python_version=sys.version.split()[0],
                attention_backend=backend, num_params=num_params, data_provenance=provenance, git_commit=git_commit(Path(__file__).resolve().parent))
    final = dict(event="final", status="ok", error=None, world_size=runtime.world_size, train_time_s=0.0)

    if h.eval_only:
        result, timing = evaluate_artifact(h.eval_only, h, runtime, log, backend, val_tokens, val_target_bytes)
        final.update(val_loss=result.loss, val_bpb=result.bpb, final_stage=result.stage, **timing,
                     total_bytes=os.path.getsize(h.eval_only), artifact_path=h.eval_only)
        log.metrics(**final)
        return

    train_files = list_shards(h.dataset_dir, "train")
    log.metrics(event="data", val_tokens=val_tokens.numel(), val_bytes=val_bytes,
                train_tokens=sum(read_shard(f).size for f in train_files), train_shards=len(train_files))
    log(f"compile:{compile_model(model, h, runtime)}")
    artifact_dir = Path(h.log_dir or ".")
    weights_path = artifact_dir / f"final_model.{run_id}.pt"
    if h.requantize_from:  # the saved averaged weights replace training; only calibration reads training data
        model.load_state_dict(read_saved_weights(h.requantize_from)[1])
        log(f"weights: {h.requantize_from} (REQUANTIZE_FROM; no training)")
        loader = TrainLoader(train_files, h.train_seq_len, micro_seqs, grad_accum_steps, runtime, h.seed, h.vocab_size)
        training_seconds, chosen = 0.0, "saved"
    else:
        loader, averager, training_seconds = train(model, h, runtime, log, val_tokens, val_target_bytes)
        log_eval(log, eval_plain(model, val_tokens, val_target_bytes, h, runtime, stage="pre_average"))
    # Choosing the weights and GPTQ calibration read training data: they count toward the train time.
    t0 = synchronize(runtime)
    if not h.requantize_from:
        chosen = choose_averaged_weights(model, averager, loader, h, runtime, log)
    hessians = collect_hessians(model, calibration_batches(loader, h, runtime), runtime)
    calibration_seconds = synchronize(runtime) - t0
    loader.close()
    log_timing(log, "weight_choice_and_gptq_calibration", calibration_seconds)
    if chosen in ("ema", "swa"):  # raw weights were already scored as pre_average
        log_eval(log, eval_plain(model, val_tokens, val_target_bytes, h, runtime, stage=f"post_{chosen}"))
    if runtime.is_main and not h.requantize_from:  # for REQUANTIZE_FROM: re-sweep quantization without retraining
        torch.save({"config": h.artifact_config(("model",)), "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}},
                   weights_path)
    train_time_s = training_seconds + calibration_seconds
    train_over_budget = h.max_wallclock_seconds > 0 and train_time_s > h.max_wallclock_seconds
    log(f"train time incl. weight choice and GPTQ calibration: {train_time_s:.1f}s (budget {h.max_wallclock_seconds:.0f}s)"
        + (" OVER THE BUDGET: not a compliant run" if train_over_budget else ""))
    final.update(train_time_s=train_time_s, train_budget_s=h.max_wallclock_seconds or None, train_over_budget=train_over_budget)

    shipped_code = build_submission_code(source)
    shipped_code_path = artifact_dir / f"{run_id}_train_gpt.py"
    config = h.artifact_config()
    reserved = len(shipped_code) + len(pack_artifact(config, b""))
    # Quantization is deterministic: rank 0 does it (compression uses every CPU core) and shares the blob.
    blob, report = runtime.comm.broadcast_object(quantize_and_pack(model, hessians, h, reserved, log) if runtime.is_main else None)
    artifact = pack_artifact(config, blob)
    artifact_path = artifact_dir / f"final_model.{run_id}.ptz"
    if runtime.is_main:
        shipped_code_path.write_bytes(shipped_code)
        artifact_path.write_bytes(artifact)
    if runtime.comm.active:
        dist.barrier()  # every rank reads the artifact file back for evaluation
    total_bytes = len(artifact) + len(shipped_code)
    log(f"model bytes: {len(artifact)}  code bytes: {len(shipped_code)}")
    log(f"Total submission size (model + code): {total_bytes} bytes; margin to {ARTIFACT_LIMIT_BYTES:,}: {ARTIFACT_LIMIT_BYTES - total_bytes} bytes")
    log.metrics(event="artifact", model_bytes=len(artifact), code_bytes=len(shipped_code), total_bytes=total_bytes,
                limit_bytes=ARTIFACT_LIMIT_BYTES, compressor=h.compressor, report=report)
    final.update(total_bytes=total_bytes, artifact_path=str(artifact_path), shipped_code_path=str(shipped_code_path),
                 weights_path=None if h.requantize_from else str(weights_path))
    if total_bytes > ARTIFACT_LIMIT_BYTES:
        raise ArtifactBudgetError(f"artifact is {total_bytes} bytes, over the {ARTIFACT_LIMIT_BYTES} limit: "
                                  f"lower ARTIFACT_TARGET_BYTES or MATRIX_BITS")

    result, timing = evaluate_artifact(str(artifact_path), h, runtime, log, backend, val_tokens, val_target_bytes)
    final.update(val_loss=result.loss, val_bpb=result.bpb, final_stage=result.stage, **timing)
    if runtime.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(runtime.device) / 2**20
        log(f"peak memory allocated: {peak:.0f} MiB reserved: {torch.cuda.max_memory_reserved(runtime.device) / 2**20:.0f} MiB")
        final["peak_memory_mib"] = peak
    log.metrics(**final)

def print_knobs() -> None:
    """`python train_gpt.py --help`: every knob with its type, default and meaning (the README's table)."""
    saved = dict(os.environ)
    try:
        os.environ.clear()  # defaults, whatever the caller's environment holds
        Hyperparameters()
    finally:
        os.environ.update(saved)
    print(__doc__.strip().split("\n\n")[0])
    print("\nEvery knob is an env var, e.g. SEED=42 torchrun --standalone --nproc_per_node=8 train_gpt.py\n")
    section = None
    for knob in CONFIG_REGISTRY.values():
        if knob.section != section:
            section = knob.section
            print(f"[{section}]")
        print(f"  {knob.name:<28} {knob.kind:<5} default {knob.default!r:<12} {knob.help}")

def check_fits_machine(h: Hyperparameters) -> None:
    """Without a GPU, refuse up front a config whose activations cannot fit in memory, instead of running until the kernel kills it."""
    if torch.cuda.is_available():
        return
    tokens = min(h.micro_batch_seqs, h.train_batch_tokens // h.train_seq_len) * h.train_seq_len
    # ~20 fp32 activations of width d saved per virtual layer and token, plus logits and their gradient.
    need = tokens * 4 * (20 * h.model_dim * h.virtual_layers + 3 * h.vocab_size)
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > 0.8 * have:
        raise ConfigError(f"no GPU, and one micro-batch of this config needs ~{need / 2**30:.0f} GiB of the machine's "
                          f"{have / 2**30:.0f} GiB: for a CPU smoke run use `bash run.sh` (its CPU config), or lower "
                          "MICRO_BATCH_SEQS/TRAIN_SEQ_LEN/MODEL_DIM")

def load_config() -> Hyperparameters:
    """The knobs; EVAL_ONLY / REQUANTIZE_FROM: model (EVAL_ONLY: also quantization) knobs from that file, checked before any data."""
    h = Hyperparameters()
    if h.eval_only:
        h = Hyperparameters(fixed=read_artifact(h.eval_only)[0])
    elif h.requantize_from:
        h = Hyperparameters(fixed=read_saved_weights(h.requantize_from)[0])
    check_fits_machine(h)
    return h

def failure_text(e: Exception, h: Hyperparameters) -> str:
    """One line for the error; a collective that waited past DIST_TIMEOUT_SECONDS says so in words (gloo's own
    text varies: 'Timed out waiting ...', 'Application timeout caused pair closure')."""
    text = f"{type(e).__name__}: " + " ".join(str(e).split())
    if isinstance(e, RuntimeError) and any(word in text.lower() for word in ("timed out", "timeout")):
        return (f"a collective timed out after DIST_TIMEOUT_SECONDS={h.dist_timeout_seconds:g} s (another rank hung "
                f"or died: its log says why; raise DIST_TIMEOUT_SECONDS if it is only slow): {text}")
    return text

def main() -> None:
    if any(arg in ("-h", "--help") for arg in sys.argv[1:]):
        print_knobs()
        return
    try:
        h = load_config()
    except (ConfigError, ArtifactError) as e:
        print(f"{'config' if isinstance(e, ConfigError) else 'artifact'} error: {e}", file=sys.stderr)
        sys.exit(2)
    runtime = setup_distributed(h.dist_timeout_seconds)
    # Every rank must agree on the run id (file names).
    run_id = runtime.comm.broadcast_object(h.run_id or time.strftime("%Y%m%d_%H%M%S") + "_" + uuid.uuid4().hex[:6])
    log = Logger(runtime, h.log_dir, run_id)
    try:
        run(h, runtime, log, run_id)
    except Exception as e:
        where = f"rank {runtime.rank}: " if runtime.world_size > 1 else ""
        line, first = runtime.comm.first_failure(where + failure_text(e, h))
        if first and not isinstance(e, (ConfigError, DataError, TrainingDiverged, ArtifactBudgetError, ArtifactError)):
            traceback.print_exc()  # a bug, not a known failure: keep its traceback
        print(f"FAILED: {line}", file=sys.stderr, flush=True)
        log.enabled = first  # the rank that failed first (any rank) writes the failure into the run's log
        log(f"FAILED: {line}", console=False)
        log.metrics(event="final", status="failed", error=line, world_size=runtime.world_size)
        sys.stdout.flush()
        # Leave without tearing the process group down: a peer stuck in a collective would hang the teardown.
        # torchrun then stops the other ranks; a rank left waiting without it fails after DIST_TIMEOUT_SECONDS.
        os._exit(1)
    if dist.is_initialized():
        # Every result is written (the logger closes its files per line). Leave without tearing gloo/NCCL down:
        # that teardown aborted a finished rank now and then (SIGABRT in the 4-rank CPU test).
        dist.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

if __name__ == "__main__":
    main()
