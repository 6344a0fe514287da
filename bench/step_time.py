"""Step-time benchmark of train_gpt.py's real training step (model + Muon/AdamW) on fixed batches.

Reports compile + warm-up time, steady ms/step without and with looping, tok/s, MFU against a bf16
matmul peak measured in the same process, and peak memory. The config comes from the same env vars
as train_gpt.py (defaults = the record config, global batch 786,432 tokens).

    python bench/step_time.py                      # one GPU
    torchrun --nproc_per_node=8 bench/step_time.py  # several (same global batch)
    BENCH_STEPS=20 BENCH_WARMUP=3 python bench/step_time.py
    BENCH_PROFILE=1 python bench/step_time.py       # + the top GPU kernels of one step (torch profiler)
    BENCH_DOC_TOKENS=783 python bench/step_time.py  # documents of 391-1,174 tokens (783: the dev corpus's mean)
    BENCH_DATA=1 DATA_DIR=logs/proof_data DATASET=docs_sp8192 python bench/step_time.py  # real training tokens
    BENCH_SYNC_EACH_STEP=1 python bench/step_time.py  # read the loss after every step, as the training loop does
    FUSED_KERNELS=off python bench/step_time.py     # the plain PyTorch MLP and cross-entropy instead of Triton
"""
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


class FixedBatches:
    """Stands in for TrainLoader: `count` fixed batches already on the device (no I/O in the timing). Their tokens:
    - BENCH_DATA=1: the first training tokens of the dataset train_gpt would read (DATA_DIR, DATASET), real documents;
    - BENCH_DOC_TOKENS=n: random ids with documents of uniformly drawn lengths n/2..3n/2 (a BOS at each start);
    - neither: random ids, a BOS on 1 token in vocab_size, so document masking sees about one document per row.
    Document structure sets FlexAttention's work: real batches keep more of the causal blocks than uniform lengths do
    (docs/BENCHMARKS.md §5.11), random ids nearly all."""

    def __init__(self, h, micro_seqs, device, count=4, doc_tokens=0, real_data=False):
        g = torch.Generator().manual_seed(0)
        size = micro_seqs * (h.train_seq_len + 1)
        if real_data:
            stream = torch.from_numpy(tg.read_shard(tg.list_shards(h.dataset_dir, "train")[0], h.vocab_size)[: count * size]
                                      .astype("int64"))
            if stream.numel() < count * size:
                raise SystemExit(f"BENCH_DATA=1: the first train shard of {h.dataset_dir} has fewer than {count * size} tokens")
        self.batches = []
        for i in range(count):
            if real_data:
                batch = stream[i * size:(i + 1) * size]
            elif doc_tokens:
                batch = torch.randint(tg.BOS_ID + 1, h.vocab_size, (size,), generator=g)
                lengths = torch.randint(doc_tokens // 2, doc_tokens * 3 // 2 + 1, (size // (doc_tokens // 2) + 1,), generator=g)
                starts = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
                batch[starts[starts < size]] = tg.BOS_ID
            else:
                batch = torch.randint(0, h.vocab_size, (size,), generator=g)
            self.batches.append(batch.view(micro_seqs, h.train_seq_len + 1).to(device))
        self.i = 0

    def next_batch(self):
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        return b[:, :-1], b[:, 1:]


def matmul_peak_tflops(device, n=8192, reps=20):
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def flops_per_token(h, looping):
    """6 x (matrix params of the virtual layer stack + tied head) + causal attention 6*T/2*d per layer."""
    layers = len(tg.loop_schedule(h.num_layers, h.loop_start, h.loop_end, h.num_loops, looping))
    d, kv = h.model_dim, h.num_kv_heads * h.head_dim
    per_layer = d * d * 2 + d * kv * 2 + 2 * d * h.mlp_mult * d
    attention = 6 * (h.train_seq_len // 2) * d * 2
    return 6 * (layers * per_layer + h.vocab_size * d) + layers * attention


def time_steps(model, opt, loader, accum, steps, sync):
    """Seconds per step. BENCH_SYNC_EACH_STEP=1 reads the loss after every step, as train_gpt's loop does (its clock
    and loss all-reduce), so the host cannot queue the next step while the GPU finishes this one."""
    read_loss = os.environ.get("BENCH_SYNC_EACH_STEP") == "1"
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        loss = tg.train_step(model, opt, loader, accum, 1.0, 0.95)
        if read_loss:
            float(loss)
    sync()
    return (time.perf_counter() - t) / steps


def profile_one_step(model, opt, loader, accum, sync, runtime):
    """Top kernels by GPU time over one step of each variant, summed over the step, and how much of the step's
    wall time the GPU spends in kernels (the rest is the GPU waiting for the host: launches, Python, syncs)."""
    from torch.profiler import ProfilerActivity, profile
    for looping in (False, True):
        model.looping = looping
        sync()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            t = time.perf_counter()
            tg.train_step(model, opt, loader, accum, 1.0, 0.95)
            sync()
            wall_ms = (time.perf_counter() - t) * 1000
        if runtime.is_main:
            kernel_ms = sum(e.self_device_time_total for e in prof.key_averages()) / 1000
            print(f"--- profile looping={looping}: kernels {kernel_ms:.1f} ms of {wall_ms:.1f} ms wall "
                  f"({kernel_ms / wall_ms:.0%} GPU busy, profiler overhead included)")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=110))


