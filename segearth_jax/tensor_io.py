"""Tensor files and param trees: the I/O under both our weights folder (weights.py) and the converters.

  flatten(tree) / unflatten(flat)     nested dict <-> {'a/b/c': array} ('/'-joined param paths)
  SafetensorsReader(path)             every tensor of a file or a (sharded, indexed) HF folder, read lazily
  save_safetensors(tensors, out_dir)  (key, array) pairs -> model.safetensors or size-capped shards + index
  to_numpy(tensor)                    a torch tensor / numpy array / array-like -> numpy (the one rule below)
  load_d2_pickle(path)                a detectron2 ``.pkl`` -> {name: ndarray}, with a restricted unpickler
  open_checkpoint(src)                any checkpoint we import -> Checkpoint(keys, get, where, format)

``to_numpy``: numpy arrays pass through unchanged; torch tensors are detached, moved to the CPU and keep
their dtype, except bfloat16, which numpy lacks: it becomes float32 (exact: every bfloat16 value is a
float32 value). Importers cast afterwards when a ``dtype`` is asked for.

``open_checkpoint`` sources: a folder of safetensors (one file or shards + ``model.safetensors.index.json``)
or of ``pytorch_model*.bin``; one ``.safetensors``, ``.bin``/``.pt``/``.pth`` (``torch.load`` with
``weights_only=True``; a top-level 'state_dict' / 'module' / 'model' dict is unwrapped) or detectron2 ``.pkl``
file; or an in-memory state dict (torch or numpy values). Tensors are read one at a time where the format
allows (safetensors); errors are UserErrors that name the file.

A pickle is a program: ``load_d2_pickle`` builds only builtin containers/scalars, numpy arrays and dtypes,
and refuses every other global (``os.system``, ``builtins.open``, ...) before anything runs.
"""
from __future__ import annotations

import dataclasses
import glob
import io
import json
import os
import pickle
from typing import Callable, Iterable, Mapping

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from segearth_jax.errors import UserError

Array = np.ndarray


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Array]:
  out = {}
  for k, v in tree.items():
    path = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, Mapping):
      out.update(flatten(v, path))
    else:
      out[path] = v
  return out


def unflatten(flat: Mapping[str, Array]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    node = out
    parts = path.split("/")
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = v
  return out


def to_numpy(tensor) -> Array:
  """torch tensor / numpy array / array-like -> numpy; torch bfloat16 -> float32 (exact), else same dtype."""
  if isinstance(tensor, np.ndarray):
    return tensor
  if hasattr(tensor, "detach"):  # torch.Tensor (torch itself is an optional dependency)
    tensor = tensor.detach().cpu()
    if str(tensor.dtype) == "torch.bfloat16":
      tensor = tensor.float()
    return tensor.numpy()
  return np.asarray(tensor)


# -------------------------------------------------------------------- safetensors I/O
class SafetensorsReader:
  """All tensors of a HF folder (single file or sharded with an index), read lazily one at a time, as
  numpy arrays (``framework='np'``) or torch tensors ('pt', for the PyTorch side)."""

  def __init__(self, path: str, framework: str = "np"):
    path = os.fspath(path)
    self._framework = framework
    if not os.path.exists(path):
      raise UserError(f"{path}: no such safetensors file or folder")
    if os.path.isfile(path):
      files = [path]
    else:
      index = os.path.join(path, "model.safetensors.index.json")
      if os.path.isfile(index):
        with open(index) as f:
          files = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(path, f) for f in files]
      else:
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
      raise UserError(f"{path}: no .safetensors files")
    self._where: dict[str, str] = {}
    for f in files:
      try:
        with safe_open(f, "np") as h:
          for k in h.keys():
            self._where[k] = f
      except Exception as e:  # safetensors raises its own error types for a damaged header
        raise UserError(f"{f}: not a readable safetensors file ({e})") from e
    self._handles: dict[str, object] = {}

  def keys(self) -> list[str]:
    return list(self._where)

  def get(self, key: str) -> Array:
    f = self._where[key]
    if f not in self._handles:
      self._handles[f] = safe_open(f, self._framework).__enter__()
    return self._handles[f].get_tensor(key)


def save_safetensors(tensors: Iterable[tuple[str, Array]], out_dir: str, *,
                     max_shard_bytes: int = 4 << 30, metadata: dict | None = None) -> list[str]:
  """Writes tensors into ``model.safetensors`` or size-capped shards + ``model.safetensors.index.json``."""
  os.makedirs(out_dir, exist_ok=True)
  shards: list[dict[str, Array]] = [{}]
  size = 0
  tmp_names = []
  weight_map = {}
  total = 0

  def flush():
    nonlocal size
    if not shards[-1]:
      return
    name = f"model-{len(tmp_names) + 1:05d}.safetensors"
    save_file(shards[-1], os.path.join(out_dir, name), metadata=metadata or {"format": "pt"})
    for k in shards[-1]:
      weight_map[k] = name
    tmp_names.append(name)
    shards[-1] = {}
    size = 0

  for key, arr in tensors:
    arr = np.ascontiguousarray(arr)
    if size and size + arr.nbytes > max_shard_bytes:
      flush()
    shards[-1][key] = arr
    size += arr.nbytes
    total += arr.nbytes
  flush()
  if len(tmp_names) == 1:
    os.replace(os.path.join(out_dir, tmp_names[0]), os.path.join(out_dir, "model.safetensors"))
    return ["model.safetensors"]
  n = len(tmp_names)
  final = {}
  for i, name in enumerate(tmp_names):
    new = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
    os.replace(os.path.join(out_dir, name), os.path.join(out_dir, new))
    final[name] = new
  with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total},
               "weight_map": {k: final[v] for k, v in weight_map.items()}}, f, indent=2)
  return list(final.values())


