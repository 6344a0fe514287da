#!/usr/bin/env bash
# run.sh: the whole job in one command: packages -> data -> train + quantize + evaluate -> records folder.
#
#   bash run.sh        with GPUs: the record config on all visible GPUs (torchrun);
#                      without:   a small CPU smoke config that finishes in minutes
#   bash run.sh test   the test suite (python -m pytest -q tests)
#
# Every train_gpt.py knob is an env var and passes straight through (README.md lists them all), e.g.
#   SEED=42 RUN_ID=seed42 bash run.sh
# run.sh's own variables (data preparation only):
#   DOCS=path          build the dataset from local .jsonl[.xz|.gz|.zst] documents ({"text": ...} per line)
#                      instead of downloading FineWeb
#   VAL_DOCS=N         with DOCS: the first N documents are validation (default 50000; CPU smoke 100)
#   TOKENIZER_DOCS=K   with DOCS: train the tokenizer on K documents (default: prepare_docs.py's; CPU smoke 5000)
#   CASEOPS=1          with DOCS: build the case-operator variant (DATASET=docs_sp{V}_caseops); default 0
#   TRAIN_SHARDS=N     FineWeb training shards to download (default 80; CPU smoke 1)
# With DOCS the dataset is DATA_DIR/datasets/docs_sp{V}[_caseops] (exported as DATASET); one already there
# is reused only when its manifest.json matches DOCS/VAL_DOCS/TOKENIZER_DOCS/TOKENIZER_PATH/CASEOPS.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

say() { printf '\n==> %s\n' "$*"; }
warn() { printf 'run.sh: warning: %s\n' "$*" >&2; }
die() { printf 'run.sh: error: %s\n' "$*" >&2; exit 1; }
# Export NAME=VALUE unless the user already set NAME.
default() { if [ -z "${!1:-}" ]; then export "$1=$2"; fi; }

PY=$(command -v python || command -v python3) || die "python not found; install Python 3.10+ and rerun"

# Prints the number of usable GPUs; fails when a required package is missing.
probe_machine() {
  "$PY" -c 'import numpy, sentencepiece, zstandard, brotli, huggingface_hub, torch
print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null
}

install_packages() {
  say "packages: some are missing; pip install -r requirements.txt"
  "$PY" -m pip install -r requirements.txt ||
    die "pip install -r requirements.txt failed; install torch for your machine (pytorch.org) and rerun"
}

cpu_count() { "$PY" -c 'import os; print(os.cpu_count() or 1)'; }
abs_path() { "$PY" -c 'import os, sys; print(os.path.realpath(sys.argv[1]))' "$1"; }

# A tiny model and short budget so the whole CPU pipeline (train, GPTQ, every eval stage) takes minutes.
cpu_smoke_defaults() {
  default VOCAB_SIZE 1024
  default NUM_LAYERS 3; default MODEL_DIM 64; default NUM_HEADS 2; default NUM_KV_HEADS 1; default MLP_MULT 2
  default XSA_LAST_N 3; default LOOP_START 1; default LOOP_END 1; default NUM_LOOPS 1; default PARALLEL_START 2
  default TRAIN_SEQ_LEN 256; default EVAL_SEQ_LEN 256; default TRAIN_BATCH_TOKENS 8192; default MICRO_BATCH_SEQS 16
  default VAL_BATCH_TOKENS 16384; default EVAL_STRIDE 128
  # The weight choice and GPTQ calibration count toward the 90 s, after a last training step that may
  # overshoot: keep them small and reserve 20 s (a 2-core machine shared with other jobs took 16-19 s for
  # them). There a step can take 20 s too; a run over its budget is flagged in its record.
  default MAX_WALLCLOCK_SECONDS 90; default GPTQ_RESERVE_SECONDS 20; default WARMUP_STEPS 1
  default AVERAGE_CHECK_SEQS 8; default GPTQ_CALIBRATION_BATCHES 2
  default MUON_MOMENTUM_WARMUP_STEPS 50; default EMA_DECAY 0.95; default TRAIN_LOG_EVERY 10
  default TTT_CHUNK_TOKENS 8192; default TTT_EPOCHS 1
  default RUN_ID "smoke_cpu_$(date +%Y%m%d_%H%M%S)"
  default VAL_DOCS 100; default TOKENIZER_DOCS 5000; default TRAIN_SHARDS 1
  # Every eval stage reads the whole validation split; FineWeb's 50,000 documents take hours on CPU, so
  # a FineWeb smoke run scores a prefix (its record says so: full_validation_set = no).
  if [ -z "${DOCS:-}" ]; then default VAL_MAX_TOKENS 150000; fi
}

