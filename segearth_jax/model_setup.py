"""The model on a mesh, without an optimizer: what eval, predict, conversion and benchmarks need.

``ModelSetup.create(config, mesh=None, vocab_size=None)`` builds, once per run:
  model             SegEarthR2 from ``config.model`` (the vocab grown to fit ``vocab_size`` tokens)
  mesh              the config's (data, fsdp, tensor) mesh unless one is handed in
  param_shardings   NamedSharding per param, from the logical-axis rule table (sharding.py)
  abstract_params   ShapeDtypeStructs (unboxed) carrying those shardings: the target of every restore
``init_params(seed)`` draws random params straight into their shardings. The training setup
(train.TrainSetup) builds on this one and adds the optimizer, the state shardings and the jitted step.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax

from segearth_jax import sharding as shd
from segearth_jax.data.batch import dummy_batch
from segearth_jax.models.segearth import SegEarthR2, build_model


def with_shardings(tree, shardings):
  """ShapeDtypeStructs of ``tree``'s leaves carrying the matching ``shardings``."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


@dataclasses.dataclass
class ModelSetup:
  config: Any                    # the experiment ConfigDict
  mesh: jax.sharding.Mesh
  model: SegEarthR2
  param_shardings: Any
  abstract_params: Any

  @classmethod
  def create(cls, config, mesh=None, vocab_size: int | None = None, **extra) -> "ModelSetup":
    mesh = mesh or shd.mesh_from_config(config.mesh)
    model = build_model(config.model, vocab_size)
    boxed = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                           init_batch(config))["params"]
    param_shardings = shd.logical_shardings(boxed, mesh)
    abstract = with_shardings(nn.unbox(boxed), param_shardings)
    return cls(config, mesh, model, param_shardings, abstract, **extra)

  @property
  def num_heads(self) -> int:
    return self.model.config.llm.num_attention_heads

  def batch_sharding(self, ndim: int) -> jax.sharding.NamedSharding:
    """Leading (batch) axis over the data-parallel mesh axes: handed to data.batch.global_batch."""
    return shd.batch_sharding(self.mesh, ndim)

  def init_params(self, seed: int):
    """Random params, each drawn on the devices of its sharding (nothing is built on one host first)."""
    batch = init_batch(self.config)

    def init(key):
      return nn.unbox(self.model.init(key, batch, train=False))["params"]

    with shd.in_mesh(self.mesh):
      return jax.jit(init, out_shardings=self.param_shardings)(jax.random.key(seed))


def init_batch(config) -> dict:
  """The smallest batch the model initialises from (one row at the shortest bucket)."""
  return dummy_batch(config, 1, min(config.data.text_buckets))
