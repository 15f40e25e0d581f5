"""PhiForCausalLM <-> our Phi params (both directions), a PEFT LoRA adapter, and token resizing.

HF keys (transformers 5): model.embed_tokens.weight, model.layers.{i}.input_layernorm.{weight,bias},
model.layers.{i}.self_attn.{q_proj,k_proj,v_proj,dense}.{weight,bias}, model.layers.{i}.mlp.{fc1,fc2}.*,
model.final_layernorm.*, lm_head.{weight,bias}. Per-layer tensors stack onto the nn.scan axis
(``llm/layers/...``) or, with ``scan_layers=False``, go to ``layers_{i}/...``; LoRA children follow the same
layout. The HF config is ``models.phi.PhiConfig.to_hf_dict``.
"""
from __future__ import annotations

import json
import os
from typing import Mapping

import numpy as np
from safetensors.numpy import save_file

from segearth_jax.convert import name_map as nm
from segearth_jax.errors import UserError
from segearth_jax.models import lora as lora_lib
from segearth_jax.models.lora import LoraConfig, split_lora
from segearth_jax.models.phi import PhiConfig
from segearth_jax.tensor_io import SafetensorsReader, open_checkpoint, save_safetensors

_LINEARS = (("self_attn/q_proj", "self_attn.q_proj"), ("self_attn/k_proj", "self_attn.k_proj"),
            ("self_attn/v_proj", "self_attn.v_proj"), ("self_attn/dense", "self_attn.dense"),
            ("mlp/fc1", "mlp.fc1"), ("mlp/fc2", "mlp.fc2"))
_LAYER = [*nm.norm("input_layernorm", "input_layernorm"), *[p for o, t in _LINEARS for p in nm.linear(o, t)]]
ROTARY_BUFFERS = r".*rotary_emb\.inv_freq"


def phi_rules(prefix: str = "model.", lm_head_prefix: str = "lm_head.", ours: str = "", *,
              scan_layers: bool = True) -> list[nm.Rule]:
  """Rules for one Phi; ``ours`` is our path prefix (e.g. 'llm/' inside the MLLM)."""
  return [nm.Rule(f"{ours}embed_tokens/embedding", f"{prefix}embed_tokens.weight"),
          *nm.layer_rules(f"{ours}layers", f"{prefix}layers.{{i}}.", _LAYER, scan_layers=scan_layers),
          *nm.rules(ours, prefix, nm.norm("final_layernorm", "final_layernorm")),
          nm.Rule(f"{ours}lm_head/kernel", f"{lm_head_prefix}weight", nm.LINEAR),
          nm.Rule(f"{ours}lm_head/bias", f"{lm_head_prefix}bias")]


def lora_rules(targets, prefix: str = "base_model.model.model.", ours: str = "", *,
               scan_layers: bool = True) -> list[nm.Rule]:
  """PEFT adapter keys (as saved by save_pretrained: no adapter name) for the adapted projections."""
  params = []
  for o, t in _LINEARS:
    if o.split("/")[-1] in targets:
      params += [(f"{o}/lora/a", f"{t}.lora_A.weight", nm.LINEAR), (f"{o}/lora/b", f"{t}.lora_B.weight", nm.LINEAR)]
  return nm.layer_rules(f"{ours}layers", f"{prefix}layers.{{i}}.", params, scan_layers=scan_layers)


def phi_name_map(*, scan_layers: bool = True) -> nm.NameMap:
  return nm.NameMap(phi_rules(scan_layers=scan_layers), ignore=(ROTARY_BUFFERS,))


def read_peft_adapter(adapter_dir: str, *, ours: str = "", scan_layers: bool = True, dtype=None) -> dict:
  """A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) -> our 'lora' children
  (a partial param tree under ``ours``; graft it with ``attach_lora``)."""
  reader = SafetensorsReader(os.path.join(adapter_dir, "adapter_model.safetensors"))
  names = nm.NameMap(lora_rules(lora_config_of(adapter_dir).targets, ours=ours, scan_layers=scan_layers))
  return names.to_ours(reader.keys(), reader.get, dtype=dtype, where=adapter_dir)


def import_phi(src, *, dtype=None, adapter: str | None = None, scan_layers: bool = True) -> dict:
  """HF PhiForCausalLM weights (any tensor_io.open_checkpoint source) -> our param tree (numpy).

  ``adapter``: optional PEFT adapter folder whose lora_A/lora_B become the 'lora' children."""
  ckpt = open_checkpoint(src)
  params = phi_name_map(scan_layers=scan_layers).to_ours(ckpt.keys, ckpt.get, dtype=dtype, where=ckpt.where)
  if adapter is not None:
    params = attach_lora(params, read_peft_adapter(adapter, scan_layers=scan_layers, dtype=dtype))
  return params


def attach_lora(base: Mapping, lora: Mapping) -> dict:
  """``base`` with the 'lora' children of the partial tree ``lora`` grafted in."""
  out = dict(base)
  for k, v in lora.items():
    out[k] = attach_lora(base[k], v) if isinstance(v, Mapping) and k != "lora" else v
  return out


