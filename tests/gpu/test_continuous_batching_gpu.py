"""Continuous batching on the GPU: preemption with recompute, parallel sampling with
copy-on-write, prefix caching, abort and a randomized soak (fp32, greedy where tokens are compared
across different batch shapes, since cuBLAS may round differently at different shapes)."""

from __future__ import annotations

import numpy as np
import pytest

from pagedgpt2 import Engine, SamplingParams
from pagedgpt2.sequence import sample_seed

pytestmark = pytest.mark.cuda
VOCAB = 1000


@pytest.fixture(scope="module")
def model_dir(hf_model_dirs):
    return hf_model_dirs["d48"][2]


def engine(model_dir, **kw):
    return Engine(model_dir, device="cuda", dtype="float32", **{"num_blocks": 512, **kw})


def prompts(seed, lengths):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, size=n).tolist() for n in lengths]


def greedy(n):
    return SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)


def test_small_pool_preempts_and_recomputes_the_same_tokens(model_dir):
    ps = prompts(1, [30, 5, 17, 40, 12, 25, 8, 33])
    reference = [o.token_ids for o in engine(model_dir, block_size=4).generate(ps, greedy(20))]
    small = engine(model_dir, block_size=4, num_blocks=16)
    assert [o.token_ids for o in small.generate(ps, greedy(20))] == reference
    assert small.kv_stats()["num_preemptions"] > 0 and small.kv_stats()["blocks_used"] == 0


def test_parallel_samples_reproduce_and_match_each_alone(model_dir):
    prompt = prompts(3, [22])[0]
    eng = engine(model_dir, block_size=8)
    params = SamplingParams(n=4, max_new_tokens=16, temperature=1.0, seed=42, ignore_eos=True)
    first, again = eng.generate(prompt, params)[0], eng.generate(prompt, params)[0]
    assert [s.token_ids for s in first.samples] == [s.token_ids for s in again.samples]
    for j, sample in enumerate(first.samples):
        alone = SamplingParams(max_new_tokens=16, temperature=1.0, seed=sample_seed(42, j), ignore_eos=True)
        assert eng.generate(prompt, alone)[0].token_ids == sample.token_ids
    assert eng.kv_stats()["blocks_used"] == 0


def test_prefix_caching_gives_the_same_tokens_and_hits(model_dir):
    shared = prompts(6, [48])[0]
    ps = [shared + tail for tail in prompts(7, [5, 9, 1, 13])]
    reference = [o.token_ids for o in engine(model_dir, block_size=8).generate(ps, greedy(12))]
    cached = engine(model_dir, block_size=8, enable_prefix_caching=True)
    cached.generate(ps, greedy(12))
    assert [o.token_ids for o in cached.generate(ps, greedy(12))] == reference
    assert cached.kv_stats()["prefix_hit_blocks"] >= 4 * 6


def test_abort_and_soak_end_with_the_pool_free(model_dir):
    rng = np.random.default_rng(7)
    eng = engine(model_dir, block_size=4, num_blocks=60, max_num_seqs=8, max_num_batched_tokens=48,
                 enable_prefix_caching=True)
    live = []
    for _ in range(120):
        if rng.random() < 0.35:
            p = rng.integers(0, VOCAB, size=int(rng.integers(1, 40))).tolist()
            live.append(eng.add_request(p, SamplingParams(n=int(rng.integers(1, 3)), max_new_tokens=int(rng.integers(1, 30)),
                                                          temperature=1.0, ignore_eos=True)))
        if live and rng.random() < 0.05:
            eng.abort(live.pop(int(rng.integers(len(live)))))
        eng.step()
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.kv_stats()["blocks_used"] == 0


