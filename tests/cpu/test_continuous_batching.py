"""Continuous batching on the CPU: preemption with recompute, chunked prefill, parallel sampling
with copy-on-write, prefix caching, abort, and a randomized soak that must end with a free pool."""

from __future__ import annotations

import numpy as np
import pytest

from pagedgpt2 import Engine, SamplingParams
from pagedgpt2.sequence import sample_seed

VOCAB = 1000  # the d48 model: n_positions 96


@pytest.fixture(scope="module")
def model_dir(hf_model_dirs):
    return hf_model_dirs["d48"][2]


def make_prompts(seed, lengths):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, size=n).tolist() for n in lengths]


def mixed_params(num, max_new=20):
    """Greedy and seeded sampling, alternating, with different lengths."""
    return [SamplingParams(max_new_tokens=max_new - (i % 5), temperature=0.0 if i % 2 else 0.9, top_k=40,
                           seed=100 + i, ignore_eos=True) for i in range(num)]


def tokens(outs):
    return [[s.token_ids for s in o.samples] for o in outs]


def test_a_pool_far_too_small_gives_the_unconstrained_tokens(model_dir):
    prompts = make_prompts(1, [30, 5, 17, 40, 12, 25, 8, 33])
    params = mixed_params(len(prompts))
    reference = tokens(Engine(model_dir, device="cpu", block_size=4).generate(prompts, params))
    small = Engine(model_dir, device="cpu", block_size=4, num_blocks=16)  # 64 slots for ~400 tokens
    assert tokens(small.generate(prompts, params)) == reference
    stats = small.kv_stats()
    assert stats["num_preemptions"] > 0
    assert stats["blocks_used"] == 0 and stats["blocks_free"] == 16


def test_chunked_prefill_gives_the_same_tokens(model_dir):
    prompts = make_prompts(2, [60, 3, 45, 20])
    params = mixed_params(len(prompts))
    reference = tokens(Engine(model_dir, device="cpu").generate(prompts, params))
    chunked = Engine(model_dir, device="cpu", max_num_batched_tokens=7)
    assert tokens(chunked.generate(prompts, params)) == reference


def test_mixed_steps_put_one_token_rows_first(model_dir, monkeypatch):
    """The backend runs the attention of a step's leading one-token rows in its decode kernel, so
    the scheduler puts them first: fresh one-token prompts admitted after longer ones, and
    decodes beside prompt chunks. The tokens stay those of each prompt run alone."""
    from pagedgpt2.model_runner import ModelRunner

    rows, original = [], ModelRunner.sample
    monkeypatch.setattr(ModelRunner, "sample", lambda self, batch: rows.append(
        [item.num_new_tokens for item in batch]) or original(self, batch))
    prompts = make_prompts(23, [5, 1, 9, 1, 30, 2])
    params = mixed_params(len(prompts), max_new=12)
    eng = Engine(model_dir, device="cpu", max_num_batched_tokens=12, decode_steps=1)
    got = tokens(eng.generate(prompts, params))
    mixed = [r for r in rows if 1 in r and max(r) > 1]
    assert mixed, rows
    for r in rows:
        assert r == sorted(r, key=lambda n: n != 1), r
    alone = Engine(model_dir, device="cpu")
    assert got == [tokens(alone.generate(p, sp))[0] for p, sp in zip(prompts, params)]


