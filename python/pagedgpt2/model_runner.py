"""Turns a scheduled batch into the flat arrays a backend runs, and runs it.

A batch of scheduled sequences (each with n new tokens) becomes, for T new tokens over S sequences:
  token_ids, positions, slot_mapping  [T]      query_start_loc [S+1]
  context_lens [S]    block_tables [S, max_blocks]    logits_indices [R]
The block manager grows each sequence and lays out slot_mapping and block_tables (see
cpp/allocator/block_manager.h); copy-on-write copies run before the forward.
"""

from __future__ import annotations

import operator

import numpy as np

from pagedgpt2.kv_cache import KVCache
from pagedgpt2.scheduler import ScheduledSeq
from pagedgpt2.sequence import Sequence, sample_seed


class ModelRunner:
    def __init__(self, backend, kv: KVCache):
        self.backend = backend
        self.kv = kv
        self._sampling_key: tuple = ()
        self._sampling: dict = {}
        # The last all-decode batch (the scheduler hands out the same ScheduledSeq objects while
        # its running set is unchanged) and what it sampled: the next step feeds those tokens.
        self._last_decode: list[ScheduledSeq] = []
        self._last_tokens = np.zeros(0, dtype=np.int32)
        self._last_counters = np.zeros(0, dtype=np.int64)

    def _take_slots(self, seqs: list[Sequence], starts: np.ndarray, num_new: np.ndarray,
                    token_ids: np.ndarray):
        """Grows each sequence (starts: its cached tokens) by its num_new tokens in the block
        manager (copy-on-write copies run now) and marks them cached.
        Returns (slot_mapping [T], block_tables, context_lens)."""
        seq_ids = np.fromiter((seq.seq_id for seq in seqs), dtype=np.int64, count=len(seqs))
        block_size = self.kv.block_size
        max_blocks = int(((starts + num_new + block_size - 1) // block_size).max())
        slot_mapping, block_tables, context_lens, copies = self.kv.manager.prepare_step(
            seq_ids, num_new, token_ids, max_blocks)
        if len(copies):
            self.backend.copy_blocks(np.ascontiguousarray(copies[:, 0]), np.ascontiguousarray(copies[:, 1]))
        for seq, n in zip(seqs, num_new.tolist()):
            seq.num_cached += n
        return slot_mapping, block_tables, context_lens

    def _prepare(self, batch: list[tuple[Sequence, int]], token_ids: np.ndarray | None = None) -> dict:
        """batch: [(sequence, number of new tokens)]; token_ids: the new tokens when the caller
        already has them (a repeated decode step)."""
        seqs = [seq for seq, _ in batch]
        num_new = np.fromiter((n for _, n in batch), dtype=np.int32, count=len(batch))
        starts = np.fromiter((seq.num_cached for seq in seqs), dtype=np.int32, count=len(batch))
        query_start_loc = np.zeros(len(batch) + 1, dtype=np.int32)
        np.cumsum(num_new, out=query_start_loc[1:])
        num_tokens = int(query_start_loc[-1])
        if token_ids is not None:
            positions = starts
        elif num_tokens == len(batch):  # decode only: one token each
            token_ids = np.fromiter((seq.uncached_ids(1)[0] for seq in seqs), dtype=np.int32, count=num_tokens)
            positions = starts
        else:
            token_ids = np.fromiter((t for seq, n in batch for t in seq.uncached_ids(n)), dtype=np.int32,
                                    count=num_tokens)
            positions = (np.arange(num_tokens, dtype=np.int32)
                         - np.repeat(query_start_loc[:-1] - starts, num_new)).astype(np.int32)
        slot_mapping, block_tables, context_lens = self._take_slots(seqs, starts, num_new, token_ids)
        return dict(token_ids=token_ids, positions=positions, slot_mapping=slot_mapping,
                    query_start_loc=query_start_loc, context_lens=context_lens,
                    block_tables=block_tables)

    def _sampling_arrays(self, rows: list[tuple[Sequence, int]]) -> dict:
        """temperature, top_k, top_p and seeds of the rows; reused while the rows stay the same
        (the common run of decode steps)."""
        key = tuple((seq.seq_id, j) for seq, j in rows)
        if key != self._sampling_key:
            params = [seq.params for seq, _ in rows]
            n = len(rows)
            self._sampling_key = key
            self._sampling = dict(
                temperature=np.fromiter((p.temperature for p in params), dtype=np.float32, count=n),
                top_k=np.fromiter((p.top_k for p in params), dtype=np.int32, count=n),
                top_p=np.fromiter((p.top_p for p in params), dtype=np.float32, count=n),
                seeds=np.fromiter((sample_seed(seq.seed, j) for seq, j in rows), dtype=np.uint64, count=n))
        return self._sampling

    def _repeats_last_decode(self, batch: list[ScheduledSeq]) -> bool:
        """Whether batch is, item for item, the all-decode batch that ran last."""
        last = self._last_decode
        return len(batch) == len(last) > 0 and all(map(operator.is_, batch, last))

    def _sample_repeated_decode(self, batch: list[ScheduledSeq]) -> list[list[int]]:
        """The steady decode step: the tokens sampled last step go in as they are, and the
        sampling arrays carry over with every counter one higher."""
        arrays = self._prepare([(item.seq, 1) for item in batch], token_ids=self._last_tokens)
        self._last_counters = self._last_counters + 1
        tokens = self.backend.forward_and_sample(
            **arrays, logits_indices=np.arange(len(batch), dtype=np.int32), **self._sampling,
            counters=self._last_counters)
        self._last_tokens = tokens
        return [[t] for t in tokens.tolist()]

    def launch_steps(self, batch: list[ScheduledSeq], num_steps: int, continues: bool = False) -> None:
        """Starts num_steps decode steps of an all-decode batch in one backend call (each step
        feeds the tokens the step before sampled); collect_steps() returns them. The cache slots
        of all the steps are taken now; a sequence that finishes early leaves the rest to be freed
        with it. continues: the batch is the one of the run launched last, whose tokens need not
        have been read: the backend feeds its last ones itself."""
        seqs = [item.seq for item in batch]
        S, k = len(seqs), num_steps
        if continues:  # the backend feeds the last run's tokens: these are not read
            first, counters = np.zeros(S, dtype=np.int32), self._last_counters + 1
        elif self._repeats_last_decode(batch):
            first, counters = self._last_tokens, self._last_counters + 1
        else:
            first = np.fromiter((seq.output_ids[-1] for seq in seqs), dtype=np.int32, count=S)
            counters = np.fromiter((len(seq.output_ids) for seq in seqs), dtype=np.int64, count=S)
        starts = np.fromiter((seq.num_cached for seq in seqs), dtype=np.int32, count=S)
        # NOTE: the ids of steps 1.. are unknown yet; the manager keeps token ids only for
        # prefix caching, which the scheduler rules out for these runs.
        placeholder = np.zeros((S, k), dtype=np.int32)
        placeholder[:, 0] = first
        slot_mapping, block_tables, _ = self._take_slots(seqs, starts, np.full(S, k, dtype=np.int32),
                                                         placeholder.reshape(-1))
        rows = np.arange(S, dtype=np.int32)
        self.backend.launch_decode_steps(
            token_ids=first, positions=starts, slot_mappings=np.ascontiguousarray(slot_mapping.reshape(S, k).T),
            query_start_loc=np.arange(S + 1, dtype=np.int32), context_lens=starts + 1,
            block_tables=block_tables, logits_indices=rows,
            **self._sampling_arrays([(seq, 0) for seq in seqs]), counters=counters, continue_run=continues)
        self._last_decode, self._last_counters = batch, counters + (k - 1)

    def collect_steps(self) -> list[list[int]]:
        """The tokens of the oldest launched run: num_steps per sequence."""
        tokens = self.backend.collect_decode_steps()  # [k, S]
        self._last_tokens = tokens[-1].copy()
        return tokens.T.tolist()

    def sample(self, batch: list[ScheduledSeq]) -> list[list[int]]:
        """Runs the batch; returns, per scheduled sequence, its num_samples new tokens."""
        if self._repeats_last_decode(batch):
            return self._sample_repeated_decode(batch)
        self._last_decode = []
        arrays = self._prepare([(item.seq, item.num_new_tokens) for item in batch])
        last_rows = arrays["query_start_loc"][1:] - 1
        counts = np.fromiter((item.num_samples for item in batch), dtype=np.int64, count=len(batch))
        logits_indices = np.repeat(last_rows, counts).astype(np.int32)
        if len(logits_indices) == 0:  # every sequence is mid-prompt
            self.backend.forward(**arrays, logits_indices=logits_indices)
            return [[] for _ in batch]
        rows = [(item.seq, j) for item in batch for j in range(item.num_samples)]
        counters = np.fromiter((len(seq.output_ids) for seq, _ in rows), dtype=np.int64, count=len(rows))
        sampled = self.backend.forward_and_sample(
            **arrays, logits_indices=logits_indices, **self._sampling_arrays(rows), counters=counters)
        if len(rows) == len(batch) == arrays["token_ids"].size:  # all decode: may repeat next step
            self._last_decode, self._last_tokens, self._last_counters = batch, sampled, counters
        tokens = sampled.tolist()
        out, start = [], 0
        for item in batch:
            out.append(tokens[start:start + item.num_samples])
            start += item.num_samples
        return out

    def logits(self, seq: Sequence) -> np.ndarray:
        """Feeds the whole prompt of one fresh sequence; logits at every position [T, V]."""
        arrays = self._prepare([(seq, len(seq.prompt_ids))])
        rows = np.arange(len(seq.prompt_ids), dtype=np.int32)
        return self.backend.forward(**arrays, logits_indices=rows)
