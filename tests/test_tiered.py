"""Tiered weights (tierlm.memory): plan values, store reuse/rebuild, exact outputs under budgets,
streaming errors, and peak RSS under a budget."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap

import pytest
import torch

from tierlm import LLM, SamplingParams
from tierlm.config import ConfigError
from tierlm.memory.plan import ModelLayout, PlanError, TensorInfo, make_plan, parse_budget
from tierlm.memory.store import StoreError, WeightStore, write_store

# -- plan: exact values --------------------------------------------------------------------------

def _layout(num_layers: int = 2) -> ModelLayout:
    # Per layer (row_bytes 100): qkv 30 rows, o 20 rows, up 60 rows, down 30 rows = 14,000 bytes.
    layers = tuple((TensorInfo(f"layers.{i}.qkv", 30, 100), TensorInfo(f"layers.{i}.o", 20, 100),
                    TensorInfo(f"layers.{i}.up", 60, 100), TensorInfo(f"layers.{i}.down", 30, 100))
                   for i in range(num_layers))
    return ModelLayout(layers, TensorInfo("lm_head", 250, 100), always_resident_bytes=64, embed_bytes=5000)


def _rows(plan, kind="layer", index=0):
    unit = next(u for u in plan.units if u.kind == kind and u.index == index)
    return [(s.tensor.name.rsplit(".", 1)[-1], s.row_start, s.resident_end, s.row_end) for s in unit.segments]


def test_plan_ffn_first_when_the_share_holds_an_ffn_tensor():
    # Streamable bytes: 2 layers x 14,000 + head 25,000 = 53,000. A 26,500 budget = fraction 0.5:
    # each layer keeps 7,000 bytes >= down (3,000): FFN first; up (6,000) fits whole, down does
    # not, so the remaining 1,000 bytes spread evenly over down, qkv, o (8,000 bytes): 1/8 of rows.
    plan = make_plan(_layout(), 26_500, window=3)
    assert plan.chosen_order == "ffn_first"
    assert _rows(plan) == [("qkv", 0, 3, 30), ("o", 0, 2, 20), ("up", 0, 60, 60), ("down", 0, 3, 30)]
    # The head (2,500 bytes... 250 rows) is cut into pieces of at most one layer (140 rows).
    assert _rows(plan, "head", 0) == [("lm_head", 0, 70, 140)]
    assert _rows(plan, "head", 1) == [("lm_head", 140, 195, 250)]
    assert plan.num_slots == 4
    assert not plan.embed_resident


def test_plan_attention_first_below_one_ffn_tensor():
    # Fraction 0.1: 1,400 bytes per layer < down (3,000): attention first; qkv (3,000) does not
    # fit, so all 1,400 bytes spread over all four tensors: 1400/14000 = 1/10 of each one's rows.
    plan = make_plan(_layout(), 5_300, window=1)
    assert plan.chosen_order == "attn_first"
    assert _rows(plan) == [("qkv", 0, 3, 30), ("o", 0, 2, 20), ("up", 0, 6, 60), ("down", 0, 3, 30)]
    # Forced orders (the ablations) ignore the threshold: at 7,000 bytes per layer qkv and o
    # (5,000) are whole, and 2,000 bytes spread over up and down (9,000): 2/9 of their rows.
    forced = make_plan(_layout(), 26_500, order="attn_first")
    assert _rows(forced) == [("qkv", 0, 30, 30), ("o", 0, 20, 20), ("up", 0, 13, 60), ("down", 0, 6, 30)]


def test_plan_splits_a_matrix_stored_as_parts_part_by_part():
    # qkv stored as three parts (q and k of one block type, v of another: WeightStore.parts): q 20 rows,
    # k 10 rows of 100 bytes, v 10 rows of 150 bytes; then o, up, down as in _layout. 15,500 bytes a
    # layer, a head of the same size: fraction 5,002 / 31,000 keeps 2,500 bytes of the layer, below down
    # (3,000): attention first. q (2,000) is whole; the 500 bytes left spread over k, v, o, up, down
    # (13,500 bytes): rows * 500 // 13,500 each, so 2 of up's 60 and 1 of down's 30.
    parts = (TensorInfo("layers.0.qkv.0", 20, 100), TensorInfo("layers.0.qkv.1", 10, 100),
             TensorInfo("layers.0.qkv.2", 10, 150))
    rest = (TensorInfo("layers.0.o", 20, 100), TensorInfo("layers.0.up", 60, 100), TensorInfo("layers.0.down", 30, 100))
    layout = ModelLayout((parts + rest,), TensorInfo("lm_head", 100, 155), always_resident_bytes=0, embed_bytes=0)
    plan = make_plan(layout, 5_002)
    assert plan.chosen_order == "attn_first"
    unit = plan.units[0]
    assert [(s.tensor.name, s.row_start, s.resident_end, s.row_end) for s in unit.segments] == [
        ("layers.0.qkv.0", 0, 20, 20), ("layers.0.qkv.1", 0, 0, 10), ("layers.0.qkv.2", 0, 0, 10),
        ("layers.0.o", 0, 0, 20), ("layers.0.up", 0, 2, 60), ("layers.0.down", 0, 1, 30)]
    assert unit.resident_bytes == 2_000 + 200 + 100 and unit.streamed_bytes == 15_500 - 2_300
    # with room for an FFN tensor the FFN goes first and the parts share the rest like any tensors
    ffn = make_plan(layout, 14_000)  # 7,000 a layer: up (6,000) whole, 1,000 over down, q, k, v, o (9,500)
    assert ffn.chosen_order == "ffn_first"
    assert [s.resident_end for s in ffn.units[0].segments] == [2, 1, 1, 2, 60, 3]


def test_plan_whole_layer_locking_and_full_budget():
    plan = make_plan(_layout(), 15_000, locking="whole_layer")
    assert _rows(plan, "layer", 0) == [("qkv", 0, 30, 30), ("o", 0, 20, 20), ("up", 0, 60, 60), ("down", 0, 30, 30)]
    assert _rows(plan, "layer", 1) == [("qkv", 0, 0, 30), ("o", 0, 0, 20), ("up", 0, 0, 60), ("down", 0, 0, 30)]
    assert plan.streamed_bytes_per_pass == 14_000 + 25_000
    full = make_plan(_layout(), _layout().total_bytes)
    assert not full.streams and full.embed_resident and full.ring_bytes == 0


def test_budget_parsing_and_bad_values():
    assert parse_budget("2GiB", 0) == 2 * 2**30
    assert parse_budget("500MB", 0) == 500 * 10**6
    assert parse_budget("25%", 1000) == 250
    assert parse_budget(123, 0) == 123
    for bad in ("lots", "-5%", "-1GiB"):
        with pytest.raises(PlanError, match="not a size"):
            parse_budget(bad, 1000)
    with pytest.raises(PlanError, match="locking must be one of"):
        make_plan(_layout(), 100, locking="random")


# -- the store -----------------------------------------------------------------------------------

def test_store_round_trip_alignment_and_corruption(tmp_path):
    tensors = [("a", torch.arange(10, dtype=torch.float32)), ("b", torch.randn(7, 5).to(torch.bfloat16))]
    write_store(tmp_path / "s", tensors, {"k": 1})
    store = WeightStore(tmp_path / "s")
    assert store.meta == {"k": 1}
    assert [e.offset for e in store.tensors.values()] == [0, 4096]
    assert torch.equal(store.read("a"), tensors[0][1])
    assert torch.equal(store.read("b"), tensors[1][1])
    assert [t.tolist() for t in store.read_rows("b", [(1, 3), (5, 7)])] == \
        [tensors[1][1][1:3].tolist(), tensors[1][1][5:7].tolist()]
    assert torch.equal(store.read_row_set("b", [4, 0]), tensors[1][1][[4, 0]])
    store.close()
    data = bytearray((tmp_path / "s" / "weights.bin").read_bytes())
    data[4096 + 3] ^= 0xFF
    (tmp_path / "s" / "weights.bin").write_bytes(bytes(data))
    with pytest.raises(StoreError, match="tensor 'b' fails its checksum"):
        WeightStore(tmp_path / "s").read("b")
    (tmp_path / "s" / "weights.bin").write_bytes(bytes(data[:5000]))
    with pytest.raises(StoreError, match="manifest says"):
        WeightStore(tmp_path / "s")


# -- exact outputs under budgets -----------------------------------------------------------------

@pytest.fixture(scope="module")
def mid_model(tmp_path_factory):
    """A 4-layer Llama with ~3 MB layers (fp32), so plans have real row splits."""
    import transformers

    from tests.hf_models import randomize_

    folder = tmp_path_factory.mktemp("tier-llama")
    cfg = transformers.LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False,
                                   max_position_embeddings=512)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    randomize_(model)
    model.save_pretrained(folder)
    return folder


PROMPT = list(range(5, 60))


def _run(folder, **kw):
    llm = LLM(folder, kv_cache_tokens=512, max_model_len=256, **kw)
    tokens = llm.generate([PROMPT], SamplingParams(max_tokens=10, temperature=0))[0].token_ids
    return llm, tokens, llm.score(PROMPT)


@pytest.mark.parametrize("budget", ["10%", "50%", "100%"])
def test_outputs_identical_to_resident_model(mid_model, tmp_path, budget):
    _, ref_tokens, ref_logits = _run(mid_model)
    llm, tokens, logits = _run(mid_model, weight_memory=budget, store_dir=tmp_path / "store")
    assert tokens == ref_tokens
    assert (logits - ref_logits).abs().max().item() <= 1e-5
    plan = llm.tiers.plan
    assert plan.streams == (budget != "100%")
    if plan.streams:
        assert llm.tiers.streamer.num_stalls >= 0 and plan.streamed_bytes_per_pass > 0


@pytest.mark.parametrize("kw", [{"tier_locking": "whole_layer"}, {"prefetch_window": 0},
                                {"tier_order": "attn_first"}, {"tier_order": "ffn_first"}])
def test_ablations_give_the_same_outputs(mid_model, tmp_path, kw):
    _, ref_tokens, ref_logits = _run(mid_model)
    _, tokens, logits = _run(mid_model, weight_memory="30%", store_dir=tmp_path / "store", **kw)
    assert tokens == ref_tokens
    assert (logits - ref_logits).abs().max().item() <= 1e-5


def test_bf16_tied_model_streams_through_the_kernel_path(tmp_path):
    """Tied embeddings: the head is the embedding table, split into streamed pieces, and lookups
    read rows from the store. bf16 goes through the machine's bf16 method on both paths."""
    import transformers

    from tests.hf_models import randomize_

    cfg = transformers.LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                                   num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(cfg)
    randomize_(model, 1)
    model.save_pretrained(tmp_path / "m")
    ref = LLM(tmp_path / "m", dtype="bfloat16", kv_cache_tokens=512, max_model_len=256)
    ref_tokens = ref.generate([PROMPT], SamplingParams(max_tokens=10, temperature=0))[0].token_ids
    llm = LLM(tmp_path / "m", dtype="bfloat16", kv_cache_tokens=512, max_model_len=256, weight_memory="20%",
              store_dir=tmp_path / "store")
    assert llm.tiers.embed is None  # lookups go to the store
    assert llm.generate([PROMPT], SamplingParams(max_tokens=10, temperature=0))[0].token_ids == ref_tokens
    assert torch.equal(llm.score(PROMPT), ref.score(PROMPT))


