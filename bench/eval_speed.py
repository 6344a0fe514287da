"""Speed of train_gpt.py's evaluation: plain, sliding-window and score-first TTT, on the real code.

Builds the model of the config (random init, or BENCH_STATE=path of a saved state_dict), compiles it
as main does (COMPILE), makes a validation stream of BENCH_VAL_TOKENS tokens (random tokens with a
BOS every ~1000, or the first tokens of the real validation set with BENCH_REAL_DATA=1) and times
each stage after a warm-up run that compiles every shape (weights restored afterwards). Prints
tokens/s and the projection of each stage to the 40.5M-token FineWeb validation set on 8 GPUs.

    python bench/eval_speed.py                       # one GPU
    torchrun --nproc_per_node=8 bench/eval_speed.py   # several
    BENCH_VAL_TOKENS=4000000 BENCH_STAGES=sliding,ttt python bench/eval_speed.py
"""
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

FINEWEB_VAL_TOKENS = 40_500_000
STAGES = {"plain": tg.eval_plain, "sliding": tg.eval_sliding, "ttt": tg.eval_ttt}


def random_validation(h, num_tokens):
    """Random token ids and byte counts: speed does not depend on the text."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, h.vocab_size, (num_tokens,), generator=g)
    tokens[::1000] = tg.BOS_ID
    return tokens, torch.randint(1, 8, (num_tokens - 1,), generator=g, dtype=torch.int32)


def real_validation(h, num_tokens):
    sp = tg.load_tokenizer(h.tokenizer_file, h.vocab_size)
    tokens = tg.load_validation_tokens(h.dataset_dir, h.vocab_size)
    caseops = tg.is_caseops(sp, tg.read_dataset_manifest(h.dataset_dir))
    target_bytes = tg.validation_target_bytes(h.dataset_dir, tokens, tg.build_byte_tables(sp, h.vocab_size), caseops)
    return tokens[:num_tokens], target_bytes[: num_tokens - 1]


def main():
    h = tg.Hyperparameters()
    runtime = tg.setup_distributed(h.dist_timeout_seconds)
    num_tokens = int(os.environ.get("BENCH_VAL_TOKENS", "2000001"))
    stages = os.environ.get("BENCH_STAGES", "plain,sliding,ttt").split(",")
    backend = tg.select_attention_backend(runtime.device, doc_masked=h.doc_masked_attention_enabled)
    model = tg.build_model(h, runtime, backend)
    if os.environ.get("BENCH_STATE"):
        model.load_state_dict(torch.load(os.environ["BENCH_STATE"], map_location=runtime.device))
    compile_mode = tg.compile_model(model, h, runtime)
    make_validation = real_validation if os.environ.get("BENCH_REAL_DATA") == "1" else random_validation
    val_tokens, target_bytes = make_validation(h, num_tokens)
    log = tg.Logger(runtime, None, "")
    log(f"device:{runtime.device} world_size:{runtime.world_size} backend:{backend} compile:{compile_mode} "
        f"val_tokens:{val_tokens.numel()} eval_seq_len:{h.eval_seq_len} stride:{h.eval_stride} "
        f"val_batch_tokens:{h.val_batch_tokens} ttt_chunk_tokens:{h.ttt_chunk_tokens} ttt_epochs:{h.ttt_epochs}")

    # Warm-up on two chunks' worth of tokens compiles every shape the full run uses (the batch sizes
    # do not depend on the stream length); TTT changes the weights, so restore them.
    initial_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    warmup_tokens = val_tokens[: 2 * max(h.ttt_chunk_tokens, h.eval_seq_len) + 1]
    t0 = time.perf_counter()
    for name in stages:
        STAGES[name](model, warmup_tokens, target_bytes, h, runtime)
    model.load_state_dict(initial_state)
    log(f"warm-up (compile): {time.perf_counter() - t0:.1f}s")

    if runtime.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(runtime.device)
    log(f"{'stage':<8} {'bpb':>8} {'seconds':>8} {'tok/s':>12} {'projected 40.5M on 8 GPUs':>26}")
    for name in stages:
        kwargs = {"log": log} if name == "ttt" else {}
        result = STAGES[name](model, val_tokens, target_bytes, h, runtime, stage=name, **kwargs)
        tokens_per_s = result.tokens / result.seconds
        projected = result.seconds * FINEWEB_VAL_TOKENS / result.tokens * runtime.world_size / 8
        log(f"{name:<8} {result.bpb:>8.4f} {result.seconds:>8.1f} {tokens_per_s:>12,.0f} {projected:>25.1f}s")
    if runtime.device.type == "cuda":
        log(f"peak memory allocated: {torch.cuda.max_memory_allocated(runtime.device) / 2**20:.0f} MiB")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
