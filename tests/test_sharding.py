"""sharding.in_mesh makes flax's constraints real, and a param gathered at use (FSDP) keeps each device on its
own rows: the v5e-256 paper step fell from 15.7 to a few GiB per chip when both held (README, results)."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from segearth_jax import sharding as shd
from segearth_jax.models.layers import dense

ROWS, LENGTH, WIDTH, OUT = 8, 16, 64, 256


def _compiled_text(mesh, module, x_sharding, in_mesh=True):
  x = jax.ShapeDtypeStruct((ROWS, LENGTH, WIDTH), jnp.float32, sharding=x_sharding)
  params = jax.eval_shape(module.init, jax.random.key(0), x)
  shardings = shd.logical_shardings(params, mesh)
  abstract = jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s),
                          nn.unbox(params), shardings)
  fn = jax.jit(lambda p, v: module.apply(p, v).sum())
  if in_mesh:
    with shd.in_mesh(mesh):
      return fn.lower(abstract, x).as_text(), fn.lower(abstract, x).compile().as_text()
  with shd.axis_rules():
    return fn.lower(abstract, x).as_text(), None


def test_gathered_axes_drop_only_the_fsdp_names():
  assert shd.gathered_axes(("embed", "mlp")) == (None, "mlp")
  assert shd.gathered_axes(("layers", "embed", "heads")) == ("layers", None, "heads")
  assert shd.gathered_axes(("head_embed", "head_mlp")) == ("head_embed", "head_mlp")


def test_in_mesh_emits_the_constraints_and_the_kernel_is_gathered_not_the_rows():
  mesh = shd.make_mesh(1, 8, 1)
  layer = dense(OUT, ("embed", "mlp"), name="proj")
  lowered, compiled = _compiled_text(mesh, layer, shd.batch_sharding(mesh, 3))
  assert "sharding_constraint" in lowered          # the kernel's at-use constraint reached the program
  assert "all-gather" in compiled                  # the fsdp-sharded kernel is gathered...
  # ...and each device multiplies its own row (ROWS / 8 = 1): no dot over every row of the batch
  dot_rows = {int(r) for r in re.findall(r"= \w+\[(\d+),\d+\]\{[^}]*\} dot\(", compiled)}
  dot_rows |= {int(r) * LENGTH for r in re.findall(r"= \w+\[(\d+),%d,\d+\]\{[^}]*\} dot\(" % LENGTH, compiled)}
  assert dot_rows and max(dot_rows) <= LENGTH, sorted(dot_rows)


def test_without_the_mesh_flax_drops_the_constraint():
  """The reason for in_mesh: under axis rules alone (or the deprecated ``with mesh:``) flax sees no mesh."""
  mesh = shd.make_mesh(1, 8, 1)
  lowered, _ = _compiled_text(mesh, dense(OUT, ("embed", "mlp")), shd.batch_sharding(mesh, 3), in_mesh=False)
  assert "sharding_constraint" not in lowered


def test_gathered_dense_computes_the_same_values():
  mesh = shd.make_mesh(1, 8, 1)
  layer = dense(OUT, ("embed", "mlp"))
  x = np.random.default_rng(0).standard_normal((ROWS, LENGTH, WIDTH)).astype(np.float32)
  params = nn.unbox(layer.init(jax.random.key(0), x))
  want = np.asarray(x @ np.asarray(params["params"]["kernel"]))
  with shd.in_mesh(mesh):
    got = jax.jit(layer.apply)(params, jax.device_put(x, shd.batch_sharding(mesh, 3)))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
