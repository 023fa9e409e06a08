import pytest

from tests.hf_models import FAMILIES, build

# Settings of the one SmolLM2 q4 model the GPTQ tests share (``smollm2_q4``); a load with exactly these
# reuses its store.
SMOLLM2_Q4 = {"max_model_len": 128, "kv_cache_tokens": 256, "max_num_seqs": 1, "quant": "q4"}


@pytest.fixture(scope="session")
def hf_model(tmp_path_factory):
    """family -> (transformers model, saved folder); built once per session."""
    cache = {}

    def get(family: str):
        if family not in cache:
            folder = tmp_path_factory.mktemp(f"hf-{family}")
            cache[family] = (build(family, folder), folder)
        return cache[family]

    return get


@pytest.fixture(scope="session", autouse=True)
def tierlm_cache(tmp_path_factory):
    """TIERLM_CACHE for the whole session (subprocesses included): the weight stores tests build by default
    go to a fresh folder, never into the user's ~/.cache/tierlm, and none is left from an earlier session."""
    folder = tmp_path_factory.mktemp("tierlm-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIERLM_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="session")
def short_calibration():
    """GPTQ calibrates on 2 of its 14 Brown windows (a GPTQ test's time is mostly calibration), from the
    first test that asks until the session ends, so every GPTQ store of the session is calibrated, and
    named (tierlm.quant.gptq.calibration_meta), alike."""
    from tierlm.quant import imatrix

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(imatrix, "CALIB_CATEGORIES", imatrix.CALIB_CATEGORIES[:2])
        yield


@pytest.fixture(scope="session")
def smollm2_q4(short_calibration):
    """The embedded SmolLM2 loaded with quant="q4" and the default method, GPTQ for this model: its store
    is calibrated once a session, in the session's TIERLM_CACHE; a later load with SMOLLM2_Q4 reuses it."""
    from tierlm import LLM

    return LLM(None, **SMOLLM2_Q4)


def pytest_collection_modifyitems(items):
    pass


__all__ = ["FAMILIES"]
