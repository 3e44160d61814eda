"""Shared fixtures: tiny real Hugging Face GPT-2 models with random weights, converted with our
tool, and the automatic skip of GPU tests where there is no GPU or no CUDA build."""

from __future__ import annotations

import pytest

# Shapes the engine must match HF on: a head size other than 64 and n_positions other than 1024.
MODEL_SHAPES = {
    # name: (n_layer, n_embd, n_head, n_positions, vocab_size)
    "d16": (2, 64, 4, 128, 50257),    # head size 16, the real vocabulary (text prompts)
    "d48": (3, 96, 2, 96, 1000),      # head size 48, a small vocabulary
    "d64": (2, 128, 2, 1024, 50257),  # GPT-2's head size 64 and context 1024
}


def cuda_available() -> bool:
    try:
        from pagedgpt2 import _cuda
        return _cuda.device_count() > 0
    except Exception:  # noqa: BLE001 - no CUDA build, no driver, no GPU: all mean "skip"
        return False


def pytest_collection_modifyitems(config, items):
    if cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and pagedgpt2's CUDA build")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def decode_run_arrays(num_seqs: int = 2, num_steps: int = 3, position: int = 10,
                      block_size: int = 16, seed: int = 0, first_block: int = 0) -> dict:
    """Arguments of a backend's decode_steps / launch_decode_steps: num_seqs sequences at one
    position, each in its own two blocks (from first_block on), every step writing the slot of
    its own position (so runs never read a slot they did not write first, whatever ran before).
    Seeded sampling. Positions past the two blocks, which a backend must refuse, get slots in the
    second."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = np.arange(num_seqs, dtype=np.int32)
    tables = first_block + np.arange(2 * num_seqs, dtype=np.int32).reshape(num_seqs, 2)[:, ::-1]
    positions = position + np.arange(num_steps, dtype=np.int32)[:, None] + np.zeros(num_seqs, dtype=np.int32)
    slots = tables[rows, np.minimum(positions // block_size, 1)] * block_size + positions % block_size
    return dict(
        token_ids=rng.integers(0, 1000, num_seqs).astype(np.int32),
        positions=np.full(num_seqs, position, dtype=np.int32), slot_mappings=slots.astype(np.int32),
        query_start_loc=np.arange(num_seqs + 1, dtype=np.int32),
        context_lens=np.full(num_seqs, position + 1, dtype=np.int32), block_tables=tables,
        logits_indices=rows, temperature=np.ones(num_seqs, dtype=np.float32),
        top_k=np.zeros(num_seqs, dtype=np.int32), top_p=np.ones(num_seqs, dtype=np.float32),
        seeds=rng.integers(0, 2**63, num_seqs).astype(np.uint64), counters=np.zeros(num_seqs, dtype=np.int64))


def later_steps(arrays: dict, steps: int) -> dict:
    """The arguments of the rest of the run `arrays` describes, from its step `steps` on (the
    token ids are left as they were: a continued run does not read them)."""
    out = dict(arrays, slot_mappings=arrays["slot_mappings"][steps:].copy())
    for name in ("positions", "context_lens", "counters"):
        out[name] = arrays[name] + steps
    return out


def hf_logits(model, ids: list[int]):
    """HF's float32 logits [T, V] (numpy) of one sequence."""
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def hf_greedy(model, ids: list[int], max_new_tokens: int) -> list[int]:
    """HF's greedy continuation of ids, exactly max_new_tokens long (no stop token)."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(ids):].tolist()


def make_hf_model(shape, seed: int = 0, initializer_range: float = 0.15):
    """A GPT2LMHeadModel with fresh random weights (std large enough that logits are peaked,
    so greedy decoding has clear winners), fp32, eval mode. shape: a MODEL_SHAPES name or its
    (n_layer, n_embd, n_head, n_positions, vocab_size)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    n_layer, n_embd, n_head, n_positions, vocab_size = MODEL_SHAPES.get(shape, shape)
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions,
                        vocab_size=vocab_size, initializer_range=initializer_range,
                        attn_implementation="eager")
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # biases and LayerNorms start at 0/1: randomize them too
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def build_model_dirs(tmp_path_factory, shape, name: str, initializer_range: float = 0.15):
    """(hf_model, hf_dir, converted_dir) of make_hf_model(shape), saved and converted."""
    from pagedgpt2.convert import convert_checkpoint

    model = make_hf_model(shape, initializer_range=initializer_range)
    hf_dir = tmp_path_factory.mktemp(f"hf-{name}")
    model.save_pretrained(hf_dir)
    dst = tmp_path_factory.mktemp(f"engine-{name}") / "model"
    convert_checkpoint(hf_dir, dst, progress=False)
    return model, hf_dir, dst


@pytest.fixture(scope="session")
def model_dirs_of(tmp_path_factory):
    """build_model_dirs for a shape of one test's own: model_dirs_of(shape_tuple, name)."""
    return lambda shape, name, **kw: build_model_dirs(tmp_path_factory, shape, name, **kw)


@pytest.fixture(scope="session")
def hf_model_dirs(tmp_path_factory):
    """{shape: (hf_model, hf_dir, converted_dir)} built once per session."""
    return {shape: build_model_dirs(tmp_path_factory, shape, shape) for shape in MODEL_SHAPES}
