"""Small building blocks shared by every model part.

- ``dense`` / ``layer_norm``: flax layers whose params carry logical axis names (see sharding.py).
- ``activation(name)``: the one table of hidden_act names (transformers' spelling) -> functions.
- ``remat_policy(name)``: the one table of rematerialisation policies ('none' -> None).
- ``dtype_of(name)``: config dtype strings ('float32', 'bfloat16', 'float16') -> jnp dtypes.
- ``sine_position_embedding``: Mask2Former's normalised 2-D sine embedding (pixel decoder and mask decoder).
- ``config_from_dict``: the one strict mapping -> part-config dataclass conversion every ``from_dict`` uses.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from segearth_jax import sharding as shd
from segearth_jax.errors import UserError

DType = Any

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str | DType) -> DType:
  """A config dtype string -> its jnp dtype; a dtype passes through unchanged."""
  if not isinstance(name, str):
    return name
  if name not in _DTYPES:
    raise UserError(f"dtype {name!r} is not supported; choose one of {sorted(_DTYPES)}")
  return _DTYPES[name]


def _gelu_tanh(x):
  return jax.nn.gelu(x, approximate=True)


def _gelu_erf(x):
  return jax.nn.gelu(x, approximate=False)


def _quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


# transformers' ACT2FN names; gelu_new / gelu_fast / gelu_pytorch_tanh are all the tanh approximation.
_ACTIVATIONS: dict[str, Callable] = {
    "gelu": _gelu_erf, "gelu_new": _gelu_tanh, "gelu_fast": _gelu_tanh, "gelu_pytorch_tanh": _gelu_tanh,
    "quick_gelu": _quick_gelu, "relu": jax.nn.relu, "silu": jax.nn.silu, "swish": jax.nn.silu,
}


def activation(name: str) -> Callable:
  if name not in _ACTIVATIONS:
    raise UserError(f"hidden_act={name!r} is not supported; known: {sorted(_ACTIVATIONS)}")
  return _ACTIVATIONS[name]


_REMAT_POLICIES = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_policy(name: str | None):
  """A jax.checkpoint policy; None for 'none' (no remat at all)."""
  if name in (None, "none"):
    return None
  if name not in _REMAT_POLICIES:
    raise UserError(f"remat_policy={name!r}: choose one of {['none', *_REMAT_POLICIES]}")
  return _REMAT_POLICIES[name]


def dense(features: int, axes: Sequence[str | None], *, use_bias: bool = True, dtype=jnp.float32,
          param_dtype=jnp.float32, name: str | None = None,
          kernel_init=nn.initializers.lecun_normal(), bias_init=nn.initializers.zeros) -> nn.Dense:
  """nn.Dense whose kernel carries ``axes`` (in, out) and whose bias carries ``(axes[-1],)``.

  Kernel layout is (in, out): the transpose of torch.nn.Linear.weight; the converters' name maps
  apply that transpose. The kernel is gathered over fsdp at its use (sharding.gather_at_use).
  """
  return nn.Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
      dot_general=functools.partial(_dot_gathered, axes=tuple(axes)),
      kernel_init=nn.with_logical_partitioning(kernel_init, tuple(axes)),
      bias_init=nn.with_logical_partitioning(bias_init, (axes[-1],)))


def _dot_gathered(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, *, axes):
  return jax.lax.dot_general(lhs, shd.gather_at_use(rhs, axes), dimension_numbers, precision=precision,
                             preferred_element_type=preferred_element_type)


def layer_norm(eps: float, *, dtype=jnp.float32, param_dtype=jnp.float32, name: str | None = None,
               axis_name: str = "norm") -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, (axis_name,)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axis_name,)))


def sine_position_embedding(height: int, width: int, num_pos_feats: int, temperature: float = 10000.0,
                            scale: float = 2 * math.pi) -> np.ndarray:
  """[h*w, 2*num_pos_feats] float32 constant, row-major over the map: y features then x features, each
  sin on even and cos on odd channels (interleaved). Coordinates 1..n normalised by (n + 1e-6) times
  ``scale`` — HF Mask2FormerSinePositionEmbedding(normalize=True) on an unpadded map, in its float32
  operation order."""
  eps = np.float32(1e-6)
  y = np.arange(1, height + 1, dtype=np.float32)
  x = np.arange(1, width + 1, dtype=np.float32)
  y = y / (y[-1] + eps) * np.float32(scale)
  x = x / (x[-1] + eps) * np.float32(scale)
  dim_t = np.arange(num_pos_feats, dtype=np.float32)
  dim_t = np.float32(temperature) ** (2 * np.floor(dim_t / 2) / np.float32(num_pos_feats))

  def enc(c):  # [n] -> [n, num_pos_feats]
    p = c[:, None] / dim_t
    return np.stack([np.sin(p[:, 0::2]), np.cos(p[:, 1::2])], -1).reshape(len(c), -1)

  pos_y = np.broadcast_to(enc(y)[:, None, :], (height, width, num_pos_feats))
  pos_x = np.broadcast_to(enc(x)[None, :, :], (height, width, num_pos_feats))
  return np.concatenate([pos_y, pos_x], -1).reshape(height * width, -1).astype(np.float32)


def _frozen(value):
  # JSON and ConfigDict.to_dict give lists where the dataclasses hold (hashable) tuples
  return tuple(_frozen(v) for v in value) if isinstance(value, (list, tuple)) else value


def config_from_dict(cls, mapping: Mapping[str, Any] | Any, part: str, **derived):
  """``cls(**mapping, **derived)`` for a frozen part-config dataclass: a field missing from ``mapping``
  takes the dataclass default; a key that is not a field is a UserError naming ``part`` and the key, and
  so is one of the ``derived`` fields (the caller sets those from elsewhere in the model).
  ``mapping``: a dict or ConfigDict."""
  d = dict(mapping.to_dict() if hasattr(mapping, "to_dict") else mapping)
  names = [f.name for f in dataclasses.fields(cls) if f.name not in derived]
  for key in d:
    if key in derived:
      raise UserError(f"{part}: field {key!r} is derived from the rest of the model config; remove it")
    if key not in names:
      raise UserError(f"{part}: unknown field {key!r}; known: {sorted(names)}")
  return cls(**{k: _frozen(v) for k, v in d.items()}, **derived)
