"""GPTQ error compensation for the group-wise formats (Frantar et al., 2022), calibrated on load.

Rounding column j of W alone leaves an output error (w_j - deq_j) * x_j. With H the second moment
of the inputs (in x in), the columns not yet quantized can absorb part of it: after quantizing
column j, every later column k moves by -err_j * U[j, k] / U[j, j], U the upper Cholesky factor of
H^-1 (the optimal update for the quadratic loss), so one column's error goes where the inputs
correlate with it. Columns run in blocks of ``BLOCK``; the update of later blocks is one product.

Columns go loudest input first (largest diagonal of H: the paper's "act-order"), so the columns
that matter most are rounded while the most columns are left to absorb their error. A group's
columns are then scattered over the pass, so every group's float16 step and min are fixed before
it, by tierlm's range search over the original weights weighted by the mean x^2 per column (the
importance of tierlm.quant.imatrix). In column order (``act_order=False``) a group's range is
instead picked when the pass reaches its first column, from its weights as updated by then.
Measured on the Brown press excerpt, q4 g64, calibrated on the 14 other Brown categories:

=====================================  ===============  ===============
columns, group ranges                  SmolLM2-135M     Gemma-3-270m
=====================================  ===============  ===============
in order, ranges when reached          +4.18%           +7.29%
in order, ranges fixed beforehand      +6.6%
act-order, ranges when first touched   +4.9%
act-order, ranges fixed beforehand     +3.3%            +7.0%
=====================================  ===============  ===============

The table was measured at commit 72068ca on an Intel Xeon. Rerun at commit d1d103f on an AMD EPYC
(bench/results/quant_quality.md), with the prompt attention and RoPE kernels landed in between,
the same settings give SmolLM2 +2.70% and Gemma-3 +8.03%, the same to the last digit on a second
run. The float perplexities are unchanged; whether the kernels or the CPU moved GPTQ by this point
was not isolated.

The calibration text moves it further. The default is the first window (BOS + 511 tokens) of each
of the 14 categories: SmolLM2 q4 g64 +2.70% as above. The second window of each category instead
(as many tokens): +5.28%. Both windows: +4.73%; four per category (28,672 tokens): +5.10%. More
text does not help, and one equal-sized draw against another differs by 2.6 points, so +2.70% is
within the 3% target on this calibration set but not a margin that holds for any text.

Act-order is not better at every width (in order -> act-order, bench/results/quant_quality.md):
SmolLM2 q5 +1.5 -> +1.4%, q3h +15.6 -> +16.9%, q3 +35.5 -> +37.0%; Gemma-3 q5 +0.43 -> +0.97%,
q3h +19.4 -> +17.9%, q3 +38.5 -> +40.6% (at commit 72068ca). It is the default because q4, the
width the targets ask about, gained on both models.

Two choices differ from the paper, both measured on SmolLM2 q4 g64 in column order, calibrated on
8 Brown categories:

* H sums each calibration token's input normalised to unit length. Unnormalised, this model's
  attention-sink (BOS) inputs, hundreds of times louder, dominate H and the fit trades every other
  token's error for theirs: +27.8% perplexity, worse than rounding alone; normalised: +15.5%.
* Group ranges come from tierlm's range search weighted by the unnormalised mean x^2 per column:
  +5.3%, against +7.9% for that weighted search alone and +25% for the plain search.

Layers are done in order, each calibrated on the output of the layers before it as quantized
(``SequentialGPTQ``), which needs one layer's weights and one matrix's moments at a time. It always
writes a weight store from the checkpoint (``gptq_store_tensors``; tierlm.quant.store), so a model
larger than RAM can be done too (``tierlm quantize --method gptq``, ``weight_memory=...``), and a
resident model reads that store whole: the calibration is paid on the first load only. The store's
manifest records the calibration (``calibration_meta``), so changing it builds a new store.
Against calibrating every layer on the float model (the first version, which held all matrices'
moments: 400 MB for SmolLM2, about 8 GB for a 1.1B model), sequential calibration is as good on
SmolLM2 (q4: +5.4% against +5.3%; q5 +0.9% against +1.6%) and better on Gemma-3 (q4: +6.8%
against +8.0%; bench/results/quant_quality.md). Tried and dropped on SmolLM2 q4 (+5.3% as above): the
asymmetric range search of tierlm.quant.base (+6.1%), ten times the damping (+5.6%), ranges
weighted by GPTQ's own 1 / [H^-1]_jj (+7.1%) or by its geometric mean with x^2 (+6.8%), inputs
normalised by sqrt |x| (+6.4%) or only above the median norm (+6.7%).

Tried and dropped with act-order (q4 g64; SmolLM2 +3.3% and Gemma-3 +7.0% as above):

* AWQ channel scales (Lin et al.) folded into the norms and the up rows before GPTQ, the exponent
  searched per matrix by the output error under the normalised H: SmolLM2 picked no scaling in 87
  of 90 matrices and got +4.3%; Gemma-3 picked 0.15-0.45 and got +6.9%, no better.
* Refitting each row's steps and mins to its codes by least squares under the normalised H, then
  GPTQ again with those ranges (two rounds): 8% less output error on synthetic data, but SmolLM2
  +4.3%. The normalised H is a worse guide to the ranges than the mean x^2 the search uses.

* Fitting each matrix to the float model's output rather than to its own weights on the inputs it
  now gets (the asymmetric objective of GPTAQ, Li et al. 2025): with f a token's input in the float
  model and x in the model quantized so far, sum |W f - Q x|^2 / |x|^2 is GPTQ's loss on the target
  T = W + W (C - H) (H + damp)^-1, C = sum f x^T / |x|^2, and the float model's hidden states run
  beside the quantized ones. SmolLM2: +7.9% with GPTQ's damping in the solve, +4.7% / +4.0% with 10 /
  100 times it, against +3.3% without the correction: fitted on 7,168 tokens, the correction adds
  more error on the evaluated text than it removes.
* The BOS row of each calibration sequence (the attention sink; position 0 of every window), SmolLM2:
  dropped from H and the mean x^2, +16.1% (unnormalised as well: +22.7%); counted k times in the
  normalised H, k = 16 / 64 / 256: +3.6 / +2.7 / +4.1%, against +3.4% for k = 1 in the same session
  (Gemma-3 at k = 64: +6.6% against +7.0%). The sink matters, but the sweep is not monotonic: these
  differences are the method's noise (about a point), so k stays 1 rather than picking the lucky draw.
* SignRound (Cheng et al., 2023) after GPTQ, layer by layer: each weight's rounding offset (within
  half a step of GPTQ's unrounded value) and each group's step and min tuned by signed gradient
  descent, 200 steps, against the layer's output on the calibration text (squared error per token
  relative to that output's norm). Codes re-rounded from the tuned step instead tripled layer 0's
  loss in 10 steps. On the 14 one-window categories the loss fell 20-40% per layer but rose 2-16% on
  held-out windows (overfitting); with 4 windows per category (28,672 tokens) it fell on held-out
  windows as well (layers 0-2: -0.2, -11, -13%), yet SmolLM2 came out at +3.60% (commit d1d103f,
  Intel Xeon), after 50 minutes of tuning against under 2 for GPTQ. GPTQ alone was not rerun on that
  machine: it had +3.3% at 72068ca there and has +2.70% at d1d103f on the AMD EPYC, so SignRound is
  no better by either figure.
* Incoherence rotation (as in QuIP# and QuaRot), measured at commit febc0cb on the AMD EPYC:
  W x = (W R)(R^T x) with R block-diagonal, random signs times an orthonormal Hadamard block; GPTQ
  quantizes W R on the inputs R^T x. Perplexity only needs the float weight deq(W R) R^T, so the
  trial changed no kernel; keeping it would need R^T x at run time before every quantized product
  (a 64-point Hadamard transform per group, cheap, but in every kernel path). Gemma-3 against +8.03%:
  blocks of 64 +5.21% (only the down matrices rotated +6.59%, all but them +4.78%), blocks of 128
  +5.54%, blocks of 64 in column order +4.55% (unrotated, in column order: +7.29% at 72068ca, above; with
  one matrix type quantized and the rest float: qkv +1.11%, o +0.65%, gate/up +1.63%, down +1.65%:
  no type dominates). SmolLM2 against +2.70%: blocks of 64 +5.75%, in column order +5.88%, without
  the signs +8.2%, only the down matrices rotated +3.09%. It closes two thirds of Gemma-3's gap to the 3%
  target and makes SmolLM2 worse, so it was not kept.

For scale, llama.cpp's own formats requantized from the same files (bench/results/
llamacpp_q4_quality.md): Q4_0 (4.5 bits a weight, as q4 g64) +17.4% on SmolLM2 and +48% on
Gemma-3; Q4_1 (5 bits) 0% on SmolLM2, whose file is Q4_1, and +21% on Gemma-3.

The result is an ordinary QuantizedWeight of the format (same codes layout, same kernels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tierlm.quant.base import QuantError, QuantizedWeight, minmax_quantize

BLOCK = 128  # columns per batched update; groups must divide it
DAMP = 0.01  # fraction of H's mean diagonal added to it: keeps the factorisation stable
ACT_ORDER = True  # quantize the columns with the loudest inputs first (the paper's "act-order")
CALIB_CTX = 512  # tokens per calibration sequence (BOS + 511), or the model's context if shorter


def calibration_meta(max_position: int) -> dict:
    """What a GPTQ store's codes depend on besides the checkpoint, format and group: recorded in its
    manifest (tierlm.quant.store), so a store calibrated otherwise is rebuilt, not reused."""
    from tierlm.quant import imatrix

    return {"text": "brown", "categories": list(imatrix.CALIB_CATEGORIES), "ctx": min(CALIB_CTX, max_position),
            "act_order": ACT_ORDER, "damp": DAMP, "block": BLOCK}


@dataclass
class InputMoments:
    """What GPTQ needs of one matrix's inputs, summed over calibration tokens."""

    normalized: torch.Tensor  # float64 (in, in): sum of u u^T, u = x / |x|
    squares: torch.Tensor  # float64 (in,): sum of x^2 per column
    num_tokens: int

    @property
    def importance(self) -> torch.Tensor:
        """float32 (in,): mean x^2 per column (the importance vector of tierlm.quant.imatrix)."""
        return (self.squares / self.num_tokens).float()

    def add(self, x: torch.Tensor) -> None:
        """x (N, in): one batch of inputs."""
        xd = x.detach().double()
        u = xd / xd.norm(dim=1, keepdim=True).clamp(min=1e-30)
        self.normalized += u.T @ u
        self.squares += xd.square().sum(dim=0)
        self.num_tokens += x.shape[0]

    @staticmethod
    def zeros(num_cols: int) -> InputMoments:
        return InputMoments(torch.zeros(num_cols, num_cols, dtype=torch.float64),
                            torch.zeros(num_cols, dtype=torch.float64), 0)


