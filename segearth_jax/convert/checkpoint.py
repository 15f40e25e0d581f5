"""Whole-model conversions: HF checkpoints -> a weights folder (`segearth convert from-hf`), and our params ->
the PyTorch export (`segearth convert to-torch`). Composes the per-part maps (mipha, mask2former,
siglip/phi/swin/...); no part's rules or HF config are written twice. The weights folder and the training
workdir are weights.py's; the model's param shapes come from model_setup.ModelSetup.

PyTorch export DIR (loaded by `torch_model.SegEarthR2Torch.from_pretrained`):
  DIR/config.json                  vision_config / text_config / mask2former_config + token ids + the
                                   experiment config (preprocessing, prompts)
  DIR/model.safetensors(+ .index)  keys as `SegEarthR2Torch.state_dict()` names them (module layout)
  DIR/adapter/                     PEFT LoRA adapter of the LLM (absent with --merge-lora)
  DIR/tokenizer/
Both directions follow `model.scan_layers` (stacked `layers/...` or `layers_{i}/...` params); the exported
tensors are the same either way.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Mapping, Sequence

import numpy as np

from segearth_jax import sharding as shd
from segearth_jax.config import apply_overrides, load_config
from segearth_jax.convert import name_map as nm
from segearth_jax.convert.mask2former import (import_mask2former, mask2former_hf_config, mask2former_model_fields,
                                              unused_swin_norm)
from segearth_jax.convert.mask_decoder_map import export_unused, mask_decoder_ignore, mask_decoder_rules
from segearth_jax.convert.mipha import import_mipha, mipha_model_fields
from segearth_jax.convert.phi_map import ROTARY_BUFFERS, phi_rules, resize_token_embeddings, write_peft_adapter
from segearth_jax.convert.pixel_decoder_map import pixel_decoder_rules, with_fpn_biases
from segearth_jax.convert.siglip_map import projector_rules, siglip_hf_config, siglip_ignore, siglip_rules
from segearth_jax.convert.swin_map import swin_ignore, swin_rules
from segearth_jax.data.tokenizer import image_token_id, load_tokenizer, seg_token_id
from segearth_jax.errors import UserError
from segearth_jax.model_setup import ModelSetup
from segearth_jax.models import lora as lora_lib
from segearth_jax.models.lora import LoraConfig, split_lora
from segearth_jax.models.segearth import ModelConfig
from segearth_jax.tensor_io import flatten, save_safetensors
from segearth_jax.weights import check_params, load_params, load_run_config, save_weights

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                              "experiments", "laserss_mipha3b.py")
# HF Mask2Former keeps learned queries; ours come from [SEG]. Exported as one zero row (unused).
EXPORT_NUM_QUERIES = 1


# ------------------------------------------------------------------------------------ shared steps
def _layer_names(tree: Mapping, name: str = "layers") -> list[str]:
  """The keys of a layer list: [name] when nn.scan-stacked, else 'name_{i}' in layer order."""
  if name in tree:
    return [name]
  return sorted((k for k in tree if re.fullmatch(rf"{name}_\d+", k)), key=lambda k: int(k[len(name) + 1:]))


def new_lora_params(llm: Mapping, lora_cfg: LoraConfig, rng: np.random.Generator) -> dict:
  """PEFT's init for every adapted projection: A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0. Drawn per target as
  one [layers, in, rank] array whatever the layout, so scan_layers=True and False get the same values."""
  out = dict(llm)
  names = _layer_names(llm)
  stacked = names == ["layers"]
  layers = {k: dict(llm[k], self_attn=dict(llm[k]["self_attn"])) for k in names}
  for t in lora_cfg.targets:
    kernel = np.asarray(llm[names[0]]["self_attn"][t]["kernel"])
    d_in, d_out = kernel.shape[-2:]
    n = kernel.shape[0] if stacked else len(names)
    bound = 1.0 / np.sqrt(d_in)
    a = rng.uniform(-bound, bound, (n, d_in, lora_cfg.rank)).astype(kernel.dtype)
    b = np.zeros((n, lora_cfg.rank, d_out), kernel.dtype)
    for i, k in enumerate(names):
      node = dict(layers[k]["self_attn"][t])
      node["lora"] = {"a": a, "b": b} if stacked else {"a": a[i], "b": b[i]}
      layers[k]["self_attn"][t] = node
  out.update(layers)
  return out


def lora_layout(llm: Mapping) -> tuple[int | None, list[str]]:
  """(rank, adapted projections) of the LoRA children in our LLM params; rank None when there are none."""
  attn = [llm[k]["self_attn"] for k in _layer_names(llm)]
  targets = sorted({t for a in attn for t, v in a.items() if isinstance(v, Mapping) and "lora" in v})
  ranks = {int(np.shape(a[t]["lora"]["a"])[-1]) for a in attn for t in targets if "lora" in a[t]}
  if len(ranks) > 1:
    raise UserError(f"LoRA tensors of different ranks {sorted(ranks)}")
  return (ranks.pop() if ranks else None), targets


# ------------------------------------------------------------------------------------ from-hf
def checkpoint_config(config, fields: Mapping, overrides: Sequence[str] = ()):
  """A copy of the experiment ``config`` whose model takes ``fields`` ({part: {field: value}}, the shapes a
  checkpoint fixes: mipha_model_fields, mask2former_model_fields), then ``overrides`` (``--config.a.b=v``),
  which win over both."""
  out = config.copy_and_resolve_references()
  with out.unlocked():
    out.model.update(dict(fields))
  apply_overrides(out, overrides)
  return out


def from_hf(mipha_dir: str, mask2former: str, out_dir: str, config, *, overrides: Sequence[str] = (),
            seed: int | None = None) -> dict:
  """Mipha (SigLIP + projector + Phi-2) + Mask2Former -> a weights folder W. Returns the params.

  The model's shapes come from the checkpoints, not from ``config``: Mipha's config.json (vision tower, Phi)
  and the Mask2Former's config.json or, where it has none (a detectron2 .pkl), its tensors; ``overrides``
  (``--config.a.b=v``) apply on top. W/config.json stores the result, so W loads with no flags. ``seed``
  (default config.train.seed): LoRA A, the [SEG] projector and the vocab rows the tokenizer adds."""
  if not os.path.isdir(mipha_dir):
    raise UserError(f"{mipha_dir}: no such folder (expected a Mipha/LLaVA-Phi folder: config.json, "
                    f"safetensors, tokenizer files)")
  mipha_fields = mipha_model_fields(mipha_dir)   # a bad config.json or tokenizer fails before any tensor is read
  tok = load_tokenizer(mipha_dir)
  probe = checkpoint_config(config, {}, overrides)
  scan = bool(probe.model.scan_layers)
  mask_head = import_mask2former(mask2former, scan_layers=scan)
  config = checkpoint_config(config, {**mipha_fields, **mask2former_model_fields(mask2former, mask_head, probe.model)},
                             overrides)
  m = config.model
  seed = int(config.train.seed) if seed is None else int(seed)
  # the 'authors' FPN starts its conv biases at zero, as the authors do from the bias-free detectron2 weights
  mask_head["pixel_decoder"] = with_fpn_biases(mask_head["pixel_decoder"], m.pixel_decoder.fpn)
  setup = ModelSetup.create(config, shd.single_device_mesh(), len(tok))
  params = import_mipha(mipha_dir, scan_layers=scan)
  params["mask_head"] = mask_head
  rng = np.random.default_rng(seed)
  llm = params["llm"]
  vocab = setup.model.config.llm.vocab_size
  if llm["embed_tokens"]["embedding"].shape[0] != vocab:  # the tokenizer outgrew the vocab: grow as HF does
    llm = resize_token_embeddings(llm, vocab, pad_to_multiple_of=None, seed=seed)
  m.llm.vocab_size = vocab   # W/config.json: the rows W holds
  if m.lora.rank:
    llm = new_lora_params(llm, LoraConfig.from_dict(m.lora), rng)
  params["llm"] = llm
  d_in, d_out = int(m.llm.hidden_size), int(m.mask_decoder.hidden_dim)
  # flax Dense default (lecun normal) for the new [SEG] projector
  params["seg_projector"] = {"kernel": (rng.standard_normal((d_in, d_out)) / np.sqrt(d_in)).astype(np.float32),
                             "bias": np.zeros((d_out,), np.float32)}
  check_params(flatten(params), setup.abstract_params, f"from-hf ({mipha_dir}, {mask2former})")
  save_weights(params, config, out_dir, tok, note=dict(mipha=os.path.abspath(mipha_dir),
                                                      mask2former=os.path.abspath(mask2former), seed=seed))
  return params


def from_hf_cli(args) -> int:
  """`segearth convert from-hf --mipha DIR --mask2former SRC --out W [--config CFG] [--config.a.b=v ...]`."""
  config = load_config(args.config or DEFAULT_CONFIG)
  from_hf(args.mipha, args.mask2former, args.out, config, overrides=getattr(args, "overrides", None) or [])
  print(f"written: {args.out} (use --weights {args.out} or --config.train.init_from={args.out})")
  return 0


# ------------------------------------------------------------------------------------ to-torch
def torch_name_map(model_cfg, *, input_projections: bool) -> nm.NameMap:
  """Our params (LoRA split off) <-> `SegEarthR2Torch.state_dict()` keys (module layout)."""
  mh = "mask_head."
  scan = bool(model_cfg.scan_layers)
  fpn = ModelConfig.from_dict(model_cfg).pixel_decoder.fpn
  rules = [*siglip_rules("vision_tower.", "vision/", scan_layers=scan),
           *projector_rules("projector.", "projector/"),
           *phi_rules("llm.model.", "llm.lm_head.", ours="llm/", scan_layers=scan),
           *nm.rules("", "", nm.linear("seg_projector", "seg_projector")),
           *swin_rules(f"{mh}pixel_level_module.encoder.", "mask_head/swin/", legacy=False, scan_layers=scan),
           *pixel_decoder_rules(f"{mh}pixel_level_module.decoder.", "mask_head/pixel_decoder/", fpn=fpn),
           *mask_decoder_rules(f"{mh}transformer_module.", "mask_head/mask_decoder/",
                               input_projections=input_projections,
                               mask_embed_layers=int(model_cfg.mask_decoder.mask_embed_layers))]
  ignore = [*siglip_ignore("vision_tower."), *swin_ignore(f"{mh}pixel_level_module.encoder."),
            *mask_decoder_ignore(f"{mh}transformer_module."), ROTARY_BUFFERS]
  return nm.NameMap(rules, ignore)


def torch_config_dict(config, params: Mapping, tokenizer, *, lora: dict | None) -> dict:
  """DIR/config.json of the PyTorch export: every part's HF config from its one writer."""
  m = ModelConfig.from_dict(config.model)
  text = m.llm.to_hf_dict()
  text["vocab_size"] = int(np.shape(params["llm"]["embed_tokens"]["embedding"])[0])
  text["eos_token_id"] = tokenizer.eos_token_id
  return dict(
      architectures=["SegEarthR2Torch"], model_type="segearth_r2",
      vision_config=siglip_hf_config(m.vision), feature_layer=m.vision.feature_layer,
      projector_hidden_act=m.projector_hidden_act, text_config=text,
      mask2former_config=mask2former_hf_config(m.swin, m.pixel_decoder, m.mask_decoder,
                                               num_queries=EXPORT_NUM_QUERIES),
      mask_decoder_heads=m.mask_decoder.num_attention_heads, pixel_decoder_fpn=m.pixel_decoder.fpn,
      seg_token_id=seg_token_id(tokenizer), image_token_id=image_token_id(tokenizer),
      eos_token_id=tokenizer.eos_token_id, max_seg=m.max_seg, lora=lora,
      segearth_config=json.loads(config.to_json_best_effort()))


