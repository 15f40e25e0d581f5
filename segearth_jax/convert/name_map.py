"""Declarative checkpoint name maps, used in both directions (MaxText style).

A ``Rule`` pairs one of our param paths ('/'-joined, e.g. ``llm/layers/attn/q_proj/kernel``) with one
external key (e.g. ``model.layers.{i}.self_attn.q_proj.weight``) and a ``Transform`` whose two hooks
are exact inverses (transpose, reshape, ...). Placeholders ``{name}`` match integers. A rule with
``stack='i'`` maps per-layer external tensors onto one array whose leading axis is ``i`` (the layer
axis of ``nn.scan``); otherwise every placeholder must appear on both sides. ``layer_rules`` writes the
rules of one layer list either way: stacked (``model.scan_layers=True``: ``.../layers/...``) or one
subtree per layer (``.../layers_{i}/...``), so every part's map follows ``scan_layers`` the same way.

Import streams: tensors are read one at a time through a getter (tensor_io.open_checkpoint), and a
stacked array is filled in place, so at most one copy of the model is alive. Export yields one external
tensor at a time; ``tensor_io.save_safetensors`` writes them into size-capped shards plus the HF index.

``rename_keys`` is the other declarative table: external key -> external key (detectron2 -> HF names),
with fused tensors split (``q|k|v`` rows) and index offsets (``norm{k}`` -> ``stage{k+1}``).

Every mismatch is a ConversionError (a UserError: one line, naming the checkpoint, the key and what
was expected).
"""
from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import flax.linen as nn
import numpy as np

from segearth_jax.errors import UserError
from segearth_jax.tensor_io import flatten, to_numpy, unflatten

Array = np.ndarray


class ConversionError(UserError):
  """A checkpoint's keys or shapes do not fit a name map."""


def _at(where: str | None, message: str) -> str:
  return f"{where}: {message}" if where else message


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


def template_regex(template: str) -> re.Pattern:
  """A key template -> its full-match regex: ``{p}`` matches 'weight' or 'bias', any other ``{name}`` an
  integer (a named group each)."""
  out, pos = [], 0
  for m in re.finditer(r"\{(\w+)\}", template):
    out.append(re.escape(template[pos:m.start()]))
    out.append("(?P<p>weight|bias)" if m.group(1) == "p" else f"(?P<{m.group(1)}>\\d+)")
    pos = m.end()
  out.append(re.escape(template[pos:]))
  return re.compile("^" + "".join(out) + "$")


@dataclasses.dataclass(frozen=True)
class Rule:
  ours: str
  theirs: str
  transform: Transform = IDENTITY
  stack: str | None = None

  @property
  def theirs_re(self) -> re.Pattern:
    return template_regex(self.theirs)

  @property
  def ours_re(self) -> re.Pattern:
    return template_regex(self.ours)


# ------------------------------------------------------------------ writing rules
# (our path, their key, transform), both relative to a module: the rows of a part's table
Param = tuple[str, str, Transform]


def linear(ours: str, theirs: str) -> list[Param]:
  """torch Linear ``theirs.{weight,bias}`` <-> flax Dense ``ours/{kernel,bias}``."""
  return [(f"{ours}/kernel", f"{theirs}.weight", LINEAR), (f"{ours}/bias", f"{theirs}.bias", IDENTITY)]


def norm(ours: str, theirs: str) -> list[Param]:
  """torch LayerNorm / GroupNorm ``theirs.{weight,bias}`` <-> flax ``ours/{scale,bias}``."""
  return [(f"{ours}/scale", f"{theirs}.weight", IDENTITY), (f"{ours}/bias", f"{theirs}.bias", IDENTITY)]


def rules(ours: str, theirs: str, params: Iterable[Param], *, stack: str | None = None) -> list[Rule]:
  """``params`` under our path prefix ``ours`` and their key prefix ``theirs``."""
  return [Rule(ours + o, theirs + t, tf, stack=stack) for o, t, tf in params]


def layer_rules(ours_layers: str, theirs_layer: str, params: Iterable[Param], *, index: str = "i",
                scan_layers: bool = True) -> list[Rule]:
  """The per-layer ``params`` of a layer list. ``theirs_layer``: the key prefix of layer ``{index}``
  (e.g. 'model.layers.{i}.'); ``ours_layers``: our path of the list (e.g. 'llm/layers'), stacked on the
  nn.scan axis (``scan_layers``) or one subtree per layer (``ours_layers + '_{i}'``)."""
  if scan_layers:
    return rules(f"{ours_layers}/", theirs_layer, params, stack=index)
  return rules(f"{ours_layers}_{{{index}}}/", theirs_layer, params)


