"""orbax checkpoints: the train state and the grain iterator state, saved together per step.

Frozen params (SigLIP, Swin, the LLM base: most of the 3B) do not change, so they are written once to
``workdir/frozen`` instead of into every step's checkpoint. Restores go straight into the sharded layout
of the abstract state handed in.

``BestCheckpointer``: ``workdir/best``, a workdir of its own holding the one step with the highest eval
metric (orbax best_fn, max_to_keep 1): best/checkpoints/<step> (state['params'] only), and, written by the
trainer, best/config.json and best/frozen -> ../frozen, so `segearth eval --workdir W/best` loads it while
``--workdir W`` keeps loading the latest step.
"""
from __future__ import annotations

import math
import os

import grain
import jax
import orbax.checkpoint as ocp


def abstract_like(tree):
  """ShapeDtypeStructs carrying each array's sharding: the target of a sharded restore."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpointer:
  def __init__(self, workdir: str, *, keep: int = 3, every: int = 500, async_save: bool = True):
    self.workdir = os.path.abspath(workdir)
    self.manager = ocp.CheckpointManager(
        os.path.join(self.workdir, "checkpoints"),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=max(every, 1),
                                             enable_async_checkpointing=async_save, create=True),
        item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator=None, *, force: bool = False) -> bool:
    items = dict(state=ocp.args.StandardSave(state))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, abstract_state, data_iterator=None):
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    return self.manager.restore(step, args=ocp.args.Composite(**items)).state

  def restore_params(self, step: int, abstract_params):
    """Only ``state['params']`` of a step: eval, predict and ``init_from`` need no optimizer state, and a
    run saved with another optimizer chain (or none of its state) still loads."""
    item = dict(params=abstract_params)
    args = ocp.args.PyTreeRestore(item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                  partial_restore=True)
    return self.manager.restore(step, args=ocp.args.Composite(state=args)).state["params"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()

  # frozen params: once per workdir ---------------------------------------------------------------
  @property
  def frozen_dir(self) -> str:
    return os.path.join(self.workdir, "frozen")

  def has_frozen(self) -> bool:
    return os.path.isdir(self.frozen_dir)

  def save_frozen(self, frozen) -> None:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(self.frozen_dir, frozen)

  def restore_frozen(self, abstract_frozen):
    with ocp.StandardCheckpointer() as ckptr:
      return ckptr.restore(self.frozen_dir, abstract_frozen)


class BestCheckpointer:
  """The trainable params of the step whose eval ``metric`` is highest so far (NaN counts as the lowest).
  Every process calls ``save`` with the same value (the eval result is reduced across processes)."""

  def __init__(self, workdir: str, metric: str, *, async_save: bool = True):
    self.dir = os.path.join(os.path.abspath(workdir), "best")
    self.metric = metric
    self.manager = ocp.CheckpointManager(
        os.path.join(self.dir, "checkpoints"),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, best_fn=lambda m: m[metric], best_mode="max",
                                             enable_async_checkpointing=async_save, create=True),
        item_names=("state",))

  def best_step(self) -> int | None:
    return self.manager.best_step()

  def save(self, step: int, params, value: float) -> None:
    if step in self.manager.all_steps():   # a step redone after a restart: same params, already scored
      return
    value = float(value)
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(dict(params=params))),
                      metrics={self.metric: value if math.isfinite(value) else -1e30}, force=True)

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
