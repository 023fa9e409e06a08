"""The one generic decoder that every family file describes.

Forward works on a flat batch: the N new tokens of all sequences in a step, concatenated
(no padding), with an ``AttentionBatch`` saying where each belongs in the paged cache. Nothing here
knows about requests or scheduling.

Block shapes (chosen by ArchConfig and by which weights exist):

    sequential:  x = x + post_attn_norm?(attn(attn_norm(x)))
                 x = x + post_mlp_norm?(mlp(mlp_norm(x)))
    parallel:    h = attn_norm(x);  x = x + attn(h) + mlp(mlp_norm(x) if mlp_norm else h)
"""

from __future__ import annotations

import logging
from typing import Protocol

import torch
import torch.nn.functional as F

from tierlm.loader.weights import LayerWeights, ModelWeights
from tierlm.memory.host import return_free_memory
from tierlm.model.attention import (
    AttentionBatch,
    DecodeAttention,
    KVCache,
    PrefillAttention,
    alibi_slopes,
    paged_attention,
)
from tierlm.model.fused_decode import FusedDecodePlan, plan_fused_decode
from tierlm.model.kernels import rms_norm_kernel, rope_bf16_kernel, rope_kernel
from tierlm.model.linear import LinearMethod, default_linear_method
from tierlm.model.rope import RotaryTable, apply_rope
from tierlm.model.spec import ArchConfig
from tierlm.quant import QuantizedWeight, method_for
from tierlm.quant.linear import QuantLinear

log = logging.getLogger("tierlm")

ROPE_INITIAL_POSITIONS = 1024  # rows of cos/sin made at start-up; longer sequences grow the tables (doubling)


class LayerStream(Protocol):
    """Weights that are not all resident (tierlm.memory.tiered.TieredWeights): the forward pass brackets
    layer i's compute with ``acquire_layer(i)`` / ``release_layer(i)`` so the streamer knows which ring
    slot may be refilled, and looks embeddings up through ``embedding`` (the table may be on disk)."""

    def acquire_layer(self, i: int) -> LayerWeights: ...

    def release_layer(self, i: int) -> None: ...

    def embedding(self, ids: torch.Tensor) -> torch.Tensor: ...


