"""Kernel-only speed of the quantized GEMV (tierlm/model/kernels/quant_gemv.c) per tierlm format,
batch 1, on copies of one 5632 x 2048 matrix totalling ~400 MB, so every weight comes from DRAM.
Prints achieved GB/s (bytes of the quantized matrices) and G weights/s. No baseline here: the
end-to-end comparison with llama.cpp and bf16 is bench/quant.py.

    python bench/quant_kernel.py
"""
import time

import torch

from tierlm.model.kernels import quant_gemv
from tierlm.quant import QuantizedWeight, get_quantizer
from tierlm.quant.linear import kernel_matmul

torch.manual_seed(0)
k = quant_gemv()
N, K = 5632, 2048
w = torch.randn(N, K)
for fmt in ("q8", "q6", "q5", "q4", "q3h", "q3", "q2"):
    q = get_quantizer(fmt, 64, search=False).quantize(w)
    ws = [QuantizedWeight(q.format, q.shape, q.codes.clone(), q.group, q.scales.clone(), q.mins.clone()) for _ in range(max(8, int(400e6 // q.nbytes)))]
    x = torch.randn(1, K)
    for qw in ws: kernel_matmul(k, x, qw)
    t0 = time.perf_counter()
    for _ in range(2):
        for qw in ws: kernel_matmul(k, x, qw)
    dt = time.perf_counter() - t0
    print(f"{fmt}: {2*sum(q.nbytes for q in ws)/dt/1e9:.1f} GB/s, {2*len(ws)*N*K/dt/1e9:.1f} Gweights/s")
