"""Pretrained networks used frozen or as teachers, each a Flax port with a converter from its
public PyTorch checkpoint and a clear error when the local file is missing.

This package holds the conversion helpers every port shares:

* :func:`torch_to_params` -- a torch ``state_dict`` (numpy arrays) -> a pure params dict of an
  nnx model, given the model's abstract params: each torch key is renamed to a path of the nnx
  tree (``blocks.0.attn.in_proj_weight`` -> ``("blocks", 0, "attn", "in_proj", "kernel")``), and
  values are laid out by the target leaf: ``kernel`` of a conv (out, in, kh, kw) -> (kh, kw, in,
  out), of a dense layer (out, in) -> (in, out); ``scale``/``bias``/embeddings unchanged. Missing,
  unexpected and mis-shaped entries raise one error listing them.
* :func:`require_file` -- the missing-weights error naming the file and where it is published.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np


def default_rename(key: str) -> tuple:
    """``a.b.0.weight`` -> ("a", "b", 0, "weight"); :func:`torch_to_params` then resolves
    ``weight`` to the target's ``kernel`` (conv, linear), ``scale`` (norm), ``embedding``, or a
    bare parameter."""
    return tuple(int(p) if p.isdigit() else p for p in key.split("."))


def _flat(tree) -> dict[tuple, object]:
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        out[tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)] = leaf
    return out


def _set(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _layout(value: np.ndarray, target_shape: tuple, leaf: str) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 4:
        value = value.transpose(2, 3, 1, 0)  # (out, in, kh, kw) -> (kh, kw, in, out)
        if len(target_shape) == 2:  # a 1x1 conv stored as a dense kernel
            value = value.reshape(value.shape[-2], value.shape[-1])
    elif leaf == "kernel" and value.ndim == 2:
        value = value.T  # Linear (out, in) -> (in, out)
    return value


def torch_to_params(state_dict: dict[str, np.ndarray], expected, *,
                    rename: Callable[[str], tuple | None] = default_rename, what: str = "checkpoint") -> dict:
    """Pure params dict matching ``expected`` (abstract pure params) from a torch state_dict.

    ``rename(key)`` gives the nnx path of a torch key (its last element ``weight`` is resolved to
    the target's ``kernel``/``scale``/``embedding``), or None to skip the key.
    """
    want = _flat(expected)
    params: dict = {}
    unexpected, wrong = [], []
    for key, value in state_dict.items():
        path = rename(key)
        if path is None:
            continue
        value = np.asarray(value, np.float32)
        if path[-1] == "weight" and path not in want:
            for candidate in (path[:-1] + ("kernel",), path[:-1] + ("scale",), path[:-1] + ("embedding",),
                              path[:-1]):  # the last: a bare nnx.Param (a codebook ``embedding``)
                if candidate in want:
                    path = candidate
                    break
        if path not in want:
            unexpected.append(f"{key} -> {'.'.join(map(str, path))}")
            continue
        target = tuple(want[path].shape)
        value = _layout(value, target, path[-1])
        if value.shape != target:
            wrong.append(f"{key}: {value.shape} vs model {target}")
            continue
        _set(params, path, value)
    missing = sorted(".".join(map(str, p)) for p in set(want) - set(_flat(params)))
    if missing or unexpected or wrong:
        raise ValueError(f"{what} does not fit the configured model: missing {missing[:8]} ({len(missing)}), "
                         f"unexpected {unexpected[:8]} ({len(unexpected)}), shape mismatches {wrong[:8]} "
                         f"({len(wrong)})")
    return params


def regex_rename(rules: list[tuple[str, str]], then: Callable[[str], tuple | None] = default_rename):
    """A ``rename`` that applies ``re.sub`` rules in order, then ``then``; a rule whose replacement
    is ``None``-like (empty string) drops keys it matches."""
    compiled = [(re.compile(p), r) for p, r in rules]

    def rename(key: str):
        for pattern, repl in compiled:
            if pattern.search(key):
                if repl == "":
                    return None
                key = pattern.sub(repl, key)
        return then(key)

    return rename


def require_file(path: str | Path | None, *, what: str, config_field: str, published: str) -> Path:
    """``Path(path)`` if it exists, else FileNotFoundError naming the field, the file and its source."""
    if not path or not Path(path).exists():
        raise FileNotFoundError(
            f"{what} not found (set {config_field}; got {str(path) if path else 'nothing'}). "
            f"It is published at {published}; download it on a machine with internet access and copy it here.")
    return Path(path)


def read_weights(path: Path) -> dict[str, np.ndarray]:
    """A local ``.safetensors`` or torch ``.pth``/``.bin``/``.pt`` (zip or legacy pickle) state_dict."""
    if Path(path).suffix == ".safetensors":
        from safetensors.numpy import load_file

        return dict(load_file(str(path)))
    from trainers import torchfile

    return torchfile.load_state_dict(path)


def clamped_normalise(images, mean, std):
    """Images in [-1, 1] (B, H, W, C) -> a teacher's input as upstream's ``ScalingLayerFor*``: to [0, 1]
    through the uint8 range with a clamp, then (x - mean) / std; one channel is repeated to three."""
    import jax.numpy as jnp

    x = jnp.clip((images.astype(jnp.float32) + 1.0) * 127.5, 0.0, 255.0) / 255.0
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    return (x - jnp.asarray(mean)) / jnp.asarray(std)


def merge_module(abstract_model, params: dict, rest: dict | None = None):
    """A module from an abstract one (``nnx.eval_shape``) and pure dicts of its params and,
    optionally, its non-param state (e.g. BatchNorm statistics)."""
    import jax.numpy as jnp
    from flax import nnx

    graphdef, abstract, abstract_rest = nnx.split(abstract_model, nnx.Param, ...)
    copy = lambda tree: jax.tree.map(lambda v: v, tree, is_leaf=lambda v: isinstance(v, nnx.Variable))  # noqa: E731
    state, other = copy(abstract), copy(abstract_rest)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    if rest is not None:
        nnx.replace_by_pure_dict(other, jax.tree.map(jnp.asarray, rest))
    return nnx.merge(graphdef, state, other)
