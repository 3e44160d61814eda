"""Hugging Face GPT-2 checkpoint -> pagedgpt2 model directory (owns the conversion).

Engine directory format (version 1), the contract with the C++ core:

* ``config.json``: format, format_version, vocab_size, n_positions, n_embd,
  n_layer, n_head, n_inner, layer_norm_epsilon, dtype, source.
* ``model.safetensors``, every tensor in ``dtype`` (C = n_embd, I = n_inner):
  ``wte`` [V, C], ``wpe`` [P, C], ``ln_f.{weight,bias}`` [C], and per layer
  ``h.{i}.ln_1.*`` [C], ``attn.qkv.weight`` [3C, C], ``attn.qkv.bias`` [3C],
  ``attn.proj.weight`` [C, C], ``attn.proj.bias`` [C], ``ln_2.*`` [C],
  ``mlp.fc.weight`` [I, C], ``mlp.fc.bias`` [I], ``mlp.proj.weight`` [C, I],
  ``mlp.proj.bias`` [C]. Matrices are [out, in]; the LM head is tied to wte.

HF stores the Conv1D matrices [in, out], so those are transposed here.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from .weights import (
    CONFIG_FILE, ENGINE_DTYPES, FORMAT, FORMAT_VERSION, WEIGHTS_FILE,
    SafetensorsFiles, check_tensor_set, expected_shapes, validate_config,
)

__all__ = ["convert_checkpoint", "convert_state_dict", "export_hf_checkpoint", "load_hf_checkpoint", "main"]

ProgressFn = Callable[[int, int, int], None]  # (tensors done, tensors total, bytes done)

_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")
_UNSUPPORTED_FLAGS = {
    "scale_attn_by_inverse_layer_idx": "attention scaled by 1/layer_idx",
    "reorder_and_upcast_attn": "reordered/upcast attention",
    "add_cross_attention": "cross-attention layers",
}
_SKIPPED_BUFFERS = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
# HF layer-relative name -> (engine layer-relative name, is an HF Conv1D weight)
_LAYER_MAP = {
    "ln_1.weight": ("ln_1.weight", False), "ln_1.bias": ("ln_1.bias", False),
    "attn.c_attn.weight": ("attn.qkv.weight", True), "attn.c_attn.bias": ("attn.qkv.bias", False),
    "attn.c_proj.weight": ("attn.proj.weight", True), "attn.c_proj.bias": ("attn.proj.bias", False),
    "ln_2.weight": ("ln_2.weight", False), "ln_2.bias": ("ln_2.bias", False),
    "mlp.c_fc.weight": ("mlp.fc.weight", True), "mlp.c_fc.bias": ("mlp.fc.bias", False),
    "mlp.c_proj.weight": ("mlp.proj.weight", True), "mlp.c_proj.bias": ("mlp.proj.bias", False),
}
_TOP_MAP = {"wte.weight": "wte", "wpe.weight": "wpe", "ln_f.weight": "ln_f.weight", "ln_f.bias": "ln_f.bias"}
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


# ---------------------------------------------------------------- config


def engine_config(hf_config: dict, dtype: str = "float32") -> dict:
    """Engine config.json dict from an HF GPT-2 config.json dict (ValueError if unsupported)."""
    model_type = hf_config.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise ValueError(f"not a GPT-2 checkpoint: model_type is {model_type!r}, expected 'gpt2'")
    act = hf_config.get("activation_function", "gelu_new")
    if act not in _ACTIVATIONS:
        raise ValueError(f"unsupported activation_function {act!r}: the engine implements {_ACTIVATIONS}")
    for flag, what in _UNSUPPORTED_FLAGS.items():
        if hf_config.get(flag):
            raise ValueError(f"unsupported GPT-2 variant: {flag}=true ({what}) is not implemented")
    if hf_config.get("scale_attn_weights") is False:
        raise ValueError("unsupported GPT-2 variant: scale_attn_weights=false is not implemented")
    if dtype not in ENGINE_DTYPES:
        raise ValueError(f"dtype must be one of {ENGINE_DTYPES}, got {dtype!r}")
    missing = [k for k in ("vocab_size", "n_embd", "n_layer", "n_head") if hf_config.get(k) is None]
    if missing:
        raise ValueError(f"HF config.json: missing field(s) {', '.join(missing)}")
    n_embd = hf_config.get("n_embd")
    n_inner = hf_config.get("n_inner")
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vocab_size": hf_config.get("vocab_size"),
        "n_positions": hf_config.get("n_positions", hf_config.get("n_ctx")),
        "n_embd": n_embd,
        "n_layer": hf_config.get("n_layer"),
        "n_head": hf_config.get("n_head"),
        "n_inner": 4 * n_embd if n_inner is None and isinstance(n_embd, int) else n_inner,
        "layer_norm_epsilon": hf_config.get("layer_norm_epsilon", 1e-5),
        "dtype": dtype,
    }
    return validate_config(config, "HF config.json")


# ---------------------------------------------------------------- tensors


def _strip_prefix(tensors: Mapping[str, np.ndarray]) -> dict[str, str]:
    """Bare HF name (no ``transformer.``) -> name in ``tensors``, minus skipped buffers."""
    names: dict[str, str] = {}
    for key in tensors:
        bare = key.removeprefix("transformer.")
        if _SKIPPED_BUFFERS.fullmatch(bare):
            continue
        if bare in names:
            raise ValueError(f"tensor {bare!r} appears twice: as {names[bare]!r} and {key!r}")
        names[bare] = key
    return names


def _name_map(n_layer: int) -> dict[str, tuple[str, bool]]:
    """Bare HF name -> (engine name, needs transpose) for every expected tensor."""
    out = {hf: (eng, False) for hf, eng in _TOP_MAP.items()}
    for i in range(n_layer):
        out.update({f"h.{i}.{hf}": (f"h.{i}.{eng}", t) for hf, (eng, t) in _LAYER_MAP.items()})
    return out


def _check_names(names: dict[str, str], mapping: dict[str, tuple[str, bool]]) -> None:
    missing = [k for k in mapping if k not in names]
    if missing:
        raise ValueError(f"HF checkpoint is missing tensor {missing[0]!r}"
                         + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    extra = sorted(k for k in names if k not in mapping and k != "lm_head.weight")
    if extra:
        raise ValueError(f"HF checkpoint has unexpected tensor {names[extra[0]]!r} "
                         f"(is it GPT-2 with the n_layer in its config?)"
                         + (f" and {len(extra) - 1} more" if len(extra) > 1 else ""))


def _convert_one(array: np.ndarray, transpose: bool, dtype: str, name: str) -> np.ndarray:
    if array.dtype.kind != "f":
        raise ValueError(f"tensor {name!r} has dtype {array.dtype}, expected floating point")
    out = np.ascontiguousarray(array.T if transpose else array, dtype=dtype)
    if dtype == "float16" and not np.isfinite(out).all():
        raise ValueError(f"tensor {name!r} overflows float16 (|x| > 65504); convert with --dtype float32")
    return out


def _check_tied_head(tensors: Mapping[str, np.ndarray], names: dict[str, str], wte: np.ndarray) -> None:
    if "lm_head.weight" not in names:
        return
    head = tensors[names["lm_head.weight"]]
    if head.shape != wte.shape or not np.array_equal(head, wte):
        diff = float(np.max(np.abs(head - wte))) if head.shape == wte.shape else "n/a"
        raise ValueError(
            f"lm_head.weight {list(head.shape)} differs from wte.weight {list(wte.shape)} "
            f"(max abs diff {diff}): untied output embeddings are not supported"
        )


def convert_state_dict(
    hf_config: dict,
    tensors: Mapping[str, np.ndarray],
    *,
    dtype: str = "float32",
    progress: ProgressFn | None = None,
) -> tuple[dict, dict[str, np.ndarray]]:
    """(engine config, engine tensors in ``dtype``) from an HF GPT-2 config and state dict.

    ``tensors`` may be lazy (values read on access); each is read once, except
    ``wte`` which is kept to check a stored ``lm_head.weight`` against it.
    """
    config = engine_config(hf_config, dtype)
    mapping = _name_map(config["n_layer"])
    names = _strip_prefix(tensors)
    _check_names(names, mapping)
    out: dict[str, np.ndarray] = {}
    nbytes = 0
    for i, (hf_name, (eng_name, transpose)) in enumerate(mapping.items(), 1):
        source = tensors[names[hf_name]]
        if hf_name == "wte.weight":
            _check_tied_head(tensors, names, source)
        out[eng_name] = _convert_one(source, transpose, dtype, names[hf_name])
        nbytes += out[eng_name].nbytes
        if progress:
            progress(i, len(mapping), nbytes)
    shapes = {k: v.shape for k, v in out.items()}
    check_tensor_set(shapes, expected_shapes(config), "HF checkpoint (after transposing Conv1D weights)")
    return config, out


# ---------------------------------------------------------------- reading HF


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def _load_sharded(directory: Path, index_file: str) -> SafetensorsFiles:
    weight_map = _read_json(directory / index_file).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{directory / index_file} has no weight_map")
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if not (directory / shard).is_file():
            raise FileNotFoundError(f"shard {shard} listed in {index_file} is missing from {directory}")
    return SafetensorsFiles([directory / s for s in shards], weight_map)


def _torch_load(files: list[Path]) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"{files[0]} is a PyTorch checkpoint and reading it needs torch, which is not "
            "installed: pip install torch, or use a checkpoint with model.safetensors"
        ) from None
    out: dict[str, np.ndarray] = {}
    for file in files:
        state = torch.load(file, weights_only=True, map_location="cpu")
        for name, t in state.items():
            t = t.float() if t.dtype == torch.bfloat16 else t
            out[name] = t.numpy()
    return out


def _torch_shards(directory: Path) -> list[Path]:
    index = directory / "pytorch_model.bin.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map") or {}
        return [directory / s for s in sorted(set(weight_map.values()))]
    return [directory / "pytorch_model.bin"]


def load_hf_checkpoint(directory: str | Path) -> tuple[dict, Mapping[str, np.ndarray]]:
    """(HF config dict, lazy name -> ndarray) from an HF GPT-2 checkpoint directory."""
    directory = Path(directory)
    if not (directory / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"HF checkpoint directory {directory} has no {CONFIG_FILE}")
    hf_config = _read_json(directory / CONFIG_FILE)
    if hf_config.get("format") == FORMAT:
        raise ValueError(f"{directory} is already a pagedgpt2 model directory")
    if (directory / "model.safetensors").is_file():
        return hf_config, SafetensorsFiles([directory / "model.safetensors"])
    if (directory / "model.safetensors.index.json").is_file():
        return hf_config, _load_sharded(directory, "model.safetensors.index.json")
    torch_files = _torch_shards(directory)
    if all(f.is_file() for f in torch_files):
        return hf_config, _torch_load(torch_files)
    raise FileNotFoundError(
        f"HF checkpoint directory {directory} has no weights: expected model.safetensors, "
        "model.safetensors.index.json + shards, or pytorch_model.bin"
    )


# ---------------------------------------------------------------- hub


def _hub_offline() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    try:
        from huggingface_hub import constants
    except ImportError:
        return flag
    return flag or bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _download(repo: str) -> Path:
    """Local snapshot of hub repo ``repo`` (config + safetensors only)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub import errors as hub_errors
    except ImportError:
        raise ImportError(
            f"cannot download {repo!r}: huggingface_hub is not installed "
            "(pip install huggingface_hub) — or pass a local checkpoint directory"
        ) from None
    try:
        path = snapshot_download(
            repo, allow_patterns=["config.json", "*.safetensors", "*.json"],
            local_files_only=_hub_offline(),
        )
    except hub_errors.RepositoryNotFoundError:
        raise FileNotFoundError(
            f"cannot download {repo!r}: no such model on the Hugging Face hub "
            "(or it is private/gated) — pass a local checkpoint directory"
        ) from None
    except Exception as e:  # offline, DNS, timeouts, HTTP errors: all mean "no hub here"
        raise ConnectionError(
            f"cannot download {repo!r}: the Hugging Face hub is not reachable (offline?) "
            f"— pass a local checkpoint directory ({type(e).__name__})"
        ) from e
    return Path(path)


