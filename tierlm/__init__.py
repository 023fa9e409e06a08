"""tierlm: run models larger than your memory, fast, and serve them."""

from tierlm.api import LLM
from tierlm.outputs import RequestOutput, TokenLogprob
from tierlm.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "TokenLogprob"]
__version__ = "0.1.0"