gpu_defaults() {
  default VOCAB_SIZE 8192   # train_gpt.py's default, repeated here because run.sh needs the data path
  default RUN_ID "run_$(date +%Y%m%d_%H%M%S)"
  default VAL_DOCS 50000; default TRAIN_SHARDS 80
}

dataset_dir() { printf '%s/datasets/%s' "$DATA_DIR" "$DATASET"; }

# The tokenizer train_gpt.py will read: TOKENIZER_PATH, else the one the dataset's manifest names, else FineWeb's.
tokenizer_file() {
  if [ -n "${TOKENIZER_PATH:-}" ]; then printf '%s' "$TOKENIZER_PATH"; return; fi
  "$PY" -c 'import json, os, sys
manifest = os.path.join(sys.argv[1], "datasets", sys.argv[2], "manifest.json")
named = json.load(open(manifest)).get("tokenizer", {}).get("file") if os.path.isfile(manifest) else None
print(os.path.join(sys.argv[1], named or "tokenizers/fineweb_%s_bpe.model" % sys.argv[3]))' "$DATA_DIR" "$DATASET" "$VOCAB_SIZE"
}

data_ready() {
  compgen -G "$(dataset_dir)/fineweb_val_*.bin" >/dev/null &&
    compgen -G "$(dataset_dir)/fineweb_train_*.bin" >/dev/null &&
    [ -f "$(tokenizer_file)" ]
}

# With DOCS, the dataset is named by what it is built from: docs_sp{V}, or docs_sp{V}_caseops with CASEOPS=1.
choose_dataset() {
  if [ -z "${DOCS:-}" ]; then default DATASET "fineweb10B_sp$VOCAB_SIZE"; return; fi
  [ -e "$DOCS" ] || die "DOCS=$DOCS does not exist; point it at a .jsonl[.xz|.gz|.zst] file of {\"text\": ...} documents"
  [[ "$VAL_DOCS" =~ ^[0-9]+$ ]] || die "VAL_DOCS=$VAL_DOCS must be a whole number of documents"
  [[ "${TOKENIZER_DOCS:-1}" =~ ^[0-9]+$ ]] || die "TOKENIZER_DOCS=$TOKENIZER_DOCS must be a whole number of documents"
  [ -z "${TOKENIZER_PATH:-}" ] || [ -f "$TOKENIZER_PATH" ] || die "TOKENIZER_PATH=$TOKENIZER_PATH does not exist; point it at a sentencepiece .model or unset it"
  local name="docs_sp$VOCAB_SIZE"
  case "${CASEOPS:-0}" in
    0) ;;
    1) name+=_caseops ;;
    *) die "CASEOPS=$CASEOPS must be 0 or 1" ;;
  esac
  if [ -n "${DATASET:-}" ] && [ "$DATASET" != "$name" ]; then
    die "DATASET=$DATASET and DOCS are both set, but DOCS builds $name; unset DATASET (or set DATASET=$name)"
  fi
  export DATASET=$name
}

