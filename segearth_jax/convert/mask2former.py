"""Whole Mask2Former checkpoints <-> our MaskHead params ({'swin', 'pixel_decoder', 'mask_decoder'}).

One HF name map (swin_rules + pixel_decoder_rules + mask_decoder_rules) serves both directions and both
transformers classes: ``Mask2FormerModel`` (keys ``pixel_level_module.*``, ``transformer_module.*``) and
``Mask2FormerForUniversalSegmentation`` (the same under ``model.``, plus ``class_predictor.*`` and
``criterion.empty_weight``, which SegEarth-R2 does not use). A detectron2 ``.pkl`` of the original
Mask2Former (read by tensor_io.load_d2_pickle, which refuses a pickle that would run code) is first
renamed to HF keys (d2_swin_to_hf, d2_pixel_decoder_to_hf, d2_mask_decoder_to_hf; its class head dropped),
then goes through the same map. ``mask2former_hf_config`` is the one writer of a Mask2FormerConfig from
our part configs (to-torch uses it).

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

from segearth_jax.convert.mask_decoder_map import (d2_mask_decoder_to_hf, export_unused, mask_decoder_ignore,
                                                   mask_decoder_rules)
from segearth_jax.convert.name_map import ConversionError, NameMap, plain_params
from segearth_jax.convert.pixel_decoder_map import (d2_pixel_decoder_to_hf, pixel_decoder_ignore,
                                                    pixel_decoder_rules)
from segearth_jax.convert.swin_map import d2_swin_to_hf, swin_hf_config, swin_ignore, swin_layout, swin_rules
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
