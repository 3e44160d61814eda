"""Turns a scheduled batch into the flat arrays a backend runs, and runs it.

A batch of (sequence, n) pairs becomes, for T new tokens over S sequences:
  token_ids, positions, slot_mapping  [T]      query_start_loc [S+1]
  context_lens [S]    block_tables [S, max_blocks]    logits_indices [R]
The block manager grows each sequence and lays out slot_mapping and block_tables (see
cpp/allocator/block_manager.h); copy-on-write copies run before the forward.
"""

from __future__ import annotations

import numpy as np

from pagedgpt2.kv_cache import KVCache
from pagedgpt2.sequence import Sequence


class ModelRunner:
    def __init__(self, backend, kv: KVCache):
        self.backend = backend
        self.kv = kv

    def _prepare(self, batch: list[tuple[Sequence, int]]) -> dict:
        new_ids = [seq.uncached_ids(n) for seq, n in batch]
        num_new = np.fromiter((n for _, n in batch), dtype=np.int32, count=len(batch))
        seq_ids = np.fromiter((seq.seq_id for seq, _ in batch), dtype=np.int64, count=len(batch))
        starts = np.fromiter((seq.num_cached for seq, _ in batch), dtype=np.int32, count=len(batch))
        max_blocks = max(self.kv.blocks_for(seq.num_cached + n) for seq, n in batch)
        slot_mapping, block_tables, context_lens, copies = self.kv.manager.prepare_step(
            seq_ids, num_new, max_blocks)
        if len(copies):
            self.backend.copy_blocks(np.ascontiguousarray(copies[:, 0]), np.ascontiguousarray(copies[:, 1]))
        query_start_loc = np.zeros(len(batch) + 1, dtype=np.int32)
        np.cumsum(num_new, out=query_start_loc[1:])
        if int(num_new.max()) == 1:  # decode only
            token_ids = np.array([ids[0] for ids in new_ids], dtype=np.int32)
            positions = starts
        else:
            token_ids = np.fromiter((t for ids in new_ids for t in ids), dtype=np.int32,
                                    count=int(query_start_loc[-1]))
            positions = (np.arange(query_start_loc[-1], dtype=np.int32)
                         - np.repeat(query_start_loc[:-1] - starts, num_new))
        for seq, n in batch:
            seq.num_cached += n
        return dict(token_ids=token_ids, positions=positions.astype(np.int32), slot_mapping=slot_mapping,
                    query_start_loc=query_start_loc, context_lens=context_lens,
                    block_tables=block_tables)

    def sample(self, batch: list[tuple[Sequence, int]]) -> np.ndarray:
        """Runs the batch; returns the next token of every sequence [S] int32."""
        arrays = self._prepare(batch)
        logits_indices = arrays["query_start_loc"][1:] - 1
        params = [seq.params for seq, _ in batch]
        return self.backend.forward_and_sample(
            **arrays,
            logits_indices=np.ascontiguousarray(logits_indices),
            temperature=np.array([p.temperature for p in params], dtype=np.float32),
            top_k=np.array([p.top_k for p in params], dtype=np.int32),
            top_p=np.array([p.top_p for p in params], dtype=np.float32),
            seeds=np.array([seq.seed for seq, _ in batch], dtype=np.uint64),
            counters=np.array([len(seq.output_ids) for seq, _ in batch], dtype=np.int64),
        )

    def logits(self, seq: Sequence) -> np.ndarray:
        """Feeds the whole prompt of one fresh sequence; logits at every position [T, V]."""
        arrays = self._prepare([(seq, len(seq.prompt_ids))])
        rows = np.arange(len(seq.prompt_ids), dtype=np.int32)
        return self.backend.forward(**arrays, logits_indices=rows)
