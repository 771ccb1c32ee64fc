"""The mesh, the logical-axis rule table, and the shardings derived from them.

Every parameter in the zoo carries logical axis names (``nnx.with_partitioning``
or ``sharding_names=`` metadata, stored by Flax as ``out_sharding``). One rule
table maps those names to the mesh axes ``data``, ``fsdp`` and ``tensor``;
nothing else in the zoo names a mesh axis. Activations use the ``act_*`` names
through :func:`constrain`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import flax
import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Variables are created unsharded and placed by the jitted init's out_shardings
# (shapes first with eval_shape, as big_vision does), so eager sharding is off.
flax.config.update("flax_always_shard_variable", False)

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis (or axes, or None = replicated). The vocabulary
# follows maxdiffusion's logical_axis_rules; the first matching rule wins.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    # parameters
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("qkv", None),
    ("vocab", "tensor"),
    ("classes", None),
    ("conv_in", None),
    ("conv_out", "tensor"),
    ("conv_kernel", None),
    ("norm", None),
    ("position", None),
    ("codebook", None),
    ("channels", None),
)

_RULES_BY_NAME = dict(LOGICAL_AXIS_RULES)


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh (data, fsdp, tensor) from ``{data: int, fsdp: int, tensor: int}``; -1 fills.

    Axis types are Auto (GSPMD propagation), chosen on purpose: explicit axes
    would demand an out_sharding on every matmul over a sharded dim.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(mesh_config, len(devices))
    device_array = np.asarray(devices).reshape(sizes)
    return Mesh(device_array, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def resolve_mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
    """Mesh sizes with -1 filled; raises ValueError naming the field on a mismatch."""
    sizes = [int(mesh_config[name]) for name in MESH_AXES]
    for name, size in zip(MESH_AXES, sizes):
        if size == 0 or size < -1:
            raise ValueError(f"config.mesh.{name}={size}: must be a positive size or -1 (fill).")
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}.")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(
                f"config.mesh={dict(zip(MESH_AXES, sizes))}: the fixed axes ({known} devices) do not "
                f"divide the {num_devices} available devices.")
        sizes[sizes.index(-1)] = num_devices // known
    elif known != num_devices:
        raise ValueError(
            f"config.mesh={dict(zip(MESH_AXES, sizes))} needs {known} devices but "
            f"{num_devices} are available; set one axis to -1 to fill.")
    return tuple(sizes)


def logical_to_spec(names: Sequence[str | None] | None, shape=None, mesh: Mesh | None = None) -> P:
    """PartitionSpec for logical axis names; a dim that the mesh axis does not divide is replicated."""
    if names is None:
        return P()
    axes = []
    used: set[str] = set()
    for i, name in enumerate(names):
        if name is None:
            axes.append(None)
            continue
        if name not in _RULES_BY_NAME:
            raise KeyError(f"logical axis name {name!r} has no rule in trainers.sharding.LOGICAL_AXIS_RULES")
        target = _RULES_BY_NAME[name]
        target_tuple = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        # A mesh axis may shard at most one dim of an array.
        target_tuple = tuple(a for a in target_tuple if a not in used)
        if mesh is not None and shape is not None:
            size = math.prod(mesh.shape[a] for a in target_tuple)
            if size > 1 and shape[i] % size:
                target_tuple = ()
        used.update(target_tuple)
        axes.append(None if not target_tuple else (target_tuple[0] if len(target_tuple) == 1 else target_tuple))
    return P(*axes)


def _names_of(variable) -> tuple | None:
    meta = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
    return meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")


def state_shardings(state, mesh: Mesh):
    """NamedShardings for an nnx.State (or any pytree of nnx.Variables / arrays)."""

    def one(x):
        if isinstance(x, nnx.Variable):
            value = x.get_value() if hasattr(x, "get_value") else x.value
            spec = logical_to_spec(_names_of(x), np.shape(value), mesh)
            return x.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def logical_specs(state):
    """Logical names of each variable in a state (None for unannotated), for tests and docs."""
    return jax.tree.map(_names_of, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


# The mesh of the current run, so that models can constrain activations without
# being handed a mesh (set by the loop, the sampler and the tests).
_CURRENT_MESH: list[Mesh] = []


@contextlib.contextmanager
def use_mesh(mesh: Mesh):
    _CURRENT_MESH.append(mesh)
    try:
        yield mesh
    finally:
        _CURRENT_MESH.pop()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical names; a no-op outside a mesh."""
    if not _CURRENT_MESH:
        return x
    mesh = _CURRENT_MESH[-1]
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, x.shape, mesh)))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading dim over (data, fsdp); the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("act_batch",) + (None,) * (ndim - 1)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
