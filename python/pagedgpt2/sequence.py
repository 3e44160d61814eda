"""Sequence: one stream of tokens (a request's prompt and one sample of its output), and how far
its keys/values are in the KV cache. A request with n samples runs as n sequences that share
the prompt's blocks."""

from __future__ import annotations

from dataclasses import dataclass, field

from pagedgpt2.sampling import SamplingParams

_MASK64 = (1 << 64) - 1


def sample_seed(seed: int, sample_index: int) -> int:
    """The seed of sample i of a request: the request's own seed for sample 0."""
    if sample_index == 0:
        return seed
    z = (seed + 0x9E3779B97F4A7C15 * sample_index) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


@dataclass(eq=False)  # NOTE: identity, not field-by-field: sequences live in lists
class Sequence:
    seq_id: int
    request_id: int
    sample_index: int
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    output_ids: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose keys/values are in the KV cache
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    # The text bytes of output_ids[:num_detokenized], decoded ahead while the GPU runs (only
    # for generate()'s requests; see Engine._detokenize_ahead).
    text_bytes: bytes = b""
    num_detokenized: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncached(self) -> int:
        """Tokens the sequence must still feed before it can sample: 1 while decoding."""
        return self.num_tokens - self.num_cached

    @property
    def max_num_tokens(self) -> int:
        """Tokens the sequence can reach: the most KV slots it may ever need."""
        return len(self.prompt_ids) + self.params.max_new_tokens

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def uncached_ids(self, n: int) -> list[int]:
        """The next n tokens whose keys/values are not yet in the cache."""
        num_prompt = len(self.prompt_ids)
        if self.num_cached >= num_prompt:
            start = self.num_cached - num_prompt
            return self.output_ids[start:start + n]
        ids = self.prompt_ids[self.num_cached:self.num_cached + n]
        return ids + self.output_ids[:n - len(ids)]

    def extend(self, token_ids: list[int]) -> int:
        """Appends new tokens until the sequence finishes (a stop token, kept, or
        max_new_tokens); returns how many it took. The rest are dropped."""
        p = self.params
        n = min(len(token_ids), p.max_new_tokens - len(self.output_ids))
        if not p.ignore_eos:
            for i in range(n):
                if token_ids[i] in p.stop_token_ids:
                    n = i + 1
                    self.finish_reason = "stop"
                    break
        self.output_ids.extend(token_ids[:n])
        if self.finish_reason is None and len(self.output_ids) >= p.max_new_tokens:
            self.finish_reason = "length"
        return n

    @property
    def num_new_tokens_left(self) -> int:
        return self.params.max_new_tokens - len(self.output_ids)

    def fork(self, seq_id: int, sample_index: int) -> "Sequence":
        """A sibling sample: the same tokens so far, its own seed."""
        return Sequence(seq_id, self.request_id, sample_index, self.prompt_ids, self.params,
                        sample_seed(self.seed, sample_index), list(self.output_ids), self.num_cached)
