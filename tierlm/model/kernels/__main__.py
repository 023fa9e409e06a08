"""``python -m tierlm.model.kernels``: build the compiled kernels this CPU can run (make calls it)."""

from tierlm.model.kernels import (
    build,
    build_attention,
    build_decode_layers,
    build_f32,
    build_norm,
    build_prefill_attention,
    build_quant,
    build_rope,
)

# (builder, what runs instead on a CPU that lacks the instructions)
KERNELS = (
    (build, "this CPU has no AVX512-BF16; bf16 matmuls will use oneDNN"),
    (build_f32, "this CPU has no AVX-512F; float32 matmuls will use oneDNN/MKL"),
    (build_quant, "this CPU has neither AVX512-VNNI nor AVX2; quantized matmuls will dequantize tile by tile"),
    (build_norm, "this CPU has no AVX2; RMSNorm will use torch"),
    (build_attention, "this CPU has no AVX2; decode attention will gather the cache for SDPA"),
    (build_prefill_attention, "this CPU has no AVX-512F; prompt attention will gather the cache for SDPA"),
    (build_rope, "this CPU has no AVX2; RoPE will use torch"),
    (build_decode_layers, "this CPU has no AVX2; decode steps will run layer by layer in Python"),
)
for builder, fallback in KERNELS:
    path = builder()
    print(f"tierlm kernels: built {path}" if path else f"tierlm kernels: {fallback}")
