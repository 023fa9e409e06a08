"""tierlm: run models larger than your memory, fast, and serve them.

``LLM`` is imported lazily so that torch-free parts (engine bookkeeping, tokenizers, corpus
tools) can be imported without paying for torch.
"""

from typing import TYPE_CHECKING

from tierlm.config import ConfigError, TierlmConfig
from tierlm.engine_args import EngineArgs
from tierlm.outputs import RequestOutput, TokenLogprob
from tierlm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tierlm.api import LLM

__all__ = ["LLM", "ConfigError", "EngineArgs", "RequestOutput", "SamplingParams", "TierlmConfig", "TokenLogprob"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "LLM":
        from tierlm.api import LLM

        return LLM
    raise AttributeError(f"module 'tierlm' has no attribute {name!r}")
