"""Model-directory loading tests: good engine/HF directories and every broken-input error."""

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from pagedgpt2.convert import convert_checkpoint
from pagedgpt2.weights import expected_shapes, load_model_dir, read_safetensors_header

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=64,
            bos_token_id=0, eos_token_id=0)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**TINY))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    path = tmp_path_factory.mktemp("hf") / "gpt2-tiny"
    model.eval().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def engine_dir(hf_dir, tmp_path_factory):
    return convert_checkpoint(hf_dir, tmp_path_factory.mktemp("eng") / "model", progress=False)


@pytest.fixture
def broken(engine_dir, tmp_path):
    """A fresh copy of the engine directory to damage."""
    return Path(shutil.copytree(engine_dir, tmp_path / "model"))


def edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


# ---------------------------------------------------------------- good inputs


def test_expected_shapes_tiny():
    config = {**TINY, "n_inner": 256}
    shapes = expected_shapes(config)
    assert len(shapes) == 4 + 12 * 2
    assert shapes["wte"] == (1000, 64) and shapes["wpe"] == (64, 64)
    assert shapes["h.1.attn.qkv.weight"] == (192, 64)
    assert shapes["h.0.mlp.fc.weight"] == (256, 64)
    assert shapes["h.0.mlp.proj.weight"] == (64, 256)


def test_load_engine_dir(engine_dir):
    config, tensors = load_model_dir(engine_dir)
    assert config["format"] == "pagedgpt2" and config["n_layer"] == 2
    assert set(tensors) == set(expected_shapes(config))
    for name, arr in tensors.items():
        assert arr.dtype == np.float32 and arr.flags.c_contiguous, name
        assert arr.shape == expected_shapes(config)[name], name
        assert np.any(arr != 0), name


def test_load_hf_dir_equals_converted(hf_dir, engine_dir):
    hf_config, hf_tensors = load_model_dir(hf_dir)
    config, tensors = load_model_dir(engine_dir)
    keys = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner",
            "layer_norm_epsilon", "dtype", "format", "format_version")
    assert {k: hf_config[k] for k in keys} == {k: config[k] for k in keys}
    assert set(hf_tensors) == set(tensors)
    for name in tensors:
        assert hf_tensors[name].flags.c_contiguous
        np.testing.assert_array_equal(hf_tensors[name], tensors[name], err_msg=name)


def test_load_float16_dir_widens(hf_dir, engine_dir, tmp_path):
    half = convert_checkpoint(hf_dir, tmp_path / "half", dtype="float16", progress=False)
    _, tensors = load_model_dir(half)
    _, full = load_model_dir(engine_dir)
    for name, arr in tensors.items():
        assert arr.dtype == np.float32
        np.testing.assert_array_equal(arr, full[name].astype(np.float16).astype(np.float32))


def test_logits_match_transformers(hf_dir):
    """A numpy forward pass over the loaded tensors reproduces HF logits (checks the layout)."""
    config, w = load_model_dir(hf_dir)
    ids = np.array([5, 17, 999, 0, 42, 42, 7])
    model = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        want = model(torch.tensor(ids)[None]).logits[0].numpy()
    np.testing.assert_allclose(numpy_gpt2(config, w, ids), want, rtol=1e-4, atol=1e-4)


def numpy_gpt2(config, w, ids):
    """Reference GPT-2 forward on engine tensors; ids [T] -> logits [T, V]."""
    eps, n_head = config["layer_norm_epsilon"], config["n_head"]

    def ln(x, p):  # x [T, C]
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * w[p + ".weight"] + w[p + ".bias"]

    def linear(x, p):  # weights are [out, in]
        return x @ w[p + ".weight"].T + w[p + ".bias"]

    t = len(ids)
    x = w["wte"][ids] + w["wpe"][:t]  # [T, C]
    mask = np.triu(np.full((t, t), -np.inf), 1)
    for i in range(config["n_layer"]):
        q, k, v = np.split(linear(ln(x, f"h.{i}.ln_1"), f"h.{i}.attn.qkv"), 3, axis=-1)
        heads = [a.reshape(t, n_head, -1).transpose(1, 0, 2) for a in (q, k, v)]  # [H, T, D]
        att = heads[0] @ heads[1].transpose(0, 2, 1) / np.sqrt(heads[0].shape[-1]) + mask
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        y = (att @ heads[2]).transpose(1, 0, 2).reshape(t, -1)  # [T, C]
        x = x + linear(y, f"h.{i}.attn.proj")
        hdn = linear(ln(x, f"h.{i}.ln_2"), f"h.{i}.mlp.fc")
        hdn = 0.5 * hdn * (1 + np.tanh(np.sqrt(2 / np.pi) * (hdn + 0.044715 * hdn**3)))
        x = x + linear(hdn, f"h.{i}.mlp.proj")
    return ln(x, "ln_f") @ w["wte"].T