@pytest.mark.parametrize("greedy_in_lm_head", [None, "0"])
def test_decode_graphs_are_captured_at_start_up(model_dir, monkeypatch, greedy_in_lm_head):
    """Every decode bucket's two sampling graphs (1, 2, 4, ..., max_num_seqs; a step's, and a
    decode run's step that turns its tokens into the next step's inputs) exist before the first
    request; steps at batch sizes that grow and shrink replay them and capture nothing more.
    Buckets of 1 and 2 rows (the skinny LM head) have a third, the run's step whose rows are all
    greedy, taking its tokens from the LM head without a sampler (unless
    PAGEDGPT2_GREEDY_IN_LM_HEAD=0). (That replayed graphs compute the right tokens is what the
    HF comparisons and test_decode_run_shortcuts_change_no_token check.)"""
    if greedy_in_lm_head is None:
        monkeypatch.delenv("PAGEDGPT2_GREEDY_IN_LM_HEAD", raising=False)
    else:
        monkeypatch.setenv("PAGEDGPT2_GREEDY_IN_LM_HEAD", greedy_in_lm_head)
    eng = engine(model_dir, max_num_seqs=24)
    buckets = [1, 2, 4, 8, 16, 24]
    graphs = 2 * len(buckets) + (2 if greedy_in_lm_head is None else 0)
    assert eng.backend.num_cuda_graphs == graphs
    rng = np.random.default_rng(12)
    lengths = rng.integers(1, 25, size=20).tolist()
    outs = eng.generate(prompts(12, rng.integers(2, 30, size=20).tolist()), [greedy(n) for n in lengths])
    assert [len(o.token_ids) for o in outs] == lengths
    assert eng.backend.num_cuda_graphs == graphs


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("switch", ["PAGEDGPT2_GREEDY_IN_LM_HEAD", "PAGEDGPT2_EMBED_IN_ADVANCE"])
def test_decode_run_shortcuts_change_no_token(model_dir, monkeypatch, dtype, switch):
    """Two shortcuts of decode runs of 1-2 sequences (the skinny steps), each against the engine
    built with it switched off (=0):
    - every row greedy: each step's tokens come from the LM head's argmax, not a sampler kernel
      (the advance reads and resets the keys);
    - the graphs leave the embedding out: the advance of the step before writes their x.
    The tokens must not change, over runs that continue one another and at a batch that shrinks
    from 2 to 1 as a sequence ends; nor may the seeded draws of a batch with a sampled sequence
    (which keeps the sampler)."""
    ps = prompts(13, [5, 17])
    sampled = SamplingParams(max_new_tokens=23, temperature=1.0, seed=3, ignore_eos=True)

    def run(value, params):
        if value is None:
            monkeypatch.delenv(switch, raising=False)
        else:
            monkeypatch.setenv(switch, value)
        eng = Engine(model_dir, device="cuda", dtype=dtype, num_blocks=512, block_size=8, decode_steps=8)
        out = [o.token_ids for o in eng.generate(ps[:len(params)], params)]
        assert eng.kv_stats()["blocks_used"] == 0
        return out

    for params in ([greedy(40)], [greedy(40), greedy(23)], [greedy(40), sampled]):
        on = run(None, params)
        assert [len(t) for t in on] == [p.max_new_tokens for p in params]
        assert on == run("0", params)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_multi_step_decode_matches_single_steps(model_dir, dtype):
    """decode_steps replays the decode graph with the sampled tokens fed back on the GPU. With
    the batch shape the same at every step (no sequence ends mid-run) the tokens are identical to
    one step per call, seeded samples included; so are those of the one-by-one fallback."""
    ps = prompts(9, [5, 17, 9, 30, 3])
    params = [SamplingParams(max_new_tokens=40, temperature=0.0 if i % 2 else 1.0, top_k=50, seed=i,
                             ignore_eos=True) for i in range(len(ps))]

    def run(steps, graphs=True, async_decode=True):
        eng = Engine(model_dir, device="cuda", dtype=dtype, num_blocks=512, block_size=8, decode_steps=steps,
                     async_decode=async_decode)
        eng.backend.use_cuda_graphs = graphs
        out = [o.token_ids for o in eng.generate(ps, params)]
        assert eng.kv_stats()["blocks_used"] == 0
        return out

    single = run(1)
    assert run(8) == single
    assert run(8, async_decode=False) == single
    assert run(64) == single
    assert run(16, graphs=False) == run(1, graphs=False)


def test_multi_step_decode_with_mixed_lengths_and_stops(model_dir):
    ps = prompts(10, [5, 17, 9, 30, 3, 12])
    probe = engine(model_dir).generate(ps[0], greedy(6))[0].token_ids
    params = [greedy(n) for n in (7, 33, 20, 1, 45)] + [
        SamplingParams(max_new_tokens=40, temperature=0.0, stop_token_ids=[probe[4]])]
    ps[5] = ps[0]
    single = engine(model_dir, decode_steps=1).generate(ps, params)
    multi = engine(model_dir, decode_steps=8).generate(ps, params)
    assert [o.token_ids for o in multi] == [o.token_ids for o in single]
    assert multi[5].samples[0].finish_reason == "stop"


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_decode_run_continued_on_the_gpu_gives_the_tokens_of_one_run(model_dir, dtype):
    """The CUDA backend returns from launch_decode_steps at once, and a run that continues it
    takes the tokens its last step sampled from the GPU: two runs give the tokens of one as long.
    So do the cases it must serve from the host: graphs switched off between the two launches,
    and a step run in between (which overwrites the GPU's copy of those tokens)."""
    from conftest import decode_run_arrays, later_steps

    backend = Engine(model_dir, device="cuda", dtype=dtype, num_blocks=64, block_size=16).backend
    arrays = decode_run_arrays(num_seqs=5, num_steps=9, position=20)
    head = dict(arrays, slot_mappings=arrays["slot_mappings"][:4])
    whole = backend.decode_steps(**arrays)

    def two_runs(between=lambda: None):
        backend.launch_decode_steps(**head)
        between()
        backend.launch_decode_steps(**later_steps(arrays, 4), continue_run=True)
        assert backend.runs_in_flight == 2
        return np.concatenate([backend.collect_decode_steps(), backend.collect_decode_steps()])

    np.testing.assert_array_equal(two_runs(), whole)
    other = decode_run_arrays(num_seqs=1, num_steps=1, position=3, first_block=20, seed=1)
    other["slot_mapping"] = other.pop("slot_mappings")[0]
    np.testing.assert_array_equal(two_runs(lambda: backend.forward_and_sample(**other)), whole)
    np.testing.assert_array_equal(two_runs(lambda: setattr(backend, "use_cuda_graphs", False)), whole)
    np.testing.assert_array_equal(two_runs(), whole)  # graphs off: both runs one step at a time