@pytest.mark.parametrize("quant,budget", [("q8", "10%"), ("q4", "25%"), ("q3h", "20%")])
def test_quantized_weights_stream_as_packed_rows_with_the_resident_outputs(mid_model, tmp_path, quant, budget):
    """quant + weight_memory: the store holds the quantized rows, so fewer bytes stream; outputs
    equal the fully resident quantized model (decode through the kernel row by row, prompt chunks
    through tiled dequantization)."""
    from tierlm.quant import QuantizedWeight

    _, ref_tokens, ref_logits = _run(mid_model, quant=quant)
    llm, tokens, logits = _run(mid_model, quant=quant, weight_memory=budget, store_dir=tmp_path / "store")
    assert tokens == ref_tokens
    assert (logits - ref_logits).abs().max().item() <= 1e-4 * ref_logits.abs().max().item()
    meta = llm.tiers.store.meta
    assert meta["quant"] == quant and meta["group"] == 64
    assert meta["matrices"]["layers.0.qkv"] == [quant, 64, 256] and meta["matrices"]["lm_head"][0] == quant
    # a q4 row of 256 weights: 128 bytes of codes + 4 groups x (step + min) x 2 bytes
    row_bytes = {"q8": 256 + 16, "q4": 128 + 16, "q3h": None}[quant]
    if row_bytes is not None:
        assert llm.tiers.store.tensors["layers.0.qkv"].row_bytes == row_bytes
    from tierlm.memory.tiered import SplitMatrix

    lw = llm.tiers.weights.layers[0]
    split = [w for w in (lw.qkv, lw.o, lw.up, lw.down) if isinstance(w, SplitMatrix)]
    assert split and split[-1].parts[-1].resident is None  # some rows stream
    kept = [p.resident for w in split for p in w.parts if p.resident is not None]
    kept += [w for w in (lw.qkv, lw.o, lw.up, lw.down) if not isinstance(w, SplitMatrix)]
    from tierlm.model.kernels import quant_gemv
    from tierlm.quant.tiles import TILE_FORMATS, RowTiles

    # resident rows are repacked into row tiles where the kernel has them (its AVX-512 build)
    kernel = quant_gemv()
    kind = RowTiles if kernel is not None and kernel.row_tiles and quant in TILE_FORMATS else QuantizedWeight
    assert kept and all(isinstance(k, kind) and k.format == quant for k in kept)
    assert llm.tiers.plan.streamed_bytes_per_pass > 0


