"""Fixture generator: the logs/<RUN_ID>.{jsonl,txt} and shipped code a train_gpt.py run writes (SPEC §8)."""
from __future__ import annotations

import json
from pathlib import Path

SHIPPED_CODE = b"import lzma as L;exec(L.decompress(b'...'))  # stand-in for the generated submission code\n"
# train_gpt.py's data_provenance for the challenge's data: the FineWeb download, its 50,000 validation documents.
FINEWEB_PROVENANCE = {"path": "./data/datasets/fineweb10B_sp8192", "source": "fineweb", "manifest_sha256": None,
                      "val_documents": 50_000, "docs": None, "docs_sha256": None, "tokenizer_train_docs": None,
                      "caseops": False, "tokenizer_sha256": "ab" * 32}


def write_run(root: Path, run_id: str, seed: int = 1337, val_loss: float = 2.5, val_bpb: float = 1.1,
              world_size: int = 8, device_name: str = "NVIDIA H100 80GB HBM3", train_time_s: float = 598.0,
              eval_time_s: float = 450.0, model_bytes: int = 15_900_000, status: str = "ok",
              with_final: bool = True, config: dict | None = None, final: dict | None = None) -> Path:
    """Write a run's logs under root/logs and its shipped code under root/; return the jsonl path.
    config/final: keys added to (or replacing) the config and final events."""
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    code_path = root / f"submission_{run_id}.py"
    code_path.write_bytes(SHIPPED_CODE)
    code_bytes = len(SHIPPED_CODE)
    total = model_bytes + code_bytes
    events = [
        {"event": "config", "run_id": run_id, "seed": seed, "num_layers": 11, "model_dim": 512, "vocab_size": 8192,
         "ttt_enabled": True, "world_size": world_size, "grad_accum_steps": 8 // world_size if world_size <= 8 else 1,
         "device_name": device_name, "torch_version": "2.13.0", "python_version": "3.11.7",
         "attention_backend": "sdpa_cudnn", "num_params": 36_000_000, "max_wallclock_seconds": 600.0,
         "data_provenance": FINEWEB_PROVENANCE, **(config or {})},
        {"event": "data", "val_tokens": 40_540_160, "val_bytes": 151_080_000, "train_tokens": 8_000_000_000, "train_shards": 80},
        {"event": "step", "step": 100, "train_loss": 3.1, "train_time_ms": 60_000.0, "step_avg_ms": 600.0, "tok_s": 1.3e6},
        {"event": "timing", "name": "training", "seconds": train_time_s - 10},
        {"event": "eval", "stage": "quantized", "val_loss": val_loss + 0.02, "val_bpb": val_bpb + 0.01,
         "eval_time_ms": 20_000.0, "tokens": 40_540_160, "bytes": 151_080_000},
        {"event": "eval", "stage": "quantized_ttt", "val_loss": val_loss, "val_bpb": val_bpb,
         "eval_time_ms": 400_000.0, "tokens": 40_540_160, "bytes": 151_080_000},
        {"event": "artifact", "model_bytes": model_bytes, "code_bytes": code_bytes, "total_bytes": total,
         "limit_bytes": 16_000_000, "compressor": "brotli"},
    ]
    if with_final:
        events.append({"event": "final", "status": status, "error": None if status == "ok" else "RuntimeError: boom",
                       "train_time_s": train_time_s, "eval_time_s": eval_time_s, "world_size": world_size,
                       "val_loss": val_loss, "val_bpb": val_bpb, "final_stage": "quantized_ttt",
                       "total_bytes": total, "peak_memory_mib": 40_000, "shipped_code_path": str(code_path),
                       "artifact_path": str(root / "final_model.ptz"), **(final or {})})
    jsonl = logs / f"{run_id}.jsonl"
    jsonl.write_text("".join(json.dumps(e) + "\n" for e in events), encoding="utf-8")
    (logs / f"{run_id}.txt").write_text(
        f"val_tokens:40540160 val_bytes:151080000\nquantized_ttt val_loss:{val_loss} val_bpb:{val_bpb} eval_time:400000ms\n"
        f"Total submission size quantized+brotli: {total} bytes\n", encoding="utf-8")
    return jsonl
