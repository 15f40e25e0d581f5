"""Whole Mask2Former checkpoints <-> our MaskHead params ({'swin', 'pixel_decoder', 'mask_decoder'}).

One HF name map (swin_rules + pixel_decoder_rules + mask_decoder_rules) serves both directions and both
transformers classes: ``Mask2FormerModel`` (keys ``pixel_level_module.*``, ``transformer_module.*``) and
``Mask2FormerForUniversalSegmentation`` (the same under ``model.``, plus ``class_predictor.*`` and
``criterion.empty_weight``, which SegEarth-R2 does not use). A detectron2 ``.pkl`` of the original
Mask2Former is first renamed to HF keys (d2_swin_to_hf, d2_pixel_decoder_to_hf, d2_mask_decoder_to_hf),
then goes through the same map.

Unused by SegEarth-R2 and ignored on import: the learned queries ``queries_features`` / ``queries_embedder``
(the queries come from [SEG] tokens with zero position), ``class_predictor``, ``criterion``. Export writes
a ``Mask2FormerModel`` folder with the queries as zeros of shape [num_queries, hidden_dim] and the Swin's
unused final LayerNorm (``swin.layernorm``) at its init values (ones/zeros), so
``Mask2FormerModel.from_pretrained`` finds every key (no missing-key warning); every other tensor
round-trips bit for bit.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import re
from typing import Any, Mapping

import numpy as np

from segearth_jax.convert.mask_decoder_map import (d2_mask_decoder_to_hf, export_unused, mask_decoder_ignore,
                                                   mask_decoder_rules)
from segearth_jax.convert.name_map import NameMap, SafetensorsReader, save_safetensors
from segearth_jax.convert.pixel_decoder_map import (d2_pixel_decoder_to_hf, pixel_decoder_ignore,
                                                    pixel_decoder_rules)
from segearth_jax.convert.swin_map import d2_swin_to_hf, swin_ignore, swin_layout, swin_rules
from segearth_jax.errors import UserError


def _prefixes(universal: bool) -> dict[str, str]:
  p = "model." if universal else ""
  return dict(swin=f"{p}pixel_level_module.encoder.", pixel_decoder=f"{p}pixel_level_module.decoder.",
              mask_decoder=f"{p}transformer_module.")


def mask2former_name_map(universal: bool = False, *, input_projections: bool = False, legacy: bool = True,
                         body: str | None = None, stage_norms: bool = True, scan_layers: bool = True) -> NameMap:
  """HF Mask2Former keys <-> our MaskHead params. ``universal``: Mask2FormerForUniversalSegmentation keys
  (prefix ``model.``); ``input_projections``: the transformer module has its 1x1 input convs; ``legacy``/
  ``body``/``stage_norms``: the Swin key layout (see swin_map; save_pretrained writes legacy=True)."""
  px = _prefixes(universal)
  rules = [*swin_rules(px["swin"], "swin/", legacy=legacy, body=body, stage_norms=stage_norms,
                       scan_layers=scan_layers),
           *pixel_decoder_rules(px["pixel_decoder"], "pixel_decoder/"),
           *mask_decoder_rules(px["mask_decoder"], "mask_decoder/", input_projections=input_projections)]
  ignore = [*swin_ignore(px["swin"]), *pixel_decoder_ignore(px["pixel_decoder"]),
            *mask_decoder_ignore(px["mask_decoder"])]
  # the class head and loss buffer of ForUniversalSegmentation (also what d2_to_hf makes of class_embed)
  ignore += [r"class_predictor\.(weight|bias)", r"criterion\..*"]
  return NameMap(rules, ignore)


# ------------------------------------------------------------------------------- detectron2 pickle
_ALLOWED_GLOBALS = {
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
    if (module, name) in _ALLOWED_GLOBALS or (module.startswith("numpy") and name.endswith("DType")):
      return super().find_class(module, name)
    raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a weights pickle")


def load_d2_pickle(path: str) -> dict[str, np.ndarray]:
  """detectron2 checkpoint ``{'model': {name: ndarray}, ...}`` -> its ``model`` dict, safely."""
  try:
    with open(path, "rb") as f:
      obj = _RestrictedUnpickler(io.BufferedReader(f), encoding="latin1").load()
  except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError) as e:
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


# d2 state outside the three modules that carries nothing (loss buffers, image normalisation).
_D2_SKIP = re.compile(r"(criterion\..*|pixel_mean|pixel_std)")


def d2_to_hf(d2: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A detectron2 Mask2Former state dict -> ``Mask2FormerModel`` keys (+ ``class_predictor.*``)."""
  px = _prefixes(False)
  out = {**d2_swin_to_hf(d2, px["swin"]), **d2_pixel_decoder_to_hf(d2, hf_prefix=px["pixel_decoder"]),
         **d2_mask_decoder_to_hf(d2, px["mask_decoder"])}
  known = ("backbone.", "sem_seg_head.pixel_decoder.", "sem_seg_head.predictor.")
  left = [k for k in d2 if not k.startswith(known) and not _D2_SKIP.fullmatch(k)]
  if left:
    raise UserError(f"detectron2 checkpoint: {len(left)} tensors belong to no Mask2Former part, e.g. {left[:5]}")
  return out