def test_gguf_blocks_stream_as_they_are(tmp_path):
    """quant="gguf" + weight_memory on the default model (SmolLM2, Q4_1 blocks): the store keeps
    the file's blocks and the outputs equal the resident GGUF-native model."""
    kw = {"quant": "gguf", "kv_cache_tokens": 512, "max_model_len": 256}
    ref = LLM(**kw)
    llm = LLM(weight_memory="25%", store_dir=tmp_path / "store", **kw)
    assert llm.tiers.store.meta["matrices"]["layers.0.up"][0] == "gguf:Q4_1"
    assert llm.tiers.plan.streams and llm.tiers.embed is None  # the tied head/embedding streams too
    # Prompt chunks multiply dequantized bands of rows with F.linear, whose float sums depend on the
    # band's shape: a split matrix gives last-bit differences (observed 1.5e-5 of the largest logit),
    # and the resident model's decode steps round activations to int8 for the Q4_1 kernel, while the
    # streamed ones do not: token log-probabilities differ by up to 0.05 between the two paths. So
    # greedy text is compared on real prompts, up to the first step where the resident model's top
    # two tokens are within 0.1 nats (after it, either is a right answer), and at least 4 tokens.
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=2)
    prompts = ["The capital of France is", "Once upon a time, there was a little"]
    for got, want in zip(llm.generate(prompts, params), ref.generate(prompts, params)):
        margins = [t.top[0][1] - t.top[1][1] for t in want.logprobs]
        clear = next((i for i, m in enumerate(margins) if m < 0.1), len(margins))
        assert clear >= 4, margins
        assert got.token_ids[:clear] == want.token_ids[:clear]
    ref_logits = ref.score(PROMPT)
    assert (llm.score(PROMPT) - ref_logits).abs().max().item() <= 1e-4 * ref_logits.abs().max().item()


