"""The KV cache's bookkeeping on the host: paged or contiguous, behind one interface.

paged       blocks of `block_size` tokens from one shared pool; a sequence takes a new block only
            when its last one is full, so waste is at most one partial block per sequence.
contiguous  "standard caching": each sequence reserves one buffer of n_positions tokens up front.
            It is the same block manager with block_size = n_positions, so the kernels and the
            numbers are the same; only the memory differs.
"""

from __future__ import annotations

from pagedgpt2 import _core

KV_CACHE_MODES = ("paged", "contiguous")


class KVCache:
    def __init__(self, mode: str, num_blocks: int, block_size: int, bytes_per_block: int,
                 enable_prefix_caching: bool = False):
        self.mode = mode
        self.bytes_per_block = bytes_per_block
        self.manager = _core.BlockManager(num_blocks, block_size, enable_prefix_caching)

    @property
    def block_size(self) -> int:
        return self.manager.block_size

    @property
    def num_blocks(self) -> int:
        return self.manager.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return self.manager.blocks_for(num_tokens)

    def stats(self) -> dict:
        m = self.manager
        bytes_per_token = self.bytes_per_block // m.block_size
        slots, held = m.num_slots_in_use, m.num_tokens_held
        return {
            "mode": self.mode,
            "block_size": m.block_size,
            "num_blocks": m.num_blocks,
            "blocks_used": m.num_used,
            "blocks_free": m.num_free,
            "blocks_shared": m.num_shared_blocks,
            "blocks_saved_by_sharing": m.num_logical_blocks - m.num_used,
            "bytes_reserved": m.num_used * self.bytes_per_block,
            "bytes_holding_tokens": m.num_tokens_held * bytes_per_token,
            "bytes_total": m.num_blocks * self.bytes_per_block,
            "waste_tokens": slots - held,  # reserved token slots holding no token
            "waste_fraction": (slots - held) / slots if slots else 0.0,
            "prefix_caching": m.prefix_caching,
            "blocks_cached": m.num_cached_blocks,
            "prefix_queried_blocks": m.num_prefix_queried_blocks,
            "prefix_hit_blocks": m.num_prefix_hit_blocks,
        }
