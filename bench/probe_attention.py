import torch, torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
q = torch.randn(48, 8, 2048, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
k = torch.randn(48, 4, 2048, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
v = torch.randn(48, 4, 2048, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
import time
def bench(fn):
    for _ in range(3): fn()
    torch.cuda.synchronize(); t=time.perf_counter()
    for _ in range(10): fn()
    torch.cuda.synchronize(); return (time.perf_counter()-t)/10*1000
fl = 4*48*8*2048*2048*64/2
for name, be, gqa in [("cudnn_gqa", SDPBackend.CUDNN_ATTENTION, True), ("cudnn_repeat", SDPBackend.CUDNN_ATTENTION, False), ("flash_gqa", SDPBackend.FLASH_ATTENTION, True)]:
    try:
        def f():
            with sdpa_kernel([be]):
                kk, vv = (k, v) if gqa else (k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
                y = F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)
            return y
        def fb():
            f().sum().backward()
        ms = bench(f); msb = bench(fb)
        print(f"{name}: fwd {ms:.2f}ms {fl/ms/1e9:.0f} TFLOP/s  fwd+bwd {msb:.2f}ms {3.5*fl/msb/1e9:.0f} TFLOP/s")
    except Exception as e:
        print(name, "FAILED", str(e)[:200])