# ------------------------------------------------------------------------------- import / export
def import_mask2former(path: str, *, scan_layers: bool = True, dtype=None) -> dict:
  """An HF folder (save_pretrained of Mask2FormerModel / ...ForUniversalSegmentation, safetensors) or a
  detectron2 ``.pkl`` -> our MaskHead params {'swin', 'pixel_decoder', 'mask_decoder'} (numpy)."""
  path = os.fspath(path)
  if path.endswith(".pkl"):
    sd = d2_to_hf(load_d2_pickle(path))
    keys, get = list(sd), sd.__getitem__
    where = path
  else:
    if not os.path.exists(path):
      raise UserError(f"{path}: no such file or folder (expected an HF Mask2Former folder or a detectron2 .pkl)")
    reader = SafetensorsReader(path)
    keys, get, where = reader.keys(), reader.get, path
  universal = any(k.startswith("model.pixel_level_module.") for k in keys)
  px = _prefixes(universal)
  if not any(k.startswith(px["mask_decoder"]) for k in keys):
    raise UserError(f"{where}: no Mask2Former transformer module keys ({px['mask_decoder']}*)")
  lay = swin_layout(keys, px["swin"])
  nm = mask2former_name_map(universal, input_projections=any(
      k.startswith(px["mask_decoder"] + "input_projections.") for k in keys),
      legacy=lay["legacy"], body=lay["body"], stage_norms=lay["stage_norms"], scan_layers=scan_layers)
  try:
    return nm.to_ours(keys, get, dtype=dtype)
  except ValueError as e:
    raise UserError(f"{where}: {e}") from e


def _hf_config_dict(hf_config) -> dict:
  if isinstance(hf_config, (str, os.PathLike)):
    with open(hf_config) as f:
      return json.load(f)
  if hasattr(hf_config, "to_json_string"):   # a transformers config: its JSON form, nested configs included
    return json.loads(hf_config.to_json_string(use_diff=False))
  return dict(hf_config)


def export_mask2former(params: Mapping[str, Any], out_dir: str, hf_config, *,
                       scan_layers: bool = True) -> list[str]:
  """Our MaskHead params -> ``out_dir`` with safetensors + config.json that ``Mask2FormerModel.from_pretrained``
  loads. ``hf_config``: a transformers Mask2FormerConfig (or its dict / config.json path) describing the
  same shapes. The learned queries are written as zeros (SegEarth-R2 has none)."""
  import flax.linen as nn

  params = nn.meta.unbox(params)
  if set(params) == {"params"}:
    params = params["params"]
  cfg = _hf_config_dict(hf_config)
  px = _prefixes(False)
  nm = mask2former_name_map(False, input_projections="input_proj_0" in params["mask_decoder"],
                            scan_layers=scan_layers)

  def tensors():
    for k, v in nm.to_theirs(params):
      yield k, np.asarray(v, np.float32)   # a no-op for float32 params: the round trip stays bit-exact
    yield from export_unused(px["mask_decoder"], int(cfg.get("num_queries", 100)), int(cfg["hidden_dim"]))
    # SwinModel's final LayerNorm: HF's backbone holds it but never applies it; written at its init values
    last = max((k for k in params["swin"] if k.startswith("norm_stage")), key=lambda k: int(k[10:]))
    c = np.asarray(params["swin"][last]["scale"]).shape[0]
    yield px["swin"] + "swin.layernorm.weight", np.ones((c,), np.float32)
    yield px["swin"] + "swin.layernorm.bias", np.zeros((c,), np.float32)

  files = save_safetensors(tensors(), out_dir)
  cfg["architectures"] = ["Mask2FormerModel"]
  cfg.setdefault("model_type", "mask2former")
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(cfg, f, indent=2, sort_keys=True, default=str)
  return files
