"""Speed of train_gpt.py's evaluation: plain, sliding-window and the score-first TTT modes, on the real code.

Builds the model of the config (random init, or BENCH_STATE=path of a saved state_dict), compiles it
as main does (COMPILE), makes a validation stream of BENCH_VAL_TOKENS tokens (random tokens in
documents of log-normal lengths, median ~545 and mean ~900 tokens like FineWeb's, or the first tokens
of the real validation set with BENCH_REAL_DATA=1: per-document LoRA TTT costs grow with the square of
a document's length up to the window, so its speed depends on the documents) and times each stage
after train_gpt.py's own warm-up (warm_up_evaluation: every shape compiled on random tokens, as before
the eval clock of a real run; weights restored before every stage).
Stages: plain, sliding, sgd (= ttt), lora, lora_phased (TTT_MODE for that stage). Prints tokens/s
and the projection of each stage to FineWeb's 47.9M validation tokens (CaseOps) on 8 GPUs.

    python bench/eval_speed.py                       # one GPU
    torchrun --nproc_per_node=8 bench/eval_speed.py   # several
    BENCH_REAL_DATA=1 BENCH_VAL_TOKENS=0 BENCH_STAGES=sgd,lora,lora_phased python bench/eval_speed.py
"""
import copy
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

STAGES = {"plain": tg.eval_plain, "sliding": tg.eval_sliding, "sgd": tg.eval_ttt, "ttt": tg.eval_ttt,
          "lora": tg.eval_lora_ttt, "lora_phased": tg.eval_lora_ttt}


def random_validation(h, num_tokens, seed=0):
    """Random token ids in documents of log-normal lengths, and random byte counts: speed does not depend
    on the text, only on the document lengths."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, h.vocab_size, (num_tokens,), generator=g)
    lengths = torch.empty(num_tokens // 100 + 1).log_normal_(6.3, 1.0, generator=g).long() + 2
    starts = torch.cumsum(lengths, 0) - lengths
    tokens[starts[starts < num_tokens]] = tg.BOS_ID
    return tokens, torch.randint(1, 8, (num_tokens - 1,), generator=g, dtype=torch.int32)


def real_validation(h, num_tokens):
    sp = tg.load_tokenizer(h.tokenizer_file, h.vocab_size)
    tokens = tg.load_validation_tokens(h.dataset_dir, h.vocab_size)
    caseops = tg.is_caseops(sp, tg.read_dataset_manifest(h.dataset_dir))
    target_bytes = tg.validation_target_bytes(h.dataset_dir, tokens, tg.build_byte_tables(sp, h.vocab_size), caseops)
    num_tokens = num_tokens or tokens.numel()
    return tokens[:num_tokens], target_bytes[: num_tokens - 1]


def stage_config(h, name):
    """h with TTT_MODE of a TTT stage (sgd/ttt, lora, lora_phased)."""
    staged = copy.copy(h)
    if name in ("sgd", "ttt", "lora", "lora_phased"):
        staged.ttt_mode = "sgd" if name == "ttt" else name
    return staged


def main():
    h = tg.Hyperparameters()
    runtime = tg.setup_distributed(h.dist_timeout_seconds)
    num_tokens = int(os.environ.get("BENCH_VAL_TOKENS", "2000001"))
    stages = os.environ.get("BENCH_STAGES", "plain,sliding,sgd,lora,lora_phased").split(",")
    backend = tg.select_attention_backend(runtime.device, doc_masked=h.doc_masked_attention_enabled)
    model = tg.build_model(h, runtime, backend)
    if os.environ.get("BENCH_STATE"):
        model.load_state_dict(torch.load(os.environ["BENCH_STATE"], map_location=runtime.device))
    lora_stages = any(name.startswith("lora") for name in stages)
    compile_mode = tg.compile_model(model, h, runtime, dynamic=None if lora_stages else False)  # as evaluate_artifact
    if os.environ.get("BENCH_REAL_DATA") == "1":
        val_tokens, target_bytes = real_validation(h, num_tokens)
    else:
        val_tokens, target_bytes = random_validation(h, num_tokens or 2_000_001)
    log = tg.Logger(runtime, None, "")
    docs = tg.document_spans(val_tokens)
    log(f"device:{runtime.device} world_size:{runtime.world_size} backend:{backend} compile:{compile_mode} "
        f"val_tokens:{val_tokens.numel()} documents:{len(docs)} eval_seq_len:{h.eval_seq_len} stride:{h.eval_stride} "
        f"val_batch_tokens:{h.val_batch_tokens} ttt_chunk_tokens:{h.ttt_chunk_tokens} ttt_epochs:{h.ttt_epochs} "
        f"lora: rank {h.ttt_lora_rank} targets {h.ttt_lora_targets} chunk {h.ttt_chunk_size} short {h.ttt_short_chunks or '-'} "
        f"batch {h.ttt_batch_docs} window {h.ttt_window} phases {h.phased_ttt_num_phases} prefix {h.phased_ttt_prefix_docs}")

    initial_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    t0 = time.perf_counter()
    for name in stages:
        staged = stage_config(h, name)
        staged.sliding_window_enabled, staged.ttt_enabled = name == "sliding", name not in ("plain", "sliding")
        tg.warm_up_evaluation(model, staged, runtime)
        model.load_state_dict(initial_state)
    log(f"warm-up (compile, random tokens): {time.perf_counter() - t0:.1f}s")

    if runtime.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(runtime.device)
    rows = []
    for name in stages:
        kwargs = {"log": log} if name in ("sgd", "ttt", "lora", "lora_phased") else {}
        result = STAGES[name](model, val_tokens, target_bytes, stage_config(h, name), runtime, stage=name, **kwargs)
        model.load_state_dict(initial_state)  # TTT changes the weights
        tokens_per_s = result.tokens / result.seconds
        projected = result.seconds * tg.CHALLENGE_VAL_TOKENS / result.tokens * runtime.world_size / 8
        rows.append(f"{name:<12} {result.bpb:>8.4f} {result.seconds:>8.1f} {tokens_per_s:>12,.0f} {projected:>25.1f}s")
    log(f"{'stage':<12} {'bpb':>8} {'seconds':>8} {'tok/s':>12} {'projected 47.9M on 8 GPUs':>26}")
    for row in rows:
        log(row)
    if runtime.device.type == "cuda":
        log(f"peak memory allocated: {torch.cuda.max_memory_allocated(runtime.device) / 2**20:.0f} MiB")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
