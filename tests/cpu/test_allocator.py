"""Block allocator and block tables: property tests over random operation sequences."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedgpt2 import _core


def test_allocator_basics():
    a = _core.BlockAllocator(3)
    ids = [a.allocate() for _ in range(3)]
    assert sorted(ids) == [0, 1, 2] and a.num_free == 0
    with pytest.raises(RuntimeError, match="exhausted"):
        a.allocate()
    a.share(ids[0])
    a.release(ids[0])
    assert a.num_free == 0 and a.ref_count(ids[0]) == 1
    a.release(ids[0])
    assert a.num_free == 1
    with pytest.raises(RuntimeError, match="release of free block"):  # a double free
        a.release(ids[0])


def test_out_of_range_block_id():
    a = _core.BlockAllocator(2)
    with pytest.raises(IndexError, match="outside the pool"):
        a.ref_count(5)


def test_append_allocates_a_block_only_when_the_last_is_full():
    bm = _core.BlockManager(10, 4)
    bm.add_sequence(1)
    slots, copies = bm.append_slots(1, [7] * 3)
    assert bm.num_used == 1 and copies == []
    table = bm.block_table(1)
    assert slots == [table[0] * 4 + i for i in range(3)]
    bm.append_slots(1, [7])
    assert bm.num_used == 1
    slots, _ = bm.append_slots(1, [7])
    assert bm.num_used == 2 and slots == [bm.block_table(1)[1] * 4]


def test_fork_then_write_copies_the_shared_partial_block():
    bm = _core.BlockManager(10, 4)
    bm.add_sequence(1)
    bm.append_slots(1, [7] * 6)  # one full block + a half-full one
    bm.fork(1, 2)
    assert bm.num_used == 2 and bm.num_shared_blocks == 2
    full, partial = bm.block_table(1)
    slots, copies = bm.append_slots(2, [7])
    new_partial = bm.block_table(2)[1]
    assert copies == [(partial, new_partial)] and new_partial != partial
    assert bm.block_table(2)[0] == full and slots == [new_partial * 4 + 2]
    _, copies = bm.append_slots(1, [7])  # the parent's block is its own again: no copy
    assert copies == []


def test_exhaustion_changes_nothing():
    bm = _core.BlockManager(2, 4)
    bm.add_sequence(1)
    bm.append_slots(1, [7] * 8)
    with pytest.raises(RuntimeError, match="needs 1 more blocks, 0 free"):
        bm.append_slots(1, [7])
    assert bm.num_tokens(1) == 8 and bm.num_free == 0


class Model:
    """The pure-Python picture of what the block manager must hold."""

    def __init__(self, num_blocks, block_size):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.tokens = {}  # seq -> num tokens


OPS = st.lists(st.tuples(st.sampled_from(["add", "append", "fork", "free"]),
                         st.integers(0, 7), st.integers(0, 7), st.integers(1, 9)), max_size=60)


@settings(max_examples=300, deadline=None)
@given(num_blocks=st.integers(1, 24), block_size=st.integers(1, 5), ops=OPS)
def test_random_operations_never_leak_or_double_own(num_blocks, block_size, ops):
    bm = _core.BlockManager(num_blocks, block_size)
    tokens: dict[int, int] = {}
    for op, a, b, n in ops:
        if op == "add" and a not in tokens:
            bm.add_sequence(a)
            tokens[a] = 0
        elif op == "append" and a in tokens:
            need = bm.blocks_needed_to_append(a, n)
            if need > bm.num_free:
                with pytest.raises(RuntimeError):
                    bm.append_slots(a, [a] * n)
            else:
                slots, _ = bm.append_slots(a, [a] * n)
                assert len(slots) == n
                tokens[a] += n
        elif op == "fork" and a in tokens and b not in tokens:
            bm.fork(a, b)
            tokens[b] = tokens[a]
        elif op == "free" and a in tokens:
            bm.free_sequence(a)
            del tokens[a]
        check_invariants(bm, tokens, num_blocks, block_size)
    for seq in list(tokens):
        bm.free_sequence(seq)
    assert bm.num_free == num_blocks and bm.num_shared_blocks == 0


def check_invariants(bm, tokens, num_blocks, block_size):
    owners: dict[int, int] = {}
    for seq, n in tokens.items():
        table = bm.block_table(seq)
        assert bm.num_tokens(seq) == n
        assert len(table) == -(-n // block_size)  # exactly enough blocks
        assert len(set(table)) == len(table)
        for block in table:
            owners[block] = owners.get(block, 0) + 1
    # Every used block is owned, by exactly as many sequences as its reference count says.
    assert bm.num_used == len(owners)
    assert bm.num_free + bm.num_used == num_blocks
    for block, count in owners.items():
        assert bm.ref_count(block) == count


OPS_CACHED = st.lists(st.tuples(st.sampled_from(["add", "append", "fork", "free"]),
                                st.integers(0, 7), st.integers(0, 7),
                                st.lists(st.integers(0, 2), min_size=1, max_size=12)), max_size=60)


@settings(max_examples=300, deadline=None)
@given(num_blocks=st.integers(1, 24), block_size=st.integers(1, 4), ops=OPS_CACHED)
def test_prefix_caching_never_leaks_and_hits_only_equal_prefixes(num_blocks, block_size, ops):
    """Tokens from a 3-letter alphabet, so prefixes repeat and the cache is hit often."""
    bm = _core.BlockManager(num_blocks, block_size, True)
    tokens: dict[int, list[int]] = {}
    content: dict[int, list[int]] = {}  # block id -> the tokens it holds (as far as written)
    for op, a, b, ids in ops:
        if op == "add" and a not in tokens:
            bm.add_sequence(a)
            held = bm.match_prefix(a, ids)
            assert held % block_size == 0 and held < len(ids)
            for i, block in enumerate(bm.block_table(a)):  # a hit holds exactly these tokens
                assert content[block][:block_size] == ids[i * block_size:(i + 1) * block_size]
            tokens[a] = ids[:held]
        elif op == "append" and a in tokens:
            if bm.blocks_needed_to_append(a, len(ids)) > bm.num_free:
                with pytest.raises(RuntimeError):
                    bm.append_slots(a, ids)
                continue
            slots, copies = bm.append_slots(a, ids)
            for src, dst in copies:
                content[dst] = list(content[src])
            for token, slot in zip(ids, slots):
                block, offset = divmod(slot, block_size)
                cells = content.setdefault(block, [])
                del cells[offset:]
                cells.append(token)
            tokens[a] += ids
        elif op == "fork" and a in tokens and b not in tokens:
            bm.fork(a, b)
            tokens[b] = list(tokens[a])
        elif op == "free" and a in tokens:
            bm.free_sequence(a)
            del tokens[a]
        check_invariants(bm, {s: len(t) for s, t in tokens.items()}, num_blocks, block_size)
        for seq, seq_tokens in tokens.items():  # every table holds its sequence's tokens
            for i, block in enumerate(bm.block_table(seq)):
                assert content[block][:block_size] == seq_tokens[i * block_size:(i + 1) * block_size][:len(content[block])]
    for seq in list(tokens):
        bm.free_sequence(seq)
    assert bm.num_free == num_blocks and bm.num_used == 0
