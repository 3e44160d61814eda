"""pagedgpt2: a GPT-2 inference engine built around a paged KV cache."""

from pagedgpt2.engine import Completion, Engine, RequestOutput, StepOutput
from pagedgpt2.sampling import SamplingParams

__all__ = ["Completion", "Engine", "RequestOutput", "SamplingParams", "StepOutput"]
__version__ = "0.1.0"
