"""Continuous batching: which sequences run in the next step, and with how many new tokens.

Each step has a budget of max_num_batched_tokens. Running sequences go first, oldest first:
one token each while decoding, the next chunk of the prompt while prefilling. Waiting sequences
are admitted in arrival order while the budget lasts and the pool keeps a watermark of free
blocks. Blocks are taken as sequences grow; when the pool runs dry, the newest running sequences
are preempted — all their blocks freed — and queued first, to be recomputed later (their
outputs are unchanged: sampling depends only on each sequence's seed and token count).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from pagedgpt2.kv_cache import KVCache
from pagedgpt2.sequence import Sequence


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int
    num_samples: int  # tokens to sample from its last row: 0 mid-prompt, n when a prompt forks


class Scheduler:
    def __init__(self, kv: KVCache, max_num_seqs: int, max_num_batched_tokens: int,
                 watermark: float = 0.01):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # NOTE: a contiguous buffer never grows (it holds a whole context), so contiguous mode keeps
        # no watermark: it would only hold buffers back (256 sequences in 256 buffers: 2 would
        # wait for the others to finish). Forks' copy-on-write copies fall back on preemption.
        self.watermark_blocks = int(watermark * kv.num_blocks) if kv.mode == "paged" else 0
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._reserved = 0
        self._pending_forks = 0  # samples running prompts will fork into once prefilled
        self._preempted_now: set[int] = set()
        # The all-decode batch, kept while `running` is unchanged: the same ScheduledSeq objects
        # step after step tell the model runner it may reuse its arrays.
        self._running_version = 0  # bumped by every change to `running`
        self._decode_version = -1
        self._decode_items: list[ScheduledSeq] = []
        self._decode_seq_ids = np.zeros(0, dtype=np.int64)
        self._steady = False  # the last schedule() returned the cached all-decode batch alone
        self._blocked_head: Sequence | None = None  # the first waiting one then, which could not start

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.kv.manager.add_sequence(seq.seq_id)
        self.waiting.append(seq)

    # -- one step -----------------------------------------------------------------------------

    def schedule(self) -> list[ScheduledSeq]:
        batch: list[ScheduledSeq] = []
        budget = self.max_num_batched_tokens
        self._reserved = 0  # blocks promised to sequences already in this step's batch
        self._preempted_now = set()
        decodes = self._all_running_decode()
        batch += decodes  # a copy: the cached items stay as they are
        budget -= len(decodes)
        for seq in [] if decodes else list(self.running):
            if budget == 0:
                break
            if seq.seq_id in self._preempted_now:  # made room for an older one
                continue
            n = min(seq.num_uncached, budget)
            if self._make_room(seq, n):
                batch.append(self._scheduled(seq, n))
                budget -= n
        self._steady = bool(decodes)
        while self.waiting and budget > 0 and self._has_seq_room(self.waiting[0]):
            seq = self.waiting[0]
            self._match_prefix(seq)
            n = min(seq.num_uncached, budget)
            if not self._admissible(seq, n):
                self._forget_prefix(seq)
                break
            self.waiting.popleft()
            self._steady = False
            self._enter_running(seq)
            batch.append(self._scheduled(seq, n))
            budget -= n
        self._blocked_head = self.waiting[0] if self.waiting else None
        if not self._steady:
            # One-token rows first: the backend runs the attention of the leading ones in its
            # decode kernel and only the prompt chunks after them in the prefill kernel.
            batch.sort(key=lambda item: item.num_new_tokens != 1)
        return batch

    def _all_running_decode(self) -> list[ScheduledSeq]:
        """The common step, at once: every running sequence decodes one token and the pool has
        the blocks for all of them. [] when any of that fails (then sequences go one by one)."""
        running = self.running
        if not running or len(running) > self.max_num_batched_tokens:
            return []
        if self._decode_version != self._running_version:
            # NOTE: once every running sequence decodes, each step keeps it so (one token fed,
            # one sampled) until `running` changes, so this scan runs once per change.
            if not all(seq.output_ids and seq.num_uncached == 1 for seq in running):
                return []
            self._decode_seq_ids = np.fromiter((seq.seq_id for seq in running), dtype=np.int64,
                                               count=len(running))
            self._decode_items = [ScheduledSeq(seq, 1, 1) for seq in running]
            self._decode_version = self._running_version
        need = self.kv.manager.blocks_needed_to_append_each(self._decode_seq_ids, 1)
        if need > self._free_blocks():
            return []
        self._reserved += need
        return self._decode_items

    def decode_run_length(self, max_steps: int) -> int:
        """How many decode steps the batch schedule() just returned may run in one backend call:
        more than 1 only for the steady all-decode batch, and without prefix caching (its block
        hashes need the tokens before the blocks fill). Steady means that schedule() admitted
        nothing: no request waits, or the first in line cannot start (no free blocks past the
        watermark, no room under max_num_seqs or the token budget) and would not during the
        run either, since no running sequence reaches max_new_tokens before its end and the
        running ones only take blocks. Never past the free blocks."""
        if max_steps <= 1 or not self._steady or self.kv.manager.prefix_caching:
            return 1
        k = min(max_steps, min(seq.num_new_tokens_left for seq in self.running))
        return max(self._steps_that_fit(k, 1), 1)

    def next_run_length(self, max_steps: int, run_steps: int) -> int:
        """Steps of a decode run that follows, straight away, the steady batch's run of run_steps
        whose tokens are not read yet (0: schedule() must decide). 0 when anything that could
        change the batch happened since schedule(): a sequence finished, left or forked, a
        request arrived that might start; or when a sequence reaches max_new_tokens with that
        run. A sequence that meets a stop token in it finishes one run late: the next run's
        tokens for it are dropped. Never past the free blocks."""
        head = self.waiting[0] if self.waiting else None
        if (max_steps <= 1 or not self._steady or self._decode_version != self._running_version
                or head is not self._blocked_head or self.kv.manager.prefix_caching):
            return 0
        k = min(max_steps, min(seq.num_new_tokens_left for seq in self.running) - run_steps)
        return self._steps_that_fit(max(k, 0), 0)

    def _steps_that_fit(self, k: int, least: int) -> int:
        """k, halved until the next k tokens of every running sequence fit in the free blocks
        (or it reaches least)."""
        while k > least and self.kv.manager.blocks_needed_to_append_each(self._decode_seq_ids, k) \
                > self.kv.manager.num_free:
            k //= 2
        return k

    def _blocks_needed(self, seq: Sequence, n: int) -> int:
        return self.kv.manager.blocks_needed_to_append(seq.seq_id, n)

    def _free_blocks(self) -> int:
        return self.kv.manager.num_free - self._reserved

    def _admissible(self, seq: Sequence, n: int) -> bool:
        """A waiting sequence starts only if the pool keeps a watermark of free blocks after it,
        so that running sequences can grow (waived when nothing runs: it must start)."""
        need = self._blocks_needed(seq, n)
        watermark = self.watermark_blocks if self.running else 0
        if need > self._free_blocks() - watermark:
            return False
        self._reserved += need
        return True

    def _scheduled(self, seq: Sequence, n: int) -> ScheduledSeq:
        if n < seq.num_uncached:
            return ScheduledSeq(seq, n, 0)  # a chunk of the prompt: nothing to sample yet
        return ScheduledSeq(seq, n, 1 + self._forks_of(seq))

    @staticmethod
    def _forks_of(seq: Sequence) -> int:
        """Samples seq will still fork into: n - 1 for a prompt not yet sampled."""
        return seq.params.n - 1 if not seq.output_ids and seq.sample_index == 0 else 0

    def _has_seq_room(self, seq: Sequence) -> bool:
        needed = 1 + self._forks_of(seq)
        return len(self.running) + self._pending_forks + needed <= self.max_num_seqs

    def _make_room(self, seq: Sequence, n: int) -> bool:
        """Preempts the newest running sequences until seq can take n more tokens.
        False when seq itself had to go."""
        while self._blocks_needed(seq, n) > self._free_blocks():
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return False
        self._reserved += self._blocks_needed(seq, n)
        return True

    def _enter_running(self, seq: Sequence) -> None:
        self.running.append(seq)
        self._running_version += 1
        self._pending_forks += self._forks_of(seq)

    def _leave_running(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._running_version += 1
        self._pending_forks -= self._forks_of(seq)

    def preempt(self, seq: Sequence) -> None:
        """Frees all of seq's blocks and queues it first, to be recomputed."""
        self._leave_running(seq)
        self.kv.manager.free_sequence(seq.seq_id)
        self.kv.manager.add_sequence(seq.seq_id)
        seq.num_cached = 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        self._preempted_now.add(seq.seq_id)

    def _match_prefix(self, seq: Sequence) -> None:
        if self.kv.manager.prefix_caching and seq.num_cached == 0:
            seq.num_cached = self.kv.manager.match_prefix(seq.seq_id, seq.token_ids())

    def _forget_prefix(self, seq: Sequence) -> None:
        if seq.num_cached:
            self.kv.manager.free_sequence(seq.seq_id)
            self.kv.manager.add_sequence(seq.seq_id)
            seq.num_cached = 0

    # -- leaving ------------------------------------------------------------------------------

    def add_running(self, seq: Sequence, after: Sequence) -> None:
        """A forked sample joins the running set beside its parent (which has sampled now)."""
        self.running.insert(self.running.index(after) + 1, seq)
        self._running_version += 1
        self._pending_forks -= 1

    def finish(self, seq: Sequence) -> None:
        self._leave_running(seq)
        self.kv.manager.free_sequence(seq.seq_id)

    def abort(self, seq: Sequence) -> None:
        """Drops a sequence wherever it is and frees its blocks."""
        if seq in self.running:
            self._leave_running(seq)
        else:
            self.waiting.remove(seq)
        self.kv.manager.free_sequence(seq.seq_id)
