"""Attention features no built-in family exercises: logit soft-capping (Gemma 2, added as a family
file and checked against transformers) and ALiBi (checked against a direct formula)."""

from __future__ import annotations

import math

import torch

from tests.kernel_check import built_or_none
from tierlm import LLM
from tierlm.model.attention import AttentionBatch, SeqSlice, alibi_slopes, build_attention_batch, paged_attention


def _gemma2_family_file(folder) -> None:
    """Gemma 2 as a family file derived from the built-in Gemma 3 one: no QK-norm, one RoPE base,
    attention and final logit soft-capping (which Gemma 3's transformers code never applies)."""
    from importlib import resources

    text = (resources.files("tierlm.model") / "specs" / "gemma3.toml").read_text()
    drop = ("q_norm", "k_norm", "rope_local_theta", "sliding_window_pattern", "rope_scaling")
    lines = [ln for ln in text.splitlines() if not any(d in ln for d in drop)]
    text = "\n".join(lines).replace('name = "gemma3"', 'name = "gemma2"')
    text = text.replace('["Gemma3ForCausalLM"]', '["Gemma2ForCausalLM"]').replace('["gemma3_text"]', '["gemma2"]')
    text = text.replace('rope_theta = ["rope_parameters.full_attention.rope_theta", "rope_theta"]',
                        'rope_theta = ["rope_parameters.rope_theta", "rope_theta"]')
    (folder / "gemma2.toml").write_text(text + "\n")


