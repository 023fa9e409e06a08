"""``python -m tierlm.model.kernels``: build the compiled kernels this CPU can run (make calls it)."""

from tierlm.model.kernels import build, build_attention, build_f32, build_norm, build_quant

path = build()
print(f"tierlm kernels: built {path}" if path else
      "tierlm kernels: this CPU has no AVX512-BF16; bf16 matmuls will use oneDNN")
path = build_f32()
print(f"tierlm kernels: built {path}" if path else
      "tierlm kernels: this CPU has no AVX-512F; float32 matmuls will use oneDNN/MKL")
path = build_quant()
print(f"tierlm kernels: built {path}" if path else
      "tierlm kernels: this CPU has no AVX512-VNNI; quantized matmuls will dequantize tile by tile")
path = build_norm()
print(f"tierlm kernels: built {path}" if path else
      "tierlm kernels: this CPU has no AVX2; RMSNorm will use torch")
path = build_attention()
print(f"tierlm kernels: built {path}" if path else
      "tierlm kernels: this CPU has no AVX2; decode attention will gather the cache for SDPA")
