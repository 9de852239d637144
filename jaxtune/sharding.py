"""Device mesh and the mapping from logical axis names (in the model) to mesh axes (here only).

The mesh has four axes: `data` (pure data parallel), `fsdp` (data parallel with parameters
sharded, ZeRO-3 style), `context` (the tokens of a row split over devices, see jaxtune.context; the
weights are sharded over it too, so the group holds no replicated copy) and `tensor` (Megatron-style
splits of heads and MLP columns).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import warnings

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxtune.errors import JaxtuneError

MESH_AXES = ("data", "fsdp", "context", "tensor")

# Logical axis (the model's `axes` metadata) -> mesh axes, tried in order. A mesh axis that does not
# divide the dimension (e.g. 3 KV heads over tensor=2) is dropped for that tensor, which then stays
# replicated on that axis.
RULES = {
    "batch": ("data", "fsdp"),
    "length": ("context",),
    "act_embed": (),
    "vocab": ("tensor",),
    "embed": ("fsdp", "context"),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "layers": (),
    "norm": (),
    "lora_rank": (),
}

_ACTIVE: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("jaxtune_mesh", default=None)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None, context: int = 1) -> Mesh:
    """A (data, fsdp, context, tensor) mesh over the visible devices (or `devices`: those of a TPU
    topology compiled for ahead of time); one size may be -1: "all remaining devices"."""
    devices = list(devices) if devices is not None else jax.devices()
    sizes = mesh_sizes(data, fsdp, tensor, len(devices), context)
    shown = " x ".join(f"{axis}={n}" for axis, n in sizes.items())
    if -1 not in (data, fsdp, context, tensor) and math.prod(sizes.values()) < len(devices):
        warnings.warn(f"mesh {shown} uses {math.prod(sizes.values())} of {len(devices)} devices; set one size to -1 "
                      "to use all")
        devices = devices[: math.prod(sizes.values())]
    if math.prod(sizes.values()) != len(devices):
        raise JaxtuneError(f"mesh {shown} needs {math.prod(sizes.values())} devices, but {len(devices)} are visible; "
                           "set one of mesh.data/fsdp/context/tensor to -1 to use the rest")
    return jax.make_mesh(tuple(sizes.values()), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def config_mesh(mesh_cfg, devices=None) -> Mesh:
    """The mesh of a config's `mesh.*` keys."""
    return make_mesh(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor, devices=devices, context=mesh_cfg.context)


def row_feeds(mesh: Mesh, process: int | None = None) -> tuple[int, int]:
    """(this process's feed, feeds). Batch rows are split over data x fsdp; the processes whose devices hold
    the same rows (a context group spanning hosts) form one feed: each is given those rows and puts its own
    devices' pieces of them on the mesh. Without such groups every process is a feed of its own."""
    process = jax.process_index() if process is None else process
    hosts = np.vectorize(lambda d: d.process_index)(mesh.devices)  # [data, fsdp, context, tensor]
    holders = [frozenset(shard.ravel().tolist()) for shard in hosts.reshape(-1, *hosts.shape[2:])]
    runs = []  # [processes, row shards] of each run of consecutive row shards held by the same processes
    for h in holders:
        if runs and runs[-1][0] == h:
            runs[-1][1] += 1
        else:
            runs.append([h, 1])
    feeds = [h for h, _ in runs]
    disjoint = len(set().union(*feeds)) == sum(map(len, feeds))  # no process in two feeds, no feed twice
    if not disjoint or len({n for _, n in runs}) != 1:
        raise JaxtuneError(f"mesh {dict(mesh.shape)}: its row shards are spread over the hosts so that no host can "
                           "be given whole rows (the processes of each row shard: "
                           f"{[sorted(h) for h in holders]}); put mesh.context inside a host or over whole hosts")
    mine = [i for i, h in enumerate(feeds) if process in h]
    if not mine:
        raise JaxtuneError(f"mesh {dict(mesh.shape)} uses none of process {process}'s devices: set one of "
                           "mesh.data/fsdp/context/tensor to -1 so that it spans every host")
    return mine[0], len(feeds)


def mesh_sizes(data: int, fsdp: int, tensor: int, devices: int, context: int = 1) -> dict:
    """{axis: size} of a (data, fsdp, context, tensor) mesh over `devices` devices, a -1 taking the rest."""
    sizes = dict(zip(MESH_AXES, (data, fsdp, context, tensor)))
    if list(sizes.values()).count(-1) > 1:
        raise JaxtuneError(f"mesh: at most one of data/fsdp/context/tensor may be -1, got {list(sizes.values())}")
    known = math.prod(s for s in sizes.values() if s != -1)
    for axis, size in sizes.items():
        if size == -1:
            if devices % known:
                raise JaxtuneError(f"mesh {list(sizes.values())}: {devices} devices are not divisible by {known}")
            sizes[axis] = devices // known
    return sizes


def spec(axes, shape, mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for a tensor with logical `axes`, skipping mesh axes that do not divide it.

    Flax's logical-axis rules (flax.core.spmd, nnx.get_partition_spec) map names without looking at
    shapes, so they cannot drop a mesh axis that does not divide a dimension; hence this function.
    """
    used, out = set(), []
    for name, dim in zip(axes, shape):
        picked = []
        for mesh_axis in RULES.get(name, ()) if name else ():
            size = dict(mesh.shape).get(mesh_axis, 1)  # an axis the mesh lacks splits nothing
            if mesh_axis in used or size == 1 or dim % (math.prod(mesh.shape[a] for a in picked) * size):
                continue
            picked.append(mesh_axis)
            used.add(mesh_axis)
        out.append(tuple(picked) if len(picked) > 1 else (picked[0] if picked else None))
    return PartitionSpec(*out)


def named_sharding(axes, shape, mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, spec(axes, shape, mesh))


def state_shardings(state, mesh: Mesh):
    """NamedShardings for every leaf of an (abstract or concrete) tree holding NNX Variables, from
    each Variable's logical `axes`; any other leaf is replicated.

    This covers optimizer states too: optax builds moments and accumulators with tree maps over the
    parameters, which keep each parameter's nnx.Variable (and so its `axes`), so every moment lands
    where its parameter is; step counters are plain arrays and stay replicated.
    """

    def one(leaf):
        axes = getattr(leaf, "axes", None) or (None,) * len(leaf.shape)
        return named_sharding(axes, leaf.shape, mesh)

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None):
    """Within this block, `constrain` pins activations to the mesh by their logical names."""
    token = _ACTIVE.set(mesh)
    try:
        yield mesh
    finally:
        _ACTIVE.reset(token)


def active_mesh() -> Mesh | None:
    """The mesh of the enclosing `use_mesh` block (None outside one)."""
    return _ACTIVE.get()


def constrain(x: jax.Array, axes) -> jax.Array:
    """with_sharding_constraint by logical names; a no-op outside `use_mesh`."""
    mesh = _ACTIVE.get()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, named_sharding(axes, x.shape, mesh))


def check_batch(micro_batch: int, shape: dict) -> None:
    """Each row of a micro-batch lives on one (data, fsdp) shard: the batch must split evenly."""
    ways = shape["data"] * shape["fsdp"]
    if micro_batch % ways:
        up = -(-micro_batch // ways) * ways
        raise JaxtuneError(f"train.micro_batch_size={micro_batch} must be a multiple of mesh data x fsdp = {ways}. "
                           f"Each shard holds whole rows: set train.micro_batch_size={up} (lower "
                           "train.grad_accum_steps to keep the batch), or shard the weights over fewer chips "
                           "(mesh.fsdp) or replicate over more (mesh.tensor)")