def test_generate_takes_its_own_token_budget(model_dir, monkeypatch):
    """generate() runs its steps within generate_batched_tokens, the request loop within
    max_num_batched_tokens (both from DEFAULT_BATCHED_TOKENS unless given); the tokens are the
    same either way, and a given budget holds for both."""
    import pagedgpt2.engine as engine_module
    from pagedgpt2.model_runner import ModelRunner

    step_tokens, original = [], ModelRunner.sample
    monkeypatch.setattr(ModelRunner, "sample", lambda self, batch: step_tokens.append(
        sum(item.num_new_tokens for item in batch)) or original(self, batch))
    monkeypatch.setitem(engine_module.DEFAULT_BATCHED_TOKENS, "cpu", (100, 400))
    prompts = make_prompts(29, [50] * 8)
    params = mixed_params(len(prompts), max_new=6)
    eng = Engine(model_dir, device="cpu", decode_steps=1)
    assert (eng.max_num_batched_tokens, eng.generate_batched_tokens) == (100, 400)
    generated = tokens(eng.generate(prompts, params))
    assert step_tokens[0] == 400  # every prompt in the first step
    assert eng.scheduler.max_num_batched_tokens == 100  # the loop's budget again

    step_tokens.clear()
    ids = [eng.add_request(p, sp) for p, sp in zip(prompts, params)]
    outputs = {i: [] for i in ids}
    while eng.has_unfinished_requests():
        for out in eng.step():
            outputs[out.request_id] += out.new_token_ids
    assert max(step_tokens) == 100 and step_tokens[0] == 100
    assert [[outputs[i]] for i in ids] == generated

    step_tokens.clear()
    given = Engine(model_dir, device="cpu", decode_steps=1, max_num_batched_tokens=150)
    assert (given.max_num_batched_tokens, given.generate_batched_tokens) == (150, 150)
    assert tokens(given.generate(prompts, params)) == generated
    assert max(step_tokens) == 150


