"""The device tier (tierlm.memory.device), tested on the CPU: the device plan's exact rows, the exact
order of copies, waits and events in the ring, the staged data, and generation identical to the
resident model. On CUDA the same stage runs with CudaCopy (streams and events)."""

from __future__ import annotations

import pytest
import torch

from tests.test_tiered import PROMPT, _run, mid_model  # noqa: F401 - mid_model is a fixture
from tierlm import LLM, SamplingParams
from tierlm.config import ConfigError
from tierlm.memory.device import DeviceStage, HostCopy
from tierlm.memory.plan import device_plan, make_plan
from tierlm.memory.prefetch import Streamer
from tierlm.memory.store import StoreError, WeightStore, write_store
from tierlm.memory.tiered import model_layout

# Two layers of fp32 rows of 16 (64 bytes): qkv 24, o 16, up 32, down 16 rows (5,632 bytes per
# layer); an untied head of 8 rows (512 bytes, one piece) and an embedding table.
ROWS = {"qkv": 24, "o": 16, "up": 32, "down": 16}


@pytest.fixture()
def small_store(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"embed": torch.randn(8, 16, generator=g), "lm_head": torch.randn(8, 16, generator=g)}
    for i in range(2):
        for m, n in ROWS.items():
            tensors[f"layers.{i}.{m}"] = torch.randn(n, 16, generator=g)
    write_store(tmp_path / "s", iter(tensors.items()), {"format": "test"})
    return WeightStore(tmp_path / "s"), tensors


def _segs(plan, kind="layer", index=0):
    unit = next(u for u in plan.units if u.kind == kind and u.index == index)
    return [(s.tensor.name.rsplit(".", 1)[-1], s.row_start, s.resident_end, s.row_end) for s in unit.segments]


def _plans(store):
    layout = model_layout(store, 2)
    # Matrices: 2 x 5,632 + 512 = 11,776 bytes; a budget of half keeps 2,816 bytes per layer:
    # FFN first, up (2,048) whole, the other 768 bytes spread over down, qkv, o (3,584 bytes).
    host = make_plan(layout, 5_888, window=1)
    # Kept off disk: 2 x (5 + 3 + 32 + 3) rows + 4 head rows = 90 rows = 5,760 bytes; the device
    # takes 2,880 of them: half of every segment's kept rows, rounded down.
    return host, device_plan(host, 2_880, window=1)


def test_device_plan_takes_the_same_share_of_every_segment_kept_off_disk(small_store):
    store, _ = small_store
    host, dev = _plans(store)
    assert _segs(host) == [("qkv", 0, 5, 24), ("o", 0, 3, 16), ("up", 0, 32, 32), ("down", 0, 3, 16)]
    assert _segs(dev) == [("qkv", 0, 2, 24), ("o", 0, 1, 16), ("up", 0, 16, 32), ("down", 0, 1, 16)]
    assert _segs(host, "head") == [("lm_head", 0, 4, 8)]
    assert _segs(dev, "head") == [("lm_head", 0, 2, 8)]
    # Device rows: 2 x (2 + 1 + 16 + 1) + 2 = 42 of 184; staged per pass: 142 rows.
    assert sum(u.resident_bytes for u in dev.units) == 42 * 64
    assert dev.streamed_bytes_per_pass == 142 * 64
    assert dev.num_slots == 2
    # A device budget above what RAM keeps puts all of it on the device, and no more.
    everything = device_plan(host, 10**9)
    assert _segs(everything) == _segs(host)


class RecordingCopy(HostCopy):
    """HostCopy that logs every call, with numbered events; a copy is logged by the base address of
    the slot it writes (``slot_log`` turns that into the slot's index)."""

    def __init__(self):
        self.log: list[tuple] = []
        self.num_events = 0

    def _event(self, prefix: str) -> str:
        self.num_events += 1
        return f"{prefix}{self.num_events}"

    def copy(self, dst, src):
        self.log.append(("copy", dst.untyped_storage().data_ptr()))
        super().copy(dst, src)

    def copy_waits_for(self, event):
        self.log.append(("copy waits", event))

    def copies_done(self):
        ev = self._event("c")
        self.log.append(("copies done", ev))
        return ev

    def compute_waits_for(self, event):
        self.log.append(("compute waits", event))

    def compute_done(self):
        ev = self._event("k")
        self.log.append(("compute done", ev))
        return ev

    def synchronize(self, event):
        self.log.append(("host waits", event))

    def slot_log(self, stage: DeviceStage) -> list[tuple]:
        index = {s.untyped_storage().data_ptr(): i for i, s in enumerate(stage.slots)}
        out = [(op, index[arg]) if op == "copy" else (op, arg) for op, arg in self.log]
        self.log.clear()
        return out


