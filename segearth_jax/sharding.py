"""One logical-axis rule table (MaxText style) and the helpers that turn it into shardings.

Every param is created with ``nn.with_logical_partitioning(init, LOGICAL_AXES)``; activations that
matter get ``nn.with_logical_constraint``. Nothing else in the code names a mesh axis.
Mesh axes: ``data`` (pure data parallel), ``fsdp`` (data parallel + params sharded), ``tensor``.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Param axes. Widths of the big towers shard over fsdp; heads/mlp/vocab over tensor.
# Small mask-head widths ('head_*') stay replicated: 256-wide layers gain nothing from sharding.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    # params
    ("embed", "fsdp"),        # model width (LLM, SigLIP)
    ("heads", "tensor"),      # fused heads*head_dim projection width
    ("kv", None),             # per-head dim when kept separate
    ("mlp", "tensor"),        # MLP hidden width
    ("vocab", "tensor"),      # embedding rows / lm_head columns
    ("layers", None),         # the nn.scan axis
    ("lora_rank", None),
    ("norm", None),           # LayerNorm scales/biases
    ("patch", None),          # conv kernel spatial/in-channel dims
    ("position", None),       # position embedding rows
    ("head_embed", None),     # mask head widths (Swin, pixel decoder, mask decoder)
    ("head_mlp", None),
    ("head_heads", None),
    ("head_levels", None),
)

AXIS_NAMES = tuple(name for name, _ in LOGICAL_AXIS_RULES)


def mesh_shape(devices: int, data: int = 1, fsdp: int = -1, tensor: int = 1) -> tuple[int, int, int]:
  """Resolves one -1 entry to 'the rest of the devices'."""
  dims = [data, fsdp, tensor]
  if dims.count(-1) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
  known = math.prod(d for d in dims if d != -1)
  if -1 in dims:
    if devices % known:
      raise ValueError(f"mesh: {devices} devices do not split into {dims}")
    dims[dims.index(-1)] = devices // known
  if math.prod(dims) != devices:
    raise ValueError(f"mesh: data*fsdp*tensor = {math.prod(dims)} but there are {devices} devices")
  return tuple(dims)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(len(devices), data, fsdp, tensor)
  try:
    arr = jax.experimental.mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # odd device counts / CPU: plain reshape is fine
    arr = np.asarray(devices).reshape(shape)
  return Mesh(arr, MESH_AXES)


def single_device_mesh() -> Mesh:
  """The first device as a (1, 1, 1) mesh: one-device predict, conversion, benchmarks."""
  return make_mesh(1, 1, 1, devices=jax.devices()[:1])


def mesh_from_config(mesh_cfg) -> Mesh:
  return make_mesh(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor)


def logical_shardings(boxed_tree, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
  """Tree of NamedShardings for a tree of (possibly abstract) boxed params from ``model.init``."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) dim over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def axis_rules():
  """Context manager under which ``nn.with_logical_constraint`` resolves against the table."""
  return nn.logical_axis_rules(LOGICAL_AXIS_RULES)


def maybe_initialize_distributed(config) -> None:
  """jax.distributed.initialize from ``config.distributed`` (train and eval on a multi-host mesh)."""
  d = config.distributed
  # before anything touches the XLA backend (jax.devices() included); once per process
  if d.enabled and not jax.distributed.is_initialized():
    jax.distributed.initialize(coordinator_address=d.coordinator_address or None,
                               num_processes=d.num_processes or None, process_id=d.process_id,
                               local_device_ids=list(d.local_device_ids) or None)
