"""``python -m tierlm.model.kernels``: build the compiled kernels this CPU can run (make calls it)."""

from tierlm.model.kernels import build

path = build()
print(f"tierlm kernels: built {path}" if path else
      "tierlm kernels: this CPU has no AVX512-BF16; bf16 matmuls will use oneDNN")
