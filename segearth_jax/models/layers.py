"""Small building blocks that attach logical axis names to params (see sharding.py)."""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

DType = Any


def dtype_of(name: str | DType) -> DType:
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}.get(name, name)


def dense(features: int, axes: Sequence[str | None], *, use_bias: bool = True, dtype=jnp.float32,
          param_dtype=jnp.float32, name: str | None = None,
          kernel_init=nn.initializers.lecun_normal(), bias_init=nn.initializers.zeros) -> nn.Dense:
  """nn.Dense whose kernel carries ``axes`` (in, out) and whose bias carries ``(axes[-1],)``.

  Kernel layout is (in, out): the transpose of torch.nn.Linear.weight; the converters' name maps
  apply that transpose.
  """
  return nn.Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
      kernel_init=nn.with_logical_partitioning(kernel_init, tuple(axes)),
      bias_init=nn.with_logical_partitioning(bias_init, (axes[-1],)))


def layer_norm(eps: float, *, dtype=jnp.float32, param_dtype=jnp.float32, name: str | None = None,
               axis_name: str = "norm") -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, (axis_name,)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axis_name,)))