def path_prefix(prefix: str) -> str:
  """'' or a path prefix ending in '/'."""
  return prefix if not prefix or prefix.endswith("/") else prefix + "/"


def plain_params(variables: Mapping) -> dict:
  """Our params from a flax variables dict ({'params': ...}) or a params tree, boxed or not."""
  params = nn.meta.unbox(variables)
  return params["params"] if set(params) == {"params"} else params


@dataclasses.dataclass
class NameMap:
  rules: Sequence[Rule]
  # external keys that carry nothing we need (buffers recomputed from config, e.g. position ids)
  ignore: Sequence[str] = ()

  def _ignored(self, key: str) -> bool:
    return any(re.fullmatch(p, key) for p in self.ignore)

  def _closest(self, key: str) -> str:
    return difflib.get_close_matches(key, [r.theirs for r in self.rules], n=1, cutoff=0.0)[0]

  # ---------------------------------------------------------------- import
  def to_ours(self, keys: Iterable[str], get: Callable[[str], Array], *, strict: bool = True,
              dtype=None, where: str | None = None) -> dict:
    """External tensors -> nested dict of our params.

    ``keys``: the external keys present; ``get(key)``: loads one tensor; ``where``: the checkpoint (file
    or folder) errors name. With ``strict``, an external key no rule claims (and not ignored) is an
    error, and so is a rule that matches nothing.
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
          raise ConversionError(_at(where, f"no tensor matches {rule.theirs!r} (expected for our {rule.ours!r})"))
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
            raise ConversionError(_at(where, f"{rule.theirs!r}: layer indices {[i for i, _ in items]} are not "
                                             f"0..{n - 1}"))
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
        raise ConversionError(_at(where, f"layers missing: {short[:5]} have fewer than {n} layers"))
    if strict:
      left = [k for k in keys if k not in claimed and not self._ignored(k)]
      if left:
        raise ConversionError(_at(where, f"{len(left)} tensors have no rule, e.g. {left[:3]}; the closest "
                                         f"expected key to {left[0]!r} is {self._closest(left[0])!r}"))
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


# ------------------------------------------------------------------ key renames (detectron2 -> HF)
# A target: one key template, None (the tensor carries nothing: dropped) or a tuple of n templates (the
# tensor is n equal row blocks fused along axis 0, e.g. q|k|v). Target placeholders may add an offset
# ('{k+1}'); sources may not.
Target = str | tuple[str, ...] | None


def _fill(template: str, groups: Mapping[str, str]) -> str:
  def one(m):
    v = groups[m.group(1)]
    return str(int(v) + int(m.group(2))) if m.group(2) else v
  return re.sub(r"\{(\w+)([+-]\d+)?\}", one, template)


def rename_keys(state: Mapping, pairs: Sequence[tuple[str, Target]], *, src_prefix: str, dst_prefix: str,
                what: str, hint: str = "") -> dict[str, Array]:
  """Tensors under ``src_prefix`` renamed by the first matching (source template, target) pair (see
  ``template_regex``); keys outside ``src_prefix`` are skipped. A key under it that no pair matches, or
  no key under it at all, is a ConversionError naming ``what`` (the checkpoint) and the key."""
  compiled = [(template_regex(a), b) for a, b in pairs]
  out: dict[str, Array] = {}
  found = False
  for key, value in state.items():
    if not key.startswith(src_prefix):
      continue
    found = True
    rel = key[len(src_prefix):]
    for rx, target in compiled:
      m = rx.match(rel)
      if m:
        break
    else:
      raise ConversionError(f"{what}: tensor {key!r} has no mapping{hint} (expected keys like "
                            f"{src_prefix + difflib.get_close_matches(rel, [a for a, _ in pairs], 1, 0.0)[0]!r})")
    if target is None:
      continue
    arr = to_numpy(value)
    if isinstance(target, tuple):
      if arr.shape[0] % len(target):
        raise ConversionError(f"{what}: {key!r} has {arr.shape[0]} rows, not {len(target)} equal blocks")
      for t, part in zip(target, np.split(arr, len(target), axis=0)):
        out[dst_prefix + _fill(t, m.groupdict())] = np.ascontiguousarray(part)
    else:
      out[dst_prefix + _fill(target, m.groupdict())] = arr
  if not found:
    raise ConversionError(f"{what}: no tensors under {src_prefix!r}")
  return out
