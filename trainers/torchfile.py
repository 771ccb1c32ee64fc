"""Read PyTorch checkpoints (``torch.save`` zip archives) into numpy without torch.

A ``.pt``/``.pth`` file written by ``torch.save`` is a zip archive holding
``<root>/data.pkl`` (a pickle whose tensors are persistent references) and
``<root>/data/<key>`` (raw little-endian storage bytes). The unpickler below
rebuilds each tensor as a numpy array from its storage, offset, size and
stride; anything else torch-specific is refused with a clear error.
"""

from __future__ import annotations

import collections
import pickle
import zipfile
import zlib
from pathlib import Path

import numpy as np

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16",
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _Storage:
    def __init__(self, data: bytes, dtype):
        if dtype == "bfloat16":
            import ml_dtypes

            dtype = ml_dtypes.bfloat16
        self.array = np.frombuffer(data, dtype=dtype)


def _rebuild_tensor(storage, offset, size, stride, *unused):
    arr = storage.array
    itemsize = arr.dtype.itemsize
    if not size:
        return arr[offset].copy() if arr.size else np.zeros((), arr.dtype)
    view = np.lib.stride_tricks.as_strided(
        arr[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride))
    return np.array(view)


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *unused):
    return data


class _StorageType:
    def __init__(self, name):
        self.name = name


class ScriptObject:
    """An object of a TorchScript class (``__torch__.*``): its type name and attributes, no code."""

    type_name = ""

    def __setstate__(self, state):
        self.attributes = dict(state)

    def __repr__(self):
        return f"ScriptObject({self.type_name}, {sorted(getattr(self, 'attributes', {}))})"


_SCRIPT_CLASSES: dict[str, type] = {}


def _script_class(type_name: str) -> type:
    # NEWOBJ needs a real type; one ScriptObject subclass per TorchScript class name.
    if type_name not in _SCRIPT_CLASSES:
        _SCRIPT_CLASSES[type_name] = type(type_name.rsplit(".", 1)[-1], (ScriptObject,), {"type_name": type_name})
    return _SCRIPT_CLASSES[type_name]


def _build_list(items):
    return list(items)


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, root: str, *, torchscript: bool = False,
                 storage_dir: str = "data"):
        super().__init__(file)
        self._archive = archive
        self._root = root
        self._torchscript = torchscript
        self._storage_dir = storage_dir
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module, name):
        if self._torchscript and module.startswith("__torch__"):
            return _script_class(f"{module}.{name}")
        if self._torchscript and module == "torch.jit._pickle" and name.startswith("build_"):
            # build_intlist, build_doublelist, build_tensorlist, ...: typed lists in TorchScript attributes.
            return _build_list
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch" and name in ("Size",):
            return tuple
        if module.startswith(("builtins", "collections", "numpy", "_codecs")):
            return super().find_class(module, name)
        if module == "argparse" and name == "Namespace":
            import argparse

            return argparse.Namespace
        raise pickle.UnpicklingError(f"checkpoint refers to {module}.{name}, which a plain state_dict reader does not load")

    def persistent_load(self, pid):
        kind, storage_type, key, _location, _numel = pid[:5]
        if kind != "storage":
            raise pickle.UnpicklingError(f"unknown persistent id {kind!r}")
        if key not in self._storages:
            dtype = _STORAGE_DTYPES[storage_type.name if isinstance(storage_type, _StorageType) else storage_type]
            data = self._archive.read(f"{self._root}/{self._storage_dir}/{key}")
            self._storages[key] = _Storage(data, dtype)
        return self._storages[key]


def load(path: str | Path):
    """The object ``torch.load(path)`` would return, with tensors as numpy arrays."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a torch zip checkpoint: it is truncated (download it again) or not "
                         "written by torch.save >= 1.6 (legacy pickles are not supported)")
    try:
        with zipfile.ZipFile(path) as archive:
            root = _archive_root(archive, path)
            with archive.open(f"{root}/data.pkl") as f:
                return _Unpickler(f, archive, root).load()
    except (zipfile.BadZipFile, EOFError, zlib.error, KeyError) as e:
        raise ValueError(f"{path} is a damaged torch checkpoint ({type(e).__name__}: {e}); download it again") from None


def load_state_dict(path: str | Path, *, keys_under: tuple[str, ...] = ("model_ema", "ema", "model", "state_dict", "module")):
    """A flat {name: np.ndarray} state_dict; unwraps common wrappers such as ``{"model": sd}``."""
    obj = load(path)
    for key in keys_under:
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state_dict, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}


def _archive_root(archive: zipfile.ZipFile, path: Path) -> str:
    pkl = [n for n in archive.namelist() if n.endswith("/data.pkl")]
    if not pkl:
        raise ValueError(f"{path}: no data.pkl in the archive")
    return pkl[0][: -len("/data.pkl")]


def load_torchscript(path: str | Path) -> ScriptObject:
    """The module tree of a TorchScript archive (``torch.jit.save``), tensors as numpy arrays.

    Only attributes are read (``data.pkl``; tensors from ``data/``); the archive's
    code is never run. Each module is a ``ScriptObject`` whose ``attributes`` hold
    its parameters, buffers, submodules and plain attributes (stride, padding, ...).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"TorchScript file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a TorchScript zip archive")
    with zipfile.ZipFile(path) as archive:
        root = _archive_root(archive, path)
        if f"{root}/code/" not in {n[: len(root) + 6] for n in archive.namelist()}:
            raise ValueError(f"{path} has no code/ folder: a torch.save checkpoint, read it with load()")
        with archive.open(f"{root}/data.pkl") as f:
            obj = _Unpickler(f, archive, root, torchscript=True).load()
    if not isinstance(obj, ScriptObject):
        raise ValueError(f"{path}: data.pkl holds a {type(obj).__name__}, not a TorchScript module")
    return obj


def torchscript_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """A flat {dotted.name: np.ndarray} of every tensor attribute in a TorchScript module tree."""
    flat: dict[str, np.ndarray] = {}

    def visit(obj: ScriptObject, prefix: str):
        for name, value in obj.attributes.items():
            if isinstance(value, np.ndarray):
                flat[prefix + name] = value
            elif isinstance(value, ScriptObject):
                visit(value, f"{prefix}{name}.")

    visit(load_torchscript(path), "")
    return flat