def test_contiguous_buffers_are_all_used(model_dir, monkeypatch):
    """Contiguous buffers never grow, so no watermark holds any back: as many sequences as
    buffers start in the first step (the paged pool keeps 1% free for growth)."""
    from pagedgpt2.model_runner import ModelRunner

    step_tokens, original = [], ModelRunner.sample
    monkeypatch.setattr(ModelRunner, "sample", lambda self, batch: step_tokens.append(
        sum(item.num_new_tokens for item in batch)) or original(self, batch))
    prompts = make_prompts(31, [10] * 100)
    params = SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True)
    for mode, num_blocks, started in [("contiguous", 100 * 96 // 16, 100), ("paged", 100, 99)]:
        step_tokens.clear()
        eng = Engine(model_dir, device="cpu", kv_cache=mode, block_size=16, num_blocks=num_blocks)
        assert eng.kv.num_blocks == 100
        eng.generate(prompts, params)
        assert step_tokens[0] == 10 * started, mode


def test_parallel_samples_reproduce_and_match_each_sample_run_alone(model_dir):
    prompt = make_prompts(3, [22])[0]  # 22 tokens: the last block is shared while partly full
    params = SamplingParams(n=4, max_new_tokens=16, temperature=1.0, seed=42, ignore_eos=True)
    eng = Engine(model_dir, device="cpu", block_size=8)
    first = eng.generate(prompt, params)[0]
    again = eng.generate(prompt, params)[0]
    assert [s.token_ids for s in first.samples] == [s.token_ids for s in again.samples]
    assert len({tuple(s.token_ids) for s in first.samples}) == 4  # they diverge
    for j, sample in enumerate(first.samples):
        alone = SamplingParams(max_new_tokens=16, temperature=1.0, seed=sample_seed(42, j), ignore_eos=True)
        assert eng.generate(prompt, alone)[0].token_ids == sample.token_ids, f"sample {j}"
    assert eng.kv_stats()["blocks_used"] == 0


@pytest.mark.parametrize("async_decode, own_blocks", [(False, 1), (True, 2)])
def test_parallel_samples_share_the_prompt_blocks(model_dir, async_decode, own_blocks):
    prompt = make_prompts(4, [40])[0]
    eng = Engine(model_dir, device="cpu", block_size=8, async_decode=async_decode)
    rid = eng.add_request(prompt, SamplingParams(n=4, max_new_tokens=10, temperature=1.0, seed=1, ignore_eos=True))
    eng.step()  # prefill, then the fork into 4 samples
    stats = eng.kv_stats()
    assert stats["blocks_shared"] == 5  # 40 tokens = 5 full blocks, all four samples share them
    assert stats["blocks_used"] == 5
    # Each sample writes its own next tokens: 8 in one run (one new block each), no copies of
    # full blocks; with async_decode the run after it (1 token) is launched too, into a 2nd block.
    eng.step()
    assert eng.kv_stats()["blocks_used"] == 5 + 4 * own_blocks
    eng.abort(rid)
    assert eng.kv_stats()["blocks_used"] == 0


def test_parallel_samples_under_preemption(model_dir):
    prompt = make_prompts(5, [21])[0]
    params = SamplingParams(n=4, max_new_tokens=24, temperature=0.8, seed=9, ignore_eos=True)
    reference = Engine(model_dir, device="cpu", block_size=4).generate(prompt, params)[0]
    small = Engine(model_dir, device="cpu", block_size=4, num_blocks=14)
    out = small.generate(prompt, params)[0]
    assert [s.token_ids for s in out.samples] == [s.token_ids for s in reference.samples]
    assert small.kv_stats()["num_preemptions"] > 0 and small.kv_stats()["blocks_used"] == 0


def test_prefix_caching_gives_identical_logits_and_tokens_and_counts_hits(model_dir):
    shared = make_prompts(6, [48])[0]
    prompts = [shared + tail for tail in make_prompts(7, [5, 9, 1, 13])]
    params = mixed_params(len(prompts), max_new=12)
    plain = Engine(model_dir, device="cpu", block_size=8)
    cached = Engine(model_dir, device="cpu", block_size=8, enable_prefix_caching=True)
    reference = tokens(plain.generate(prompts, params))
    assert tokens(cached.generate(prompts, params)) == reference  # the first fills the cache…
    assert tokens(cached.generate(prompts, params)) == reference  # …the second hits it
    stats = cached.kv_stats()
    assert stats["prefix_hit_blocks"] >= 4 * 6  # each prompt finds at least the 6 shared blocks
    assert stats["blocks_used"] == 0 and stats["blocks_cached"] > 0
    full = shared + prompts[0][48:]
    np.testing.assert_array_equal(cached.logits(full), plain.logits(full))


def test_prefix_cache_evicts_least_recently_used_blocks(model_dir):
    eng = Engine(model_dir, device="cpu", block_size=8, num_blocks=12, enable_prefix_caching=True)
    params = SamplingParams(max_new_tokens=1, temperature=0.0)
    a, b = make_prompts(8, [41, 41])
    eng.generate(a, params)  # a's 5 full blocks stay cached (evictable)
    assert eng.kv_stats()["blocks_cached"] == 5
    eng.generate(b, params)  # b takes 6 of the 7 free blocks: a's survive
    assert eng.kv_stats()["blocks_cached"] == 10
    eng.generate([1] * 80, SamplingParams(max_new_tokens=8, temperature=0.0))  # 11 blocks: evicts a's first
    before = eng.kv_stats()["prefix_hit_blocks"]
    eng.generate(a, params)
    assert eng.kv_stats()["prefix_hit_blocks"] == before  # a was evicted: no hit
    assert eng.kv_stats()["blocks_used"] == 0


def test_step_api_requests_join_and_leave(model_dir):
    eng = Engine(model_dir, device="cpu", decode_steps=1)  # one token per step: r1 still decodes
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    p1, p2 = make_prompts(9, [7, 11])
    r1 = eng.add_request(p1, greedy)
    got = {r1: [], }
    for _ in range(3):
        for out in eng.step():
            got[out.request_id] += out.new_token_ids
    r2 = eng.add_request(p2, greedy)  # joins while r1 is decoding
    got[r2] = []
    finished = set()
    while eng.has_unfinished_requests():
        for out in eng.step():
            got[out.request_id] += out.new_token_ids
            if out.finished:
                finished.add(out.request_id)
    assert finished == {r1, r2}
    alone = Engine(model_dir, device="cpu")
    assert got[r1] == alone.generate(p1, greedy)[0].token_ids
    assert got[r2] == alone.generate(p2, greedy)[0].token_ids
    assert eng.kv_stats()["blocks_used"] == 0


def test_abort_frees_every_block(model_dir):
    eng = Engine(model_dir, device="cpu", block_size=4)
    rids = [eng.add_request(p, SamplingParams(n=2, max_new_tokens=30, temperature=1.0, ignore_eos=True))
            for p in make_prompts(10, [10, 20, 30])]
    for _ in range(4):
        eng.step()
    assert eng.kv_stats()["blocks_used"] > 0
    for rid in rids:
        eng.abort(rid)
    assert eng.kv_stats()["blocks_used"] == 0 and not eng.has_unfinished_requests()
    eng.abort(12345)  # unknown: ignored


@pytest.mark.parametrize("prefix_caching", [True, False])  # False: multi-step decode runs too
def test_randomized_soak_ends_with_the_pool_free(model_dir, prefix_caching):
    rng = np.random.default_rng(2026)
    eng = Engine(model_dir, device="cpu", block_size=int(rng.integers(1, 9)), num_blocks=40,
                 max_num_seqs=6, max_num_batched_tokens=32, enable_prefix_caching=prefix_caching)
    reference = Engine(model_dir, device="cpu")
    live, finished, expected = {}, {}, {}
    for step in range(150):
        if rng.random() < 0.3:
            prompt = rng.integers(0, VOCAB, size=int(rng.integers(1, 40))).tolist()
            greedy = rng.random() < 0.5
            params = SamplingParams(max_new_tokens=int(rng.integers(1, 30)), temperature=0.0 if greedy else 1.0,
                                    n=1 if greedy else int(rng.integers(1, 4)), seed=int(rng.integers(1 << 30)),
                                    ignore_eos=True)
            rid = eng.add_request(prompt, params)
            live[rid] = (prompt, params)
        if live and rng.random() < 0.05:
            rid = list(live)[int(rng.integers(len(live)))]
            eng.abort(rid)
            del live[rid]
        for out in eng.step():
            finished.setdefault((out.request_id, out.sample_index), []).extend(out.new_token_ids)
        for rid in [r for r in live if not eng._requests.get(r)]:
            expected[rid] = live.pop(rid)
    while eng.has_unfinished_requests():
        for out in eng.step():
            finished.setdefault((out.request_id, out.sample_index), []).extend(out.new_token_ids)
    expected.update(live)
    assert eng.kv_stats()["blocks_used"] == 0
    assert eng.kv_stats()["num_running"] == 0 and eng.kv_stats()["num_waiting"] == 0
    # Every request that ran to the end gave what it gives alone.
    for rid, (prompt, params) in list(expected.items())[:12]:
        ref = reference.generate(prompt, params)[0]
        for j, sample in enumerate(ref.samples):
            assert finished[(rid, j)] == sample.token_ids


def test_parallel_samples_count_against_max_num_seqs(model_dir):
    eng = Engine(model_dir, device="cpu", block_size=4, max_num_seqs=6)
    for prompt in make_prompts(11, [5, 9, 3, 12, 7]):
        eng.add_request(prompt, SamplingParams(n=4, max_new_tokens=6, temperature=1.0, ignore_eos=True))
    peak = 0
    while eng.has_unfinished_requests():
        eng.step()
        peak = max(peak, len(eng.scheduler.running))
    assert 4 <= peak <= 6
    assert eng.kv_stats()["blocks_used"] == 0 and eng.scheduler._pending_forks == 0


def test_repeated_decode_steps_reuse_arrays_and_change_nothing(model_dir, monkeypatch):
    """The steady decode step (same running set as last step: last step's sampled tokens fed
    straight back, sampling arrays carried over) gives the tokens of the general path, with
    seeded sampling, forks, a late joiner and an abort in the run."""
    from pagedgpt2.model_runner import ModelRunner

    def run(fast: bool):
        eng = Engine(model_dir, device="cpu", block_size=4, decode_steps=1)
        taken = []
        repeats, original = ModelRunner._repeats_last_decode, ModelRunner._sample_repeated_decode
        monkeypatch.setattr(ModelRunner, "_repeats_last_decode", lambda self, batch: fast and repeats(self, batch))
        monkeypatch.setattr(ModelRunner, "_sample_repeated_decode",
                            lambda self, batch: taken.append(len(batch)) or original(self, batch))
        params = mixed_params(5, max_new=24) + [SamplingParams(n=3, max_new_tokens=18, temperature=1.0, seed=7,
                                                               ignore_eos=True)]
        rids = [eng.add_request(p, sp) for p, sp in zip(make_prompts(21, [5, 9, 13, 3, 17, 8]), params)]
        got = {}
        for step in range(60):
            if step == 6:
                rids.append(eng.add_request(make_prompts(22, [6])[0], mixed_params(1)[0]))
            if step == 9:
                eng.abort(rids[2])
            for out in eng.step():
                got.setdefault((out.request_id, out.sample_index), []).extend(out.new_token_ids)
        assert not eng.has_unfinished_requests() and eng.kv_stats()["blocks_used"] == 0
        return got, taken

    fast, taken = run(True)
    slow, none = run(False)
    assert fast == slow
    assert len(taken) > 10 and not none  # the steady path ran, and only when allowed


def run_with_events(eng, prompts, params, join_at=None, abort_at=None):
    """Steps eng to the end, with an optional late joiner and abort; {(request, sample): tokens}
    and {(request, sample): finish reason}."""
    rids = [eng.add_request(p, sp) for p, sp in zip(prompts, params)]
    got, reasons = {}, {}
    step = 0
    while eng.has_unfinished_requests():
        if step == join_at:
            rids.append(eng.add_request(make_prompts(31, [6])[0], mixed_params(1, max_new=15)[0]))
        if step == abort_at:
            eng.abort(rids[1])
        for out in eng.step():
            key = (out.request_id, out.sample_index)
            got.setdefault(key, []).extend(out.new_token_ids)
            if out.finished:
                reasons[key] = out.finish_reason
        step += 1
    assert eng.kv_stats()["blocks_used"] == 0
    return got, reasons


@pytest.mark.parametrize("async_decode", [True, False], ids=["async", "sync"])
@pytest.mark.parametrize("decode_steps, block_size", [(8, 4), (3, 1), (5, 16)])
def test_multi_step_decode_gives_the_tokens_of_single_steps(model_dir, monkeypatch, decode_steps, block_size,
                                                             async_decode):
    """decode_steps > 1 runs several decode steps per backend call, feeding sampled tokens back
    inside the backend (and, with async_decode, launches the next run before reading the last);
    every request gets exactly the tokens and finish reasons of one step per call: greedy and
    seeded sampling, forks, stop tokens hit mid-run, a late joiner, an abort."""
    from pagedgpt2.model_runner import ModelRunner

    prompts = make_prompts(30, [5, 9, 13, 3, 17, 8])
    # A stop token that greedy decoding of prompt 0 reaches at its 4th new token.
    probe = Engine(model_dir, device="cpu").generate(
        prompts[0], SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True))[0].token_ids
    params = mixed_params(4, max_new=24) + [
        SamplingParams(max_new_tokens=30, temperature=0.0, stop_token_ids=[probe[3]]),
        SamplingParams(n=3, max_new_tokens=18, temperature=1.0, seed=7, stop_token_ids=[probe[3]])]
    prompts[4] = prompts[0]
    runs = []
    original = ModelRunner.launch_steps
    monkeypatch.setattr(ModelRunner, "launch_steps", lambda self, batch, k, continues=False:
                        runs.append((k, continues)) or original(self, batch, k, continues))
    multi = run_with_events(Engine(model_dir, device="cpu", block_size=block_size, decode_steps=decode_steps,
                                   async_decode=async_decode), prompts, params, join_at=4, abort_at=2)
    assert runs and max(runs)[0] == decode_steps  # multi-step runs happened, full length at least once
    assert any(continues for _, continues in runs) == async_decode  # runs launched ahead
    runs.clear()
    single = run_with_events(Engine(model_dir, device="cpu", block_size=block_size, decode_steps=1),
                             prompts, params, join_at=4, abort_at=2)
    assert not runs
    # The abort lands after a different number of tokens (a step may carry several): request 1
    # got a prefix of the same tokens either way. All others match exactly.
    short, long = sorted([multi[0].pop((1, 0)), single[0].pop((1, 0))], key=len)
    assert 0 < len(short) < len(long) and long[:len(short)] == short
    assert multi[1].pop((1, 0), None) is None and single[1].pop((1, 0), None) is None
    assert multi == single
    assert multi[1][(4, 0)] == "stop" and multi[0][(4, 0)][-1] == probe[3]


def test_multi_step_decode_stays_within_free_blocks_and_max_new_tokens(model_dir, monkeypatch):
    from pagedgpt2.model_runner import ModelRunner

    runs = []
    original = ModelRunner.launch_steps

    def spy(self, batch, k, continues=False):
        free = self.kv.manager.num_free
        need = self.kv.manager.blocks_needed_to_append_each(
            np.array([item.seq.seq_id for item in batch], dtype=np.int64), k)
        # a run launched ahead follows one whose tokens are not counted yet
        unread = runs[-1][0] if continues else 0
        left = min(item.seq.num_new_tokens_left for item in batch) - unread
        runs.append((k, need <= free, k <= left))
        return original(self, batch, k, continues)

    monkeypatch.setattr(ModelRunner, "launch_steps", spy)
    prompts = make_prompts(40, [20, 11, 30])
    params = mixed_params(3, max_new=21)
    tight = Engine(model_dir, device="cpu", block_size=2, num_blocks=60, decode_steps=16)
    assert tokens(tight.generate(prompts, params)) == \
        tokens(Engine(model_dir, device="cpu", decode_steps=1).generate(prompts, params))
    assert runs and all(fits and within for _, fits, within in runs)
    assert tight.kv_stats()["blocks_used"] == 0


@pytest.mark.parametrize("limit", ["max_num_seqs", "blocks"])
def test_multi_step_decode_runs_while_the_next_request_cannot_start(model_dir, monkeypatch, limit):
    """Requests that wait because the running set is full (max_num_seqs) or the pool is (a pool
    of a few blocks) do not stop multi-step runs; every request still gets the tokens of one
    step per call."""
    from pagedgpt2.model_runner import ModelRunner

    waiting_runs = []
    original = ModelRunner.launch_steps

    def spy(self, batch, k, continues=False):
        if eng.scheduler.waiting:
            waiting_runs.append(k)
        return original(self, batch, k, continues)

    monkeypatch.setattr(ModelRunner, "launch_steps", spy)
    prompts = make_prompts(42, [7, 12, 5, 9, 14])
    params = mixed_params(len(prompts), max_new=20)
    kw = dict(max_num_seqs=2) if limit == "max_num_seqs" else dict(block_size=4, num_blocks=24)
    eng = Engine(model_dir, device="cpu", decode_steps=8, **kw)
    got = tokens(eng.generate(prompts, params))
    assert waiting_runs, "no multi-step run while a request waited"
    assert got == tokens(Engine(model_dir, device="cpu", decode_steps=1).generate(prompts, params))
    assert eng.kv_stats()["blocks_used"] == 0


def test_multi_step_decode_is_off_with_prefix_caching(model_dir, monkeypatch):
    from pagedgpt2.model_runner import ModelRunner

    monkeypatch.setattr(ModelRunner, "launch_steps", lambda *a: pytest.fail("multi-step with prefix caching"))
    eng = Engine(model_dir, device="cpu", enable_prefix_caching=True, decode_steps=8)
    eng.generate(make_prompts(41, [9, 12]), mixed_params(2))


def test_async_decode_join_and_abort_while_a_run_is_ahead(model_dir):
    """A request added while a decode run is launched ahead starts once that run is read; one
    aborted then gets no more tokens. Every request's tokens are those it gets run alone, and the
    pool ends free."""
    prompts = make_prompts(43, [9, 14, 6])
    params = mixed_params(3, max_new=30)
    eng = Engine(model_dir, device="cpu", decode_steps=4)
    first, aborted = (eng.add_request(p, sp) for p, sp in zip(prompts[:2], params[:2]))
    got: dict[int, list[int]] = {}

    def step():
        for out in eng.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)

    for _ in range(20):
        step()
        if eng.backend.runs_in_flight:
            break
    assert eng.backend.runs_in_flight == 1  # a run is ahead, its tokens unread
    late = eng.add_request(prompts[2], params[2])
    eng.abort(aborted)
    num_before = len(got[aborted])
    while eng.has_unfinished_requests():
        step()
    alone = [Engine(model_dir, device="cpu", decode_steps=1).generate(p, sp)[0].token_ids
             for p, sp in zip(prompts, params)]
    assert got[first] == alone[0] and got[late] == alone[2]
    assert got[aborted] == alone[1][:num_before] and 0 < num_before < len(alone[1])
    assert eng.kv_stats()["blocks_used"] == 0