def test_store_is_reused_and_rebuilt_when_it_does_not_match(mid_model, tmp_path, caplog):
    store = tmp_path / "store"
    with caplog.at_level(logging.WARNING, logger="tierlm"):
        LLM(mid_model, max_model_len=256, weight_memory="50%", store_dir=store)
    assert "building the weight store" in caplog.text and "none exists" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tierlm"):
        LLM(mid_model, max_model_len=256, weight_memory="50%", store_dir=store)
    assert "building" not in caplog.text
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["meta"]["dtype"] = "float16"
    (store / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="tierlm"):
        llm = LLM(mid_model, max_model_len=256, weight_memory="50%", store_dir=store)
    assert "different checkpoint or dtype" in caplog.text
    assert llm.generate([PROMPT], SamplingParams(max_tokens=2, temperature=0))[0].token_ids


def test_store_truncated_mid_run_is_a_clear_error_not_a_hang(mid_model, tmp_path):
    from tierlm.engine.engine import RequestError  # noqa: F401  (the engine surfaces step errors)
    llm = LLM(mid_model, max_model_len=256, weight_memory="10%", store_dir=tmp_path / "store")
    llm.generate([PROMPT], SamplingParams(max_tokens=2, temperature=0))
    with open(tmp_path / "store" / "weights.bin", "r+b") as f:
        f.truncate(4096)
    with pytest.raises(StoreError, match="truncated since it was opened|streaming weights failed"):
        llm.generate([PROMPT], SamplingParams(max_tokens=4, temperature=0))


