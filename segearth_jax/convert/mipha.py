"""Mipha / LLaVA-Phi checkpoints (vision tower + mm_projector + Phi-2 in one safetensors set) <-> our
MLLM params {'vision', 'projector', 'llm'}.

Key layout (public `zhuyiche/llava-phi`, mipha/model): MiphaPhiForCausalLM.model is a PhiModel that also
holds `vision_tower` (a SigLIP tower whose transformer is `.vision_model`) and `mm_projector`
(Sequential(Linear, GELU, Linear) for 'mlp2x_gelu'); lm_head has a bias. So:
  model.vision_tower.vision_model.*   -> vision/*
  model.mm_projector.{0,2}.*          -> projector/fc1, fc2
  model.embed_tokens / model.layers.{i} / model.final_layernorm, lm_head.*  -> llm/*
config.json: a PhiConfig (model_type 'mipha_phi') plus vision_config = {'vision_tower': {SigLIP fields,
mm_vision_select_layer, ...}, 'mm_projector': {'mm_projector_type', 'mm_hidden_size', 'hidden_size'}}.
`mipha_model_fields` reads it into our model config's vision / llm fields (the checkpoint's shapes: a
from-hf import takes them from here, not from the experiment file).
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import ml_collections

from segearth_jax import presets
from segearth_jax.config import read_json
from segearth_jax.convert import name_map as nm
from segearth_jax.convert.phi_map import (ROTARY_BUFFERS, attach_lora, phi_rules, read_peft_adapter,
                                          write_peft_adapter)
from segearth_jax.convert.siglip_map import projector_rules, siglip_hf_config, siglip_ignore, siglip_rules
from segearth_jax.errors import UserError
from segearth_jax.models import lora as lora_lib
from segearth_jax.models.lora import LoraConfig, split_lora
from segearth_jax.models.phi import PhiConfig
from segearth_jax.models.siglip import SiglipConfig
from segearth_jax.tensor_io import open_checkpoint, save_safetensors

VISION_PREFIX = "model.vision_tower.vision_model."
PROJECTOR_PREFIX = "model.mm_projector."


def mipha_name_map(*, scan_layers: bool = True) -> nm.NameMap:
  rules = (phi_rules("model.", "lm_head.", ours="llm/", scan_layers=scan_layers)
           + siglip_rules(VISION_PREFIX, "vision", scan_layers=scan_layers)
           + projector_rules(PROJECTOR_PREFIX, "projector"))
  return nm.NameMap(rules, ignore=(*siglip_ignore(VISION_PREFIX), ROTARY_BUFFERS))


_REQUIRED = object()
# (key, type, default) of the Phi fields of a Mipha config.json; defaults are PhiConfig's (transformers')
_PHI_KEYS = (("vocab_size", int, _REQUIRED), ("hidden_size", int, _REQUIRED), ("intermediate_size", int, _REQUIRED),
             ("num_hidden_layers", int, _REQUIRED), ("num_attention_heads", int, _REQUIRED),
             ("num_key_value_heads", int, None), ("layer_norm_eps", float, 1e-5),
             ("max_position_embeddings", int, 2048), ("hidden_act", str, "gelu_new"))
# the same for vision_config.vision_tower (SigLIP); defaults are transformers' SiglipVisionConfig's
_SIGLIP_KEYS = (("hidden_size", int, _REQUIRED), ("intermediate_size", int, _REQUIRED),
                ("num_hidden_layers", int, _REQUIRED), ("num_attention_heads", int, _REQUIRED),
                ("image_size", int, _REQUIRED), ("patch_size", int, _REQUIRED), ("num_channels", int, 3),
                ("layer_norm_eps", float, 1e-6), ("hidden_act", str, "gelu_pytorch_tanh"))


def _entry(d: Mapping, key: str, kind: type, default, where: str, path: str = ""):
  """``d[key]`` checked against ``kind`` (a float field takes an int); ``default`` when absent (``_REQUIRED``:
  an error). Errors name the file, the key and what was expected."""
  name = path + key
  if key not in d or d[key] is None:
    if default is _REQUIRED:
      raise UserError(f"{where}: no {name!r} (expected {kind.__name__}, a Mipha/LLaVA-Phi config.json)")
    return default
  v = d[key]
  ok = isinstance(v, kind) and not isinstance(v, bool)
  if kind is float and isinstance(v, int) and not isinstance(v, bool):
    v, ok = float(v), True
  if not ok:
    raise UserError(f"{where}: {name!r} is {v!r}, expected {kind.__name__}")
  return v


def mipha_model_fields(src: Mapping | str) -> dict:
  """A Mipha config.json (a folder, the file's path, or its parsed dict) -> the model config fields the
  checkpoint fixes: {'vision': SigLIP shapes + feature_layer, 'llm': Phi shapes + rotary/norm settings,
  'projector_hidden_act'} (field names as presets.py). A missing or ill-typed entry is a UserError
  naming the file, the key and what was expected."""
  where = "Mipha config"
  if isinstance(src, (str, os.PathLike)):
    where = os.path.join(src, "config.json") if os.path.isdir(src) else os.fspath(src)
    if not os.path.isfile(where):
      raise UserError(f"{where}: no such file (expected the config.json of a Mipha/LLaVA-Phi folder)")
    src = read_json(where)
  if not isinstance(src, Mapping):
    raise UserError(f"{where}: expected a JSON object, got {type(src).__name__}")
  d = dict(src)
  llm = {k: _entry(d, k, kind, default, where) for k, kind, default in _PHI_KEYS}
  llm["num_key_value_heads"] = llm["num_key_value_heads"] or llm["num_attention_heads"]
  # newer transformers nest the rotary settings in rope_parameters; older configs keep them flat
  rope = d.get("rope_parameters") or {}
  for key, default in (("partial_rotary_factor", 0.5), ("rope_theta", 10000.0)):
    holder, path = (rope, "rope_parameters.") if key in rope else (d, "")
    llm[key] = _entry(holder, key, float, default, where, path)
  vc = _entry(d, "vision_config", dict, _REQUIRED, where)
  vt = _entry(vc, "vision_tower", dict, _REQUIRED, where, "vision_config.")
  vision = {k: _entry(vt, k, kind, default, where, "vision_config.vision_tower.") for k, kind, default in _SIGLIP_KEYS}
  vision["feature_layer"] = _entry(vt, "mm_vision_select_layer", int, -2, where, "vision_config.vision_tower.")
  proj = _entry(vc, "mm_projector", dict, {}, where, "vision_config.")
  kind = _entry(proj, "mm_projector_type", str, "mlp2x_gelu", where, "vision_config.mm_projector.")
  if kind != "mlp2x_gelu":
    raise UserError(f"{where}: 'vision_config.mm_projector.mm_projector_type' is {kind!r}, expected 'mlp2x_gelu' "
                    f"(the only projector supported)")
  return dict(vision=vision, llm=llm, projector_hidden_act="gelu")


def model_config_from_mipha(src: Mapping | str, base: ml_collections.ConfigDict | None = None):
  """Our model ConfigDict (``base``, default the 'tiny' preset, copied) with the fields of a Mipha
  config.json (``mipha_model_fields``) set."""
  cfg = ml_collections.ConfigDict(base.to_dict()) if base is not None else presets.model_config("tiny")
  cfg.update(mipha_model_fields(src))
  return cfg


def mipha_config_dict(model_cfg) -> dict:
  """Our model ConfigDict -> a Mipha config.json (Phi-2's HF config + the SigLIP tower's + the projector)."""
  phi = PhiConfig.from_dict(model_cfg.llm).to_hf_dict()
  phi.update(model_type="mipha_phi", architectures=["MiphaPhiForCausalLM"])
  vision = SiglipConfig.from_dict(model_cfg.vision)
  vt = siglip_hf_config(vision)
  vt.pop("architectures")
  vt.update(model_type="mipha_vision_model", mm_vision_select_layer=vision.feature_layer,
            mm_vision_select_feature="patch", vision_model_name_or_path="siglip")
  phi["vision_config"] = dict(vision_tower=vt, mm_projector=dict(
      model_type="mipha_projector", mm_projector_type="mlp2x_gelu", mm_hidden_size=vision.hidden_size,
      hidden_size=phi["hidden_size"]))
  return phi


def import_mipha(src, *, dtype=None, adapter: str | None = None, scan_layers: bool = True) -> dict:
  """Mipha folder / file / state dict (any tensor_io.open_checkpoint source) -> {'vision', 'projector',
  'llm'} (numpy). ``adapter``: a PEFT LoRA folder for the language model (keys
  base_model.model.model.layers.{i}...)."""
  ckpt = open_checkpoint(src)
  params = mipha_name_map(scan_layers=scan_layers).to_ours(ckpt.keys, ckpt.get, dtype=dtype, where=ckpt.where)
  if adapter is not None:
    params = attach_lora(params, read_peft_adapter(adapter, ours="llm/", scan_layers=scan_layers, dtype=dtype))
  return params


def export_mipha(params: Mapping[str, Any], out_dir: str, model_cfg, *, lora: LoraConfig | None = None,
                 merge_lora: bool = False, max_shard_bytes: int = 4 << 30) -> None:
  """Our MLLM params -> a Mipha folder (safetensors + config.json); LoRA merged, or written as a PEFT
  adapter under ``out_dir/adapter``. The layer layout follows ``model_cfg.scan_layers``."""
  scan = bool(model_cfg.scan_layers)
  params = {k: params[k] for k in ("vision", "projector", "llm")}
  base, lora_params = split_lora(params)
  if lora_params and lora is None:
    raise ValueError("params hold LoRA children: pass lora=LoraConfig(...) to export them")
  if lora_params and merge_lora:
    base = dict(base, llm=lora_lib.merge_lora(params["llm"], lora))
    lora_params = {}
  save_safetensors(mipha_name_map(scan_layers=scan).to_theirs(base), out_dir, max_shard_bytes=max_shard_bytes)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(mipha_config_dict(model_cfg), f, indent=2)
  if lora_params:
    write_peft_adapter(lora_params["llm"], os.path.join(out_dir, "adapter"), lora, base_model=out_dir,
                       scan_layers=scan)
