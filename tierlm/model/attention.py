"""Paged KV cache and attention over it (torch, any device).

Cache layout: per layer a K and a V tensor of shape (num_blocks * block_size, kv_heads, head_dim):
a flat array of *slots*; token position p of a sequence lives in slot
``block_table[p // block_size] * block_size + p % block_size``. Block 0 is the null block: it is
never handed to a request, is zero-filled, and is where padded gather indices point, so padding
never reads uninitialised memory (a NaN there would survive a zero attention weight: 0 * NaN = NaN).

Attention for one step runs in at most two batched calls: all decode rows (one query token each)
together, and all rows with several query tokens (prompt chunks) together, each padded to its
group's longest query/context. Grouping keeps a 512-token chunk from padding 15 decode rows to 512.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


class KVCache:
    """K and V for every layer. Slot arithmetic is described in the module docstring.

    ``quant`` ("q8" or "q4"): each layer's K and V are ``tierlm.quant.kv.QuantizedSlots``, which
    quantize on ``index_copy_`` and dequantize on ``index_select``, so attention below is unchanged.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", quant: str | None = None):
        self.num_blocks = num_blocks
        self.block_size = block_size
        num_slots = num_blocks * block_size
        if quant is not None:
            from tierlm.quant.kv import QuantizedSlots

            def slots() -> QuantizedSlots:
                return QuantizedSlots(quant, num_slots, num_kv_heads, head_dim, dtype, device)

            self.k = [slots() for _ in range(num_layers)]
            self.v = [slots() for _ in range(num_layers)]
            for t in self.k + self.v:
                t.zero_(block_size)  # the null block
            return
        # torch.empty does not touch pages: memory is committed as blocks are first written.
        self.k = [torch.empty(num_slots, num_kv_heads, head_dim, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty(num_slots, num_kv_heads, head_dim, dtype=dtype, device=device) for _ in range(num_layers)]
        for t in self.k + self.v:
            t[:block_size].zero_()  # the null block

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


@dataclass
class SeqSlice:
    """One sequence's part of a step: ``query_len`` new tokens at positions
    [context_len - query_len, context_len), stored in the cache through ``block_table``."""

    query_start: int  # offset of its first new token in the step's flat token array
    query_len: int
    context_len: int  # tokens in the cache once this step has written its new ones
    block_table: list[int]


@dataclass
class AttentionGroup:
    """Rows attended together in one padded call.

    Bg rows, each padded to maxQ query tokens and maxL context tokens.
    """

    num_rows: int
    max_q: int
    max_kv: int
    q_index: torch.Tensor  # (Bg * maxQ,) int64: index into the step's tokens (padding -> 0)
    valid: torch.Tensor  # (Bg * maxQ,) bool
    out_index: torch.Tensor  # (num_valid,) int64 = q_index[valid]
    kv_slots: torch.Tensor  # (Bg * maxL,) int64 slots to gather (padding -> null block slot 0)
    q_pos: torch.Tensor  # (Bg, maxQ) int64 absolute positions (padding -> 0)
    fresh: bool = False  # one row, no cached prefix: attend over this step's own k/v, causal
    # The group's queries as one run of the step's tokens, in order and unpadded (every decode group
    # of a step whose decodes come first, and any single row); None otherwise. Attention then reads q
    # and writes its output as views, saving a gather and a scatter per layer.
    rows: slice | None = None
    # (Bg, 3) int64: per row its (query_start, query_len, context_len), as SeqSlice has them
    spans: torch.Tensor | None = None
    windows: dict[str, int | None] = field(default_factory=dict)  # layer type -> sliding window (None: none)
    _masks: dict[str, torch.Tensor | None] = field(default_factory=dict, repr=False)

    def mask(self, layer_type: str) -> torch.Tensor | None:
        """(Bg, 1, maxQ, maxL) bool, query i of row b may see key j: j <= its position and, with a
        window, position - j < window; padded query rows see key 0 only (an all-masked softmax is NaN).
        None: plain causal attention over the step's own tokens (``fresh``, no window in the way).

        Made on first use and kept for the step's other layers: steps whose attention runs in the
        decode kernel (or the fused decode step) never need one."""
        if layer_type not in self._masks:
            self._masks[layer_type] = self._make_mask(self.windows[layer_type])
        return self._masks[layer_type]

    def _make_mask(self, window: int | None) -> torch.Tensor | None:
        if self.fresh and (window is None or window >= self.max_kv):
            return None
        bg, max_q = self.num_rows, self.max_q
        q_pos = self.q_pos.view(bg, max_q, 1)
        kv_pos = torch.arange(self.max_kv, device=q_pos.device).view(1, 1, self.max_kv)
        m = kv_pos <= q_pos  # (Bg, maxQ, maxL)
        if window is not None:
            m &= (q_pos - kv_pos) < window
        padded = ~self.valid.view(bg, max_q)
        m[padded] = False
        m[..., 0] |= padded
        return m.unsqueeze(1)


@dataclass
class AttentionBatch:
    """Everything attention needs about one step's N new tokens; shared by all layers."""

    positions: torch.Tensor  # (N,) int64
    slot_mapping: torch.Tensor  # (N,) int64
    groups: list[AttentionGroup]


def build_attention_batch(seqs: list[SeqSlice], block_size: int, layer_windows: dict[str, int | None],
                          device: torch.device | str = "cpu") -> AttentionBatch:
    """Turn per-sequence bookkeeping into index tensors, once per step.

    ``layer_windows`` maps each layer type present ("full", "sliding") to its window (None = no
    window). A query at position p may see key position j iff j <= p and (no window or p - j < window).
    """
    positions: list[int] = []
    slots: list[int] = []
    for s in seqs:
        start = s.context_len - s.query_len
        for p in range(start, s.context_len):
            positions.append(p)
            slots.append(s.block_table[p // block_size] * block_size + p % block_size)
    decode = [s for s in seqs if s.query_len == 1]
    multi = [s for s in seqs if s.query_len > 1]
    groups = [g for g in (_group(decode, block_size, layer_windows, device),
                          _group(multi, block_size, layer_windows, device)) if g is not None]
    return AttentionBatch(positions=torch.tensor(positions, dtype=torch.int64, device=device),
                          slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device), groups=groups)


def _group(seqs: list[SeqSlice], block_size: int, layer_windows: dict[str, int | None],
           device: torch.device | str) -> AttentionGroup | None:
    if not seqs:
        return None
    bg = len(seqs)
    max_q = max(s.query_len for s in seqs)
    max_kv = max(s.context_len for s in seqs)
    # A few whole-group ops rather than a handful per sequence: this runs every step, for every row.
    q_len = torch.tensor([s.query_len for s in seqs]).view(bg, 1)
    ctx_len = torch.tensor([s.context_len for s in seqs]).view(bg, 1)
    q_off = torch.arange(max_q).view(1, max_q)
    valid = q_off < q_len  # (Bg, maxQ)
    q_index = torch.where(valid, torch.tensor([s.query_start for s in seqs]).view(bg, 1) + q_off, 0)
    q_pos = torch.where(valid, ctx_len - q_len + q_off, 0)
    # slot of position p: table[p // block_size] * block_size + p % block_size; tables padded with
    # block 0, which only positions past a row's context (set to slot 0 below) would read
    num_table = -(-max_kv // block_size)
    tables = torch.tensor([s.block_table[:num_table] + [0] * (num_table - len(s.block_table[:num_table]))
                           for s in seqs], dtype=torch.int64)  # (Bg, blocks)
    slots = (tables.view(bg, num_table, 1) * block_size + torch.arange(block_size)).view(bg, -1)[:, :max_kv]
    kv_slots = torch.where(torch.arange(max_kv).view(1, max_kv) < ctx_len, slots, 0)  # (Bg, maxL)
    fresh = bg == 1 and seqs[0].context_len == seqs[0].query_len
    start = seqs[0].query_start
    dense = all(s.query_len == max_q and s.query_start == start + r * max_q for r, s in enumerate(seqs))
    valid_flat = valid.view(-1)
    q_flat = q_index.view(-1)
    spans = torch.tensor([(s.query_start, s.query_len, s.context_len) for s in seqs], dtype=torch.int64)
    return AttentionGroup(num_rows=bg, max_q=max_q, max_kv=max_kv, q_index=q_flat.to(device),
                          valid=valid_flat.to(device), out_index=q_flat[valid_flat].to(device),
                          kv_slots=kv_slots.reshape(-1).to(device), q_pos=q_pos.to(device), fresh=fresh,
                          rows=slice(start, start + bg * max_q) if dense else None, spans=spans.to(device),
                          windows=dict(layer_windows))


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """(num_heads,) float32 ALiBi slopes (Press et al.), including the non-power-of-two rule."""
    def power_of_two_slopes(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(torch.log2(torch.tensor(float(n))).item() - 3)))
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** int(torch.log2(torch.tensor(float(num_heads))).floor().item())
    slopes = power_of_two_slopes(closest)
    if closest < num_heads:
        slopes += power_of_two_slopes(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


class _CacheKernel:
    """A compiled attention kernel that reads the paged cache in place. The model picks one once
    (``for_model``): CPU, no logit soft-capping, no ALiBi, and the library built for this CPU
    (``_load``); a step's group goes to it when ``takes`` says so."""

    _DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # the kernels' dtype codes

    def __init__(self, kernel, layer_windows: dict[str, int | None]):
        self.kernel = kernel
        self.layer_windows = layer_windows

    @staticmethod
    def _load():
        raise NotImplementedError

    @classmethod
    def for_model(cls, device: torch.device, softcap: float | None, alibi: torch.Tensor | None,
                  layer_windows: dict[str, int | None]):
        kernel = cls._load() if device.type == "cpu" and softcap is None and alibi is None else None
        return None if kernel is None else cls(kernel, layer_windows)

    def _takes_tensors(self, q: torch.Tensor, k_cache) -> bool:
        """A plain cache tensor of q's dtype, one the kernels take, and q's heads contiguous."""
        return (isinstance(k_cache, torch.Tensor) and k_cache.dtype == q.dtype and q.dtype in self._DTYPES
                and q.stride(-1) == 1 and q.stride(-2) == q.shape[-1])


class DecodeAttention(_CacheKernel):
    """Decode rows' attention by the compiled kernel (tierlm/model/kernels/decode_attention.c), which
    reads each row's keys and values in place from the paged cache instead of gathering them for
    SDPA. A step's decode group goes to it whenever the cache is a plain float32 or bfloat16 tensor."""

    @staticmethod
    def _load():
        from tierlm.model.kernels import decode_attention_kernel

        return decode_attention_kernel()

    def takes(self, g: AttentionGroup, q: torch.Tensor, k_cache) -> bool:
        return g.max_q == 1 and not g.fresh and self._takes_tensors(q, k_cache)

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, g: AttentionGroup,
                 layer_type: str, scale: float, out: torch.Tensor) -> None:
        """q (Bg, H, D), one query each (heads contiguous, rows any stride); writes out (Bg, H * D)."""
        bg, h, d = q.shape
        window = self.layer_windows.get(layer_type) or 0
        status = self.kernel(self._DTYPES[q.dtype], q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
                             g.kv_slots.data_ptr(), g.q_pos.data_ptr(), bg, h, k_cache.shape[1], d, g.max_kv,
                             window, scale, out.data_ptr(), torch.get_num_threads())
        if status != 0:
            raise RuntimeError(f"decode attention kernel failed (status {status}) for {bg} rows of {h} heads "
                               f"x {d} over {k_cache.shape[1]} KV heads")


class PrefillAttention(_CacheKernel):
    """Prompt rows' attention (whole prompts and SplitFuse chunks: several queries per row) by the
    compiled kernel (tierlm/model/kernels/prefill_attention.c, AVX-512F): causal flash attention
    that reads each row's keys and values in place from the paged cache, 1.4-3.5x torch's CPU
    flash attention on SmolLM2's and Gemma-3's heads, with no gather of a chunk's context. A step's
    prompt group goes to it whenever the cache is a plain float32 or bfloat16 tensor and the head
    size is a multiple of 64, at most 512 (what the kernel takes)."""

    @staticmethod
    def _load():
        from tierlm.model.kernels import prefill_attention_kernel

        return prefill_attention_kernel()

    def takes(self, g: AttentionGroup, q: torch.Tensor, k_cache) -> bool:
        return (g.spans is not None and q.shape[-1] % 64 == 0 and q.shape[-1] <= 512
                and self._takes_tensors(q, k_cache))

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, g: AttentionGroup,
                 layer_type: str, scale: float, out: torch.Tensor) -> None:
        """q (N, H, D): the step's queries (heads contiguous, rows any stride); writes the group's
        rows of out (N, H * D), contiguous."""
        _, h, d = q.shape
        window = self.layer_windows.get(layer_type) or 0
        status = self.kernel(self._DTYPES[q.dtype], q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
                             g.kv_slots.data_ptr(), g.max_kv, g.spans.data_ptr(), g.num_rows, h, k_cache.shape[1],
                             d, window, scale, out.data_ptr(), torch.get_num_threads())
        if status != 0:
            raise RuntimeError(f"prompt attention kernel failed (status {status}) for {g.num_rows} rows of {h} "
                               f"heads x {d} over {k_cache.shape[1]} KV heads")


def paged_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, batch: AttentionBatch, layer_type: str, scale: float,
                    softcap: float | None = None, alibi: torch.Tensor | None = None,
                    decode: DecodeAttention | None = None, prefill: PrefillAttention | None = None) -> torch.Tensor:
    """Write this step's k/v into the cache, then attend (the decode group through ``decode``, the
    prompt group through ``prefill``, when they take it).

    q: (N, H, D); k_new, v_new: (N, Hkv, D); returns (N, H * D) in q's dtype.
    """
    k_cache.index_copy_(0, batch.slot_mapping, k_new)
    v_cache.index_copy_(0, batch.slot_mapping, v_new)
    n, h, d = q.shape
    hkv = k_new.shape[1]
    out = torch.empty(n, h * d, dtype=q.dtype, device=q.device)
    for g in batch.groups:
        if decode is not None and decode.takes(g, q, k_cache):
            q_rows = q[g.rows] if g.rows is not None else q.index_select(0, g.q_index)  # (Bg, H, D)
            o_rows = out[g.rows] if g.rows is not None else torch.empty(g.num_rows, h * d, dtype=q.dtype)
            decode(q_rows, k_cache, v_cache, g, layer_type, scale, o_rows)
            if g.rows is None:
                out.index_copy_(0, g.out_index, o_rows)
            continue
        if prefill is not None and prefill.takes(g, q, k_cache):
            prefill(q, k_cache, v_cache, g, layer_type, scale, out)
            continue
        mask = g.mask(layer_type)
        q_rows = q[g.rows] if g.rows is not None else q.index_select(0, g.q_index)  # (Bg * maxQ, H, D)
        qg = q_rows.view(g.num_rows, g.max_q, h, d).transpose(1, 2)  # (Bg, H, maxQ, D)
        if g.fresh:  # one row (so g.rows is set): its own k/v are all there is
            kg = k_new[g.rows].unsqueeze(0).transpose(1, 2)  # (1, Hkv, T, D)
            vg = v_new[g.rows].unsqueeze(0).transpose(1, 2)
        else:
            kg = k_cache.index_select(0, g.kv_slots).view(g.num_rows, g.max_kv, hkv, d).transpose(1, 2)
            vg = v_cache.index_select(0, g.kv_slots).view(g.num_rows, g.max_kv, hkv, d).transpose(1, 2)
        if softcap is None and alibi is None:
            og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, is_causal=mask is None,
                                                scale=scale, enable_gqa=hkv != h)
        else:
            og = _attention_reference(qg, kg, vg, mask, scale, softcap, alibi, g.q_pos)
        og = og.transpose(1, 2).reshape(-1, h * d)  # (Bg * maxQ, H * D)
        if g.rows is not None:
            out[g.rows] = og
        else:
            out.index_copy_(0, g.out_index, og[g.valid])
    return out


def _attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                         scale: float, softcap: float | None, alibi: torch.Tensor | None,
                         q_pos: torch.Tensor) -> torch.Tensor:
    """Explicit attention for what SDPA cannot express: logit soft-capping and ALiBi biases.

    q: (B, H, Q, D); k, v: (B, Hkv, L, D); mask: (B, 1, Q, L) bool or None (causal).
    """
    b, h, nq, _ = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    if hkv != h:
        k = k.repeat_interleave(h // hkv, dim=1)
        v = v.repeat_interleave(h // hkv, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, H, Q, L)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if alibi is not None:
        rel = torch.arange(nk, device=q.device).view(1, 1, 1, nk) - q_pos.view(b, 1, nq, 1)  # j - p <= 0
        scores = scores + alibi.view(1, h, 1, 1).to(scores.device) * rel
    if mask is None:
        mask = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(nk - nq).view(1, 1, nq, nk)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1), v.float()).to(q.dtype)
