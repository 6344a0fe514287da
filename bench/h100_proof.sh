#!/usr/bin/env bash
# GPU proof on one H100, in one command (issue 7): install the carried wheels, build sp8192 shards
# from the carried dev corpus with the same split as ../shared/REFERENCE.md (first 2,000 documents
# are validation), then run train_gpt.py through training, GPTQ, packing and every eval stage.
#
#   Needs in the repo (git-ignored, carried): .corpus/docs.jsonl.xz, .corpus/fineweb_8192_bpe.model,
#   and .whl/ with brotli + zstandard wheels for the box's Python.
#   SETTING=C (default): TRAIN_BATCH_TOKENS=98304, 200 s budget, SEED=42 (REFERENCE.md run C)
#   SETTING=A:           TRAIN_BATCH_TOKENS=786432, 200 s budget, SEED=42 (REFERENCE.md run A)
#   CASEOPS=1:           the CaseOps variant (FRONTIER §6): dataset docs_sp8192_caseops, its sp8192
#                        tokenizer trained on the box on the transformed corpus (about 15 s), bytes
#                        from the side-car. Default: dataset docs_sp8192 with the carried FineWeb tokenizer.
#   TRAIN_TOKENIZER=1:   plain sp8192, but with a tokenizer trained on the dev corpus as CaseOps's is
#                        (the fair baseline for CASEOPS=1); its data goes to /tmp/proof_data_dev_tokenizer.
#   Any train_gpt.py env var set by the caller wins, except DATASET (set above). Logs go to $OUT (or ./logs).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-logs}
mkdir -p "$OUT"

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

build_args=(--docs .corpus/docs.jsonl.xz --vocab-size 8192 --val-docs 2000 --workers "$(nproc)")
if [ "${CASEOPS:-0}" = 1 ]; then
  DATA=${PROOF_DATA_DIR:-/tmp/proof_data} DATASET=docs_sp8192_caseops
  build_args+=(--caseops)
elif [ "${TRAIN_TOKENIZER:-0}" = 1 ]; then
  DATA=${PROOF_DATA_DIR:-/tmp/proof_data_dev_tokenizer} DATASET=docs_sp8192
else
  DATA=${PROOF_DATA_DIR:-/tmp/proof_data} DATASET=docs_sp8192
  build_args+=(--tokenizer .corpus/fineweb_8192_bpe.model)
fi
if [ ! -f "$DATA/datasets/$DATASET/manifest.json" ]; then
  t0=$(date +%s)
  python3 data/prepare_docs.py "${build_args[@]}" --out "$DATA" 2> "$OUT/prepare_docs.log" || { tail -5 "$OUT/prepare_docs.log"; exit 1; }
  echo "data build ($DATASET): $(( $(date +%s) - t0 )) s"
  grep -E "tokenizer trained|^\[prepare_docs\] (val|train):|built in" "$OUT/prepare_docs.log" || true
fi

case "${SETTING:-C}" in
  C) export TRAIN_BATCH_TOKENS=${TRAIN_BATCH_TOKENS:-98304} ;;
  A) export TRAIN_BATCH_TOKENS=${TRAIN_BATCH_TOKENS:-786432} ;;
  *) echo "SETTING must be A or C" >&2; exit 2 ;;
esac
export DATA_DIR=$DATA DATASET MAX_WALLCLOCK_SECONDS=${MAX_WALLCLOCK_SECONDS:-200} SEED=${SEED:-42} VAL_LOSS_EVERY=${VAL_LOSS_EVERY:-0}
export LOG_DIR=$OUT RUN_ID=${RUN_ID:-proof_${SETTING:-C}_${DATASET}_seed${SEED}}
t0=$(date +%s)
python3 train_gpt.py > "$OUT/console.txt" 2>&1 || { tail -30 "$OUT/console.txt"; exit 1; }
echo "whole pipeline: $(( $(date +%s) - t0 )) s"
grep -E "^(bytes:|val_tokens:|WARNING|step:[0-9]+/|looping:on|stopped|timing|pre_average|post_|quantized|model bytes|Total submission|total eval|peak memory|train time)" "$OUT/console.txt" | grep -v "chunk:" | tail -40