# An existing DOCS dataset is reused only when its manifest.json says it was built from the settings asked
# for; otherwise this prints one line naming each differing setting (nothing when all agree). Unset
# TOKENIZER_DOCS/TOKENIZER_PATH are not compared. A mismatch stops the run instead of rebuilding, because a
# rebuild would silently replace data that earlier runs (and their records) used.
dataset_differences() {
  "$PY" - "$(dataset_dir)" <<'PYTHON'
import hashlib, json, os, sys

folder = sys.argv[1]
fix = f"delete it to rebuild it (rm -r {folder}), or use another DATA_DIR"
path = os.path.join(folder, "manifest.json")
if not os.path.isfile(path):
    sys.exit(print(f"{folder} has no manifest.json, so what it was built from is unknown; {fix}"))
manifest = json.load(open(path))

def sha256(file):
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

env = os.environ.get
tokenizer = manifest.get("tokenizer", {})
differ = []  # (setting, value it was built with, value asked for)
source = manifest.get("source", {})
if source.get("sha256"):
    asked = sha256(env("DOCS"))
    if asked != source["sha256"]:
        differ.append(("DOCS", f"{source.get('path')} (sha256 {source['sha256'][:12]})", f"{env('DOCS')} (sha256 {asked[:12]})"))
elif os.path.realpath(env("DOCS")) != os.path.realpath(source.get("path", "")):
    differ.append(("DOCS", source.get("path"), env("DOCS")))
differ.append(("VAL_DOCS", manifest.get("val_docs"), int(env("VAL_DOCS"))))
differ.append(("CASEOPS", int(bool(manifest.get("caseops"))), int(env("CASEOPS") or 0)))
if env("TOKENIZER_PATH"):
    asked = sha256(env("TOKENIZER_PATH"))
    differ.append(("TOKENIZER_PATH", f"a tokenizer with sha256 {tokenizer.get('sha256', '?')[:12]}", f"{env('TOKENIZER_PATH')} (sha256 {asked[:12]})")
                  if asked != tokenizer.get("sha256") else None)
elif env("TOKENIZER_DOCS"):
    differ.append(("TOKENIZER_DOCS", manifest.get("tokenizer_docs") or "none (a given tokenizer)", int(env("TOKENIZER_DOCS"))))
differ = [d for d in differ if d and d[1] != d[2]]
if differ:
    print(f"{folder} was built with " + ", ".join(f"{name}={built}" for name, built, _ in differ) + " (its manifest.json), not "
          + ", ".join(f"{name}={asked}" for name, _, asked in differ) + f"; rerun with the values it was built with, or {fix}")
PYTHON
}

check_docs_dataset() {
  local differences
  differences=$(dataset_differences) || die "could not read $(dataset_dir)/manifest.json (message above); delete that folder to rebuild it"
  if [ -n "$differences" ]; then die "$differences"; fi
}

build_from_docs() {
  local args=(--docs "$DOCS" --vocab-size "$VOCAB_SIZE" --val-docs "$VAL_DOCS" --out "$DATA_DIR" --workers "$(cpu_count)")
  if [ -n "${TOKENIZER_DOCS:-}" ]; then args+=(--tokenizer-docs "$TOKENIZER_DOCS"); fi
  if [ -n "${TOKENIZER_PATH:-}" ]; then args+=(--tokenizer "$TOKENIZER_PATH"); fi
  if [ "${CASEOPS:-0}" = 1 ]; then args+=(--caseops); fi
  say "data: building $(dataset_dir) from $DOCS: python data/prepare_docs.py ${args[*]}"
  "$PY" data/prepare_docs.py "${args[@]}" || die "data/prepare_docs.py failed (message above); fix DOCS or its options and rerun"
}

# Returns non-zero (after saying why) when FineWeb cannot be fetched.
download_fineweb() {
  if [ ! -f data/cached_challenge_fineweb.py ]; then
    warn "data/cached_challenge_fineweb.py is missing, so FineWeb cannot be downloaded"
    return 1
  fi
  if [ "$(abs_path "$DATA_DIR")" != "$(abs_path data)" ]; then
    warn "the FineWeb download writes to ./data, but DATA_DIR=$DATA_DIR"
    return 1
  fi
  say "data: downloading FineWeb sp$VOCAB_SIZE ($TRAIN_SHARDS train shards) into ./data"
  "$PY" data/cached_challenge_fineweb.py --variant "sp$VOCAB_SIZE" --train-shards "$TRAIN_SHARDS"
}