# ---------------------------------------------------------------- broken inputs


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model_dir(tmp_path / "nope")


def test_missing_config(broken):
    (broken / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model_dir(broken)


def test_missing_weights_file(broken):
    (broken / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        load_model_dir(broken)


def test_truncated_weights(broken):
    path = broken / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"truncated or corrupt: tensor data ends at byte \d+ "
                                         r"but the file has only \d+ bytes"):
        load_model_dir(broken)


def test_truncated_inside_header(broken):
    path = broken / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated or corrupt: header length \\d+ exceeds"):
        load_model_dir(broken)


def test_tiny_file(broken):
    (broken / "model.safetensors").write_bytes(b"abc")
    with pytest.raises(ValueError, match="shorter than the 8-byte header length"):
        load_model_dir(broken)


def test_garbage_header(broken):
    path = broken / "model.safetensors"
    rng = np.random.default_rng(0)
    garbage = rng.integers(0, 256, size=4000, dtype=np.uint8).tobytes()
    path.write_bytes(struct.pack("<Q", 1000) + garbage)
    with pytest.raises(ValueError, match="truncated or corrupt: header is not valid JSON"):
        load_model_dir(broken)


def test_garbage_length_prefix(broken):
    path = broken / "model.safetensors"
    path.write_bytes(b"\xff" * 8 + path.read_bytes()[8:])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_model_dir(broken)


def test_offsets_beyond_file(broken):
    path = broken / "model.safetensors"
    header = {"wte": {"dtype": "F32", "shape": [1000, 64], "data_offsets": [0, 256000]}}
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 1000)
    with pytest.raises(ValueError, match="'?tensor data ends at byte"):
        read_safetensors_header(path)


def test_offsets_disagree_with_shape(broken):
    path = broken / "model.safetensors"
    header = {"wte": {"dtype": "F32", "shape": [10, 64], "data_offsets": [0, 100]}}
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 100)
    with pytest.raises(ValueError, match=r"'wte' F32\[10, 64\] needs 2560 bytes"):
        read_safetensors_header(path)


def test_shape_mismatch_from_config(broken):
    edit_config(broken, n_embd=128)
    with pytest.raises(ValueError, match=r"tensor 'wte' has shape \[1000, 64\], expected \[1000, 128\]"):
        load_model_dir(broken)


def test_missing_tensor(broken):
    path = broken / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["h.1.attn.proj.bias"]
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=r"missing tensor 'h.1.attn.proj.bias' \(expected shape \[64\]\)"):
        load_model_dir(broken)


def test_unexpected_tensor(broken):
    path = broken / "model.safetensors"
    tensors = load_file(str(path))
    tensors["lm_head.weight"] = tensors["wte"]
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=r"unexpected tensor 'lm_head.weight' with shape \[1000, 64\]"):
        load_model_dir(broken)


def test_dtype_disagrees_with_config(broken):
    edit_config(broken, dtype="float16")
    with pytest.raises(ValueError, match="is F32, config says F16"):
        load_model_dir(broken)


@pytest.mark.parametrize("changes, message", [
    ({"n_head": 5}, r"n_embd \(64\) must be divisible by n_head \(5\)"),
    ({"n_layer": 0}, "n_layer must be a positive integer, got 0"),
    ({"vocab_size": -3}, "vocab_size must be a positive integer"),
    ({"n_inner": 2.5}, "n_inner must be a positive integer"),
    ({"layer_norm_epsilon": 0}, "layer_norm_epsilon must be a number"),
    ({"dtype": "int8"}, "dtype must be one of"),
    ({"format_version": 2}, "unsupported format_version 2"),
])
def test_invalid_config(broken, changes, message):
    edit_config(broken, **changes)
    with pytest.raises(ValueError, match=message):
        load_model_dir(broken)


def test_config_missing_field(broken):
    config = json.loads((broken / "config.json").read_text())
    del config["n_head"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="missing field\\(s\\) n_head"):
        load_model_dir(broken)


def test_config_not_json(broken):
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load_model_dir(broken)


def test_unknown_directory_kind(broken):
    (broken / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="neither a pagedgpt2 model"):
        load_model_dir(broken)


def test_truncated_hf_checkpoint(hf_dir, tmp_path):
    src = Path(shutil.copytree(hf_dir, tmp_path / "hf"))
    path = src / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_model_dir(src)
