import pytest

from tests.hf_models import FAMILIES, build


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


def pytest_collection_modifyitems(items):
    pass


__all__ = ["FAMILIES"]