def test_impossible_budget_is_a_config_error(mid_model, tmp_path):
    with pytest.raises(ConfigError, match="is not a size"):
        LLM(mid_model, max_model_len=256, weight_memory="half", store_dir=tmp_path / "s")
    with pytest.raises(ConfigError, match="only .* is available"):
        LLM(mid_model, max_model_len=256, weight_memory="30%", prefetch_window=10**7, store_dir=tmp_path / "s")


# -- peak RSS under a budget ---------------------------------------------------------------------

_MEASURE = textwrap.dedent("""
    import json, sys
    from pathlib import Path

    def status(key):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    import torch
    from tierlm import LLM, SamplingParams
    from tierlm.model.attention import KVCache
    before = status("VmRSS:")
    llm = LLM(sys.argv[1], dtype="bfloat16", kv_cache_tokens=1024, max_model_len=1024, weight_memory=sys.argv[2],
              store_dir=sys.argv[3])
    llm.generate([list(range(3, 200))], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    plan = llm.tiers.plan
    cfg = llm.arch
    kv = KVCache.bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, torch.bfloat16) * 1024
    print(json.dumps({"before": before, "peak": status("VmHWM:"), "budget": plan.budget_bytes,
                      "ring": plan.ring_bytes, "small": plan.always_resident_bytes, "kv": kv,
                      "total": plan.total_bytes, "streamed": plan.streamed_bytes_per_pass}))
""")

# What tierlm itself allocates beyond budget + ring + small tensors + KV cache: the 16 MiB bounce
# buffer for loading, activations and logits of a step, the tokenizer-free engine's bookkeeping.
FIXED_OVERHEAD = 96 * 2**20


def test_peak_rss_stays_within_budget_plus_kv_plus_overhead(tmp_path):
    """A ~500 MB bf16 Llama at a 25% budget, in a fresh process (the store is built first, in
    another process, as a first run would)."""
    from safetensors.torch import save_file

    d, inter, layers, vocab, kv_heads, heads = 1024, 2816, 16, 32000, 4, 16
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": d, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "vocab_size": vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}))
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    kv = d // heads * kv_heads
    sd = {"model.embed_tokens.weight": rnd(vocab, d), "lm_head.weight": rnd(vocab, d),
          "model.norm.weight": torch.ones(d, dtype=torch.bfloat16)}
    for i in range(layers):
        p = f"model.layers.{i}."
        sd |= {p + "self_attn.q_proj.weight": rnd(d, d), p + "self_attn.k_proj.weight": rnd(kv, d),
               p + "self_attn.v_proj.weight": rnd(kv, d), p + "self_attn.o_proj.weight": rnd(d, d),
               p + "mlp.gate_proj.weight": rnd(inter, d), p + "mlp.up_proj.weight": rnd(inter, d),
               p + "mlp.down_proj.weight": rnd(d, inter),
               p + "input_layernorm.weight": torch.ones(d, dtype=torch.bfloat16),
               p + "post_attention_layernorm.weight": torch.ones(d, dtype=torch.bfloat16)}
    model_bytes = sum(t.numel() * 2 for t in sd.values())
    save_file(sd, folder / "model.safetensors")
    del sd
    store = tmp_path / "store"
    args = [sys.executable, "-c", _MEASURE, str(folder), "25%", str(store)]
    for _ in range(2):  # the first run builds the store; the second is measured
        out = subprocess.run(args, capture_output=True, text=True, check=False)
        assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert 450e6 < model_bytes < 550e6 and m["streamed"] > 0
    grew = m["peak"] - m["before"]
    allowed = m["budget"] + m["ring"] + m["small"] + m["kv"] + FIXED_OVERHEAD
    assert grew <= allowed, (f"peak grew {grew / 2**20:.0f} MiB; budget {m['budget'] / 2**20:.0f} + ring "
                             f"{m['ring'] / 2**20:.0f} + KV {m['kv'] / 2**20:.0f} + overhead "
                             f"{FIXED_OVERHEAD / 2**20:.0f} MiB = {allowed / 2**20:.0f} MiB")
    # and the budget is far below the model: the test would fail if everything were loaded
    assert allowed < 0.75 * model_bytes