def test_backend_decode_run_continued_gives_the_tokens_of_one_run(model_dir):
    """launch_decode_steps(continue_run=True) feeds the last tokens of the run before it, which
    the caller has not read: two runs give the tokens of one as long."""
    from conftest import decode_run_arrays, later_steps

    backend = Engine(model_dir, device="cpu", block_size=16).backend
    arrays = decode_run_arrays(num_seqs=3, num_steps=7, position=10)
    whole = backend.decode_steps(**arrays)
    backend.launch_decode_steps(**dict(arrays, slot_mappings=arrays["slot_mappings"][:3]))
    backend.launch_decode_steps(**later_steps(arrays, 3), continue_run=True)
    assert backend.runs_in_flight == 2
    head, tail = backend.collect_decode_steps(), backend.collect_decode_steps()
    assert head.shape == (3, 3) and tail.shape == (4, 3)
    np.testing.assert_array_equal(np.concatenate([head, tail]), whole)
    # continued again after the host read everything: from the tokens it kept
    backend.launch_decode_steps(**dict(arrays, slot_mappings=arrays["slot_mappings"][:5]))
    np.testing.assert_array_equal(backend.collect_decode_steps(), whole[:5])
    backend.launch_decode_steps(**later_steps(arrays, 5), continue_run=True)
    np.testing.assert_array_equal(backend.collect_decode_steps(), whole[5:])


