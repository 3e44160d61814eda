"""Sampling: seeded reproducibility, and the filters compute what they claim."""

from __future__ import annotations

import numpy as np
import pytest

from pagedgpt2 import Engine, SamplingParams, _core

VOCAB = 12


def draw(logits: np.ndarray, n: int, temperature=1.0, top_k=0, top_p=1.0, seed=3) -> np.ndarray:
    rows = np.repeat(logits[None, :], n, axis=0).astype(np.float32)
    return _core.ops.sample(rows, np.full(n, temperature, np.float32), np.full(n, top_k, np.int32),
                            np.full(n, top_p, np.float32), np.full(n, seed, np.uint64),
                            np.arange(n, dtype=np.int64))


@pytest.fixture
def logits():
    return np.random.default_rng(0).normal(size=VOCAB).astype(np.float32) * 1.5


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def test_greedy_is_argmax(logits):
    assert (draw(logits, 5, temperature=0.0) == np.argmax(logits)).all()


def test_draws_follow_the_softmax(logits):
    n = 40000
    counts = np.bincount(draw(logits, n, temperature=0.7), minlength=VOCAB)
    expected = softmax(logits / 0.7) * n
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 40  # 11 degrees of freedom: p ~ 1e-5 at 40


def test_top_k_keeps_only_the_k_highest(logits):
    got = set(draw(logits, 4000, top_k=3).tolist())
    assert got == set(np.argsort(-logits)[:3].tolist())


def test_top_p_keeps_the_smallest_set_reaching_p(logits):
    p = softmax(logits)
    order = np.argsort(-p)
    keep = int(np.searchsorted(np.cumsum(p[order]), 0.6) + 1)
    got = set(draw(logits, 4000, top_p=0.6).tolist())
    assert got == set(order[:keep].tolist())
    assert set(draw(logits, 100, top_p=1e-6).tolist()) == {int(order[0])}


def test_counter_generator_is_uniform():
    u = np.array([_core.ops.uniform_from_counter(7, i) for i in range(20000)])
    assert 0.0 <= u.min() and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.01
    assert np.histogram(u, bins=10, range=(0, 1))[0].min() > 1800


def test_same_seed_same_sample(hf_model_dirs):
    engine_dir = hf_model_dirs["d16"][2]
    eng = Engine(engine_dir, device="cpu")
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_k=40, top_p=0.95, seed=1234, ignore_eos=True)
    a = eng.generate("The quick brown fox", params)[0].token_ids
    # The same request inside a different batch: still the same tokens.
    b = eng.generate(["Once upon a time", "The quick brown fox", [5, 6, 7]], params)[1].token_ids
    c = eng.generate("The quick brown fox", SamplingParams(max_new_tokens=16, temperature=1.0, top_k=40,
                                                           top_p=0.95, seed=1235, ignore_eos=True))[0].token_ids
    assert a == b
    assert a != c