def export_torch(params: Mapping, config, tokenizer_dir: str, out_dir: str, *, merge_lora: bool = False) -> None:
  """Our params -> DIR that `SegEarthR2Torch.from_pretrained` loads (see the module docstring).
  ``merge_lora``: fold LoRA into the LLM's kernels instead of writing a PEFT adapter."""
  m = config.model
  scan = bool(m.scan_layers)
  tok = load_tokenizer(tokenizer_dir)
  params = dict(params)
  llm_base, llm_lora = split_lora(params["llm"])
  lora_cfg = LoraConfig.from_dict(m.lora) if llm_lora else None
  if llm_lora and merge_lora:
    llm_base, llm_lora = lora_lib.merge_lora(params["llm"], lora_cfg), {}
  params["llm"] = llm_base
  proj = any(k.startswith("input_proj_") for k in params["mask_head"]["mask_decoder"])
  names = torch_name_map(m, input_projections=proj)

  def tensors():
    for k, v in names.to_theirs(params):
      yield k, np.asarray(v)
    yield from export_unused("mask_head.transformer_module.", EXPORT_NUM_QUERIES, int(m.mask_decoder.hidden_dim))
    yield from unused_swin_norm("mask_head.pixel_level_module.encoder.swin.", params["mask_head"]["swin"])

  os.makedirs(out_dir, exist_ok=True)
  save_safetensors(tensors(), out_dir)
  lora = None
  if llm_lora:
    write_peft_adapter(llm_lora, os.path.join(out_dir, "adapter"), lora_cfg, base_model=out_dir, scan_layers=scan)
    lora = dict(rank=lora_cfg.rank, alpha=lora_cfg.alpha, targets=list(lora_cfg.targets), adapter="adapter")
  elif merge_lora and lora_cfg is not None:
    lora = dict(merged=True)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(torch_config_dict(config, params, tok, lora=lora), f, indent=2)
  tok_out = os.path.join(out_dir, "tokenizer")
  if os.path.isdir(tok_out):
    shutil.rmtree(tok_out)
  tok.save_pretrained(tok_out)


def to_torch_cli(args) -> int:
  """`segearth convert to-torch --workdir W --out DIR [--merge-lora]` (W: a weights folder or a workdir)."""
  config = load_run_config(args.workdir)
  params = load_params(args.workdir)
  export_torch(params, config, config.data.tokenizer, args.out, merge_lora=bool(args.merge_lora))
  print(f"written: {args.out} (load with segearth_jax.convert.torch_model.SegEarthR2Torch.from_pretrained)")
  return 0
