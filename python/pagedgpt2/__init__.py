"""pagedgpt2: a GPT-2 inference engine built around a paged KV cache."""

from pagedgpt2.engine import Engine, RequestOutput
from pagedgpt2.sampling import SamplingParams

__all__ = ["Engine", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
