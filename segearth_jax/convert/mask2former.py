"""Whole Mask2Former checkpoints <-> our MaskHead params ({'swin', 'pixel_decoder', 'mask_decoder'}).

One HF name map (swin_rules + pixel_decoder_rules + mask_decoder_rules) serves both directions and both
transformers classes: ``Mask2FormerModel`` (keys ``pixel_level_module.*``, ``transformer_module.*``) and
``Mask2FormerForUniversalSegmentation`` (the same under ``model.``, plus ``class_predictor.*`` and
``criterion.empty_weight``, which SegEarth-R2 does not use). A detectron2 ``.pkl`` of the original
Mask2Former (read by tensor_io.load_d2_pickle, which refuses a pickle that would run code) is first
renamed to HF keys (d2_swin_to_hf, d2_pixel_decoder_to_hf, d2_mask_decoder_to_hf; its class head dropped),
then goes through the same map. ``mask2former_hf_config`` is the one writer of a Mask2FormerConfig from
our part configs (to-torch uses it); ``mask2former_model_fields`` reads the other way, the part configs a
checkpoint fixes (from its config.json, or from its tensors where it has none, as a detectron2 .pkl).

Unused by SegEarth-R2 and ignored on import: the learned queries ``queries_features`` / ``queries_embedder``
(the queries come from [SEG] tokens with zero position), ``class_predictor``, ``criterion``. Export writes
a ``Mask2FormerModel`` folder with the queries as zeros of shape [num_queries, hidden_dim] and the Swin's
unused final LayerNorm (``swin.layernorm``) at its init values (ones/zeros), so
``Mask2FormerModel.from_pretrained`` finds every key (no missing-key warning); every other tensor
round-trips bit for bit.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import numpy as np
from transformers import Mask2FormerConfig

from segearth_jax.convert.mask_decoder_map import (d2_mask_decoder_to_hf, export_unused, mask_decoder_ignore,
                                                   mask_decoder_rules)
from segearth_jax.convert.name_map import ConversionError, NameMap, plain_params
from segearth_jax.convert.pixel_decoder_map import (d2_pixel_decoder_to_hf, pixel_decoder_ignore,
                                                    pixel_decoder_rules)
from segearth_jax.convert.swin_map import d2_swin_to_hf, swin_hf_config, swin_ignore, swin_layout, swin_rules
from segearth_jax.errors import UserError
from segearth_jax.models.mask_decoder import MaskDecoderConfig
from segearth_jax.models.pixel_decoder import PixelDecoderConfig
from segearth_jax.models.swin import SwinConfig
from segearth_jax.tensor_io import Checkpoint, open_checkpoint, save_safetensors


def _prefixes(universal: bool) -> dict[str, str]:
  p = "model." if universal else ""
  return dict(swin=f"{p}pixel_level_module.encoder.", pixel_decoder=f"{p}pixel_level_module.decoder.",
              mask_decoder=f"{p}transformer_module.")


def mask2former_name_map(universal: bool = False, *, input_projections: bool = False, legacy: bool = True,
                         body: str | None = None, stage_norms: bool = True, scan_layers: bool = True,
                         mask_embed_layers: int = 3) -> NameMap:
  """HF Mask2Former keys <-> our MaskHead params. ``universal``: Mask2FormerForUniversalSegmentation keys
  (prefix ``model.``); ``input_projections``: the transformer module has its 1x1 input convs; ``legacy``/
  ``body``/``stage_norms``: the Swin key layout (see swin_map; save_pretrained writes legacy=True)."""
  px = _prefixes(universal)
  rules = [*swin_rules(px["swin"], "swin/", legacy=legacy, body=body, stage_norms=stage_norms,
                       scan_layers=scan_layers),
           *pixel_decoder_rules(px["pixel_decoder"], "pixel_decoder/"),
           *mask_decoder_rules(px["mask_decoder"], "mask_decoder/", input_projections=input_projections,
                               mask_embed_layers=mask_embed_layers)]
  ignore = [*swin_ignore(px["swin"]), *pixel_decoder_ignore(px["pixel_decoder"]),
            *mask_decoder_ignore(px["mask_decoder"])]
  # the class head and loss buffer of ForUniversalSegmentation
  ignore += [r"class_predictor\.(weight|bias)", r"criterion\..*"]
  return NameMap(rules, ignore)


# ------------------------------------------------------------------------------- detectron2
# d2 state outside the three modules that carries nothing (loss buffers, image normalisation).
_D2_SKIP = re.compile(r"(criterion\..*|pixel_mean|pixel_std)")
_D2_PARTS = ("backbone.", "sem_seg_head.pixel_decoder.", "sem_seg_head.predictor.")


def d2_to_hf(d2: Mapping[str, np.ndarray], where: str = "detectron2 checkpoint") -> dict[str, np.ndarray]:
  """A detectron2 Mask2Former state dict -> ``Mask2FormerModel`` keys."""
  px = _prefixes(False)
  left = [k for k in d2 if not k.startswith(_D2_PARTS) and not _D2_SKIP.fullmatch(k)]
  if left:
    raise ConversionError(f"{where}: {len(left)} tensors belong to no Mask2Former part, e.g. {left[:5]} "
                          f"(expected keys under {list(_D2_PARTS)})")
  try:
    return {**d2_swin_to_hf(d2, px["swin"]), **d2_pixel_decoder_to_hf(d2, hf_prefix=px["pixel_decoder"]),
            **d2_mask_decoder_to_hf(d2, px["mask_decoder"])}
  except ConversionError as e:
    raise ConversionError(f"{where}: {e}") from e


# ------------------------------------------------------------------------------- import / export
def import_mask2former(src, *, scan_layers: bool = True, dtype=None) -> dict:
  """An HF folder (save_pretrained of Mask2FormerModel / ...ForUniversalSegmentation, safetensors), a
  detectron2 ``.pkl`` or any other tensor_io.open_checkpoint source -> our MaskHead params {'swin',
  'pixel_decoder', 'mask_decoder'} (numpy). ``scan_layers``: the Swin blocks stacked or ``blocks_{j}``."""
  ckpt: Checkpoint = open_checkpoint(src)
  keys, get, where = ckpt.keys, ckpt.get, ckpt.where
  if ckpt.format == "detectron2":
    hf = d2_to_hf(ckpt.as_dict(), where)
    keys, get = list(hf), hf.__getitem__
  universal = any(k.startswith("model.pixel_level_module.") for k in keys)
  px = _prefixes(universal)
  if not any(k.startswith(px["mask_decoder"]) for k in keys):
    raise ConversionError(f"{where}: no Mask2Former transformer module keys ({px['mask_decoder']}*)")
  lay = swin_layout(keys, px["swin"], where)
  names = mask2former_name_map(universal, input_projections=any(
      k.startswith(px["mask_decoder"] + "input_projections.") for k in keys),
      legacy=lay["legacy"], body=lay["body"], stage_norms=lay["stage_norms"], scan_layers=scan_layers)
  return names.to_ours(keys, get, dtype=dtype, where=where)


# ------------------------------------------------------------------------------- model config fields
# (our field, its Mask2FormerConfig key, type) per part. swin.image_size (the canvas the Swin reads) is the
# experiment's choice: no weight depends on it.
_HF_FIELDS = {
    "swin": [(f, "backbone_config." + f, t) for f, t in (
        ("patch_size", int), ("embed_dim", int), ("depths", tuple), ("num_heads", tuple), ("window_size", int),
        ("mlp_ratio", float), ("layer_norm_eps", float), ("hidden_act", str))],
    "pixel_decoder": [(f, f, int) for f in ("feature_size", "mask_feature_size", "encoder_layers",
                                             "num_attention_heads", "encoder_feedforward_dim")],
    "mask_decoder": [("hidden_dim", "hidden_dim", int), ("num_layers", "decoder_layers", int),
                     ("num_attention_heads", "num_attention_heads", int),
                     ("dim_feedforward", "dim_feedforward", int), ("pre_norm", "pre_norm", bool)],
}


def _typed(value, kind: type, where: str, key: str):
  """``value`` as ``kind`` (an int is a float; a list of ints is a tuple), else a UserError naming the key."""
  is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
  if kind is tuple and isinstance(value, (list, tuple)) and value and all(is_int(v) for v in value):
    return tuple(value)
  if kind is float and (is_int(value) or isinstance(value, float)):
    return float(value)
  if (kind is int and is_int(value)) or (kind in (bool, str) and isinstance(value, kind)):
    return value
  want = "a list of ints" if kind is tuple else kind.__name__
  raise UserError(f"{where}: {key!r} is {value!r}, expected {want}")


def _lookup(d, key: str):
  """``d['a']['b']`` for the key 'a.b'; None where a level is missing."""
  for k in key.split("."):
    if not isinstance(d, dict) or k not in d:
      return None
    d = d[k]
  return d


def _fields_from_config_json(path: str) -> dict:
  """A transformers Mask2Former config.json -> {part: {field: value}} (transformers' defaults for absent keys)."""
  try:
    with open(path) as f:
      raw = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: not a readable JSON file ({e})") from e
  if not isinstance(raw, dict) or raw.get("model_type") != "mask2former":
    got = raw.get("model_type") if isinstance(raw, dict) else type(raw).__name__
    raise UserError(f"{path}: 'model_type' is {got!r}, expected 'mask2former' (a transformers Mask2Former config)")
  backbone = raw.get("backbone_config") or {}
  if not isinstance(backbone, dict) or backbone.get("model_type", "swin") != "swin":
    got = backbone.get("model_type") if isinstance(backbone, dict) else backbone
    raise UserError(f"{path}: 'backbone_config.model_type' is {got!r}, expected 'swin' (the only backbone supported)")
  for key, want in (("use_absolute_embeddings", False), ("qkv_bias", True)):
    if backbone.get(key, want) != want:
      raise UserError(f"{path}: 'backbone_config.{key}' is {backbone[key]!r}, expected {want} (Mask2Former's Swin)")
  for rows in _HF_FIELDS.values():   # the keys we read, checked before transformers sees them
    for _, key, kind in rows:
      if _lookup(raw, key) is not None:
        _typed(_lookup(raw, key), kind, path, key)
  try:
    d = Mask2FormerConfig.from_dict(raw).to_dict()   # transformers' defaults for the keys it lacks
  except Exception as e:  # transformers' config validation raises its own error types, over several lines
    raise UserError(f"{path}: not a valid Mask2Former config ({' '.join(str(e).split())})") from e
  out = {part: {ours: _typed(_lookup(d, key), kind, path, key) for ours, key, kind in rows}
         for part, rows in _HF_FIELDS.items()}
  out["mask_decoder"]["num_layers"] -= 1   # HF's decoder_layers counts the prediction before the first layer
  return out


def layer_count(tree: Mapping, name: str, leaf: tuple[str, ...]) -> int:
  """Layers of the list ``name`` in our params: the leading axis of a stacked ``name`` (nn.scan), else the
  number of ``name_{i}`` subtrees."""
  if name in tree:
    node = tree[name]
    for k in leaf:
      node = node[k]
    return int(np.shape(node)[0])
  return sum(bool(re.fullmatch(rf"{name}_\d+", k)) for k in tree)


def first_layer(tree: Mapping, name: str) -> tuple[Mapping, bool]:
  """(the subtree of layer 0 of the list ``name``, whether its leaves carry the stacked layer axis)."""
  return (tree[name], True) if name in tree else (tree[f"{name}_0"], False)


def _fields_from_tensors(params: Mapping, base) -> dict:
  """Our MaskHead params -> {part: {field: value}} for the fields the tensors fix. Settings no tensor shows
  (the decoders' head counts but the pixel decoder's, pre_norm, eps, activations) stay ``base``'s."""
  sw, pd, md = params["swin"], params["pixel_decoder"], params["mask_decoder"]
  kernel = np.shape(sw["patch_embed"]["kernel"])             # [p, p, C, embed_dim]
  stages = sorted((k for k in sw if re.fullmatch(r"stage\d+", k)), key=lambda k: int(k[5:]))
  depths, heads = [], []
  for s in stages:
    depths.append(layer_count(sw[s], "blocks", ("fc1", "kernel")))
    block, stacked = first_layer(sw[s], "blocks")
    table = np.shape(block["attention"]["relative_position_bias_table"])[int(stacked):]   # [(2w-1)**2, heads]
    heads.append(int(table[1]))
  side = int(round(np.sqrt(table[0])))
  fc1 = np.shape(block["fc1"]["kernel"])[int(stacked):]       # of the last stage: [dim, mlp_ratio * dim]
  swin = dict(patch_size=int(kernel[0]), embed_dim=int(kernel[-1]), depths=tuple(depths), num_heads=tuple(heads),
              window_size=(side + 1) // 2, mlp_ratio=fc1[1] / fc1[0])
  enc = pd["encoder"]                                         # always stacked: [layers, ...]
  weights = int(np.shape(enc["self_attn"]["attention_weights"]["kernel"])[-1])   # heads * levels * points
  per_head = int(base.pixel_decoder.num_feature_levels) * int(base.pixel_decoder.encoder_n_points)
  if weights % per_head:
    raise UserError(f"Mask2Former pixel decoder: attention_weights has {weights} outputs, not a multiple of "
                    f"num_feature_levels * encoder_n_points = {per_head}")
  pixel_decoder = dict(feature_size=int(np.shape(pd["input_proj_0"]["conv"]["kernel"])[-1]),
                       mask_feature_size=int(np.shape(pd["mask_projection"]["kernel"])[-1]),
                       encoder_layers=int(np.shape(enc["fc1"]["kernel"])[0]),
                       encoder_feedforward_dim=int(np.shape(enc["fc1"]["kernel"])[-1]),
                       num_attention_heads=weights // per_head)
  mask_decoder = dict(hidden_dim=int(np.shape(md["layernorm"]["scale"])[0]),
                      num_layers=layer_count(md, "layers", ("fc1", "kernel")),
                      dim_feedforward=int(np.shape(first_layer(md, "layers")[0]["fc1"]["kernel"])[-1]))
  return dict(swin=swin, pixel_decoder=pixel_decoder, mask_decoder=mask_decoder)


def mask2former_model_fields(src, params: Mapping, base) -> dict:
  """The model config fields a Mask2Former checkpoint fixes: {part: {field: value}} for the parts 'swin',
  'pixel_decoder', 'mask_decoder' (names as presets.py). ``src``: the checkpoint imported as ``params`` (our
  MaskHead params). An HF folder's config.json gives them; without one (a detectron2 .pkl, a bare file, a
  state dict) the tensors do, and the settings no tensor shows stay ``base``'s (the model ConfigDict).
  mask_embed_layers and enforce_input_projection (not in HF's config) always come from the tensors."""
  path = os.path.join(src, "config.json") if isinstance(src, (str, os.PathLike)) and os.path.isdir(src) else None
  fields = _fields_from_config_json(path) if path and os.path.isfile(path) else _fields_from_tensors(params, base)
  md = params["mask_decoder"]
  fields["mask_decoder"]["mask_embed_layers"] = sum(bool(re.fullmatch(r"mask_embedder_\d+", k))
                                                    for k in md["mask_predictor"])
  if "input_proj_0" in md and fields["pixel_decoder"]["feature_size"] == fields["mask_decoder"]["hidden_dim"]:
    fields["mask_decoder"]["enforce_input_projection"] = True   # HF adds them only then, or when widths differ
  return fields


def mask2former_hf_config(swin: SwinConfig, pixel_decoder: PixelDecoderConfig, mask_decoder: MaskDecoderConfig, *,
                          num_queries: int = 1) -> dict:
  """Our Swin / pixel decoder / mask decoder configs -> a transformers Mask2FormerConfig dict. HF has one
  head count for both decoders: the pixel decoder's (to-torch rebuilds the mask decoder when they differ).
  ``num_queries``: HF's learned queries, which SegEarth-R2 replaces by [SEG] queries (exported as zeros)."""
  backbone = swin_hf_config(swin)
  backbone.pop("architectures")
  pd, md = pixel_decoder, mask_decoder
  return dict(backbone_config=backbone, feature_size=pd.feature_size, mask_feature_size=pd.mask_feature_size,
              hidden_dim=md.hidden_dim, encoder_feedforward_dim=pd.encoder_feedforward_dim,
              encoder_layers=pd.encoder_layers, decoder_layers=md.num_layers + 1,
              num_attention_heads=pd.num_attention_heads, dim_feedforward=md.dim_feedforward,
              pre_norm=md.pre_norm, enforce_input_projection=md.enforce_input_projection,
              common_stride=pd.common_stride, feature_strides=list(pd.feature_strides), num_queries=num_queries,
              dropout=0.0, use_auxiliary_loss=False)


def _as_dict(hf_config) -> dict:
  if isinstance(hf_config, (str, os.PathLike)):
    with open(hf_config) as f:
      return json.load(f)
  if hasattr(hf_config, "to_json_string"):   # a transformers config: its JSON form, nested configs included
    return json.loads(hf_config.to_json_string(use_diff=False))
  return dict(hf_config)


def export_mask2former(params: Mapping[str, Any], out_dir: str, hf_config, *,
                       scan_layers: bool = True) -> list[str]:
  """Our MaskHead params -> ``out_dir`` with safetensors + config.json that ``Mask2FormerModel.from_pretrained``
  loads. ``hf_config``: a transformers Mask2FormerConfig, its dict (e.g. ``mask2former_hf_config``) or a
  config.json path, describing the same shapes. The learned queries are written as zeros (SegEarth-R2 has
  none)."""
  params = plain_params(params)
  cfg = _as_dict(hf_config)
  px = _prefixes(False)
  names = mask2former_name_map(False, input_projections="input_proj_0" in params["mask_decoder"],
                               scan_layers=scan_layers)

  def tensors():
    for k, v in names.to_theirs(params):
      yield k, np.asarray(v, np.float32)   # a no-op for float32 params: the round trip stays bit-exact
    yield from export_unused(px["mask_decoder"], int(cfg.get("num_queries", 100)), int(cfg["hidden_dim"]))
    yield from unused_swin_norm(px["swin"] + "swin.", params["swin"])

  files = save_safetensors(tensors(), out_dir)
  cfg["architectures"] = ["Mask2FormerModel"]
  cfg.setdefault("model_type", "mask2former")
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(cfg, f, indent=2, sort_keys=True, default=str)
  return files


def unused_swin_norm(prefix: str, swin_params: Mapping):
  """SwinModel's final LayerNorm (``{prefix}layernorm.*``): HF's backbone holds it but never applies it;
  written at its init values (ones / zeros) so a strict load finds it."""
  last = max((k for k in swin_params if k.startswith("norm_stage")), key=lambda k: int(k[len("norm_stage"):]))
  c = np.asarray(swin_params[last]["scale"]).shape[0]
  yield prefix + "layernorm.weight", np.ones((c,), np.float32)
  yield prefix + "layernorm.bias", np.zeros((c,), np.float32)
