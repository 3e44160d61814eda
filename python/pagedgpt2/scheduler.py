"""Which sequences run in the next step, and with how many new tokens.

Every step runs the running sequences' next token (decode) together with the prompts of newly
admitted sequences (prefill) in one forward. A waiting sequence is admitted only when the pool
can hold it at its longest (prompt + max_new_tokens) on top of what the running sequences may
still claim, so a running sequence never finds the pool empty.
"""

from __future__ import annotations

from collections import deque

from pagedgpt2.kv_cache import KVCache
from pagedgpt2.sequence import Sequence


class Scheduler:
    def __init__(self, kv: KVCache, max_num_seqs: int, max_num_batched_tokens: int):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.kv.manager.add_sequence(seq.seq_id)
        self.waiting.append(seq)

    def _blocks_still_claimable(self) -> int:
        """Blocks the running sequences may still take before they finish."""
        kv = self.kv
        return sum(kv.blocks_for(s.max_num_tokens) - kv.blocks_for(s.num_cached) for s in self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """[(sequence, number of new tokens to feed)] for the next step."""
        batch = [(s, 1) for s in self.running]
        num_tokens = len(batch)
        free = self.kv.manager.num_free - self._blocks_still_claimable()
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            need_blocks = self.kv.blocks_for(seq.max_num_tokens)
            need_tokens = len(seq.prompt_ids)
            if need_blocks > free or (batch and num_tokens + need_tokens > self.max_num_batched_tokens):
                break
            self.waiting.popleft()
            self.running.append(seq)
            batch.append((seq, need_tokens))
            num_tokens += need_tokens
            free -= need_blocks
        return batch

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.manager.free_sequence(seq.seq_id)

    def abort(self, seq: Sequence) -> None:
        """Drops a sequence wherever it is and frees its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.kv.manager.free_sequence(seq.seq_id)