def main():
    h = tg.Hyperparameters()
    runtime = tg.setup_distributed(h.dist_timeout_seconds)
    steps = int(os.environ.get("BENCH_STEPS", "10"))
    warmup = int(os.environ.get("BENCH_WARMUP", "3"))
    backend = tg.select_attention_backend(runtime.device, doc_masked=h.doc_masked_attention_enabled)
    model = tg.build_model(h, runtime, backend)
    micro, accum = tg.batch_layout(h, runtime)
    opt = tg.Optimizers(model, h, runtime)
    loader = FixedBatches(h, micro, runtime.device, doc_tokens=int(os.environ.get("BENCH_DOC_TOKENS", "0")),
                          real_data=os.environ.get("BENCH_DATA") == "1")
    sync = (lambda: torch.cuda.synchronize()) if runtime.device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    mode = tg.compile_model(model, h, runtime)
    results = {"compile": mode, "attention_backend": backend, "kernels": tg.kernel_path(h, runtime.device),
               "world_size": runtime.world_size,
               "grad_accum_steps": accum, "micro_batch_seqs": micro, "batch_tokens": h.train_batch_tokens}
    for looping in (False, True):
        model.looping = looping
        t = time.perf_counter()
        time_steps(model, opt, loader, accum, warmup, sync)
        results[f"warmup_s_loop{int(looping)}"] = time.perf_counter() - t
    results["compile_warmup_s"] = time.perf_counter() - t0
    peak = matmul_peak_tflops(runtime.device) if runtime.device.type == "cuda" else float("nan")
    results["matmul_peak_tflops"] = peak
    if runtime.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for looping in (False, True):
        model.looping = looping
        sec = time_steps(model, opt, loader, accum, steps, sync)
        tok_s = h.train_batch_tokens / sec
        key = "loop" if looping else "noloop"
        results[f"{key}_ms_per_step"] = sec * 1000
        results[f"{key}_tok_s"] = tok_s
        results[f"{key}_mfu"] = flops_per_token(h, looping) * tok_s / (peak * 1e12 * runtime.world_size)
    if runtime.device.type == "cuda":
        results["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if os.environ.get("BENCH_PROFILE") == "1" and runtime.device.type == "cuda":
        profile_one_step(model, opt, loader, accum, sync, runtime)
    if runtime.is_main:
        print(json.dumps(results))
        print(f"{'phase':<10}{'ms/step':>10}{'tok/s':>12}{'MFU':>8}")
        for key in ("noloop", "loop"):
            print(f"{key:<10}{results[key + '_ms_per_step']:>10.1f}{results[key + '_tok_s']:>12.0f}{results[key + '_mfu']:>8.1%}")
        print(f"compile+warmup {results['compile_warmup_s']:.1f}s  matmul peak {peak:.0f} TFLOP/s  "
              f"peak mem {results.get('peak_memory_gib', float('nan')):.1f} GiB  kernels: {results['kernels']}  "
              f"attention: {backend}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
