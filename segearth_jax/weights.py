"""Our params on disk: the weights folder and the training workdir, below the trainer and the converters.

Weights folder W (framework neutral; written by `segearth convert from-hf|from-authors`, read by
`--weights W` and `train.init_from=W`):
  W/config.json                    the full experiment config (data.tokenizer points at W/tokenizer)
  W/model.safetensors(+ .index)    every param of SegEarthR2, keyed by its '/'-joined param path
  W/tokenizer/                     the tokenizer with [SEG] and <image>
  W/segearth_weights.json          marker + how it was made
Training workdir (train.py): config.json, checkpoints/ (orbax: state['params'] = the trainable params, their
optimizer state, step, rng; the grain iterator state) and frozen/ (the frozen params, written once).

Both are accepted wherever a path to params is: ``restore_params(setup, path)`` places them in the setup's
shardings; ``load_params(path)`` returns host numpy arrays. The run's own config (``load_run_config``) says
how the stored params are split and shaped, whatever config the caller runs with.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Iterable, Mapping

import jax
import ml_collections
import numpy as np

from segearth_jax import sharding as shd
from segearth_jax.checkpointing import Checkpointer
from segearth_jax.config import apply_overrides, read_json
from segearth_jax.data.tokenizer import load_tokenizer
from segearth_jax.errors import UserError
from segearth_jax.experiment import base_config
from segearth_jax.model_setup import ModelSetup
from segearth_jax.optim import merge_params, split_params
from segearth_jax.tensor_io import SafetensorsReader, flatten, save_safetensors, unflatten

log = logging.getLogger(__name__)

MARKER = "segearth_weights.json"
CONFIG = "config.json"


def is_weights_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, MARKER))


def is_workdir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, CONFIG)) and not is_weights_dir(path)


def save_weights(params: Mapping, config, out_dir: str, tokenizer=None, *, note: dict | None = None) -> None:
  """Writes a weights folder. ``config``: the experiment ConfigDict; ``tokenizer``: saved to W/tokenizer."""
  os.makedirs(out_dir, exist_ok=True)
  save_safetensors(((k, np.asarray(jax.device_get(v))) for k, v in flatten(params).items()), out_dir)
  cfg = json.loads(json.dumps(config.to_dict() if hasattr(config, "to_dict") else dict(config), default=list))
  if tokenizer is not None:
    tok_dir = os.path.join(out_dir, "tokenizer")
    tokenizer.save_pretrained(tok_dir)
    cfg["data"]["tokenizer"] = os.path.abspath(tok_dir)
  cfg["train"]["init_from"] = ""
  with open(os.path.join(out_dir, CONFIG), "w") as f:
    json.dump(cfg, f, indent=2)
  with open(os.path.join(out_dir, MARKER), "w") as f:
    json.dump(dict(format="segearth-weights", version=1, **(note or {})), f, indent=2)


def save_run_config(config, workdir: str) -> None:
  """The config a training workdir runs with (eval, predict and export read it back)."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, CONFIG), "w") as f:
    f.write(config.to_json_best_effort(indent=2))


def load_run_config(path: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """The config stored with a weights folder or a training workdir, with ``--config.a.b=v`` overrides."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise UserError(f"{path}: no such weights folder or workdir")
  file = os.path.join(path, CONFIG)
  if not os.path.isfile(file):
    raise UserError(f"{path}: no {CONFIG}: neither a weights folder ({MARKER}) nor a training workdir")
  config = with_current_fields(read_json(file), file)
  apply_overrides(config, overrides)
  return config


def with_current_fields(stored: dict, where: str) -> ml_collections.ConfigDict:
  """A stored run config on today's fields: a field added since it was written takes the base config's
  default, a field that no longer exists is dropped; both are named in a warning. The model section is
  kept whole (it says what the params are)."""
  base = base_config().to_dict()
  added, dropped = [], []

  def merge(into: dict, have: dict, prefix: str):
    for k in sorted(set(into) | set(have)):
      name = f"{prefix}{k}"
      if k not in have:
        added.append(name)
      elif k not in into:
        dropped.append(name)
      elif isinstance(into[k], dict) and into[k] and isinstance(have[k], dict) and name != "model":
        merge(into[k], have[k], name + ".")
      else:   # a value, the model section, or a free-form mapping (e.g. train.lr_scale): as stored
        into[k] = have[k]

  merge(base, stored, "")
  if added or dropped:
    log.warning("%s was written by another version: fields added with defaults %s, dropped %s",
                where, added, dropped)
  return ml_collections.ConfigDict(base)


def check_params(flat: Mapping, abstract_params, what: str) -> None:
  """Every param the model has, no other, each with the model's shape; the error names what differs."""
  want = flatten(abstract_params)
  missing = sorted(set(want) - set(flat))
  extra = sorted(set(flat) - set(want))
  wrong = [f"{k}: {tuple(np.shape(flat[k]))} vs the model's {tuple(want[k].shape)}"
           for k in sorted(set(want) & set(flat)) if tuple(np.shape(flat[k])) != tuple(want[k].shape)]
  if missing or extra or wrong:
    raise UserError(f"{what}: the params do not fit the config's model: missing {missing[:5]}, unexpected "
                    f"{extra[:5]}, shape mismatches {wrong[:5]}")


def restore_params(setup: ModelSetup, path: str):
  """A weights folder or a training workdir -> (params in ``setup.param_shardings``, step or None)."""
  path = os.fspath(path)
  if is_weights_dir(path):
    reader = SafetensorsReader(path)
    flat = {k: reader.get(k) for k in reader.keys()}
    check_params(flat, setup.abstract_params, path)
    target = flatten(setup.abstract_params)
    return unflatten({k: jax.device_put(np.asarray(v, target[k].dtype), target[k].sharding)
                      for k, v in flat.items()}), None
  if is_workdir(path):
    return _restore_workdir(setup, path)
  raise UserError(f"{path}: neither a weights folder ({MARKER}) nor a training workdir ({CONFIG})")


def _restore_workdir(setup: ModelSetup, workdir: str):
  """Latest checkpoint's trainable params + frozen/, restored straight into the setup's shardings (no
  optimizer state, nothing initialised first). The split is the one the workdir was trained with."""
  trainable = load_run_config(workdir).train.trainable
  ckpt = Checkpointer(workdir, async_save=False)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise UserError(f"{workdir}: no checkpoint found (train first)")
    abstract_train, abstract_frozen = split_params(setup.abstract_params, trainable)
    params = ckpt.restore_params(step, abstract_train)
    frozen = {}
    if jax.tree.leaves(abstract_frozen):
      if not ckpt.has_frozen():
        raise UserError(f"{workdir}: the run freezes parts of the model but the workdir has no frozen/ params")
      frozen = ckpt.restore_frozen(abstract_frozen)
  finally:
    ckpt.close()
  return merge_params(params, frozen), step


def vocab_size_of(config) -> int:
  return len(load_tokenizer(config.data.tokenizer))


def load_params(path: str) -> dict:
  """A weights folder or a training workdir -> nested dict of host numpy arrays (every param)."""
  path = os.fspath(path)
  if is_weights_dir(path):
    reader = SafetensorsReader(path)
    return unflatten({k: reader.get(k) for k in reader.keys()})
  config = load_run_config(path)
  mesh = shd.single_device_mesh()
  setup = ModelSetup.create(config, mesh=mesh, vocab_size=vocab_size_of(config))
  params, _ = restore_params(setup, path)
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params)