def test_text_decoded_ahead_during_runs_equals_decoding_at_the_end(hf_model_dirs, monkeypatch):
    """generate() decodes its sequences' text while the backend runs (Engine._detokenize_ahead);
    each sample's text is the tokenizer's text of its tokens, the stop token left out: forks,
    stop tokens met mid-run, sequences of different lengths."""
    model, _, engine_dir = hf_model_dirs["d16"]  # GPT-2's vocabulary: real text
    ahead = []
    original = Engine._detokenize_ahead
    monkeypatch.setattr(Engine, "_detokenize_ahead", lambda self, batch: ahead.append(
        sum(len(item.seq.output_ids) - 1 - item.seq.num_detokenized for item in batch)) or original(self, batch))
    eng = Engine(engine_dir, device="cpu", block_size=4, decode_steps=4)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, model.config.vocab_size, size=n).tolist() for n in (3, 11, 6, 2)]
    probe = Engine(engine_dir, device="cpu").generate(
        prompts[1], SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True))[0].token_ids
    params = [SamplingParams(max_new_tokens=40, temperature=1.0, seed=1, ignore_eos=True),
              SamplingParams(max_new_tokens=40, temperature=0.0, stop_token_ids=[probe[6]]),
              SamplingParams(n=3, max_new_tokens=29, temperature=1.2, seed=2, ignore_eos=True),
              SamplingParams(max_new_tokens=35, temperature=0.0, ignore_eos=True)]
    outs = eng.generate(prompts, params)
    assert sum(ahead) > 100  # most tokens were decoded ahead
    assert outs[1].samples[0].finish_reason == "stop" and outs[1].samples[0].token_ids[-1] == probe[6]
    for out in outs:
        for sample in out.samples:
            ids = sample.token_ids[:-1] if sample.finish_reason == "stop" else sample.token_ids
            assert sample.text == eng.tokenizer.decode(ids)
    assert len(outs[2].samples) == 3 and not eng._requests  # nothing left behind
