"""Sequence: one request's tokens and how far its keys/values are in the cache."""

from __future__ import annotations

from dataclasses import dataclass, field

from pagedgpt2.sampling import SamplingParams


@dataclass
class Sequence:
    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    output_ids: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose keys/values are in the KV cache
    finish_reason: str | None = None  # "stop" | "length"

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def max_num_tokens(self) -> int:
        """Tokens the sequence can reach: the most KV slots it may ever need."""
        return len(self.prompt_ids) + self.params.max_new_tokens

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    def uncached_ids(self, n: int) -> list[int]:
        """The next n tokens whose keys/values are not yet in the cache."""
        num_prompt = len(self.prompt_ids)
        if self.num_cached >= num_prompt:
            start = self.num_cached - num_prompt
            return self.output_ids[start:start + n]
        ids = self.prompt_ids[self.num_cached:self.num_cached + n]
        return ids + self.output_ids[:n - len(ids)]

    def append(self, token_id: int) -> None:
        self.output_ids.append(token_id)
        p = self.params
        if not p.ignore_eos and token_id in p.stop_token_ids:
            self.finish_reason = "stop"
        elif len(self.output_ids) >= p.max_new_tokens:
            self.finish_reason = "length"