# -------------------------------------------------------------------- detectron2 pickle
_PICKLE_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("collections", "OrderedDict"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"), ("builtins", "complex"),
    ("builtins", "bytearray"),
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Builds only builtins and numpy arrays/dtypes: a checkpoint cannot run code while it loads."""

  def find_class(self, module, name):
    if (module, name) in _PICKLE_GLOBALS or (module.startswith("numpy") and name.endswith("DType")):
      return super().find_class(module, name)
    raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a weights pickle")


def load_d2_pickle(path: str) -> dict[str, Array]:
  """detectron2 checkpoint ``{'model': {name: ndarray}, ...}`` (or the bare dict) -> its ``model`` dict."""
  path = os.fspath(path)
  try:
    with open(path, "rb") as f:
      obj = _RestrictedUnpickler(io.BufferedReader(f), encoding="latin1").load()
  except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, ValueError) as e:
    raise UserError(f"{path}: cannot read the detectron2 pickle: {e}") from e
  if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
    obj = obj["model"]
  if not isinstance(obj, Mapping):
    raise UserError(f"{path}: expected {{'model': {{name: array}}}}, got {type(obj).__name__}")
  out = {}
  for k, v in obj.items():
    if not isinstance(v, np.ndarray):
      raise UserError(f"{path}: record 'model', field {k!r} is a {type(v).__name__}, not a numpy array")
    out[str(k)] = v
  return out


# -------------------------------------------------------------------- torch files
def torch_state_dict(path: str) -> dict:
  """A ``.bin`` / ``.pt`` state dict, loaded with ``weights_only=True`` (no code runs); unwraps a top-level
  'state_dict' / 'module' / 'model' dict (DeepSpeed, Lightning, detectron2-style wrappers)."""
  try:
    import torch
  except ImportError as e:
    raise UserError(f"{path}: reading a .bin/.pt checkpoint needs torch (or convert it to safetensors)") from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many kinds (pickle, zip, weights_only refusals)
    raise UserError(f"{path}: cannot read the torch checkpoint: {e}") from e
  for k in ("state_dict", "module", "model"):
    if isinstance(obj, Mapping) and isinstance(obj.get(k), Mapping):
      obj = obj[k]
  if not isinstance(obj, Mapping):
    raise UserError(f"{path}: expected a state dict, got {type(obj).__name__}")
  return dict(obj)


# -------------------------------------------------------------------- one checkpoint source
@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """The tensors of one checkpoint: ``keys``, ``get(key)`` -> numpy (see ``to_numpy``), ``where`` (the file
  or folder, for errors; 'state dict' for an in-memory one) and ``format`` ('safetensors', 'torch',
  'detectron2' or 'state dict': detectron2 keys need renaming before an HF name map applies)."""
  keys: list[str]
  get: Callable[[str], Array]
  where: str
  format: str

  def as_dict(self) -> dict[str, Array]:
    return {k: self.get(k) for k in self.keys}


def _in_memory(state: Mapping, where: str, format: str) -> Checkpoint:
  return Checkpoint(list(state), lambda k: to_numpy(state[k]), where, format)


def _safetensors(path: str) -> Checkpoint:
  reader = SafetensorsReader(path)
  return Checkpoint(reader.keys(), reader.get, path, "safetensors")


def open_checkpoint(src) -> Checkpoint:
  """A checkpoint folder, file or in-memory state dict -> Checkpoint (the sources: module docstring)."""
  if isinstance(src, Checkpoint):
    return src
  if isinstance(src, Mapping):
    return _in_memory(src, "state dict", "state dict")
  path = os.fspath(src)
  if not os.path.exists(path):
    raise UserError(f"{path}: no such checkpoint file or folder")
  if os.path.isdir(path):
    if glob.glob(os.path.join(path, "*.safetensors")):
      return _safetensors(path)
    bins = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
    if not bins:
      raise UserError(f"{path}: no *.safetensors or pytorch_model*.bin files")
    state = {}
    for b in bins:
      state.update(torch_state_dict(b))
    return _in_memory(state, path, "torch")
  if path.endswith(".safetensors"):
    return _safetensors(path)
  if path.endswith(".pkl"):
    return _in_memory(load_d2_pickle(path), path, "detectron2")
  if path.endswith((".bin", ".pt", ".pth")):
    return _in_memory(torch_state_dict(path), path, "torch")
  raise UserError(f"{path}: unknown checkpoint format (expected a folder, .safetensors, .bin/.pt/.pth or a "
                  f"detectron2 .pkl)")