def resolve_source(src: str | os.PathLike) -> Path:
    """Local checkpoint directory for ``src``: an existing path, else a hub download."""
    path = Path(src)
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"checkpoint {path} is not a directory (pass the directory)")
        return path
    name = os.fspath(src)
    if _HUB_NAME.fullmatch(name) and ".." not in name:
        return _download(name)
    raise FileNotFoundError(f"checkpoint directory {name!r} does not exist")


# ---------------------------------------------------------------- writing


def _progress_printer(enabled: bool) -> ProgressFn | None:
    if not enabled:
        return None

    def show(done: int, total: int, nbytes: int) -> None:
        end = "\n" if done == total else ""
        print(f"\rconverting {done}/{total} tensors ({nbytes / 1e6:.0f} MB)", end=end,
              file=sys.stderr, flush=True)

    return show


def _prepare_dst(dst: Path, force: bool) -> None:
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"destination {dst} exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise FileExistsError(f"destination {dst} is not empty (pass --force / force=True to overwrite)")


def _write_dir(tmp: Path, config: dict, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / WEIGHTS_FILE))
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _swap_in(tmp: Path, dst: Path) -> None:
    """Replace ``dst`` (absent, empty, or checked for --force) by the finished ``tmp``."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
        dst.rename(old)
    tmp.rename(dst)
    if old is not None:
        shutil.rmtree(old)


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    dtype: str = "float32",
    progress: bool = True,
    *,
    force: bool = False,
) -> Path:
    """Convert the HF GPT-2 checkpoint ``src`` (directory or hub name) into directory ``dst``."""
    dst = Path(dst)
    _prepare_dst(dst, force)
    directory = resolve_source(src)
    if dst.exists() and dst.resolve() == directory.resolve():
        raise ValueError(f"destination {dst} is the source checkpoint directory")
    hf_config, hf_tensors = load_hf_checkpoint(directory)
    config, tensors = convert_state_dict(hf_config, hf_tensors, dtype=dtype,
                                         progress=_progress_printer(progress))
    config["source"] = os.fspath(src)
    tmp = dst.with_name(f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        _write_dir(tmp, config, tensors)
        _swap_in(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


# ---------------------------------------------------------------- engine -> HF


def hf_config_of(config: dict) -> dict:
    """The HF GPT2Config dict of an engine config (the inverse of engine_config)."""
    return {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
        "vocab_size": config["vocab_size"], "n_positions": config["n_positions"],
        "n_embd": config["n_embd"], "n_layer": config["n_layer"], "n_head": config["n_head"],
        "n_inner": config["n_inner"], "layer_norm_epsilon": config["layer_norm_epsilon"],
        "activation_function": "gelu_new", "tie_word_embeddings": True,
        "bos_token_id": 50256, "eos_token_id": 50256, "dtype": config.get("dtype", "float32"),
    }


def export_hf_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, force: bool = False) -> Path:
    """Write the engine model directory ``src`` as an HF GPT-2 checkpoint directory ``dst``
    (config.json + model.safetensors in the stored dtype) that GPT2LMHeadModel.from_pretrained
    loads: the same weights, for checking the engine against transformers."""
    from .weights import load_model_dir

    src, dst = Path(src), Path(dst)
    _prepare_dst(dst, force)
    config, tensors = load_model_dir(src)
    dtype = config.get("dtype", "float32")
    hf_tensors = {f"transformer.{hf}": np.ascontiguousarray(tensors[eng].T if transpose else tensors[eng],
                                                             dtype=dtype)
                  for hf, (eng, transpose) in _name_map(config["n_layer"]).items()}
    tmp = dst.with_name(f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        _write_dir(tmp, hf_config_of(config), hf_tensors)
        _swap_in(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


# ---------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convert_hf",
        description="Convert a Hugging Face GPT-2 checkpoint into a pagedgpt2 model directory.",
    )
    p.add_argument("src", metavar="SRC", help="HF checkpoint directory or hub name (e.g. gpt2)")
    p.add_argument("dst", metavar="DST", help="output model directory")
    p.add_argument("--dtype", choices=ENGINE_DTYPES, default="float32", help="stored weight dtype")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty DST")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the process exit status."""
    args = _parser().parse_args(argv)
    try:
        out = convert_checkpoint(args.src, args.dst, args.dtype, progress=not args.quiet,
                                 force=args.force)
    except (OSError, ValueError, ImportError) as e:
        print(f"convert_hf: error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0
