"""Conversion tests: tiny random transformers GPT-2 checkpoints in the HF layouts we accept."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file  # noqa: E402
from safetensors.torch import save_file as torch_save_file  # noqa: E402

import pagedgpt2.convert as convert_mod  # noqa: E402
from pagedgpt2.convert import convert_checkpoint, convert_state_dict  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TINY = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=64,
            bos_token_id=0, eos_token_id=0)
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
RENAME = {"attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj", "mlp.c_fc": "mlp.fc",
          "mlp.c_proj": "mlp.proj"}


# ---------------------------------------------------------------- helpers


def make_model(seed=0, **overrides):
    """Tiny GPT2LMHeadModel with every parameter random (LN and biases included)."""
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**TINY, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model.eval()


def bare_state(model):
    """HF parameter name without 'transformer.' -> fp32 torch tensor (no lm_head)."""
    return {k.removeprefix("transformer."): v.detach().clone()
            for k, v in model.state_dict().items() if not k.startswith("lm_head")}


def engine_name(hf_name):
    if hf_name in ("wte.weight", "wpe.weight"):
        return hf_name.split(".")[0]
    for old, new in RENAME.items():
        hf_name = hf_name.replace(old, new)
    return hf_name


def expected_engine(state, dtype=np.float32):
    """What the converter must produce from bare HF ``state`` (transposing Conv1D weights)."""
    out = {}
    for name, t in state.items():
        arr = t.float().numpy()
        arr = arr.T if name.endswith(CONV1D) else arr
        out[engine_name(name)] = np.ascontiguousarray(arr).astype(dtype)
    return out


def assert_converted(dst, expected, dtype="float32"):
    config = json.loads((Path(dst) / "config.json").read_text())
    assert config["format"] == "pagedgpt2" and config["format_version"] == 1
    assert config["dtype"] == dtype
    got = load_file(str(Path(dst) / "model.safetensors"))
    assert set(got) == set(expected)
    for name, want in expected.items():
        assert got[name].dtype == np.dtype(dtype), name
        assert got[name].shape == want.shape, name
        np.testing.assert_array_equal(got[name], want, err_msg=name)
    return config


def write_variant(model_dir, dst, state, config_edit=None):
    """Copy ``model_dir``'s config into ``dst`` with a replacement model.safetensors."""
    dst.mkdir(parents=True)
    config = json.loads((model_dir / "config.json").read_text())
    config.update(config_edit or {})
    (dst / "config.json").write_text(json.dumps(config))
    torch_save_file({k: v.contiguous() for k, v in state.items()}, str(dst / "model.safetensors"))
    return dst


def prefixed(state):
    return {"transformer." + k: v for k, v in state.items()}


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def state(model):
    return bare_state(model)