prepare_data() {
  choose_dataset
  if [ -n "${DOCS:-}" ] && [ -d "$(dataset_dir)" ]; then check_docs_dataset; fi
  if data_ready; then
    say "data: using $(dataset_dir) and $(tokenizer_file)"
  elif [ -n "${DOCS:-}" ]; then
    build_from_docs
  elif ! download_fineweb; then
    die "no training data: $(dataset_dir) has no shards and FineWeb could not be downloaded. Do one of: make huggingface.co reachable and rerun; or build from local documents: DOCS=path/to/docs.jsonl.xz bash run.sh; or point DATA_DIR at a folder holding datasets/ and tokenizers/"
  fi
  data_ready || die "data preparation ended but $(dataset_dir)/fineweb_{train,val}_*.bin or $(tokenizer_file) is missing; see the messages above"
}

# On CPU every eval stage reads the whole validation split (or its first VAL_MAX_TOKENS); say so when that is large.
note_cpu_val_size() {
  local tokens
  tokens=$("$PY" -c 'import glob, os, sys; print(sum((os.path.getsize(f) - 1024) // 2 for f in glob.glob(sys.argv[1] + "/fineweb_val_*.bin")))' "$(dataset_dir)")
  if [ "${VAL_MAX_TOKENS:-0}" -gt 0 ] && [ "$VAL_MAX_TOKENS" -lt "$tokens" ]; then tokens=$VAL_MAX_TOKENS; fi
  if [ "$tokens" -gt 5000000 ]; then
    warn "$tokens validation tokens: evaluating them on CPU takes hours; for a smoke run use a small split: DOCS=docs.jsonl.xz VAL_DOCS=100 bash run.sh"
  fi
}

train() {
  local ngpu=$1
  if [ "$ngpu" -gt 0 ]; then
    say "train: torchrun --standalone --nproc_per_node=$ngpu train_gpt.py (RUN_ID=$RUN_ID)"
    "$PY" -m torch.distributed.run --standalone --nproc_per_node="$ngpu" train_gpt.py ||
      die "training failed; see $LOG_DIR/$RUN_ID.txt"
  else
    say "train: no GPU, CPU smoke config: python train_gpt.py (RUN_ID=$RUN_ID, ${MAX_WALLCLOCK_SECONDS} s budget)"
    "$PY" train_gpt.py || die "training failed; see $LOG_DIR/$RUN_ID.txt"
  fi
}

make_record() {
  say "records: python records/make_record.py --log $LOG_DIR/$RUN_ID.jsonl"
  "$PY" records/make_record.py --log "$LOG_DIR/$RUN_ID.jsonl" || die "records/make_record.py refused the run (reason above)"
}

main() {
  case "${1:-}" in
    "") ;;
    test) exec "$PY" -m pytest -q tests ;;
    *) die "unknown argument '$1'; use: bash run.sh [test]" ;;
  esac
  local ngpu
  if ngpu=$(probe_machine); then
    say "packages: everything in requirements.txt imports"
  else
    install_packages
    ngpu=$(probe_machine) || die "packages still missing after the install; run: $PY -c 'import torch, sentencepiece' to see why"
  fi
  if [ "$ngpu" -gt 0 ]; then gpu_defaults; else cpu_smoke_defaults; fi
  default DATA_DIR ./data
  default LOG_DIR logs
  say "run.sh: $ngpu GPU(s), RUN_ID=$RUN_ID, DATA_DIR=$DATA_DIR, VOCAB_SIZE=$VOCAB_SIZE"
  prepare_data
  if [ "$ngpu" -eq 0 ]; then note_cpu_val_size; fi
  train "$ngpu"
  make_record
  say "done: logs in $LOG_DIR/$RUN_ID.txt, record folder above"
}

# Sourcing run.sh (tests do) defines the functions without running the job.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then main "$@"; fi
