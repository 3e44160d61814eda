"""Model weights for the engine (owns reading and validating a model directory).

A model directory is either an engine directory written by ``pagedgpt2.convert``
(``config.json`` with ``"format": "pagedgpt2"`` + ``model.safetensors``) or a raw
Hugging Face GPT-2 checkpoint directory, converted in memory. Every safetensors
header is checked against the file size before any tensor is read, so a
truncated or corrupt file gives a ValueError, never a crash.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "SafetensorsFiles",
    "expected_shapes",
    "load_model_dir",
    "read_safetensors_header",
    "validate_config",
]

FORMAT = "pagedgpt2"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
ENGINE_DTYPES = ("float32", "float16")
# The default model: a 7.3M-parameter GPT-2 trained on Shakespeare and Milton (docs/bundled_model.md).
BUNDLED_MODEL = Path(__file__).resolve().parent / "assets" / "shakespeare-gpt2"
_INT_FIELDS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner")

# safetensors dtype name -> (bytes per element, numpy dtype or None if numpy lacks it)
_ST_DTYPES = {
    "BOOL": (1, "?"), "U8": (1, "u1"), "I8": (1, "i1"), "F8_E4M3": (1, None),
    "F8_E5M2": (1, None), "U16": (2, "<u2"), "I16": (2, "<i2"), "F16": (2, "<f2"),
    "BF16": (2, None), "U32": (4, "<u4"), "I32": (4, "<i4"), "F32": (4, "<f4"),
    "U64": (8, "<u8"), "I64": (8, "<i8"), "F64": (8, "<f8"),
}
_ST_NAME = {"float32": "F32", "float16": "F16"}


# ---------------------------------------------------------------- config


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Engine tensor name -> shape for ``config`` (see the format in convert.py)."""
    v, p, c = config["vocab_size"], config["n_positions"], config["n_embd"]
    i_ = config["n_inner"]
    shapes = {"wte": (v, c), "wpe": (p, c)}
    for layer in range(config["n_layer"]):
        h = f"h.{layer}."
        shapes.update({
            h + "ln_1.weight": (c,), h + "ln_1.bias": (c,),
            h + "attn.qkv.weight": (3 * c, c), h + "attn.qkv.bias": (3 * c,),
            h + "attn.proj.weight": (c, c), h + "attn.proj.bias": (c,),
            h + "ln_2.weight": (c,), h + "ln_2.bias": (c,),
            h + "mlp.fc.weight": (i_, c), h + "mlp.fc.bias": (i_,),
            h + "mlp.proj.weight": (c, i_), h + "mlp.proj.bias": (c,),
        })
    shapes.update({"ln_f.weight": (c,), "ln_f.bias": (c,)})
    return shapes


def validate_config(config: dict, where: str = "config") -> dict:
    """Check the model-size fields of an engine config; return it (ValueError if bad)."""
    missing = [k for k in (*_INT_FIELDS, "layer_norm_epsilon") if k not in config]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
    for key in _INT_FIELDS:
        val = config[key]
        if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
            raise ValueError(f"{where}: {key} must be a positive integer, got {val!r}")
    if config["n_embd"] % config["n_head"]:
        raise ValueError(
            f"{where}: n_embd ({config['n_embd']}) must be divisible by n_head ({config['n_head']})"
        )
    eps = config["layer_norm_epsilon"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise ValueError(f"{where}: layer_norm_epsilon must be a number in (0, 1), got {eps!r}")
    dtype = config.get("dtype", "float32")
    if dtype not in ENGINE_DTYPES:
        raise ValueError(f"{where}: dtype must be one of {ENGINE_DTYPES}, got {dtype!r}")
    return config


def _validate_engine_config(config: dict, where: str) -> dict:
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{where}: unsupported format_version {version!r} (this build reads {FORMAT_VERSION})"
        )
    return validate_config(config, where)


# ---------------------------------------------------------------- safetensors


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file."""

    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def _corrupt(path: Path, why: str) -> ValueError:
    return ValueError(f"weights file {path} is truncated or corrupt: {why}")


def read_safetensors_header(path: str | Path) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header against the file size; no data read."""
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise _corrupt(path, f"file is {size} bytes, shorter than the 8-byte header length")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise _corrupt(path, f"header length {n} exceeds the {size - 8} bytes after it")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(path, f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    infos = {
        name: _tensor_info(path, name, entry, 8 + n)
        for name, entry in header.items() if name != "__metadata__"
    }
    last = max((t.end for t in infos.values()), default=8 + n)
    if last > size:
        raise _corrupt(path, f"tensor data ends at byte {last} but the file has only {size} bytes")
    return infos


def _tensor_info(path: Path, name: str, entry: object, base: int) -> TensorInfo:
    try:
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        shape = tuple(int(d) for d in shape)
        begin, end = int(begin), int(end)
    except (TypeError, KeyError, ValueError):
        raise _corrupt(path, f"bad header entry for tensor {name!r}: {entry!r}") from None
    if min(shape, default=0) < 0 or not 0 <= begin <= end:
        raise _corrupt(path, f"bad shape or offsets for tensor {name!r}: {entry!r}")
    itemsize = _ST_DTYPES.get(dtype, (None, None))[0]
    if itemsize is not None and end - begin != math.prod(shape) * itemsize:
        raise _corrupt(
            path, f"tensor {name!r} {dtype}{list(shape)} needs {math.prod(shape) * itemsize} "
            f"bytes but its offsets span {end - begin}"
        )
    return TensorInfo(path, dtype, shape, base + begin, base + end)


def read_tensor(info: TensorInfo, name: str) -> np.ndarray:
    """Load one tensor; BF16 is widened to float32 (numpy has no bfloat16)."""
    if info.dtype == "BF16":
        count = math.prod(info.shape)
        raw = np.fromfile(info.path, dtype="<u2", count=count, offset=info.start)
        return (raw.astype(np.uint32) << 16).view(np.float32).reshape(info.shape)
    if _ST_DTYPES.get(info.dtype, (None, None))[1] is None:
        raise ValueError(f"tensor {name!r} in {info.path} has unsupported dtype {info.dtype}")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(info.path), framework="numpy") as f:
            return f.get_tensor(name)
    except SafetensorError as e:
        raise _corrupt(info.path, str(e)) from None