def test_ring_order_copies_after_the_slots_last_compute_and_compute_after_its_copies(small_store):
    store, tensors = small_store
    rec = RecordingCopy()
    host, dev = _plans(store)
    stage = DeviceStage(store, host, dev, Streamer(store, host, 2), torch.device("cpu"), rec)
    assert [(u.kind, u.index) for u in stage.cycle] == [("layer", 0), ("layer", 1), ("head", 0)]
    # Window 1: position 0 is copied at start. Each unit copies its four segments (host rows, then
    # ring rows, except up whose staged rows are all in RAM) and the host waits for the copy before
    # handing the host ring slot back.
    layer_copies = [("copy", 0)] * 7
    assert rec.slot_log(stage) == [("copy waits", None), *layer_copies, ("copies done", "c1"), ("host waits", "c1")]

    def step(kind, index):
        unit = stage.acquire(kind, index)
        names = [s.tensor.name for s in unit.unit.segments]
        for i, (name, seg) in enumerate(zip(names, unit.unit.segments)):
            assert torch.equal(unit.segment(i), tensors[name][seg.resident_end:seg.row_end])
        stage.release()

    step("layer", 0)
    # Compute on 0 waits for its copies; releasing 0 enqueues 1 into slot 1, which nothing used yet.
    assert rec.slot_log(stage) == [("compute waits", "c1"), ("compute done", "k2"), ("copy waits", None),
                       *[("copy", 1)] * 7, ("copies done", "c3"), ("host waits", "c3")]
    step("layer", 1)
    # Releasing 1 enqueues the head into slot 0 only after the compute on layer 0 (k2) is done.
    assert rec.slot_log(stage) == [("compute waits", "c3"), ("compute done", "k4"), ("copy waits", "k2"),
                       ("copy", 0), ("copy", 0), ("copies done", "c5"), ("host waits", "c5")]
    step("head", 0)
    assert rec.slot_log(stage)[:3] == [("compute waits", "c5"), ("compute done", "k6"), ("copy waits", "k4")]
    # Positions 0-2 were the first pass, 3 is layer 0 of the next one, which is cut short: asking
    # for layer 0 again drains layer 1 (4) and the head (5), and takes position 6.
    step("layer", 0)
    step("layer", 0)
    assert stage._consume == 7
    stage.close()


def test_generation_is_identical_to_the_resident_model(mid_model, tmp_path):  # noqa: F811
    _, ref_tokens, ref_logits = _run(mid_model)
    for kw in ({"weight_memory": "50%", "device_memory": "20%"},  # device + RAM + disk
               {"device_memory": "30%"},  # device + RAM
               {"weight_memory": "40%", "device_memory": "40%", "prefetch_window": 0}):  # device + disk, synchronous
        llm, tokens, logits = _run(mid_model, store_dir=tmp_path / "store", **kw)
        assert isinstance(llm.tiers.streamer, DeviceStage)
        assert tokens == ref_tokens, kw
        assert (logits - ref_logits).abs().max().item() <= 1e-5, kw
        llm.tiers.close()


def test_quantized_weights_stage_as_packed_rows(mid_model, tmp_path):  # noqa: F811
    _, ref_tokens, ref_logits = _run(mid_model, quant="q8")
    llm, tokens, logits = _run(mid_model, quant="q8", weight_memory="60%", device_memory="25%",
                               store_dir=tmp_path / "store")
    assert isinstance(llm.tiers.streamer, DeviceStage)
    assert tokens == ref_tokens
    assert (logits - ref_logits).abs().max().item() <= 1e-4 * ref_logits.abs().max().item()


def test_device_memory_above_weight_memory_is_a_config_error(mid_model, tmp_path):  # noqa: F811
    with pytest.raises(ConfigError, match="device_memory='60%'.*more than weight_memory='30%'"):
        _run(mid_model, weight_memory="30%", device_memory="60%", store_dir=tmp_path / "store")


def test_store_truncated_mid_run_is_a_clear_error_through_the_device_stage(mid_model, tmp_path):  # noqa: F811
    llm = LLM(mid_model, max_model_len=256, weight_memory="20%", device_memory="10%", store_dir=tmp_path / "store")
    llm.generate([PROMPT], SamplingParams(max_tokens=2, temperature=0))
    with open(tmp_path / "store" / "weights.bin", "r+b") as f:
        f.truncate(4096)
    with pytest.raises(StoreError, match="truncated since it was opened|streaming weights failed"):
        llm.generate([PROMPT], SamplingParams(max_tokens=4, temperature=0))
