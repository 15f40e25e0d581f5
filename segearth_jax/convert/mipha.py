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
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import ml_collections

from segearth_jax import presets
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
_SIGLIP_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                  "patch_size", "num_channels", "layer_norm_eps", "hidden_act")


def mipha_name_map(*, scan_layers: bool = True) -> nm.NameMap:
  rules = (phi_rules("model.", "lm_head.", ours="llm/", scan_layers=scan_layers)
           + siglip_rules(VISION_PREFIX, "vision", scan_layers=scan_layers)
           + projector_rules(PROJECTOR_PREFIX, "projector"))
  return nm.NameMap(rules, ignore=(*siglip_ignore(VISION_PREFIX), ROTARY_BUFFERS))


def model_config_from_mipha(mipha_cfg: Mapping | str, base: ml_collections.ConfigDict | None = None):
  """Mipha config.json (dict or path) -> our model ConfigDict's vision/llm/projector fields (on ``base``)."""
  if isinstance(mipha_cfg, (str, os.PathLike)):
    path = os.path.join(mipha_cfg, "config.json") if os.path.isdir(mipha_cfg) else mipha_cfg
    try:
      with open(path) as f:
        mipha_cfg = json.load(f)
    except (OSError, ValueError) as e:
      raise UserError(f"{path}: not a readable Mipha config.json ({e})") from e
  d = dict(mipha_cfg)
  cfg = ml_collections.ConfigDict(base.to_dict()) if base is not None else presets.model_config("tiny")
  rope = d.get("rope_parameters") or {}
  llm = dict(vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
             num_hidden_layers=d["num_hidden_layers"], num_attention_heads=d["num_attention_heads"],
             num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
             partial_rotary_factor=rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 0.5)),
             rope_theta=rope.get("rope_theta", d.get("rope_theta", 10000.0)),
             layer_norm_eps=d.get("layer_norm_eps", 1e-5),
             max_position_embeddings=d.get("max_position_embeddings", 2048),
             hidden_act=d.get("hidden_act", "gelu_new"))
  for k, v in llm.items():
    cfg.llm[k] = v
  vt = d["vision_config"]["vision_tower"]
  for k in _SIGLIP_FIELDS:
    if k in vt:
      cfg.vision[k] = vt[k]
  cfg.vision.feature_layer = int(vt.get("mm_vision_select_layer", -2))
  proj = d["vision_config"].get("mm_projector", {})
  if proj.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
    raise UserError(f"only the 'mlp2x_gelu' projector is supported, got {proj.get('mm_projector_type')!r}")
  cfg.projector_hidden_act = "gelu"
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