@pytest.fixture(scope="module")
def hf_dir(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "gpt2-tiny"
    model.save_pretrained(path)
    return path


# ---------------------------------------------------------------- happy paths


def test_cli_subprocess(hf_dir, state, tmp_path):
    dst = tmp_path / "out"
    env = dict(os.environ)
    pkg_root = str(Path(convert_mod.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([pkg_root, env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert_hf.py"), str(hf_dir), str(dst)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "converting 28/28 tensors" in proc.stderr
    config = assert_converted(dst, expected_engine(state))
    assert config["source"] == str(hf_dir)
    assert {k: config[k] for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")} == \
        {"vocab_size": 1000, "n_positions": 64, "n_embd": 64, "n_layer": 2, "n_head": 4}
    assert config["n_inner"] == 256 and config["layer_norm_epsilon"] == 1e-5


def test_saved_layout_has_prefix_and_no_head(hf_dir):
    keys = load_file(str(hf_dir / "model.safetensors")).keys()
    assert all(k.startswith("transformer.") for k in keys)


def test_convert_checkpoint_default(hf_dir, state, tmp_path):
    out = convert_checkpoint(hf_dir, tmp_path / "out", progress=False)
    assert out == tmp_path / "out"
    assert_converted(out, expected_engine(state))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_without_transformer_prefix(hf_dir, state, tmp_path):
    src = write_variant(hf_dir, tmp_path / "src", state)
    assert_converted(convert_checkpoint(src, tmp_path / "out", progress=False), expected_engine(state))


def test_with_tied_lm_head(hf_dir, state, tmp_path):
    variant = {**prefixed(state), "lm_head.weight": state["wte.weight"].clone()}
    src = write_variant(hf_dir, tmp_path / "src", variant)
    assert_converted(convert_checkpoint(src, tmp_path / "out", progress=False), expected_engine(state))


def test_untied_lm_head_rejected(hf_dir, state, tmp_path):
    variant = {**prefixed(state), "lm_head.weight": state["wte.weight"] + 1.0}
    src = write_variant(hf_dir, tmp_path / "src", variant)
    with pytest.raises(ValueError, match="lm_head.weight .* differs from wte.weight"):
        convert_checkpoint(src, tmp_path / "out", progress=False)


def test_attention_buffers_skipped(hf_dir, state, tmp_path):
    mask = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
    variant = dict(state)
    variant["h.0.attn.bias"] = mask
    variant["h.1.attn.bias"] = mask.bool()
    variant["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    variant["h.1.attn.masked_bias"] = torch.tensor(-1e4)
    src = write_variant(hf_dir, tmp_path / "src", variant)
    assert_converted(convert_checkpoint(src, tmp_path / "out", progress=False), expected_engine(state))


def test_explicit_n_inner(tmp_path):
    model = make_model(seed=1, n_inner=96)
    model.save_pretrained(tmp_path / "src")
    assert json.loads((tmp_path / "src" / "config.json").read_text())["n_inner"] == 96
    config = assert_converted(convert_checkpoint(tmp_path / "src", tmp_path / "out", progress=False),
                              expected_engine(bare_state(model)))
    assert config["n_inner"] == 96


def test_null_n_inner(hf_dir):
    assert json.loads((hf_dir / "config.json").read_text())["n_inner"] is None
    config, tensors = convert_state_dict(json.loads((hf_dir / "config.json").read_text()),
                                         load_file(str(hf_dir / "model.safetensors")))
    assert config["n_inner"] == 4 * 64
    assert tensors["h.0.mlp.fc.weight"].shape == (256, 64)


@pytest.mark.parametrize("src_dtype", [torch.float16, torch.bfloat16])
def test_half_precision_sources(hf_dir, state, tmp_path, src_dtype):
    half = {k: v.to(src_dtype) for k, v in state.items()}
    src = write_variant(hf_dir, tmp_path / "src", prefixed(half))
    # widening fp16/bf16 -> fp32 is exact, so the comparison is exact too
    assert_converted(convert_checkpoint(src, tmp_path / "out", progress=False), expected_engine(half))


def test_output_float16(hf_dir, state, tmp_path):
    out = convert_checkpoint(hf_dir, tmp_path / "out", dtype="float16", progress=False)
    assert_converted(out, expected_engine(state, np.float16), dtype="float16")


def test_sharded_checkpoint(model, state, tmp_path):
    model.save_pretrained(tmp_path / "src", max_shard_size="200KB")
    assert (tmp_path / "src" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "src").glob("model-*.safetensors"))) > 1
    assert_converted(convert_checkpoint(tmp_path / "src", tmp_path / "out", progress=False),
                     expected_engine(state))


def test_pytorch_bin_only(hf_dir, state, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(hf_dir / "config.json", src / "config.json")
    torch.save({k: v.contiguous() for k, v in state.items()}, src / "pytorch_model.bin")
    assert_converted(convert_checkpoint(src, tmp_path / "out", progress=False), expected_engine(state))


def test_progress_on_stderr(hf_dir, tmp_path, capsys):
    convert_checkpoint(hf_dir, tmp_path / "out", progress=True)
    err = capsys.readouterr().err
    assert "converting 1/28 tensors" in err and "converting 28/28 tensors" in err
    assert "MB)" in err


# ---------------------------------------------------------------- destination handling


def test_nonempty_destination_needs_force(hf_dir, state, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "stale.txt").write_text("old")
    with pytest.raises(FileExistsError, match="not empty"):
        convert_checkpoint(hf_dir, dst, progress=False)
    assert convert_mod.main([str(hf_dir), str(dst), "--quiet"]) == 1
    assert convert_mod.main([str(hf_dir), str(dst), "--quiet", "--force"]) == 0
    assert not (dst / "stale.txt").exists()
    assert_converted(dst, expected_engine(state))


def test_empty_destination_ok(hf_dir, state, tmp_path):
    (tmp_path / "out").mkdir()
    assert_converted(convert_checkpoint(hf_dir, tmp_path / "out", progress=False),
                     expected_engine(state))


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("edit, message", [
    ({"activation_function": "relu"}, "unsupported activation_function 'relu'"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ({"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn"),
    ({"add_cross_attention": True}, "add_cross_attention"),
    ({"model_type": "llama"}, "model_type is 'llama'"),
    ({"n_head": 5}, "divisible by n_head"),
])
def test_unsupported_config(hf_dir, tmp_path, edit, message):
    src = tmp_path / "src"
    shutil.copytree(hf_dir, src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(ValueError, match=message):
        convert_checkpoint(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_config_disagrees_with_tensors(hf_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(hf_dir, src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "vocab_size": 999}))
    with pytest.raises(ValueError, match=r"'wte' has shape \[1000, 64\], expected \[999, 64\]"):
        convert_checkpoint(src, tmp_path / "out", progress=False)


def test_missing_tensor(hf_dir, state, tmp_path):
    variant = {k: v for k, v in state.items() if k != "h.1.mlp.c_fc.bias"}
    src = write_variant(hf_dir, tmp_path / "src", variant)
    with pytest.raises(ValueError, match="missing tensor 'h.1.mlp.c_fc.bias'"):
        convert_checkpoint(src, tmp_path / "out", progress=False)


def test_missing_local_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_checkpoint(str(tmp_path / "nope"), tmp_path / "out", progress=False)


def test_no_weights_in_directory(hf_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(hf_dir / "config.json", src / "config.json")
    with pytest.raises(FileNotFoundError, match="has no weights"):
        convert_checkpoint(src, tmp_path / "out", progress=False)


def test_hub_name_offline_in_process(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = "pagedgpt2-tests/no-such-model"  # never in any local cache
    with pytest.raises(ConnectionError, match=f"cannot download '{name}': the Hugging Face hub "
                                              r"is not reachable \(offline\?\)"):
        convert_checkpoint(name, tmp_path / "out", progress=False)


def test_hub_name_offline_cli(tmp_path):
    pytest.importorskip("huggingface_hub")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"))
    pkg_root = str(Path(convert_mod.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([pkg_root, env.get("PYTHONPATH", "")])
    name = "gpt2"  # HF_HOME is empty, so not cached
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert_hf.py"), name, str(tmp_path / "out")],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert f"cannot download '{name}': the Hugging Face hub is not reachable (offline?)" in proc.stderr
    assert "pass a local checkpoint directory" in proc.stderr
