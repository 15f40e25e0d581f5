"""Declarative checkpoint name maps, used in both directions (MaxText style).

A ``Rule`` pairs one of our param paths ('/'-joined, e.g. ``llm/layers/attn/q_proj/kernel``) with one
external key (e.g. ``model.layers.{i}.self_attn.q_proj.weight``) and a ``Transform`` whose two hooks
are exact inverses (transpose, reshape, ...). Placeholders ``{name}`` match integers. A rule with
``stack='i'`` maps per-layer external tensors onto one array whose leading axis is ``i`` (the layer
axis of ``nn.scan``); otherwise every placeholder must appear on both sides.

Import streams: tensors are read one at a time through a getter (e.g. a safetensors ``safe_open``), and a
stacked array is filled in place, so at most one copy of the model is alive. Export yields one external
tensor at a time; ``save_safetensors`` writes them into size-capped shards plus the HF index file.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

Array = np.ndarray


@dataclasses.dataclass(frozen=True)
class Transform:
  to_ours: Callable[[Array], Array]
  to_theirs: Callable[[Array], Array]


IDENTITY = Transform(lambda x: x, lambda x: x)
# torch.nn.Linear.weight is (out, in); flax Dense kernel is (in, out).
LINEAR = Transform(lambda w: np.ascontiguousarray(w.T), lambda k: np.ascontiguousarray(k.T))
# torch Conv2d weight OIHW <-> flax Conv kernel HWIO.
CONV2D = Transform(lambda w: np.ascontiguousarray(w.transpose(2, 3, 1, 0)),
                   lambda k: np.ascontiguousarray(k.transpose(3, 2, 0, 1)))


def reshape(ours_shape: Callable[[tuple], tuple], theirs_shape: Callable[[tuple], tuple],
            inner: Transform = IDENTITY) -> Transform:
  """Reshape after/before ``inner``; each shape function takes the source shape."""
  return Transform(lambda x: inner.to_ours(x).reshape(ours_shape(x.shape)),
                   lambda y: inner.to_theirs(y.reshape(theirs_shape(y.shape))))


def chain(*ts: Transform) -> Transform:
  def fwd(x):
    for t in ts:
      x = t.to_ours(x)
    return x

  def inv(y):
    for t in reversed(ts):
      y = t.to_theirs(y)
    return y

  return Transform(fwd, inv)


@dataclasses.dataclass(frozen=True)
class Rule:
  ours: str
  theirs: str
  transform: Transform = IDENTITY
  stack: str | None = None

  def _regex(self, template: str, sep: str) -> re.Pattern:
    out, pos = [], 0
    for m in re.finditer(r"\{(\w+)\}", template):
      out.append(re.escape(template[pos:m.start()]))
      out.append(f"(?P<{m.group(1)}>\\d+)")
      pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("^" + "".join(out) + "$")

  @property
  def theirs_re(self) -> re.Pattern:
    return self._regex(self.theirs, ".")

  @property
  def ours_re(self) -> re.Pattern:
    return self._regex(self.ours, "/")


class ConversionError(ValueError):
  pass


@dataclasses.dataclass
class NameMap:
  rules: Sequence[Rule]
  # external keys that carry nothing we need (buffers recomputed from config, e.g. position ids)
  ignore: Sequence[str] = ()

  def _ignored(self, key: str) -> bool:
    return any(re.fullmatch(p, key) for p in self.ignore)

  # ---------------------------------------------------------------- import
  def to_ours(self, keys: Iterable[str], get: Callable[[str], Array], *, strict: bool = True,
              dtype=None) -> dict:
    """External tensors -> nested dict of our params.

    ``keys``: the external keys present; ``get(key)``: loads one tensor. With ``strict``, an external
    key no rule claims (and not ignored) is an error, and so is a rule that matches nothing.
    """
    keys = list(keys)
    claimed: set[str] = set()
    flat: dict[str, Array] = {}
    # external layer list (theirs up to '{stack}', e.g. 'model.layers.') -> {path: layers found}: every
    # tensor stacked from one list must have all its layers (lists may differ, e.g. Swin stages)
    stack_len: dict[str, dict[str, int]] = {}
    for rule in self.rules:
      rx = rule.theirs_re
      hits = []
      for k in keys:
        m = rx.match(k)
        if m:
          hits.append((k, {n: int(v) for n, v in m.groupdict().items()}))
      if not hits:
        if strict:
          raise ConversionError(f"no tensor matches {rule.theirs!r} (for {rule.ours!r})")
        continue
      for k, _ in hits:
        claimed.add(k)
      if rule.stack:
        groups: dict[str, list] = {}
        lists: dict[str, str] = {}
        head = rule.theirs[:rule.theirs.index("{" + rule.stack + "}")]
        for k, idx in hits:
          rest = {n: v for n, v in idx.items() if n != rule.stack}
          groups.setdefault(rule.ours.format(**rest), []).append((idx[rule.stack], k))
          lists[rule.ours.format(**rest)] = head.format(**rest)
        for path, items in groups.items():
          items.sort()
          n = items[-1][0] + 1
          if [i for i, _ in items] != list(range(n)):
            raise ConversionError(f"{rule.theirs!r}: layer indices {[i for i, _ in items]} are not 0..{n-1}")
          first = rule.transform.to_ours(get(items[0][1]))
          out = np.empty((n,) + first.shape, dtype if dtype is not None else first.dtype)
          out[0] = first
          for i, k in items[1:]:
            out[i] = rule.transform.to_ours(get(k))
          flat[path] = out
          stack_len.setdefault(lists[path], {})[path] = n
      else:
        for k, idx in hits:
          arr = rule.transform.to_ours(get(k))
          flat[rule.ours.format(**idx)] = arr.astype(dtype) if dtype is not None else arr
    for lens in stack_len.values():
      if len(set(lens.values())) > 1:
        n = max(lens.values())
        short = sorted(p for p, v in lens.items() if v < n)
        raise ConversionError(f"layers missing: {short[:5]} have fewer than {n} layers")
    if strict:
      left = [k for k in keys if k not in claimed and not self._ignored(k)]
      if left:
        raise ConversionError(f"{len(left)} tensors have no rule, e.g. {left[:5]}")
    return unflatten(flat)

  # ---------------------------------------------------------------- export
  def to_theirs(self, params: Mapping) -> Iterator[tuple[str, Array]]:
    """Our params -> (external key, tensor), one at a time, in rule order."""
    flat = flatten(params)
    used: set[str] = set()
    for rule in self.rules:
      rx = rule.ours_re
      for path in flat:
        m = rx.match(path)
        if not m:
          continue
        used.add(path)
        idx = {n: int(v) for n, v in m.groupdict().items()}
        arr = np.asarray(flat[path])
        if rule.stack:
          for i in range(arr.shape[0]):
            yield rule.theirs.format(**idx, **{rule.stack: i}), rule.transform.to_theirs(arr[i])
        else:
          yield rule.theirs.format(**idx), rule.transform.to_theirs(arr)
    left = [p for p in flat if p not in used]
    if left:
      raise ConversionError(f"{len(left)} of our params have no rule, e.g. {left[:5]}")


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


# -------------------------------------------------------------------- safetensors I/O
class SafetensorsReader:
  """All tensors of a HF folder (single file or sharded with an index), read lazily one at a time."""

  def __init__(self, path: str):
    from safetensors import safe_open

    self._open = safe_open
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
      raise ConversionError(f"{path}: no .safetensors files")
    self._where: dict[str, str] = {}
    for f in files:
      with safe_open(f, "np") as h:
        for k in h.keys():
          self._where[k] = f
    self._handles: dict[str, object] = {}

  def keys(self) -> list[str]:
    return list(self._where)

  def get(self, key: str) -> Array:
    f = self._where[key]
    if f not in self._handles:
      self._handles[f] = self._open(f, "np").__enter__()
    return self._handles[f].get_tensor(key)


def save_safetensors(tensors: Iterable[tuple[str, Array]], out_dir: str, *,
                     max_shard_bytes: int = 4 << 30, metadata: dict | None = None) -> list[str]:
  """Writes tensors into ``model.safetensors`` or size-capped shards + ``model.safetensors.index.json``."""
  from safetensors.numpy import save_file

  os.makedirs(out_dir, exist_ok=True)
  shards: list[dict[str, Array]] = [{}]
  size = 0
  tmp_names = []
  weight_map = {}
  total = 0

  def flush(final=False):
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