_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class Transformer:
    """Weights + config -> logits. Stateless apart from the rotary tables; the KV cache is passed in."""

    def __init__(self, cfg: ArchConfig, weights: ModelWeights, dtype: torch.dtype,
                 linear: LinearMethod | None = None, device: torch.device | str = "cpu", fused_decode: bool = True,
                 *, stream: LayerStream | None = None, head_linear: LinearMethod | None = None):
        """Takes ownership of ``weights``: each tensor is moved to ``device`` and matrices are
        replaced by ``linear.prepare``'d versions one at a time, so two copies of the whole model
        never coexist.

        ``stream``: weights partly on disk (tierlm.memory.tiered); ``weights`` are then its
        ``LayerWeights``, already prepared, and ``linear`` / ``head_linear`` the methods that multiply
        their split matrices (``TieredWeights.bind``).
        """
        self.cfg = cfg
        self.dtype = dtype
        self.device = torch.device(device)
        self.linear: LinearMethod = linear if linear is not None else default_linear_method(self.device, dtype)
        self.tiers = stream
        self.w = weights
        if stream is not None:
            self.lm_head_linear: LinearMethod = head_linear if head_linear is not None else self.linear
        else:
            _move_(weights, self.device)
            for lw in weights.layers:
                for name in ("qkv", "o", "up", "down"):
                    setattr(lw, name, self.linear.prepare(getattr(lw, name)))
                # a layer's freed source blocks and repacking temporaries back to the OS before the next
                # layer's tiles are allocated: kept in the heap, they raised a 1.1B Q5_K_M's peak by 190 MB
                return_free_memory()
            # A tied lm_head is also the embedding table, which lookups read as it is stored: it is never
            # prepared (a float table stays plain, which every method's apply takes as it is; a quantized
            # one stays in the file's blocks, which the quantized method multiplies: repacking it into
            # row tiles would be a second copy of the table).
            self.lm_head_linear = self.linear
            if not weights.tied:
                weights.lm_head = self.linear.prepare(weights.lm_head)
            elif isinstance(weights.embed, QuantizedWeight):
                embed = weights.embed
                log.info("%s", quantized_head_note(embed, embed.shape, embed.nbytes, self.linear))
        self.act = _ACTIVATIONS[cfg.activation]
        self._rms_kernel = rms_norm_kernel() if self.device.type == "cpu" and cfg.norm == "rmsnorm" else None
        # dtype -> the compiled in-place RoPE for it (kernels/rope.c), where built
        on_cpu = self.device.type == "cpu"
        kernels = {torch.float32: rope_kernel(), torch.bfloat16: rope_bf16_kernel()} if on_cpu else {}
        self._rope_kernels = {dt: k for dt, k in kernels.items() if k is not None}
        self.scale = cfg.effective_attn_scale
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        scale = cfg.effective_embed_scale
        # HF multiplies by the scale cast to the weights' dtype; do the same to match bit for bit.
        self.embed_scale = None if scale is None else torch.tensor(scale, dtype=dtype, device=self.device)
        self.alibi = alibi_slopes(cfg.num_heads).to(self.device) if cfg.position == "alibi" else None
        self.decode_attention = DecodeAttention.for_model(self.device, cfg.attn_softcap, self.alibi, self.layer_windows)
        self.prefill_attention = PrefillAttention.for_model(self.device, cfg.attn_softcap, self.alibi,
                                                            self.layer_windows)
        self.rope: dict[str, RotaryTable] = {}
        if cfg.position == "rope":
            # The tables grow on demand (RotaryTable.lookup): made for the model's whole context up front,
            # Gemma-3's two (32,768 positions x 128 pairs) would hold 64 MiB, a quarter of its GGUF file.
            num_positions = min(cfg.max_position, ROPE_INITIAL_POSITIONS)
            global_table = RotaryTable(cfg.effective_rotary_dim, cfg.rope_theta, cfg.rope_scaling_dict,
                                       num_positions, self.device)
            self.rope["full"] = global_table
            self.rope["sliding"] = global_table
            if cfg.rope_local_theta is not None and cfg.rope_local_theta != cfg.rope_theta:
                # Gemma 3's local layers use their own base and no scaling.
                self.rope["sliding"] = RotaryTable(cfg.effective_rotary_dim, cfg.rope_local_theta, None,
                                                   num_positions, self.device)
        self.fused_decode = fused_decode
        self._decode_plan: FusedDecodePlan | None = None

    def decode_plan(self) -> FusedDecodePlan:
        """Whether decode steps run in one C call (tierlm.model.fused_decode) and why not; made again
        when the linear method or the layers' weights changed since (GPTQ replaces them in place)."""
        p = self._decode_plan
        if p is None or not p.current(self.w.layers, self.linear):
            p = plan_fused_decode(self.cfg, self.w, self.linear, self.dtype, self.device, self.tiers is not None,
                                  self.layer_windows, self.fused_decode)
            self._decode_plan = p
        return p

    @property
    def layer_windows(self) -> dict[str, int | None]:
        return {t: (self.cfg.sliding_window if t == "sliding" else None) for t in set(self.cfg.layer_types)}

    def new_kv_cache(self, num_blocks: int, block_size: int, device: torch.device | str = "cpu") -> KVCache:
        c = self.cfg
        return KVCache(c.num_layers, num_blocks, block_size, c.num_kv_heads, c.head_dim, self.dtype, device)

    # -- forward ------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, batch: AttentionBatch, cache: KVCache) -> torch.Tensor:
        """input_ids (N,) -> final hidden states (N, hidden), before the final norm."""
        x = self.embed(input_ids, batch.positions)
        rope = self.rope_for(batch.positions)
        # (the first tests are FusedDecode.takes's own, here so that prompt steps skip the plan's check)
        if self.fused_decode and self.tiers is None and len(batch.groups) == 1 and batch.groups[0].max_q == 1:
            fused = self.decode_plan().fused
            if fused is not None and fused.takes(batch, cache):
                x = x.contiguous()
                fused(x, batch, cache, rope)
                return x
        for i in range(len(self.w.layers)):
            if self.tiers is None:
                x = self.block(i, x, batch, cache.k[i], cache.v[i], rope)
                continue
            self.tiers.acquire_layer(i)
            try:
                x = self.block(i, x, batch, cache.k[i], cache.v[i], rope)
            finally:
                self.tiers.release_layer(i)
        return x

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids (N,) at positions (N,) -> the first layer's input (N, d)."""
        if self.tiers is not None:
            x = self.tiers.embedding(input_ids)  # (N, d)
        else:
            x = embedding_rows(self.w.embed, input_ids)  # (N, d)
        x = x.to(self.dtype)
        if self.embed_scale is not None:
            x = x * self.embed_scale
        if self.w.pos_embed is not None:
            x = x + F.embedding(positions + self.cfg.learned_pos_offset, self.w.pos_embed)
        return x

    def rope_for(self, positions: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per layer type, the (cos, sin) rows of ``positions`` (N,); empty without RoPE."""
        return {t: table.lookup(positions, self.dtype) for t, table in self.rope.items()}

    def block(self, i: int, x: torch.Tensor, batch: AttentionBatch, k_cache: torch.Tensor, v_cache: torch.Tensor,
              rope: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Decoder layer i: x (N, d) -> (N, d), writing the step's K/V into ``k_cache``/``v_cache``.
        With tiered weights the layer must be acquired (``forward`` does it)."""
        lw = self.w.layers[i]  # tiered: the same objects, whose streamed rows the acquire filled in
        layer_type = self.cfg.layer_types[i]
        return self._block(x, lw, batch, k_cache, v_cache, layer_type, rope.get(layer_type))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (M, d) -> logits (M, vocab) float32, after the final norm and soft-capping."""
        with torch.inference_mode():
            h = self._norm(hidden, self.w.final_norm, self.w.final_norm_bias)
            out = self.lm_head_linear.apply(h, self.w.lm_head, self.w.lm_head_bias).float()
            if self.cfg.final_softcap is not None:
                out = torch.tanh(out / self.cfg.final_softcap) * self.cfg.final_softcap
            return out

    def _block(self, x: torch.Tensor, lw: LayerWeights, batch: AttentionBatch, k_cache: torch.Tensor,
               v_cache: torch.Tensor, layer_type: str, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        h = self._norm(x, lw.attn_norm, lw.attn_norm_bias)
        a = self._attention(h, lw, batch, k_cache, v_cache, layer_type, rope)
        if self.cfg.residual == "parallel":
            m_in = h if lw.mlp_norm is None else self._norm(x, lw.mlp_norm, lw.mlp_norm_bias)
            return x + a + self._mlp(m_in, lw)
        if lw.post_attn_norm is not None:
            a = self._norm(a, lw.post_attn_norm, None)
        x = x + a
        m = self._mlp(self._norm(x, lw.mlp_norm, lw.mlp_norm_bias), lw)
        if lw.post_mlp_norm is not None:
            m = self._norm(m, lw.post_mlp_norm, None)
        return x + m

    def _norm(self, x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor:
        """Normalise in float32 (as HF does), return in the compute dtype. w already holds any +1 offset."""
        if w is None:
            return x
        xf = x.float()
        if self._rms_kernel is not None:  # the compiled RMSNorm (tierlm/model/kernels/rms_norm.c)
            xf, w = xf.contiguous(), w.float().contiguous()
            y = torch.empty_like(xf)
            self._rms_kernel(xf.data_ptr(), w.data_ptr(), y.data_ptr(), xf.numel() // xf.shape[-1], xf.shape[-1],
                             self.cfg.norm_eps, torch.get_num_threads())
        elif self.cfg.norm == "rmsnorm":
            y = F.rms_norm(xf, (xf.shape[-1],), w, self.cfg.norm_eps)
        else:
            y = F.layer_norm(xf, (xf.shape[-1],), w, None if b is None else b.float(), self.cfg.norm_eps)
        return y.to(x.dtype)

    def _attention(self, h: torch.Tensor, lw: LayerWeights, batch: AttentionBatch, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, layer_type: str,
                   rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        c = self.cfg
        n = h.shape[0]
        qkv = self.linear.apply(h, lw.qkv, lw.qkv_bias)  # (N, q_size + 2 * kv_size)
        q = qkv[:, :self.q_size].view(n, c.num_heads, c.head_dim)
        k = qkv[:, self.q_size:self.q_size + self.kv_size].view(n, c.num_kv_heads, c.head_dim)
        v = qkv[:, self.q_size + self.kv_size:].view(n, c.num_kv_heads, c.head_dim)
        if lw.q_norm is not None:
            q = self._norm(q, lw.q_norm, None)
            k = self._norm(k, lw.k_norm, None)
        if rope is not None:
            cos, sin = rope
            if lw.q_norm is None:  # q and k sit side by side in qkv: rotate them as one (N, H + Hkv, D)
                qk = qkv[:, :self.q_size + self.kv_size].view(n, c.num_heads + c.num_kv_heads, c.head_dim)
                if not self._rope_(qk, cos, sin):  # half the small ops of rotating q and k apart
                    qk = apply_rope(qk, cos, sin, c.rope_layout)
                q, k = qk[:, :c.num_heads], qk[:, c.num_heads:]
            else:
                q = q if self._rope_(q, cos, sin) else apply_rope(q, cos, sin, c.rope_layout)
                k = k if self._rope_(k, cos, sin) else apply_rope(k, cos, sin, c.rope_layout)
        o = paged_attention(q, k, v, k_cache, v_cache, batch, layer_type, self.scale, c.attn_softcap, self.alibi,
                            self.decode_attention, self.prefill_attention)
        return self.linear.apply(o, lw.o, lw.o_bias)

    def _rope_(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
        """Rotate x (N, heads, D) in place with the compiled kernel (tierlm/model/kernels/rope.c) where it
        takes it: float32 or bfloat16 (cos and sin in the same dtype; both equal apply_rope bit for bit),
        heads contiguous (rows any stride), at most 256 rotated pairs. False: the caller uses apply_rope."""
        kernel = self._rope_kernels.get(x.dtype)
        if (kernel is None or cos.dtype != x.dtype or sin.dtype != x.dtype or x.stride(2) != 1
                or x.stride(1) != x.shape[2] or cos.shape[-1] > 256):
            return False
        cos, sin = cos.contiguous(), sin.contiguous()  # (N, 1, r/2)
        kernel(x.data_ptr(), x.stride(0), x.shape[0], x.shape[1], x.shape[2], 2 * cos.shape[-1],
               cos.data_ptr(), sin.data_ptr(), int(self.cfg.rope_layout == "interleaved"))
        return True

    def _mlp(self, h: torch.Tensor, lw: LayerWeights) -> torch.Tensor:
        u = self.linear.apply(h, lw.up, lw.up_bias)
        if self.cfg.gated_mlp:
            gate, up = u.chunk(2, dim=-1)
            u = self.act(gate) * up
        else:
            u = self.act(u)
        return self.linear.apply(u, lw.down, lw.down_bias)


def embedding_rows(table: torch.Tensor | QuantizedWeight, ids: torch.Tensor) -> torch.Tensor:
    """ids (N,) -> rows (N, d) of ``table`` (vocab, d) on ``ids``'s device: a float table's rows as
    they are; a quantized table's rows dequantized to float32, each distinct row once, nothing else
    of the table expanded. The values are the format's dequantization of those rows (for a GGUF
    type: the ``gguf`` package's), so they equal a float table loaded from the same blocks."""
    if isinstance(table, torch.Tensor):
        return F.embedding(ids.to(table.device), table).to(ids.device)
    uniq, inverse = torch.unique(ids, return_inverse=True)  # (U,), (N,)
    rows = method_for(table.format, table.group).dequantize(table.take_rows(uniq.to(table.codes.device)))
    return rows.to(ids.device)[inverse]  # (N, d)


def quantized_head_note(sample: QuantizedWeight, shape: tuple[int, int], nbytes: int, linear: LinearMethod) -> str:
    """The start-up line about a tied head kept as the embedding's blocks: how ``linear`` multiplies
    it in decode steps. ``sample``: the head or some of its rows (their format decides), ``shape`` and
    ``nbytes``: the whole head's.

    Without a kernel for its type the head still stays as blocks, on purpose: expanding it would put
    vocab x hidden float32 (4x to 8x the blocks) back in memory, and where the kernel is missing the
    layers' matrices take the same slow tiled path anyway. ``dtype="float32"`` expands everything."""
    rows, cols = shape
    what = f"tied head: the embedding's {sample.format} blocks ({rows} x {cols}, {nbytes / 2**20:.0f} MiB)"
    if isinstance(linear, QuantLinear) and linear.kernel_takes(sample):
        return (f"{what}, multiplied by the {linear.kernel.isa} quantized kernel for up to "
                f"{linear.max_kernel_rows} rows a step (more rows: dequantized a tile at a time)")
    return (f"{what}, dequantized a tile at a time in every step: no quantized kernel for {sample.format} "
            f"here (slow); kept as blocks so memory stays near the file's size; dtype='float32' would expand "
            f"it to {rows * cols * 4 / 2**20:.0f} MiB of float32")


def _move_(weights: ModelWeights, device: torch.device) -> None:
    """Move every tensor of ``weights`` to ``device`` in place, one tensor at a time."""
    if device.type == "cpu":
        return
    tied = weights.tied
    for holder in [weights, *weights.layers]:
        for name, value in vars(holder).items():
            if isinstance(value, torch.Tensor):
                setattr(holder, name, value.to(device))
    if tied:
        weights.lm_head = weights.embed
