"""Sharded train steps equal the unsharded step (issue 6: fsdp=4 x tensor=2, fsdp=8 and data=8 on 8 CPU
devices), and no device's program computes on the whole batch's rows."""
import re

import jax
import numpy as np
import pytest

from segearth_jax import sharding as shd
from segearth_jax.train import TrainSetup

from train_fixtures import random_batch, tiny_config


def _run(config, mesh, batches):
  setup = TrainSetup.create(config, mesh=mesh)
  state, frozen = setup.init_state(0)
  step = setup.jit_train_step(batches[0])
  losses, compiled = [], None
  for b in batches:
    gb = {k: jax.device_put(v, shd.batch_sharding(mesh, v.ndim)) for k, v in b.items()}
    with shd.in_mesh(mesh):
      compiled = compiled or step.lower(state, frozen, gb).compile()
      state, metrics = compiled(state, frozen, gb)
    losses.append(jax.device_get(metrics))
  return losses, jax.device_get(state["params"]), compiled.as_text()


@pytest.fixture(scope="module")
def reference():
  config = tiny_config("--config.loss.lambda_s=0.5", "--config.train.lr=1e-4")
  batches = [random_batch(config, 8, seed=s) for s in (0, 1)]
  mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  return config, batches, _run(config, mesh, batches)


@pytest.mark.parametrize("axes", [dict(data=1, fsdp=4, tensor=2), dict(data=1, fsdp=8, tensor=1),
                                  dict(data=8, fsdp=1, tensor=1)])
def test_sharded_steps_equal_unsharded(reference, axes):
  config, batches, (ref_metrics, ref_params, _) = reference
  assert all(np.isfinite(m["loss"]) for m in ref_metrics)
  assert ref_metrics[0]["ls"] != 0.0 and ref_metrics[0]["bce"] > 0  # every term is live
  metrics, params, hlo = _run(config, shd.make_mesh(**axes), batches)
  if axes["tensor"] == 1:
    # one row per device: no value holds all 8 rows' features at the text length. Without the mesh set for flax
    # (sharding.in_mesh) and the weights gathered at use, XLA split the projections on the fsdp-sharded
    # width and every device computed [8, L, width / 8] for the whole batch (the v5e-256 paper step:
    # 12.5 GiB of lm_head partials per chip). With tensor=2 the embedding lookup is still split that way
    # (cheap: [8, L, width / fsdp], no partial sums), so that case is not checked.
    L = batches[0]["input_ids"].shape[1]
    widths = [int(w) for w in re.findall(rf"\[8,{L},(\d+)\]", hlo)]
    assert max(widths, default=1) == 1, widths   # [8, L, 1]: per-token scalars of the loss, gathered
  for m, r in zip(metrics, ref_metrics):
    for k in ("loss", "text", "bce", "dice", "ls", "grad_norm"):
      np.testing.assert_allclose(m[k], r[k], rtol=1e-5, atol=1e-5, err_msg=k)
  # Params: Adam divides each gradient element by its own magnitude, so an element whose gradient is float
  # noise (the key-projection bias, whose exact gradient is 0 because softmax ignores it; a rare token's
  # embedding entries) moves by ~lr whatever the reduction order made its sign. So: every element within the
  # Adam bound (lr per step), and all but a handful equal to 1e-5.
  flat_ref = jax.tree_util.tree_leaves_with_path(ref_params)
  flat = dict(jax.tree_util.tree_leaves_with_path(params))
  bound = config.train.lr * len(batches) * 1.01
  off, total = 0, 0
  for path, r in flat_ref:
    name = jax.tree_util.keystr(path)
    diff = np.abs(np.asarray(flat[path]) - np.asarray(r))
    assert diff.max() <= bound, name
    off += int(np.sum(diff > 1e-5 + 1e-5 * np.abs(r)))
    total += diff.size
  assert total > 10_000
  assert off <= 1e-4 * total, f"{off} of {total} param elements differ by more than 1e-5"
