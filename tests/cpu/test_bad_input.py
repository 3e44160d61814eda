"""Every bad input raises a clear Python exception naming the problem, and loses nothing."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from conftest import decode_run_arrays
from pagedgpt2 import Engine, SamplingParams


@pytest.fixture(scope="module")
def engine_dir(hf_model_dirs):
    return hf_model_dirs["d48"][2]  # n_positions 96, vocab 1000


@pytest.fixture(scope="module")
def eng(engine_dir):
    return Engine(engine_dir, device="cpu", block_size=16)


def check_untouched(eng):
    """The engine still works and holds no block after a refused request."""
    assert eng.kv_stats()["blocks_used"] == 0
    out = eng.generate([1, 2, 3], SamplingParams(max_new_tokens=2, temperature=0.0))
    assert len(out[0].token_ids) == 2


@pytest.mark.parametrize("prompts, index", [("", 0), ([[]], 0), ([[1, 2], ""], 1), ([[1], []], 1)])
def test_empty_prompt(eng, prompts, index):
    with pytest.raises(ValueError, match=f"prompt {index} is empty"):
        eng.generate(prompts)
    with pytest.raises(ValueError, match="at least one prompt"):
        eng.generate([])
    check_untouched(eng)


def test_prompt_longer_than_context(eng):
    with pytest.raises(ValueError, match=r"97 tokens.*n_positions=96"):
        eng.generate([1] * 97)
    with pytest.raises(ValueError, match=r"n_positions=96"):
        eng.logits([1] * 97)
    check_untouched(eng)


def test_prompt_plus_new_tokens_beyond_context(eng):
    with pytest.raises(ValueError, match=r"90 prompt tokens \+ max_new_tokens 7 = 97 exceeds .*n_positions=96"):
        eng.generate([[1, 2], [1] * 90], SamplingParams(max_new_tokens=7))
    check_untouched(eng)


@pytest.mark.parametrize("bad_id", [-1, 1000, 10**12])
def test_token_id_outside_vocabulary(eng, bad_id):
    with pytest.raises(ValueError, match=rf"token id {bad_id} is outside the vocabulary \[0, 1000\)"):
        eng.generate([[5, 6], [1, bad_id]])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        eng.logits([bad_id])
    check_untouched(eng)


def test_text_whose_tokens_exceed_a_small_vocabulary(eng):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        eng.generate("Hello world")


@pytest.mark.parametrize("bad", [1.5, "7", None, True])
def test_non_integer_token_ids(eng, bad):
    with pytest.raises(TypeError, match="token ids must be integers"):
        eng.generate([[1, 2, 3], [4, bad]])
    check_untouched(eng)


def test_prompt_of_wrong_type(eng):
    with pytest.raises(TypeError, match="expected a string or a list of token ids"):
        eng.generate([{"a": 1}])


@pytest.mark.parametrize("temperature", [-0.1, math.nan, math.inf])
def test_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        SamplingParams(temperature=temperature)


@pytest.mark.parametrize("top_p", [0.0, -0.5, 1.01, math.nan])
def test_top_p_outside_unit_interval(top_p):
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        SamplingParams(top_p=top_p)


def test_negative_top_k():
    with pytest.raises(ValueError, match="top_k must be an integer >= 0"):
        SamplingParams(top_k=-1)


@pytest.mark.parametrize("kwargs", [{"max_new_tokens": 0}, {"max_new_tokens": 2.5}, {"seed": -1},
                                    {"seed": 2**64}])
def test_other_bad_sampling_params(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_stop_token_ids_must_be_integers():
    with pytest.raises(TypeError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=["x"])


@pytest.mark.parametrize("kwargs, message", [
    ({"device": "tpu"}, "unknown device 'tpu'"),
    ({"dtype": "float64"}, "unknown dtype 'float64'"),
    ({"kv_cache": "ring"}, "unknown kv_cache 'ring'"),
    ({"block_size": 0}, "block_size must be an integer >= 1"),
    ({"block_size": -3}, "block_size must be an integer >= 1"),
    ({"block_size": 2.0}, "block_size must be an integer >= 1"),
    ({"num_blocks": 0}, "num_blocks must be an integer >= 1"),
    ({"device": "cpu", "dtype": "float16"}, "CPU backend computes in float32"),
    ({"decode_steps": 0}, r"decode_steps must be an integer in \[1, 64\]"),
    ({"decode_steps": 65}, r"decode_steps must be an integer in \[1, 64\]"),
    ({"decode_steps": 2.0}, r"decode_steps must be an integer in \[1, 64\]"),
    ({"async_decode": 1}, "async_decode must be True or False, got 1"),
])
def test_bad_engine_arguments(engine_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Engine(engine_dir, **kwargs)


def test_cuda_without_gpu_or_build(engine_dir):
    from conftest import cuda_available
    if cuda_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="device='cuda'"):
        Engine(engine_dir, device="cuda")


def test_block_pool_too_small_for_the_request(engine_dir):
    eng = Engine(engine_dir, device="cpu", block_size=4, num_blocks=5)  # 20 token slots
    with pytest.raises(ValueError, match=r"21 tokens need 6 KV blocks of 4 tokens, but the pool has only 5"):
        eng.generate([[1, 2], [1] * 5], SamplingParams(max_new_tokens=16))
    check_untouched(eng)
    with pytest.raises(ValueError, match="less than one contiguous buffer"):
        Engine(engine_dir, device="cpu", kv_cache="contiguous", block_size=4, num_blocks=5)


def test_missing_model_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        Engine(tmp_path / "no-such-model", device="cpu")


def test_truncated_weights_file(engine_dir, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(engine_dir, broken)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        Engine(broken, device="cpu")


def test_corrupt_weights_file(engine_dir, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(engine_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        Engine(broken, device="cpu")


def test_weights_disagree_with_config(engine_dir, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(engine_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config["n_layer"] += 1
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"h\.3\."):
        Engine(broken, device="cpu")


def test_wrong_number_of_sampling_params(eng):
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        eng.generate([[1, 2]], [SamplingParams(), SamplingParams()])


@pytest.mark.parametrize("change, message", [
    (dict(position=94), r"sequence 0 at position 94 cannot take 3 more tokens \(n_positions 96"),
    (dict(position=30), r"cannot take 3 more tokens .* block table of 32 slots"),
    (dict(num_steps=0), "slot_mappings has no step"),
])
def test_backend_decode_steps_past_the_context_or_table(engine_dir, change, message):
    eng = Engine(engine_dir, device="cpu", block_size=16)
    with pytest.raises(ValueError, match=message):
        eng.backend.decode_steps(**decode_run_arrays(**change))
    check_untouched(eng)


def test_backend_decode_steps_needs_a_decode_batch_in_order(engine_dir):
    import numpy as np

    eng = Engine(engine_dir, device="cpu", block_size=16)
    arrays = decode_run_arrays()
    arrays["logits_indices"] = np.array([1, 0], dtype=np.int32)
    with pytest.raises(ValueError, match="one token and one logits row per sequence, in order"):
        eng.backend.decode_steps(**arrays)
    arrays = decode_run_arrays()
    arrays["logits_indices"] = np.array([0], dtype=np.int32)
    with pytest.raises(ValueError, match=r"logits_indices \(one per sequence\): expected 2 entries, got 1"):
        eng.backend.decode_steps(**arrays)
    check_untouched(eng)


def test_backend_decode_runs_out_of_order(engine_dir):
    """Collecting with nothing launched, a third run before one is read, continuing nothing or a
    run of another batch, and decode_steps while a run is out are clear errors."""
    eng = Engine(engine_dir, device="cpu", block_size=16)
    backend = eng.backend
    with pytest.raises(RuntimeError, match="no decode run was launched"):
        backend.collect_decode_steps()
    with pytest.raises(RuntimeError, match="continue_run, but no run was launched before"):
        backend.launch_decode_steps(**decode_run_arrays(), continue_run=True)
    backend.launch_decode_steps(**decode_run_arrays())
    with pytest.raises(ValueError, match="continue_run with 3 sequences, but the previous run had 2"):
        backend.launch_decode_steps(**decode_run_arrays(num_seqs=3), continue_run=True)
    with pytest.raises(RuntimeError, match="launched decode run\\(s\\) not collected"):
        backend.decode_steps(**decode_run_arrays())
    backend.launch_decode_steps(**decode_run_arrays(), continue_run=True)
    with pytest.raises(RuntimeError, match="2 launched decode runs are not collected"):
        backend.launch_decode_steps(**decode_run_arrays())
    assert backend.runs_in_flight == 2
    assert backend.collect_decode_steps().shape == backend.collect_decode_steps().shape == (3, 2)
    assert backend.runs_in_flight == 0
    check_untouched(eng)
