"""Name maps for the SigLIP vision tower and the LLaVA projector (both directions).

HF key layout: checkpoints on the Hub (and Mipha's `...vision_tower.vision_model.`) prefix every key
with `vision_model.`; transformers 5.x `SiglipVisionModel.state_dict()` has no prefix, and its
`from_pretrained` accepts both. We export with `vision_model.` so older transformers load it too.
The attention-pooling head (`head.*`) is not used by LLaVA-style models and is dropped on import.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import numpy as np

from segearth_jax.convert.name_map import (CONV2D, IDENTITY, LINEAR, NameMap, Rule,
                                           SafetensorsReader, save_safetensors)

_LAYER = [  # (ours under encoder/layers, theirs under encoder.layers.{i}., transform)
    ("layer_norm1/scale", "layer_norm1.weight", IDENTITY),
    ("layer_norm1/bias", "layer_norm1.bias", IDENTITY),
    ("self_attn/q_proj/kernel", "self_attn.q_proj.weight", LINEAR),
    ("self_attn/q_proj/bias", "self_attn.q_proj.bias", IDENTITY),
    ("self_attn/k_proj/kernel", "self_attn.k_proj.weight", LINEAR),
    ("self_attn/k_proj/bias", "self_attn.k_proj.bias", IDENTITY),
    ("self_attn/v_proj/kernel", "self_attn.v_proj.weight", LINEAR),
    ("self_attn/v_proj/bias", "self_attn.v_proj.bias", IDENTITY),
    ("self_attn/out_proj/kernel", "self_attn.out_proj.weight", LINEAR),
    ("self_attn/out_proj/bias", "self_attn.out_proj.bias", IDENTITY),
    ("layer_norm2/scale", "layer_norm2.weight", IDENTITY),
    ("layer_norm2/bias", "layer_norm2.bias", IDENTITY),
    ("mlp/fc1/kernel", "mlp.fc1.weight", LINEAR),
    ("mlp/fc1/bias", "mlp.fc1.bias", IDENTITY),
    ("mlp/fc2/kernel", "mlp.fc2.weight", LINEAR),
    ("mlp/fc2/bias", "mlp.fc2.bias", IDENTITY),
]


def _slash(prefix: str) -> str:
  return prefix if not prefix or prefix.endswith("/") else prefix + "/"


def siglip_rules(prefix: str = "vision_model.", ours_prefix: str = "", *,
                 scan_layers: bool = True) -> list[Rule]:
  """HF SiglipVisionModel keys (under `prefix`) <-> our SiglipVisionTower params (under `ours_prefix`).

  `scan_layers=False` maps to the unstacked layout (`encoder/layers_{i}/...`).
  """
  o, t = _slash(ours_prefix), prefix
  rules = [
      Rule(f"{o}embeddings/patch_embedding/kernel", f"{t}embeddings.patch_embedding.weight", CONV2D),
      Rule(f"{o}embeddings/patch_embedding/bias", f"{t}embeddings.patch_embedding.bias"),
      Rule(f"{o}embeddings/position_embedding", f"{t}embeddings.position_embedding.weight"),
  ]
  for ours, theirs, tf in _LAYER:
    if scan_layers:
      rules.append(Rule(f"{o}encoder/layers/{ours}", f"{t}encoder.layers.{{i}}.{theirs}", tf, stack="i"))
    else:
      rules.append(Rule(f"{o}encoder/layers_{{i}}/{ours}", f"{t}encoder.layers.{{i}}.{theirs}", tf))
  rules += [
      Rule(f"{o}post_layernorm/scale", f"{t}post_layernorm.weight"),
      Rule(f"{o}post_layernorm/bias", f"{t}post_layernorm.bias"),
  ]
  return rules


def siglip_ignore(prefix: str = "vision_model.") -> list[str]:
  """Regexes (full match) of HF keys we drop: the pooling head and position-id buffers."""
  p = re.escape(prefix)
  return [rf"{p}head\..*", rf"{p}embeddings\.position_ids"]


def projector_rules(prefix: str = "model.mm_projector.", ours_prefix: str = "") -> list[Rule]:
  """LLaVA `mm_projector` = Sequential(Linear, GELU, Linear): indices 0 and 2 -> fc1, fc2."""
  o = _slash(ours_prefix)
  return [
      Rule(f"{o}fc1/kernel", f"{prefix}0.weight", LINEAR),
      Rule(f"{o}fc1/bias", f"{prefix}0.bias"),
      Rule(f"{o}fc2/kernel", f"{prefix}2.weight", LINEAR),
      Rule(f"{o}fc2/bias", f"{prefix}2.bias"),
  ]


# ---------------------------------------------------------------------- whole-model helpers
_ANCHOR = "embeddings.patch_embedding.weight"


def _to_numpy(t) -> np.ndarray:
  if isinstance(t, np.ndarray):
    return t
  try:
    import torch
  except ImportError:  # pragma: no cover
    torch = None
  if torch is not None and isinstance(t, torch.Tensor):
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits (exact)
      import ml_dtypes
      return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()
  return np.asarray(t)


def _find_prefix(keys) -> str:
  hits = [k[:-len(_ANCHOR)] for k in keys if k.endswith(_ANCHOR)]
  if len(hits) != 1:
    raise ValueError(f"cannot find a single SigLIP vision tower (keys ending in {_ANCHOR!r}): {hits}")
  return hits[0]


def import_siglip(hf_dir_or_state_dict, *, prefix: str | None = None, scan_layers: bool = True,
                  dtype=None) -> dict:
  """HF SigLIP vision weights -> our params (`{'embeddings':..., 'encoder':..., 'post_layernorm':...}`).

  Takes a folder/file of safetensors or a state_dict (torch or numpy values). `prefix` is found from
  the key of the patch embedding when not given, so a SiglipModel / Mipha checkpoint also works (only
  keys under the prefix are read). Tensors are read one at a time.
  """
  if isinstance(hf_dir_or_state_dict, (str, os.PathLike)):
    reader = SafetensorsReader(os.fspath(hf_dir_or_state_dict))
    keys, get = reader.keys(), reader.get
  else:
    sd = hf_dir_or_state_dict
    keys, get = list(sd.keys()), (lambda k: _to_numpy(sd[k]))
  if prefix is None:
    prefix = _find_prefix(keys)
  keys = [k for k in keys if k.startswith(prefix)]
  nm = NameMap(siglip_rules(prefix, scan_layers=scan_layers), ignore=siglip_ignore(prefix))
  params = nm.to_ours(keys, get, dtype=dtype)
  _check_layers(params, scan_layers, prefix)
  return params


def _check_layers(params, scan_layers, prefix):
  """Every layer must have every tensor (a missing last layer would otherwise shorten one stack)."""
  from segearth_jax.convert.name_map import ConversionError, flatten
  enc = params["encoder"]
  if scan_layers:
    depth = {p: a.shape[0] for p, a in flatten(enc["layers"]).items()}
    if len(set(depth.values())) != 1:
      raise ConversionError(f"{prefix}encoder.layers: layer counts differ per tensor: {depth}")
  else:
    want = {p for layer in enc.values() for p in flatten(layer)}
    for name, layer in enc.items():
      miss = want - set(flatten(layer))
      if miss:
        raise ConversionError(f"{prefix}encoder {name}: missing {sorted(miss)}")


def _hf_config_dict(hf_config) -> dict:
  if hasattr(hf_config, "to_dict"):
    d = hf_config.to_dict()
  elif isinstance(hf_config, Mapping):
    d = dict(hf_config)
  else:  # our SiglipConfig dataclass
    import dataclasses
    d = dataclasses.asdict(hf_config)
  if "vision_config" in d:  # a full SiglipConfig (vision + text): keep the vision part
    v = d["vision_config"]
    d = dict(v.to_dict() if hasattr(v, "to_dict") else v)
  d.pop("feature_layer", None)  # ours (LLaVA's select layer), not a SiglipVisionConfig field
  d.pop("transformers_version", None)
  d.update(model_type="siglip_vision_model", architectures=["SiglipVisionModel"],
           vision_use_head=False)  # we carry no pooling head
  return d


def export_siglip(params: Mapping[str, Any], out_dir: str, hf_config, *,
                  prefix: str = "vision_model.", scan_layers: bool = True,
                  max_shard_bytes: int = 4 << 30) -> list[str]:
  """Our params -> `out_dir` with safetensors + config.json that `SiglipVisionModel.from_pretrained`
  loads. `hf_config`: a SiglipVisionConfig, its dict, or our SiglipConfig. Written with
  `vision_use_head=False` (no head weights exist on our side). Returns the safetensors file names."""
  import flax.linen as nn

  params = nn.meta.unbox(params)
  if set(params) == {"params"}:
    params = params["params"]
  nm = NameMap(siglip_rules(prefix, scan_layers=scan_layers), ignore=siglip_ignore(prefix))
  files = save_safetensors(nm.to_theirs(params), out_dir, max_shard_bytes=max_shard_bytes)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(_hf_config_dict(hf_config), f, indent=2, sort_keys=True)
  return files
