"""SamplingParams: how one request picks its next tokens, checked when it is made."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

EOT_TOKEN_ID = 50256  # <|endoftext|>


def is_int(x) -> bool:
    """A Python or numpy integer; not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


@dataclass
class SamplingParams:
    """Per-request decoding settings.

    n samples are drawn per prompt (sharing the prompt's KV blocks). temperature 0 is greedy. top_k 0 and top_p 1 turn those filters off. The same seed gives the
    same tokens whatever else runs in the batch. Generation stops at any of stop_token_ids (the
    stop token is kept in token_ids, left out of text) unless ignore_eos is set, or after
    max_new_tokens.
    """

    max_new_tokens: int = 16
    n: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=lambda: [EOT_TOKEN_ID])
    ignore_eos: bool = False

    def __post_init__(self):
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        if not isinstance(self.temperature, (int, float)) or math.isnan(self.temperature) \
                or self.temperature < 0 or math.isinf(self.temperature):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or math.isnan(self.top_p) \
                or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2**64):
            raise ValueError(f"seed must be an integer in [0, 2**64) or None, got {self.seed!r}")
        if isinstance(self.stop_token_ids, int) or not all(is_int(t) for t in self.stop_token_ids):
            raise TypeError(f"stop_token_ids must be a list of integers, got {self.stop_token_ids!r}")
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]
        self.max_new_tokens = int(self.max_new_tokens)
        self.top_k = int(self.top_k)
        self.temperature = float(self.temperature)
        self.top_p = float(self.top_p)
