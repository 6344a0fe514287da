"""How much of causal attention document-masked FlexAttention computes, for the batches bench/step_time.py times:
the share of the causal (query block, kv block) pairs its block mask keeps (partial + full blocks, 128 x 128), for
real training tokens (BENCH_DATA=1's batches), synthetic documents (BENCH_DOC_TOKENS's) and random ids (the default).
FlexAttention's time grows with this share, so it says how far a synthetic step time is from the real data's. CPU only.

    DATA_DIR=logs/proof_data DATASET=docs_sp8192 python bench/mask_density.py   # BENCH_DOC_TOKENS=783 by default
"""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_gpt as tg  # noqa: E402
from step_time import FixedBatches  # noqa: E402

ROWS, COUNT = 48, 8  # one GPU's share of the challenge batch (786,432 / 8 / 2,048), 8 batches


def kept_share(batch: torch.Tensor) -> float:
    mask = tg.attention_mask(tg.document_segments(batch, None), "flex")
    blocks = batch.size(1) // 128
    kept = int(mask.kv_num_blocks.sum()) + int(mask.full_kv_num_blocks.sum())
    return kept / (batch.size(0) * blocks * (blocks + 1) // 2)


def main() -> None:
    h = tg.Hyperparameters()
    doc_tokens = int(os.environ.get("BENCH_DOC_TOKENS", "783"))
    kinds = {"random ids": dict(), f"documents of {doc_tokens // 2}-{doc_tokens * 3 // 2} tokens": dict(doc_tokens=doc_tokens)}
    if os.path.isdir(h.dataset_dir):
        kinds[f"real: {h.dataset_dir}"] = dict(real_data=True)
    else:
        print(f"{h.dataset_dir}: no dataset, real batches skipped (set DATA_DIR/DATASET)")
    print(f"{ROWS} rows x {h.train_seq_len} tokens, {COUNT} batches: share of causal kv blocks computed (min / mean / max)")
    for name, kwargs in kinds.items():
        batches = [b[:, :-1] for b in FixedBatches(h, ROWS, torch.device("cpu"), count=COUNT, **kwargs).batches]
        shares = [kept_share(b) for b in batches]
        bos_per_row = sum(int((b == tg.BOS_ID).sum()) for b in batches) / (ROWS * COUNT)
        print(f"  {name:<58} {min(shares):.3f} / {sum(shares) / len(shares):.3f} / {max(shares):.3f}   "
              f"({bos_per_row:.2f} BOS per row)")


if __name__ == "__main__":
    main()
