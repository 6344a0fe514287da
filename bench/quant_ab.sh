#!/usr/bin/env bash
# LQER / AWQ-lite A/B on one trained model (issue 15, items 1-2), no training: each arm quantizes the
# saved averaged weights again (REQUANTIZE_FROM; the GPTQ Hessians read the training data, so the
# dataset bench/h100_proof.sh builds must be there) to the same byte target, then scores the reloaded
# artifact plainly (TTT and sliding window off). Equal bytes come from the budget search: every arm
# fills the same target, so a lower quantized bpb means the arm spent the bytes better.
#
#   WEIGHTS=logs/final_model.<RUN_ID>.pt bash bench/quant_ab.sh          # arms: off lqer awq both
#   ARMS="off both" COMPRESSOR=rans WEIGHTS=... bash bench/quant_ab.sh   # any train_gpt.py knob passes through
#
# Prints one row per arm: quantized plain bpb, model/total bytes, budget-search rounds, LQER's tensors
# and AWQ-lite's group (from $OUT/ab_<arm>.jsonl; the full quant: lines are in $OUT/ab_<arm>.txt; OUT defaults to logs).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
: "${WEIGHTS:?set WEIGHTS to the final_model.<RUN_ID>.pt of a finished run}"
export OUT=${OUT:-logs} REQUANTIZE_FROM=$WEIGHTS TTT_ENABLED=0 SLIDING_WINDOW_ENABLED=0
for arm in ${ARMS:-off lqer awq both}; do
  case $arm in
    off) lqer=0 awq=0 ;; lqer) lqer=1 awq=0 ;; awq) lqer=0 awq=1 ;; both) lqer=1 awq=1 ;;
    *) echo "ARMS: unknown arm '$arm' (off, lqer, awq, both)" >&2; exit 2 ;;
  esac
  echo "== arm $arm (LQER_ENABLED=$lqer AWQ_LITE_ENABLED=$awq)"
  RUN_ID=ab_$arm LQER_ENABLED=$lqer AWQ_LITE_ENABLED=$awq bash bench/h100_proof.sh | grep -E "^(quantized|Total submission|whole)" \
    || { tail -20 "$OUT/console.txt"; exit 1; }
done
python3 - "$OUT" ${ARMS:-off lqer awq both} <<'EOF'
import json, sys
print("| arm | quantized bpb | model bytes | total bytes | rounds | LQER tensors | AWQ-lite group |\n|---|---|---|---|---|---|---|")
for arm in sys.argv[2:]:
    events = [json.loads(line) for line in open(f"{sys.argv[1]}/ab_{arm}.jsonl")]
    report = next(e for e in events if e["event"] == "artifact")["report"]
    final = next(e for e in events if e["event"] == "final")
    print(f"| {arm} | {final['val_bpb']:.5f} | {report['model_bytes']:,} | {final['total_bytes']:,} | {len(report['attempts'])} "
          f"| {', '.join(report.get('lqer', []))} | {report.get('awq_lite', {})} |")
EOF