def lora_config_of(adapter_dir: str) -> LoraConfig:
  """The LoraConfig of a PEFT adapter folder (its adapter_config.json)."""
  path = os.path.join(adapter_dir, "adapter_config.json")
  try:
    with open(path) as f:
      a = json.load(f)
    return LoraConfig(rank=a["r"], alpha=float(a["lora_alpha"]), dropout=float(a.get("lora_dropout", 0.0)),
                      targets=tuple(sorted(a["target_modules"])))
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise UserError(f"{path}: not a readable PEFT adapter config ({e})") from e


def export_phi(params: Mapping, out_dir: str, config: PhiConfig, *, lora: LoraConfig | None = None,
               merge_lora: bool = False, scan_layers: bool = True, max_shard_bytes: int = 4 << 30) -> None:
  """Our params -> ``out_dir`` loadable by PhiForCausalLM.from_pretrained.

  With LoRA children present: ``merge_lora=True`` folds them into the kernels; otherwise the base
  weights go to ``out_dir`` and a PEFT adapter (adapter_config.json + adapter_model.safetensors) to
  ``out_dir/adapter`` (load with peft.PeftModel.from_pretrained(base, out_dir + '/adapter'))."""
  base, lora_params = split_lora(params)
  if lora_params and lora is None:
    raise ValueError("params hold LoRA children: pass lora=LoraConfig(...) to export them")
  if lora_params and merge_lora:
    base, lora_params = lora_lib.merge_lora(params, lora), {}
  save_safetensors(phi_name_map(scan_layers=scan_layers).to_theirs(base), out_dir, max_shard_bytes=max_shard_bytes)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config.to_hf_dict(), f, indent=2)
  if lora_params:
    write_peft_adapter(lora_params, os.path.join(out_dir, "adapter"), lora, base_model=out_dir,
                       scan_layers=scan_layers)


def write_peft_adapter(lora_params: Mapping, adapter_dir: str, lora: LoraConfig, *, base_model: str = "",
                       scan_layers: bool = True) -> None:
  """Our LLM's 'lora' children -> a PEFT adapter folder (``PeftModel.from_pretrained`` loads it)."""
  os.makedirs(adapter_dir, exist_ok=True)
  names = nm.NameMap(lora_rules(lora.targets, scan_layers=scan_layers))
  tensors = {k: np.ascontiguousarray(v) for k, v in names.to_theirs(lora_params)}
  save_file(tensors, os.path.join(adapter_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
  cfg = dict(peft_type="LORA", task_type="CAUSAL_LM", r=lora.rank, lora_alpha=lora.alpha,
             lora_dropout=lora.dropout, target_modules=list(lora.targets), bias="none",
             fan_in_fan_out=False, inference_mode=True, base_model_name_or_path=base_model)
  with open(os.path.join(adapter_dir, "adapter_config.json"), "w") as f:
    json.dump(cfg, f, indent=2)


# ------------------------------------------------------------------ token resizing
def _mean_init(old: np.ndarray, added: int, rng: np.random.Generator) -> np.ndarray:
  """transformers' mean_resizing: rows ~ N(mean, 1e-9 * cov) of the old rows, or the mean if cov is not PD."""
  w = old.astype(np.float64)
  mean = w.mean(0)
  cov = (w - mean).T @ (w - mean) / w.shape[0]
  try:
    chol = np.linalg.cholesky(1e-9 * cov)
  except np.linalg.LinAlgError:
    return np.repeat(mean[None], added, 0).astype(old.dtype)
  z = rng.standard_normal((added, w.shape[1]))
  return (mean[None] + z @ chol.T).astype(old.dtype)


def resize_token_embeddings(params: Mapping, new_size: int, pad_to_multiple_of: int | None = 64,
                            seed: int = 0) -> dict:
  """Grows embed_tokens rows and lm_head columns/bias to ``new_size`` (rounded up to the multiple), as
  transformers' resize_token_embeddings(mean_resizing=True) does; shrinking truncates."""
  if pad_to_multiple_of:
    new_size = -(-new_size // pad_to_multiple_of) * pad_to_multiple_of
  rng = np.random.default_rng(seed)
  out = dict(params)
  emb = np.asarray(params["embed_tokens"]["embedding"])
  old = emb.shape[0]
  if new_size <= old:
    out["embed_tokens"] = {"embedding": emb[:new_size]}
    out["lm_head"] = {"kernel": np.asarray(params["lm_head"]["kernel"])[:, :new_size],
                      "bias": np.asarray(params["lm_head"]["bias"])[:new_size]}
    return out
  added = new_size - old
  out["embed_tokens"] = {"embedding": np.concatenate([emb, _mean_init(emb, added, rng)], 0)}
  k = np.asarray(params["lm_head"]["kernel"])                          # [D, V]
  new_k = np.concatenate([k, _mean_init(k.T, added, rng).T], 1)
  b = np.asarray(params["lm_head"]["bias"])
  bias_new = rng.normal(b.astype(np.float64).mean(), 1e-9 * b.astype(np.float64).std(ddof=1), added)
  out["lm_head"] = {"kernel": new_k, "bias": np.concatenate([b, bias_new.astype(b.dtype)])}
  return out
