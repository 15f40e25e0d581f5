"""Name maps for the SigLIP vision tower and the LLaVA projector (both directions), and the SigLIP HF config.

HF key layout: checkpoints on the Hub (and Mipha's `...vision_tower.vision_model.`) prefix every key
with `vision_model.`; transformers 5.x `SiglipVisionModel.state_dict()` has no prefix, and its
`from_pretrained` accepts both. We export with `vision_model.` so older transformers load it too.
The attention-pooling head (`head.*`) is not used by LLaVA-style models and is dropped on import.
`siglip_hf_config` is the one SigLIP config writer (the SigLIP export, Mipha's vision_tower, to-torch).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Mapping

from segearth_jax.convert.name_map import (CONV2D, ConversionError, NameMap, Rule, layer_rules, linear, norm,
                                           path_prefix, plain_params, rules)
from segearth_jax.models.siglip import SiglipConfig
from segearth_jax.tensor_io import flatten, open_checkpoint, save_safetensors

# one encoder layer: (ours under encoder/layers, theirs under encoder.layers.{i}., transform)
_LAYER = [*norm("layer_norm1", "layer_norm1"),
          *[p for n in ("q_proj", "k_proj", "v_proj", "out_proj")
            for p in linear(f"self_attn/{n}", f"self_attn.{n}")],
          *norm("layer_norm2", "layer_norm2"), *linear("mlp/fc1", "mlp.fc1"), *linear("mlp/fc2", "mlp.fc2")]


def siglip_rules(prefix: str = "vision_model.", ours_prefix: str = "", *,
                 scan_layers: bool = True) -> list[Rule]:
  """HF SiglipVisionModel keys (under `prefix`) <-> our SiglipVisionTower params (under `ours_prefix`).

  `scan_layers=False` maps to the unstacked layout (`encoder/layers_{i}/...`).
  """
  o, t = path_prefix(ours_prefix), prefix
  return [
      Rule(f"{o}embeddings/patch_embedding/kernel", f"{t}embeddings.patch_embedding.weight", CONV2D),
      Rule(f"{o}embeddings/patch_embedding/bias", f"{t}embeddings.patch_embedding.bias"),
      Rule(f"{o}embeddings/position_embedding", f"{t}embeddings.position_embedding.weight"),
      *layer_rules(f"{o}encoder/layers", f"{t}encoder.layers.{{i}}.", _LAYER, scan_layers=scan_layers),
      *rules(o, t, norm("post_layernorm", "post_layernorm")),
  ]


def siglip_ignore(prefix: str = "vision_model.") -> list[str]:
  """Regexes (full match) of HF keys we drop: the pooling head and position-id buffers."""
  p = re.escape(prefix)
  return [rf"{p}head\..*", rf"{p}embeddings\.position_ids"]


def projector_rules(prefix: str = "model.mm_projector.", ours_prefix: str = "") -> list[Rule]:
  """LLaVA `mm_projector` = Sequential(Linear, GELU, Linear): indices 0 and 2 -> fc1, fc2."""
  return rules(path_prefix(ours_prefix), prefix, [*linear("fc1", "0"), *linear("fc2", "2")])


# ---------------------------------------------------------------------- whole-tower helpers
_ANCHOR = "embeddings.patch_embedding.weight"


def _find_prefix(keys, where: str) -> str:
  hits = [k[:-len(_ANCHOR)] for k in keys if k.endswith(_ANCHOR)]
  if len(hits) != 1:
    raise ConversionError(f"{where}: cannot find a single SigLIP vision tower (keys ending in {_ANCHOR!r}): {hits}")
  return hits[0]


def import_siglip(src, *, prefix: str | None = None, scan_layers: bool = True, dtype=None) -> dict:
  """HF SigLIP vision weights -> our params (`{'embeddings':..., 'encoder':..., 'post_layernorm':...}`).

  `src`: any tensor_io.open_checkpoint source (a folder/file of safetensors, a state dict of torch or
  numpy values, ...). `prefix` is found from the key of the patch embedding when not given, so a
  SiglipModel / Mipha checkpoint also works (only keys under the prefix are read, one at a time).
  """
  ckpt = open_checkpoint(src)
  if prefix is None:
    prefix = _find_prefix(ckpt.keys, ckpt.where)
  keys = [k for k in ckpt.keys if k.startswith(prefix)]
  names = NameMap(siglip_rules(prefix, scan_layers=scan_layers), ignore=siglip_ignore(prefix))
  params = names.to_ours(keys, ckpt.get, dtype=dtype, where=ckpt.where)
  _check_layers(params, scan_layers, f"{ckpt.where}: {prefix}encoder")
  return params


def _check_layers(params, scan_layers, what):
  """Every layer must have every tensor (a missing last layer would otherwise shorten one stack)."""
  enc = params["encoder"]
  if scan_layers:
    depth = {p: a.shape[0] for p, a in flatten(enc["layers"]).items()}
    if len(set(depth.values())) != 1:
      raise ConversionError(f"{what}.layers: layer counts differ per tensor: {depth}")
  else:
    want = {p for layer in enc.values() for p in flatten(layer)}
    for name, layer in enc.items():
      miss = want - set(flatten(layer))
      if miss:
        raise ConversionError(f"{what} {name}: missing {sorted(miss)}")


def siglip_hf_config(config) -> dict:
  """A transformers SiglipVisionConfig dict (no pooling head) from our SiglipConfig, or normalised from a
  transformers SiglipVisionConfig / SiglipConfig or their dict (a full SiglipConfig gives its vision part)."""
  if isinstance(config, SiglipConfig):
    d = dataclasses.asdict(config)
  else:
    d = dict(config.to_dict() if hasattr(config, "to_dict") else config)
  if "vision_config" in d:
    v = d["vision_config"]
    d = dict(v.to_dict() if hasattr(v, "to_dict") else v)
  d.pop("feature_layer", None)  # ours (LLaVA's select layer), not a SiglipVisionConfig field
  d.pop("transformers_version", None)
  d.update(model_type="siglip_vision_model", architectures=["SiglipVisionModel"],
           vision_use_head=False)  # we carry no pooling head
  return d


def export_siglip(params: Mapping[str, Any], out_dir: str, config, *,
                  prefix: str = "vision_model.", scan_layers: bool = True,
                  max_shard_bytes: int = 4 << 30) -> list[str]:
  """Our params -> `out_dir` with safetensors + config.json that `SiglipVisionModel.from_pretrained`
  loads. `config`: our SiglipConfig or a transformers config / dict (see `siglip_hf_config`). Written
  with `vision_use_head=False` (no head weights exist on our side). Returns the safetensors file names."""
  names = NameMap(siglip_rules(prefix, scan_layers=scan_layers), ignore=siglip_ignore(prefix))
  files = save_safetensors(names.to_theirs(plain_params(params)), out_dir, max_shard_bytes=max_shard_bytes)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(siglip_hf_config(config), f, indent=2, sort_keys=True)
  return files