def gptq_quantize(quantizer, w: torch.Tensor, moments: InputMoments, act_order: bool = ACT_ORDER) -> QuantizedWeight:
    """float (out, in) -> the ``quantizer``'s format (a group-wise Quantizer: levels, group, search,
    pack), columns quantized with error compensation (module docstring): in order, or with
    ``act_order`` loudest input first."""
    r, k = w.shape
    group, levels = quantizer.group, quantizer.levels
    if k % group or BLOCK % group:
        raise QuantError(f"GPTQ runs groups of at most {BLOCK} weights dividing the row: got {group} for {k}")
    if moments.normalized.shape != (k, k):
        raise QuantError(f"input moments of {moments.normalized.shape[0]} columns for a matrix of {k}")
    W = w.detach().double().clone()  # (R, K), updated as columns are quantized
    H = moments.normalized.clone()
    dead = torch.diag(H) == 0  # inputs that never fire: their weights cannot matter
    H[dead, dead] = 1
    W[:, dead] = 0
    H += DAMP * torch.diag(H).mean() * torch.eye(k, dtype=H.dtype)
    # perm[p]: the column quantized p-th. W and H are permuted so that the pass runs left to right.
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else torch.arange(k)
    pos = torch.argsort(perm)  # pos[c]: where column c is quantized
    order = perm.tolist()  # perm as ints: read once per column in the loop below
    W, H = W[:, perm], H[perm][:, perm]
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)  # (K, K), permuted
    imp = moments.importance
    codes = torch.empty(r, k, dtype=torch.uint8)  # original column order
    steps = torch.empty(r, k // group, dtype=torch.float16)
    mins = torch.empty(r, k // group, dtype=torch.float16)
    step_g = torch.empty(r, k // group, dtype=torch.float64)
    low_g, inv_g = torch.empty_like(step_g), torch.empty_like(step_g)
    ready = [False] * (k // group)

    def set_range(g: int, cur: torch.Tensor) -> None:  # cur (R, group): the weights the range is fitted to
        _, s, m = minmax_quantize(cur.float(), levels, group, quantizer.search, imp[g * group:(g + 1) * group])
        steps[:, g], mins[:, g] = s[:, 0], m[:, 0]
        step_g[:, g], low_g[:, g] = s[:, 0].double(), m[:, 0].double()
        inv_g[:, g] = torch.where(step_g[:, g] > 0, 1.0 / step_g[:, g], torch.zeros_like(step_g[:, g]))
        ready[g] = True

    if act_order:  # a group's columns are scattered over the pass: fix its range from the original weights
        for g in range(k // group):
            set_range(g, W[:, pos[g * group:(g + 1) * group]])
    for b0 in range(0, k, BLOCK):
        b1 = min(k, b0 + BLOCK)
        wb = W[:, b0:b1].clone()  # (R, B)
        errs = torch.zeros_like(wb)
        ub = U[b0:b1, b0:b1]
        for i in range(b1 - b0):
            c = order[b0 + i]
            g = c // group
            if not ready[g]:  # in order, at the group's first column: its range from the weights as updated
                set_range(g, wb[:, i:i + group])  # so far (a group never straddles blocks: BLOCK % group == 0)
            step, low = step_g[:, g], low_g[:, g]
            q = torch.round((wb[:, i] - low) * inv_g[:, g]).clamp_(0, levels - 1)  # (R,)
            codes[:, c] = q.to(torch.uint8)
            e = (wb[:, i] - (q * step + low)) / ub[i, i]
            wb[:, i:] -= e[:, None] * ub[i, i:][None, :]
            errs[:, i] = e
        W[:, b1:] -= errs @ U[b0:b1, b1:]
    return QuantizedWeight(quantizer.name, (r, k), quantizer.pack(codes), group, steps, mins)


class SequentialGPTQ:
    """GPTQ over a model's layers in order, as in the paper's reference code: layer i is calibrated
    on the output of layers 0..i-1 *as already quantized*, so each layer corrects the error the ones
    before it left; inside a layer qkv, o, up and down go in that order, each on inputs computed
    with the matrices before it quantized. Only the calibration sequences' hidden states (T, d each)
    and one matrix's moments are kept, so a model larger than RAM can be done one layer at a time
    (``gptq_store_tensors``). The passes cost about five forward passes of the calibration text.

    ``model`` (a tierlm.model.transformer.Transformer with its weights resident) runs with
    ``method`` (a tierlm.quant.linear.QuantLinear): float matrices go to its dense method, quantized
    ones to its kernels. ``quantize_layer(i)`` must be called for i = 0, 1, ... in order, with
    ``model.w.layers[i]`` holding layer i's float weights.
    """

    def __init__(self, model, method, sequences: list[list[int]], block_size: int = 16):
        from tierlm.model.attention import KVCache, SeqSlice, build_attention_batch

        self.model, self.method, self.next_layer = model, method, 0
        model.linear = method
        self.steps = []  # per sequence: (attention batch, its rope rows, hidden states (T, d))
        for seq in sequences:
            n = len(seq)
            table = list(range(1, 1 + -(-n // block_size)))  # block 0 is the null block
            batch = build_attention_batch([SeqSlice(0, n, n, table)], block_size, model.layer_windows, model.device)
            with torch.inference_mode():
                self.steps.append((batch, model.rope_for(batch.positions),
                                   model.embed(torch.tensor(seq, device=model.device), batch.positions)))
        # One layer's K/V at a time: every pass writes the slots it reads.
        cfg = model.cfg
        self.cache = KVCache(1, 1 + -(-max(map(len, sequences)) // block_size), block_size, cfg.num_kv_heads,
                             cfg.head_dim, model.dtype, model.device)

    def _run_layer(self, i: int) -> list[torch.Tensor]:
        m, c = self.model, self.cache
        with torch.inference_mode():
            return [m.block(i, h, b, c.k[0], c.v[0], rope) for b, rope, h in self.steps]

    def quantize_layer(self, i: int) -> None:
        """Replace layer i's matrices in place by their GPTQ quantizations (prepared by the method)
        and move the hidden states past the quantized layer."""
        from tierlm.model.linear import plain_weight
        from tierlm.quant.imatrix import MATRICES, _Recorder

        if i != self.next_layer:
            raise QuantError(f"GPTQ quantizes layers in order: layer {self.next_layer} is next, not {i}")
        lw = self.model.w.layers[i]
        for m in MATRICES:
            w = getattr(lw, m)
            moments = InputMoments.zeros(plain_weight(w).shape[1])
            self.model.linear = _Recorder(self.method, {id(w): f"layers.{i}.{m}"},
                                          lambda _n, x, mom=moments: mom.add(x))
            try:
                self._run_layer(i)
            finally:
                self.model.linear = self.method
            setattr(lw, m, self.method.prepare(gptq_quantize(self.method.quantizer, plain_weight(w), moments)))
        self.steps = [(b, rope, h) for (b, rope, _), h in zip(self.steps, self._run_layer(i), strict=True)]
        self.next_layer += 1


def gptq_store_tensors(opened, dtype: torch.dtype, method, sequences: list[list[int]]):
    """``tierlm.loader.weights.store_tensors`` with every layer matrix GPTQ-quantized by ``method`` (a
    QuantLinear) and an untied head rounded by it: yields (store name, tensor or QuantizedWeight)
    in the store's order, with one layer of float32 weights in memory at a time. Calibration runs
    in float32; the tensors that stay float are yielded in ``dtype``."""
    from tierlm.loader.weights import GLOBAL_FIELDS, LAYER_FIELDS, WeightAssembler
    from tierlm.model.transformer import Transformer

    asm = WeightAssembler(opened.family, opened.config, opened.reader, torch.float32)
    g = asm.globals()
    model = Transformer(opened.config, g, torch.float32, method)  # prepares (quantizes) an untied head
    for name in GLOBAL_FIELDS:
        t = getattr(g, name)
        if t is not None and not (name == "lm_head" and g.tied):
            yield name, t if not isinstance(t, torch.Tensor) else t.to(dtype)
    gptq = SequentialGPTQ(model, method, sequences)
    # Only layer i is held: the others are None (block(i) reads model.w.layers[i]).
    g.layers.extend([None] * opened.config.num_layers)
    for i in range(opened.config.num_layers):
        g.layers[i] = asm.layer(i)
        gptq.quantize_layer(i)
        for name in LAYER_FIELDS:
            t = getattr(g.layers[i], name)
            if t is not None:
                yield f"layers.{i}.{name}", t if not isinstance(t, torch.Tensor) else t.to(dtype)
        g.layers[i] = None
    asm.finish()
