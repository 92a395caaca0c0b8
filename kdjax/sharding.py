"""Device mesh and THE rule table from logical axis names to mesh axes.

Parameters carry logical axis names as `nnx.Param(..., axes=("embed", "mlp"))`; activations are
constrained with `shard_constraint(x, ("batch", "length", "embed"))`. Only `LOGICAL_RULES` knows
about the mesh, so changing the parallelism never touches the model.

Mesh axes are ("data", "fsdp", "tensor"):
  data    pure data parallelism (parameters replicated),
  fsdp    data parallelism with parameters and optimizer state sharded on their "embed" dim,
  tensor  model parallelism over vocab / heads / mlp (and the vocabulary of the loss).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis (or tuple of axes, or None = replicated). Parameters and
# activations share the table; a mesh axis already used by an earlier dimension of the same
# array is skipped, so activations ("batch", "length", "embed") give P(("data", "fsdp"), None,
# None) while the parameter ("embed", "mlp") gives P("fsdp", "tensor").
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "norm": None,
}


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A mesh with axes ("data", "fsdp", "tensor"); one size may be -1 = all remaining devices.

    Raises ValueError naming the flags when data * fsdp * tensor != number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    flags = ", ".join(f"{k}={v}" for k, v in sizes.items())
    free = [k for k, v in sizes.items() if v == -1]
    bad = [k for k, v in sizes.items() if v != -1 and (not isinstance(v, int) or v < 1)]
    if len(free) > 1 or bad:
        raise ValueError(f"make_mesh({flags}): each of the mesh flags data/fsdp/tensor must be a "
                         "positive int, and at most one of them -1 (= the remaining devices)")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if n % fixed:
            raise ValueError(f"make_mesh({flags}): {n} devices do not divide by the product of the "
                             f"other mesh flags ({fixed}); change them so {fixed} divides {n}")
        sizes[free[0]] = n // fixed
    if math.prod(sizes.values()) != n:
        raise ValueError(f"make_mesh({flags}): data*fsdp*tensor = {math.prod(sizes.values())} but "
                         f"there are {n} devices; set the mesh flags data/fsdp/tensor so their "
                         f"product is {n}, or set one of them to -1")
    shape = tuple(sizes[a] for a in MESH_AXES)
    axis_types = getattr(jax.sharding, "AxisType", None)
    if axis_types is not None:  # Auto: jit propagates shardings (newer jax defaults to Explicit)
        return jax.make_mesh(shape, MESH_AXES, axis_types=(axis_types.Auto,) * 3, devices=devices)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None) -> P:
    """PartitionSpec for logical `axes` via LOGICAL_RULES.

    With `shape` and `mesh`, a dimension whose size does not divide by its mesh axes' total size
    is replicated instead. A mesh axis is used at most once per array (first dimension wins).
    """
    used: set[str] = set()
    spec = []
    for i, name in enumerate(axes):
        if name is not None and name not in LOGICAL_RULES:
            raise KeyError(f"logical axis {name!r} is not in kdjax.sharding.LOGICAL_RULES "
                           f"(known: {sorted(LOGICAL_RULES)})")
        rule = LOGICAL_RULES.get(name) if name is not None else None
        mesh_axes = (rule,) if isinstance(rule, str) else tuple(rule or ())
        mesh_axes = tuple(a for a in mesh_axes if a not in used)
        if mesh is not None:
            mesh_axes = tuple(a for a in mesh_axes if a in mesh.shape)
            if shape is not None and shape[i] % math.prod(mesh.shape[a] for a in mesh_axes):
                mesh_axes = ()
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return P(*spec)


def _axes_of(x) -> tuple | None:
    if isinstance(x, nnx.Variable):
        return x.get_metadata().get("axes")
    return None


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """NamedShardings for a pytree of nnx.Variables (e.g. `nnx.state(model)`), same structure.

    Each Variable with `axes` metadata is sharded by LOGICAL_RULES (dims that do not divide are
    replicated); Variables without `axes` and plain arrays are replicated. The result is a tree
    prefix of `state`, usable with `jax.device_put` and as jit in/out shardings.
    """
    def one(x):
        axes = _axes_of(x)
        value = x.get_value() if isinstance(x, nnx.Variable) else x
        shape = np.shape(value)
        if axes is None:
            return NamedSharding(mesh, P())
        if len(axes) != len(shape):
            raise ValueError(f"Variable of shape {shape} has axes={axes}: need one logical name "
                             "(or None) per dimension")
        return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _ambient_mesh():
    get = getattr(jax.sharding, "get_abstract_mesh", None)
    mesh = get() if get is not None else None
    if mesh is None or mesh.empty:
        return None
    manual = getattr(getattr(jax.sharding, "AxisType", None), "Manual", None)
    if manual is not None and all(t == manual for t in mesh.axis_types):
        return None  # inside shard_map: nothing left to constrain
    return mesh


def shard_constraint(x: jax.Array, axes: Sequence[str | None], mesh: Mesh | None = None):
    """Constrain an activation's sharding by logical axes; a no-op when no mesh is given or set.

    The mesh is `mesh` or the one set with `jax.set_mesh(mesh)`.
    """
    mesh = mesh if mesh is not None else _ambient_mesh()
    if mesh is None:
        return x
    return constrain(x, logical_to_spec(axes, x.shape, mesh), mesh)


def constrain(x: jax.Array, spec: P, mesh) -> jax.Array:
    """Lay x out as `spec` on `mesh`: `reshard` on Explicit mesh axes, else a sharding constraint."""
    target = NamedSharding(mesh, spec) if isinstance(mesh, Mesh) else spec
    explicit = getattr(getattr(jax.sharding, "AxisType", None), "Explicit", None)
    if explicit is not None and explicit in tuple(getattr(mesh, "axis_types", ())):
        return jax.sharding.reshard(x, target)
    return jax.lax.with_sharding_constraint(x, target)


# ---- batches across processes ------------------------------------------------------------------
def batch_spec() -> P:
    """Rows of a batch over the data-parallel mesh axes (the rule table's "batch")."""
    rule = LOGICAL_RULES["batch"]
    return P(rule)


def data_shards(mesh: Mesh) -> int:
    """How many ways a batch's rows split on `mesh`: the product of its data-parallel axes."""
    return math.prod(mesh.shape[a] for a in LOGICAL_RULES["batch"])


def place_rows(host: Any, mesh: Mesh) -> Any:
    """A global batch of host arrays ([rows, ...] leaves, the same on every process) as arrays
    whose rows are split over the data-parallel devices of `mesh`. Each process copies only the
    rows its own devices hold (`process_rows`), so on several hosts no process places the others'."""
    sharding = NamedSharding(mesh, batch_spec())

    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
    return jax.tree.map(one, host)


def process_rows(mesh: Mesh, rows: int) -> slice:
    """The rows of a [rows, ...] batch (split as `place_rows` splits it) that this process's
    devices hold: contiguous, disjoint between processes, together the whole batch."""
    sharding = NamedSharding(mesh, batch_spec())
    index = sharding.addressable_devices_indices_map((rows,))
    starts = sorted({(ix[0].start or 0, rows if ix[0].stop is None else ix[0].stop) for ix in index.values()})
    lo, hi = starts[0][0], starts[-1][1]
    if sum(b - a for a, b in starts) != hi - lo:
        raise ValueError(f"the devices of process {jax.process_index()} hold rows {starts} of a batch of {rows}, "
                         f"not one contiguous block; order the mesh's devices by process")
    return slice(lo, hi)


def allgather(x: np.ndarray) -> np.ndarray:
    """The concatenation over processes (in process order) of each process's host array; the
    array itself on one process."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=True))


def host_rows(x: jax.Array) -> np.ndarray:
    """All rows of a (possibly multi-process) array on every process, as numpy."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def barrier(name: str, timeout_s: int = 1800):
    """Every process waits here until all have arrived (through the coordinator's key-value store,
    not a collective); a no-op on one process."""
    if jax.process_count() > 1:
        from orbax.checkpoint import multihost
        multihost.sync_global_processes(f"kdjax:{name}", timeout=timeout_s)


_COMPILED: dict = {}


def call_compiled(jitted, *args, **static):
    """jitted(*args, **static), with every static argument passed by keyword. On several
    processes the program is compiled ahead (once per signature) and all processes have finished
    compiling before any runs it: CPU collectives (gloo) give up when a peer is 30 s late, and
    processes on a loaded machine compile the same program at different speeds."""
    if jax.process_count() == 1:
        return jitted(*args, **static)
    leaves, tree = jax.tree.flatten((args, static))
    sig = tuple((x.shape, str(x.dtype), getattr(x, "sharding", None)) if hasattr(x, "shape") else x for x in leaves)
    key = (jitted, tree, sig)
    if key not in _COMPILED:
        _COMPILED[key] = jitted.lower(*args, **static).compile()
        barrier(f"compiled {getattr(jitted, '__name__', 'program')} #{len(_COMPILED)}")
    return _COMPILED[key](*args)