def test_soft_capped_attention_and_logits_match_transformers(tmp_path):
    import transformers

    from tests.hf_models import randomize_

    specs = tmp_path / "specs"
    specs.mkdir()
    _gemma2_family_file(specs)
    cfg = transformers.Gemma2Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=5,
                                    query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
                                    final_logit_softcapping=3.0, max_position_embeddings=128,
                                    attn_implementation="eager")  # the path that applies soft-capping
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(cfg).eval()
    randomize_(model, seed=5)
    model.save_pretrained(tmp_path / "model")
    ids = torch.randint(0, 300, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    llm = LLM(tmp_path / "model", dtype="float32", max_num_batched_tokens=8, spec_dirs=[specs])
    c = llm.arch
    assert (c.family, c.attn_softcap, c.final_softcap) == ("gemma2", 2.0, 3.0)
    assert c.layer_types == ("sliding", "full", "sliding")
    got = llm.score(ids)
    assert got.abs().max() <= 3.0 + 1e-6  # the final cap holds
    assert torch.allclose(got, ref, atol=1e-4, rtol=0), (got - ref).abs().max()


def test_alibi_slopes_follow_the_paper():
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    # 12 heads: the 8 power-of-two slopes, then every other slope of the 16-head sequence.
    sixteen = [2.0 ** (-(i + 1) / 2) for i in range(16)]
    assert torch.allclose(alibi_slopes(12), torch.tensor([2.0 ** -(i + 1) for i in range(8)] + sixteen[0::2][:4]))


def test_alibi_paged_attention_equals_direct_formula():
    torch.manual_seed(0)
    heads, head_dim, block = 4, 8, 4
    seqs = [SeqSlice(query_start=0, query_len=6, context_len=6, block_table=[1, 2]),
            SeqSlice(query_start=6, query_len=1, context_len=3, block_table=[3])]
    k_cache = torch.zeros(5 * block, 1, head_dim)
    v_cache = torch.zeros(5 * block, 1, head_dim)
    # The second sequence has two cached tokens already.
    old_k, old_v = torch.randn(2, 1, head_dim), torch.randn(2, 1, head_dim)
    k_cache[3 * block:3 * block + 2], v_cache[3 * block:3 * block + 2] = old_k, old_v
    batch: AttentionBatch = build_attention_batch(seqs, block, {"full": None})
    q, k, v = torch.randn(7, heads, head_dim), torch.randn(7, 1, head_dim), torch.randn(7, 1, head_dim)
    slopes = alibi_slopes(heads)
    out = paged_attention(q, k, v, k_cache, v_cache, batch, "full", 0.5, alibi=slopes).view(7, heads, head_dim)

    def direct(qs, ks, vs, q_pos):
        rows = []
        for i, p in enumerate(q_pos):
            scores = torch.einsum("hd,jd->hj", qs[i], ks[: p + 1, 0]) * 0.5
            scores = scores + slopes[:, None] * (torch.arange(p + 1) - p)[None, :].float()
            rows.append(torch.einsum("hj,jd->hd", scores.softmax(-1), vs[: p + 1, 0]))
        return torch.stack(rows)

    assert torch.allclose(out[:6], direct(q[:6], k[:6], v[:6], list(range(6))), atol=1e-5)
    k2, v2 = torch.cat([old_k, k[6:]]), torch.cat([old_v, v[6:]])
    assert torch.allclose(out[6:], direct(q[6:], k2, v2, [2]), atol=1e-5)
    assert math.isfinite(out.abs().max().item())


def _decode_case(dtype, window, hkv, seed):
    """Three decode rows with 1, 9 and 37 tokens in context (windows cut the last two), one prompt
    chunk beside them; the caches hold every row's earlier tokens."""
    g = torch.Generator().manual_seed(seed)
    heads, head_dim, block = 8, 64, 4
    lens = [1, 9, 37]
    tables, nxt = [], 1
    for n in lens + [5]:
        tables.append(list(range(nxt, nxt + -(-n // block))))
        nxt += len(tables[-1])
    seqs = [SeqSlice(query_start=i, query_len=1, context_len=n, block_table=t)
            for i, (n, t) in enumerate(zip(lens, tables))]
    seqs.append(SeqSlice(query_start=3, query_len=5, context_len=5, block_table=tables[3]))
    k_cache = torch.randn(nxt * block, hkv, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(nxt * block, hkv, head_dim, generator=g).to(dtype)
    k_cache[:block], v_cache[:block] = 0, 0  # the null block
    # q as the fused qkv output's view: rows (heads + hkv) * head_dim apart
    qk = torch.randn(8, heads + hkv, head_dim, generator=g).to(dtype)
    q = qk[:, :heads]
    k = torch.randn(8, hkv, head_dim, generator=g).to(dtype)
    v = torch.randn(8, hkv, head_dim, generator=g).to(dtype)
    windows = {"full": None, "sliding": window}
    return q, k, v, k_cache, v_cache, build_attention_batch(seqs, block, windows), windows


def test_decode_kernel_equals_the_gather_and_sdpa_path():
    from tierlm.model.attention import DecodeAttention
    from tierlm.model.kernels import cpu_has_avx2

    for dtype, window, hkv in ((torch.float32, None, 2), (torch.float32, 6, 8), (torch.bfloat16, None, 1),
                               (torch.bfloat16, 6, 2)):
        q, k, v, kc, vc, batch, windows = _decode_case(dtype, window, hkv, seed=hkv)
        decode = built_or_none(DecodeAttention.for_model(torch.device("cpu"), None, None, windows), cpu_has_avx2(),
                               "decode attention kernel")
        if decode is None:
            return
        assert decode.takes(batch.groups[0], q, kc) and not decode.takes(batch.groups[1], q, kc)
        for layer_type in ("full", "sliding"):
            ref = paged_attention(q, k, v, kc.clone(), vc.clone(), batch, layer_type, 0.125)
            got = paged_attention(q, k, v, kc.clone(), vc.clone(), batch, layer_type, 0.125, decode=decode)
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            assert torch.allclose(got.float(), ref.float(), atol=tol, rtol=0), (dtype, window, hkv, layer_type)
            assert torch.equal(got[3:], ref[3:])  # the prompt chunk still goes through SDPA


def test_decode_kernel_declines_what_it_cannot_do():
    from tierlm.model.attention import DecodeAttention
    from tierlm.quant.kv import QuantizedSlots

    q, k, v, kc, vc, batch, windows = _decode_case(torch.float32, None, 2, seed=0)
    assert DecodeAttention.for_model(torch.device("cpu"), 30.0, None, windows) is None  # soft-capping
    assert DecodeAttention.for_model(torch.device("cpu"), None, alibi_slopes(8), windows) is None
    decode = DecodeAttention.for_model(torch.device("cpu"), None, None, windows)
    if decode is None:
        return
    slots = QuantizedSlots("q8", kc.shape[0], 2, 64, torch.float32)
    assert not decode.takes(batch.groups[0], q, slots)  # quantized KV: dequantized by the gather
    assert not decode.takes(batch.groups[0], q.to(torch.bfloat16), kc)  # dtypes differ


def _prompt_case(dtype, window, heads, hkv, head_dim, seed):
    """One decode row beside three prompt rows: a whole 37-token prompt, a 21-token chunk at position
    39 (its earlier tokens already cached) and a 3-token prompt; caches random, as a step sees them."""
    g = torch.Generator().manual_seed(seed)
    block = 4
    spans = [(1, 17), (37, 37), (21, 60), (3, 3)]  # (query_len, context_len)
    tables, nxt, seqs, start = [], 1, [], 0
    for q_len, ctx in spans:
        tables.append(list(range(nxt, nxt + -(-ctx // block))))
        nxt += len(tables[-1])
        seqs.append(SeqSlice(query_start=start, query_len=q_len, context_len=ctx, block_table=tables[-1]))
        start += q_len
    k_cache = torch.randn(nxt * block, hkv, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(nxt * block, hkv, head_dim, generator=g).to(dtype)
    k_cache[:block], v_cache[:block] = 0, 0  # the null block
    qk = torch.randn(start, heads + hkv, head_dim, generator=g).to(dtype)  # q as a view into qkv
    q = qk[:, :heads]
    k = torch.randn(start, hkv, head_dim, generator=g).to(dtype)
    v = torch.randn(start, hkv, head_dim, generator=g).to(dtype)
    windows = {"full": None, "sliding": window}
    return q, k, v, k_cache, v_cache, build_attention_batch(seqs, block, windows), windows


def test_prefill_kernel_equals_the_gather_and_sdpa_path():
    from tierlm.model.attention import PrefillAttention
    from tierlm.model.kernels import cpu_has_avx512f

    for dtype, window, heads, hkv, head_dim in ((torch.float32, None, 9, 3, 64), (torch.float32, 6, 8, 8, 64),
                                                (torch.bfloat16, None, 8, 1, 128), (torch.bfloat16, 20, 4, 1, 256),
                                                (torch.float32, 512, 4, 2, 256)):
        q, k, v, kc, vc, batch, windows = _prompt_case(dtype, window, heads, hkv, head_dim, seed=heads + hkv)
        prefill = built_or_none(PrefillAttention.for_model(torch.device("cpu"), None, None, windows),
                                cpu_has_avx512f(), "prompt attention kernel")
        if prefill is None:
            return
        decode_group, prompt_group = batch.groups
        assert prefill.takes(prompt_group, q, kc)
        assert prefill.takes(decode_group, q, kc)  # one query a row is a prompt row too (here: no decode kernel)
        assert prompt_group.spans.tolist() == [[1, 37, 37], [38, 21, 60], [59, 3, 3]]
        for layer_type in ("full", "sliding"):
            ref = paged_attention(q, k, v, kc.clone(), vc.clone(), batch, layer_type, 0.125)
            got = paged_attention(q, k, v, kc.clone(), vc.clone(), batch, layer_type, 0.125, prefill=prefill)
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            case = (dtype, window, heads, hkv, head_dim, layer_type)
            assert torch.allclose(got.float(), ref.float(), atol=tol, rtol=0), case


def test_prefill_kernel_output_does_not_depend_on_chunking():
    """A 50-token prompt attended whole, and in chunks of 16, 20 and 14 over the cache the earlier
    chunks filled: the same bits (key blocks sit at absolute positions; rows are independent)."""
    from tierlm.model.attention import PrefillAttention
    from tierlm.model.kernels import cpu_has_avx512f

    g = torch.Generator().manual_seed(3)
    heads, hkv, d, block, n = 9, 3, 64, 16, 50
    windows = {"full": None}
    prefill = built_or_none(PrefillAttention.for_model(torch.device("cpu"), None, None, windows),
                            cpu_has_avx512f(), "prompt attention kernel")
    if prefill is None:  # a CPU without AVX-512F: the loader said so (built_or_none checked it)
        return
    q = torch.randn(n, heads, d, generator=g)
    k = torch.randn(n, hkv, d, generator=g)
    v = torch.randn(n, hkv, d, generator=g)
    table = [1, 2, 3, 4]

    def run(chunks):
        kc, vc = torch.zeros(5 * block, hkv, d), torch.zeros(5 * block, hkv, d)
        outs, done = [], 0
        for c in chunks:
            seq = SeqSlice(query_start=0, query_len=c, context_len=done + c, block_table=table)
            batch = build_attention_batch([seq], block, windows)
            sl = slice(done, done + c)
            outs.append(paged_attention(q[sl], k[sl], v[sl], kc, vc, batch, "full", 0.125, prefill=prefill))
            done += c
        return torch.cat(outs)

    whole = run([50])
    assert torch.equal(whole, run([16, 20, 14]))
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, scale=0.125, enable_gqa=True)
    assert torch.allclose(whole, ref.transpose(0, 1).reshape(n, heads * d), atol=1e-5, rtol=0)


def test_prefill_kernel_declines_what_it_cannot_do():
    from tierlm.model.attention import PrefillAttention
    from tierlm.model.kernels import cpu_has_avx512f
    from tierlm.quant.kv import QuantizedSlots

    q, k, v, kc, vc, batch, windows = _prompt_case(torch.float32, None, 8, 2, 64, seed=0)
    assert PrefillAttention.for_model(torch.device("cpu"), 30.0, None, windows) is None  # soft-capping
    assert PrefillAttention.for_model(torch.device("cpu"), None, alibi_slopes(8), windows) is None
    prefill = built_or_none(PrefillAttention.for_model(torch.device("cpu"), None, None, windows),
                            cpu_has_avx512f(), "prompt attention kernel")
    if prefill is None:
        return
    group = batch.groups[1]
    assert not prefill.takes(group, q, QuantizedSlots("q8", kc.shape[0], 2, 64, torch.float32))  # quantized KV
    assert not prefill.takes(group, q.to(torch.bfloat16), kc)  # dtypes differ
    q32 = torch.randn(q.shape[0], 8, 32)
    assert not prefill.takes(group, q32, torch.randn(kc.shape[0], 2, 32))  # head size not a multiple of 64


def test_attention_batch_exact_indices_and_masks():
    """Two decode rows and two prompt chunks (one padded to the other's 3 tokens), block size 4."""
    seqs = [SeqSlice(query_start=0, query_len=1, context_len=6, block_table=[7, 2]),
            SeqSlice(query_start=1, query_len=1, context_len=3, block_table=[5]),
            SeqSlice(query_start=2, query_len=3, context_len=5, block_table=[1, 4]),
            SeqSlice(query_start=5, query_len=2, context_len=2, block_table=[3])]
    b = build_attention_batch(seqs, 4, {"full": None, "sliding": 2})
    assert b.positions.tolist() == [5, 2, 2, 3, 4, 0, 1]
    assert b.slot_mapping.tolist() == [9, 22, 6, 7, 16, 12, 13]  # table[p // 4] * 4 + p % 4
    dec, multi = b.groups
    assert (dec.num_rows, dec.max_q, dec.max_kv, dec.rows, dec.fresh) == (2, 1, 6, slice(0, 2), False)
    assert dec.kv_slots.tolist() == [28, 29, 30, 31, 8, 9, 20, 21, 22, 0, 0, 0]  # past a row's context: slot 0
    assert dec.q_pos.tolist() == [[5], [2]] and dec.q_index.tolist() == [0, 1] and dec.out_index.tolist() == [0, 1]
    assert dec.mask("full").tolist() == [[[[True] * 6]], [[[True] * 3 + [False] * 3]]]
    assert dec.mask("sliding").tolist() == [[[[False] * 4 + [True] * 2]], [[[False, True, True] + [False] * 3]]]
    assert (multi.num_rows, multi.max_q, multi.max_kv, multi.rows, multi.fresh) == (2, 3, 5, None, False)
    assert multi.q_index.tolist() == [2, 3, 4, 5, 6, 0] and multi.valid.tolist() == [True] * 5 + [False]
    assert multi.out_index.tolist() == [2, 3, 4, 5, 6] and multi.q_pos.tolist() == [[2, 3, 4], [0, 1, 0]]
    assert multi.kv_slots.tolist() == [4, 5, 6, 7, 16, 12, 13, 0, 0, 0]
    T, F = True, False
    assert multi.mask("full").tolist() == [[[[T, T, T, F, F], [T, T, T, T, F], [T, T, T, T, T]]],
                                           [[[T, F, F, F, F], [T, T, F, F, F], [T, F, F, F, F]]]]  # padding: key 0
    assert multi.mask("sliding").tolist() == [[[[F, T, T, F, F], [F, F, T, T, F], [F, F, F, T, T]]],
                                              [[[T, F, F, F, F], [T, T, F, F, F], [T, F, F, F, F]]]]
    assert multi.mask("full") is multi.mask("full")  # made once, kept for the step's other layers
    # one prompt with nothing cached: plain causal attention (no mask) unless a window cuts it
    fresh = build_attention_batch([SeqSlice(0, 3, 3, [1])], 4, {"full": None, "sliding": 2}).groups[0]
    assert fresh.fresh and fresh.mask("full") is None
    assert fresh.mask("sliding").tolist() == [[[[T, F, F], [T, T, F], [F, T, T]]]]