class SafetensorsFiles(Mapping):
    """Lazy name -> ndarray view over one or more safetensors files (loads on access)."""

    def __init__(self, files: list[str | Path], weight_map: dict[str, str] | None = None):
        self._infos: dict[str, TensorInfo] = {}
        for file in files:
            for name, info in read_safetensors_header(file).items():
                if weight_map is not None and weight_map.get(name) != Path(file).name:
                    continue
                if name in self._infos:
                    raise ValueError(f"tensor {name!r} appears in both {self._infos[name].path} and {file}")
                self._infos[name] = info
        self._check_weight_map(weight_map)

    def _check_weight_map(self, weight_map: dict[str, str] | None) -> None:
        missing = sorted(set(weight_map or ()) - set(self._infos))
        if missing:
            raise ValueError(f"sharded checkpoint index lists tensors found in no shard: {missing[:5]}")

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def __getitem__(self, name: str) -> np.ndarray:
        return read_tensor(self._infos[name], name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)


# ---------------------------------------------------------------- model dir


def _read_config(directory: Path) -> dict:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"model directory {directory} has no {CONFIG_FILE}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return config


def _is_hf_gpt2(config: dict) -> bool:
    return config.get("model_type") == "gpt2" or "GPT2LMHeadModel" in (config.get("architectures") or ())


def check_tensor_set(shapes: dict[str, tuple], expected: dict[str, tuple], where: str) -> None:
    """ValueError naming the first missing, unexpected or mis-shaped tensor."""
    missing = [k for k in expected if k not in shapes]
    if missing:
        raise ValueError(
            f"{where}: missing tensor {missing[0]!r} (expected shape {list(expected[missing[0]])})"
            + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
        )
    extra = sorted(k for k in shapes if k not in expected)
    if extra:
        raise ValueError(f"{where}: unexpected tensor {extra[0]!r} with shape {list(shapes[extra[0]])}"
                         + (f" and {len(extra) - 1} more" if len(extra) > 1 else ""))
    for name, shape in expected.items():
        if tuple(shapes[name]) != tuple(shape):
            raise ValueError(
                f"{where}: tensor {name!r} has shape {list(shapes[name])}, "
                f"expected {list(shape)} from the config"
            )


def _load_engine_dir(directory: Path, config: dict) -> tuple[dict, dict[str, np.ndarray]]:
    config = _validate_engine_config(config, str(directory / CONFIG_FILE))
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"model directory {directory} has no {WEIGHTS_FILE}")
    files = SafetensorsFiles([path])
    check_tensor_set({k: files.info(k).shape for k in files}, expected_shapes(config), str(path))
    want = _ST_NAME[config.get("dtype", "float32")]
    for name in files:
        if files.info(name).dtype != want:
            raise ValueError(f"{path}: tensor {name!r} is {files.info(name).dtype}, config says {want}")
    tensors = {k: np.ascontiguousarray(files[k], dtype=np.float32) for k in files}
    return config, tensors


def _load_hf_dir(directory: Path) -> tuple[dict, dict[str, np.ndarray]]:
    from .convert import convert_state_dict, load_hf_checkpoint

    hf_config, hf_tensors = load_hf_checkpoint(directory)
    config, tensors = convert_state_dict(hf_config, hf_tensors)
    config["source"] = str(directory)
    check_tensor_set({k: v.shape for k, v in tensors.items()}, expected_shapes(config), str(directory))
    return config, tensors


def load_model_dir(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(config, name -> float32 C-contiguous array) from an engine or HF GPT-2 directory."""
    directory = Path(path)
    if not directory.exists():
        raise FileNotFoundError(f"model directory {directory} does not exist")
    if not directory.is_dir():
        raise NotADirectoryError(f"model path {directory} is not a directory")
    config = _read_config(directory)
    if config.get("format") == FORMAT:
        return _load_engine_dir(directory, config)
    if _is_hf_gpt2(config):
        return _load_hf_dir(directory)
    raise ValueError(
        f"{directory / CONFIG_FILE} is neither a pagedgpt2 model (format={config.get('format')!r}) "
        f"nor a Hugging Face GPT-2 checkpoint (model_type={config.get('model_type')!r})"
    )
