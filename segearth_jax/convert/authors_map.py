"""The authors' released SegEarth-R2 PyTorch checkpoint (earth-insights/SegEarth-R2) -> our params.

Their model (segearth_r2/model/language_model/llava_phi.py: ``SegEarthR2(MiphaPhiForCausalLM)``) keeps
every part in one state dict. Key map (authors' key -> ours; '{i}' a layer index; verified by reading
llava_phi.py, mipha_phi.py, siglip_encoder.py, mask_encoder/swin_trans.py, the pixel decoder
msdeformattn.py and transformer_decoder/mask2former_transformer_decoder.py of their code):

  model.vision_tower.vision_model.*       -> vision/*         SigLIP: their SiglipVisionTower holds a
                                                              SiglipVisionTransformer as `.vision_model`,
                                                              so the prefix is Mipha's (no second
                                                              `.vision_tower`); `head.*` dropped
  model.mm_projector.{0,2}.{weight,bias}  -> projector/fc1, fc2   (mlp2x_gelu)
  model.embed_tokens / model.layers.{i}.* / model.final_layernorm.*  -> llm/*   (Phi-2, as Mipha)
  lm_head.weight                          -> llm/lm_head/kernel
      their lm_head is nn.Linear(hidden, 51200, bias=False), unlike Mipha's: our lm_head/bias is set to
      ZERO, which computes the same logits. It is never resized, while resize_token_embeddings gives
      model.embed_tokens len(tokenizer) rows (Phi-2's tokenizer + [SEG], ~50.3k): ours has one vocab for
      both, so the embedding is padded up to the head's rows (transformers' mean init; those ids are
      never fed to their model), and both grow only when our tokenizer (theirs + `<image>`) or the
      config's vocab needs more rows than the head has
  SEG_token_projector.{weight,bias}       -> seg_projector/{kernel,bias}
  model.vision_tower_mask.*               -> mask_head/swin/*   Swin in the original Swin / detectron2
      naming (patch_embed, layers.{s}.blocks.{j}.attn.qkv, norm{s}, ...), i.e. detectron2's `backbone.*`
      without the prefix; renamed to `backbone.*` and sent through swin_map.d2_swin_to_hf
  pixel_decoder.*                         -> mask_head/pixel_decoder/*   detectron2's
      `sem_seg_head.pixel_decoder.*` names except the FPN convs, which their code builds as
      Sequential(Conv2d, GroupNorm, ReLU): `adapter_{k}.0.weight` / `adapter_{k}.1.{weight,bias}` (same
      for `layer_{k}`); renamed back to detectron2's `adapter_{k}.weight` / `adapter_{k}.norm.*`. Their
      Conv2d there has a bias (`adapter_{k}.0.bias`, `layer_{k}.0.bias`, zero at the start because the
      detectron2 weights have none, then trained) and the lateral path ends in a ReLU: that is our
      pixel decoder's fpn='authors' variant, which every import from their checkpoint gets (the
      biases -> pixel_decoder/{adapter,layer}_{k}/conv/bias; ``authors_config``)
  predictor.*                             -> mask_head/mask_decoder/*   detectron2's
      `sem_seg_head.predictor.*` (MultiScaleMaskedTransformerDecoder) names, sent through
      mask_decoder_map.d2_mask_decoder_to_hf. Their decoder adds tensors that SegEarth-R2 inference never
      reads (the queries are the projected [SEG] states with zero position; use_seg_query is off):
      `query_feat`, `query_embed`, `SEG_query_embed`, `new_query_embed`, `SEG_proj.*` (only for the
      training-time [SEG] class logits) and, with seg_norm, `SEG_norm.*` / `seg_proj_after_norm.*`:
      all dropped. There is no `class_embed`.
  model.rotary_emb.inv_freq, *.relative_position_index, *.position_ids: buffers, dropped.

LoRA (r=8, alpha=16 on the Phi layers' q_proj and v_proj: their find_linear_layers picks every Linear
named *q_proj*/*v_proj* outside the vision towers and mask modules). Two layouts are read:
  merged (what merge_lora_weights_and_save_hf_model.py releases: `merge_and_unload()`, then
      save_pretrained): plain keys as above, no LoRA tensors. If the config asks for LoRA, fresh LoRA
      children are added (A as PEFT's init, B = 0, so the model's outputs are unchanged);
  PEFT-wrapped (a state dict of the PeftModel, e.g. a consolidated DeepSpeed checkpoint): every key under
      `base_model.model.`, adapted Linears as `<name>.base_layer.{weight,bias}` plus
      `<name>.lora_A.default.weight` [r, in] / `<name>.lora_B.default.weight` [out, r] (the adapter name
      `.default` may be absent) -> llm/layers/self_attn/{q_proj,v_proj}/lora/{a,b}. PEFT's scale
      (alpha / r) is not stored in a state dict: ours comes from config.model.lora, which must match
      the training run (theirs: alpha=16, r=8).
A DeepSpeed `module.` prefix is stripped too.

Shapes (``authors_model_fields``): the model's sizes come from the checkpoint, not from the experiment file.
A folder's config.json (their model is a MiphaPhiForCausalLM: a Mipha/LLaVA-Phi config, read by
mipha.mipha_model_fields) gives the Phi and SigLIP fields; where it has no `vision_config`, or there is no
config.json (a file, a state dict), the tensors give the sizes they fix (widths, layer counts, patch and image
size) and the settings no tensor shows (head counts, eps, activations) stay the experiment's. The mask head's
always come from the tensors (mask2former.mask2former_model_fields); `--config.model.*` overrides win over
all of them, and W/config.json stores the result. Sources: whatever tensor_io.open_checkpoint reads (a folder
of safetensors, sharded or not, or of `pytorch_model*.bin`; one .safetensors / .bin / .pt file, loaded with
torch.load(weights_only=True); an in-memory dict of torch / numpy tensors). Tensors are cast to float32
(their release is float16) unless ``dtype`` says otherwise. The layer layout follows `model.scan_layers`.
"""
from __future__ import annotations

import copy
import json
import os
import re
from typing import Mapping, Sequence

import numpy as np

from segearth_jax import sharding as shd
from segearth_jax.config import load_config
from segearth_jax.convert import name_map as nm
from segearth_jax.convert.checkpoint import DEFAULT_CONFIG, checkpoint_config, lora_layout, new_lora_params
from segearth_jax.convert.mask2former import first_layer, import_mask2former, layer_count, mask2former_model_fields
from segearth_jax.convert.mipha import mipha_model_fields
from segearth_jax.convert.phi_map import ROTARY_BUFFERS, lora_rules, phi_rules, resize_token_embeddings
from segearth_jax.convert.pixel_decoder_map import fpn_conv_names, with_fpn_biases
from segearth_jax.convert.siglip_map import projector_rules, siglip_ignore, siglip_rules
from segearth_jax.data.tokenizer import load_tokenizer
from segearth_jax.errors import UserError
from segearth_jax.model_setup import ModelSetup
from segearth_jax.models.lora import LoraConfig
from segearth_jax.tensor_io import Checkpoint, flatten, open_checkpoint
from segearth_jax.weights import check_params, save_weights

VISION_PREFIX = "model.vision_tower.vision_model."
PROJECTOR_PREFIX = "model.mm_projector."
SWIN_PREFIX = "model.vision_tower_mask."
PIXEL_DECODER_PREFIX = "pixel_decoder."
PREDICTOR_PREFIX = "predictor."
SEG_PROJECTOR_PREFIX = "SEG_token_projector."
PEFT_PREFIX = "base_model.model."

# predictor tensors that SegEarth-R2 inference never reads (see the module docstring)
_PREDICTOR_UNUSED = re.compile(r"(SEG_query_embed\.weight|new_query_embed\.weight|SEG_proj\..*|"
                               r"seg_proj_after_norm\..*|SEG_norm\..*)")
_FPN = re.compile(r"(adapter|layer)_(\d+)\.([01])\.(weight|bias)")


def normalize_key(key: str) -> str:
  """Strips the DeepSpeed / PEFT wrappers: `module.`, `base_model.model.`, `.base_layer.`, `.default.`."""
  if key.startswith("module."):
    key = key[len("module."):]
  if key.startswith(PEFT_PREFIX):
    key = key[len(PEFT_PREFIX):]
  key = key.replace(".base_layer.", ".")
  return re.sub(r"\.(lora_[AB])\.default\.", r".\1.", key)


# ------------------------------------------------------------------------------------ name maps
def authors_name_map(*, scan_layers: bool = True, lora_targets=()) -> nm.NameMap:
  """The MLLM part (everything but the mask head) of the authors' keys, after ``normalize_key``."""
  # phi_rules includes lm_head.bias; theirs has none (filled with zeros by authors_to_ours)
  rules = [r for r in phi_rules("model.", "lm_head.", ours="llm/", scan_layers=scan_layers)
           if r.theirs != "lm_head.bias"]
  rules += siglip_rules(VISION_PREFIX, "vision", scan_layers=scan_layers)
  rules += projector_rules(PROJECTOR_PREFIX, "projector")
  rules += nm.rules("", "", nm.linear("seg_projector", SEG_PROJECTOR_PREFIX[:-1]))
  if lora_targets:
    rules += lora_rules(tuple(lora_targets), prefix="model.", ours="llm/", scan_layers=scan_layers)
  return nm.NameMap(rules, ignore=(*siglip_ignore(VISION_PREFIX), ROTARY_BUFFERS))


def authors_mask_head_to_d2(keys, get) -> tuple[dict, dict, dict]:
  """Authors' Swin / pixel decoder / predictor tensors -> detectron2 Mask2Former keys (numpy), the map
  d2 key -> authors' key (for error messages), and the FPN conv biases detectron2 has no key for
  ({'adapter_1': bias, 'layer_1': bias})."""
  d2, back, fpn_biases = {}, {}, {}
  for k in keys:
    if k.startswith(SWIN_PREFIX):
      new = "backbone." + k[len(SWIN_PREFIX):]
    elif k.startswith(PIXEL_DECODER_PREFIX):
      rel = k[len(PIXEL_DECODER_PREFIX):]
      m = _FPN.fullmatch(rel)
      if m:
        name, idx, sub, kind = m.groups()
        if sub == "0" and kind == "bias":
          fpn_biases[f"{name}_{idx}"] = get(k)
          continue
        rel = f"{name}_{idx}.weight" if sub == "0" else f"{name}_{idx}.norm.{kind}"
      new = "sem_seg_head.pixel_decoder." + rel
    elif k.startswith(PREDICTOR_PREFIX):
      rel = k[len(PREDICTOR_PREFIX):]
      if _PREDICTOR_UNUSED.fullmatch(rel):
        continue
      new = "sem_seg_head.predictor." + rel
    else:
      continue
    d2[new] = get(k)
    back[new] = k
  return d2, back, fpn_biases


def _mask_head(keys, get, where: str, *, scan_layers: bool, dtype) -> dict:
  for part, px in (("Swin", SWIN_PREFIX), ("pixel decoder", PIXEL_DECODER_PREFIX), ("predictor", PREDICTOR_PREFIX)):
    if not any(k.startswith(px) for k in keys):
      raise UserError(f"{where}: no {part} tensors ({px}*): not a SegEarth-R2 checkpoint with its mask modules")
  back = {}
  try:
    d2, back, fpn_biases = authors_mask_head_to_d2(keys, get)
    head = import_mask2former(Checkpoint(list(d2), d2.__getitem__, where, "detectron2"), scan_layers=scan_layers,
                              dtype=dtype)
  except UserError as e:
    msg = str(e)
    for d2k, ak in back.items():  # name the authors' key, not our intermediate detectron2 one
      msg = msg.replace(repr(d2k), repr(ak))
    raise UserError(msg if msg.startswith(where) else f"{where}: {msg}") from e
  pd = head["pixel_decoder"]
  names = fpn_conv_names(pd)
  missing = [n for n in names if n not in fpn_biases]
  if missing:
    raise UserError(f"{where}: no tensor {PIXEL_DECODER_PREFIX}{missing[0]}.0.bias (their FPN convs have a bias)")
  extra = sorted(set(fpn_biases) - set(names))
  if extra:
    raise UserError(f"{where}: {PIXEL_DECODER_PREFIX}{extra[0]}.0.bias belongs to no FPN conv (have {names})")
  for n in names:
    want = np.shape(pd[n]["conv"]["kernel"])[-1:]
    if np.shape(fpn_biases[n]) != want:
      raise UserError(f"{where}: {PIXEL_DECODER_PREFIX}{n}.0.bias has shape {np.shape(fpn_biases[n])}, "
                      f"expected {want}")
  head["pixel_decoder"] = with_fpn_biases(pd, "authors", {n: np.asarray(b, dtype) for n, b in fpn_biases.items()})
  return head


# ------------------------------------------------------------------------------------ import
def authors_to_ours(src, *, scan_layers: bool = True, dtype=np.float32) -> dict:
  """The authors' checkpoint (folder, file, or state dict) -> our nested params (numpy):
  {'vision', 'projector', 'llm' (+ 'lora' children when the source is PEFT-wrapped), 'seg_projector',
  'mask_head': {'swin', 'pixel_decoder' (fpn='authors': with the FPN conv biases), 'mask_decoder'}}.
  llm/lm_head/bias is zeros (theirs has none); the embedding keeps its rows (see import_authors_checkpoint)."""
  ckpt = open_checkpoint(src)
  where = ckpt.where
  norm = {}
  for k in ckpt.keys:
    n = normalize_key(k)
    if n in norm:
      raise UserError(f"{where}: keys {norm[n]!r} and {k!r} name the same tensor")
    norm[n] = k
  nget = lambda n: ckpt.get(norm[n])  # noqa: E731
  mask_keys = [n for n in norm if n.startswith((SWIN_PREFIX, PIXEL_DECODER_PREFIX, PREDICTOR_PREFIX))]
  mask_set = set(mask_keys)
  rest = [n for n in norm if n not in mask_set]
  targets = sorted({m.group(1) for n in rest
                    if (m := re.fullmatch(r"model\.layers\.\d+\.self_attn\.(\w+)\.lora_[AB]\.weight", n))})
  names = authors_name_map(scan_layers=scan_layers, lora_targets=targets)
  try:
    params = names.to_ours(rest, nget, dtype=dtype, where=where)
  except nm.ConversionError as e:
    raise nm.ConversionError(f"{e} (the authors' key map is in segearth_jax/convert/authors_map.py)") from e
  params["mask_head"] = _mask_head(mask_keys, nget, where, scan_layers=scan_layers, dtype=dtype)
  llm = params["llm"]
  k = llm["lm_head"]["kernel"]
  llm["lm_head"]["bias"] = np.zeros((k.shape[-1],), k.dtype)
  return params


def authors_config(config):
  """A copy of the experiment ConfigDict ``config`` for a model from the authors' checkpoint: their pixel
  decoder FPN (model.pixel_decoder.fpn='authors'), which their weights need whatever the config says."""
  config = copy.deepcopy(config)
  with config.unlocked():
    config.model.pixel_decoder.fpn = "authors"
  return config


def _vision_tower_from_tensors(vision: Mapping, base) -> dict:
  """Our SigLIP params -> a Mipha config.json `vision_config.vision_tower` (HF names) with the sizes the
  tensors fix; head count, eps, activation and the selected layer are ``base``'s (the model ConfigDict)."""
  emb = vision["embeddings"]
  kernel = np.shape(emb["patch_embedding"]["kernel"])           # [p, p, C, hidden]
  side = int(round(np.sqrt(np.shape(emb["position_embedding"])[-2])))
  enc = vision["encoder"]
  block, _ = first_layer(enc, "layers")
  b = base.vision
  return dict(hidden_size=int(kernel[-1]), num_channels=int(kernel[2]), patch_size=int(kernel[0]),
              image_size=side * int(kernel[0]), num_hidden_layers=layer_count(enc, "layers", ("mlp", "fc1", "kernel")),
              intermediate_size=int(np.shape(block["mlp"]["fc1"]["kernel"])[-1]),
              num_attention_heads=int(b.num_attention_heads), layer_norm_eps=float(b.layer_norm_eps),
              hidden_act=str(b.hidden_act), mm_vision_select_layer=int(b.feature_layer))


def _llm_from_tensors(llm: Mapping) -> dict:
  """Our Phi params -> the llm fields the tensors fix (the rest stay the experiment's)."""
  block, _ = first_layer(llm, "layers")
  return dict(hidden_size=int(np.shape(llm["embed_tokens"]["embedding"])[1]),
              intermediate_size=int(np.shape(block["mlp"]["fc1"]["kernel"])[-1]),
              num_hidden_layers=layer_count(llm, "layers", ("mlp", "fc1", "kernel")))


def authors_model_fields(src, params: Mapping, base) -> dict:
  """The model config fields the authors' checkpoint ``src`` (imported as ``params``) fixes: {part: {field:
  value}} for 'vision', 'llm', 'swin', 'pixel_decoder', 'mask_decoder' (+ 'projector_hidden_act' from a
  config.json); see the module docstring. ``base``: the experiment's model ConfigDict. llm.vocab_size is
  the LM head's rows (theirs is never resized; the embedding is padded up to it)."""
  path = os.path.join(src, "config.json") if isinstance(src, (str, os.PathLike)) and os.path.isdir(src) else None
  if path and os.path.isfile(path):
    try:
      with open(path) as f:
        d = json.load(f)
    except (OSError, ValueError) as e:
      raise UserError(f"{path}: not a readable JSON file ({e})") from e
    if isinstance(d, Mapping) and "vision_config" not in d:   # their config without the vision tower's sizes
      d = dict(d, vision_config=dict(vision_tower=_vision_tower_from_tensors(params["vision"], base)))
      try:
        fields = mipha_model_fields(d)
      except UserError as e:
        raise UserError(f"{path}: {e}") from e
    else:
      fields = mipha_model_fields(path)   # its errors name the file
  else:
    tower = _vision_tower_from_tensors(params["vision"], base)
    tower["feature_layer"] = tower.pop("mm_vision_select_layer")
    fields = dict(vision=tower, llm=_llm_from_tensors(params["llm"]))
  fields["llm"] = dict(fields["llm"], vocab_size=int(np.shape(params["llm"]["lm_head"]["kernel"])[-1]))
  return {**fields, **mask2former_model_fields(None, params["mask_head"], base)}


def import_authors_checkpoint(path, config, *, overrides: Sequence[str] = (), vocab_size: int | None = None,
                              seed: int = 0):
  """The authors' checkpoint -> (params, the experiment ConfigDict of their model): its shapes are the
  checkpoint's (``authors_model_fields``), then ``overrides`` (``--config.a.b=v``), then ``authors_config``.

  Vocab: their embedding has fewer rows than their LM head (see the module docstring); it is padded up
  to the head, and both grow only to fit ``vocab_size`` (the tokenizer length, `<image>` included) or the
  config's vocab, rounded up as from-hf does (new rows: transformers' mean resizing); a head that is large
  enough is never grown. LoRA: a PEFT-wrapped source keeps its A/B (its rank and targets must match
  config.model.lora); a merged one gets fresh LoRA children (B = 0) when the config asks for LoRA.
  Raises UserError naming the key or the shape that does not fit."""
  probe = checkpoint_config(config, {}, overrides)
  params = authors_to_ours(path, scan_layers=bool(probe.model.scan_layers))
  config = authors_config(checkpoint_config(config, authors_model_fields(path, params, probe.model), overrides))
  m = config.model
  what = f"authors' checkpoint {path if isinstance(path, (str, os.PathLike)) else '(state dict)'}"
  llm = params["llm"]
  try:
    rank, have = lora_layout(llm)
  except UserError as e:
    raise UserError(f"{what}: {e}") from e
  want = int(m.lora.rank)
  if rank is not None:
    cfg = LoraConfig.from_dict(m.lora)
    if rank != want or have != sorted(cfg.targets):
      raise UserError(f"{what}: LoRA rank {rank} on {have}, but config.model.lora has rank {want} on "
                      f"{sorted(cfg.targets)}; rerun with --config.model.lora.rank={rank} "
                      f"--config.model.lora.targets={tuple(have)}")
  elif want:
    params["llm"] = new_lora_params(llm, LoraConfig.from_dict(m.lora), np.random.default_rng(seed))
  rows = int(np.shape(llm["embed_tokens"]["embedding"])[0])
  head = int(np.shape(llm["lm_head"]["kernel"])[-1])
  if rows > head:
    raise UserError(f"{what}: model.embed_tokens.weight has {rows} rows but lm_head.weight only {head}; "
                    f"expected an LM head at least as large as the embedding")
  want_rows = head if vocab_size is None else max(head, int(vocab_size))
  setup = ModelSetup.create(config, shd.single_device_mesh(), want_rows)
  padded = setup.model.config.llm.vocab_size
  if rows < head:
    params["llm"] = _pad_embedding(params["llm"], head, seed)
  if head < padded:  # the tokenizer or the config's vocab needs more rows: grow both as from-hf does
    params["llm"] = resize_token_embeddings(params["llm"], padded, pad_to_multiple_of=None, seed=seed)
  check_params(flatten(params), setup.abstract_params, what)
  m.llm.vocab_size = int(np.shape(params["llm"]["embed_tokens"]["embedding"])[0])   # the rows the params hold
  return params, config


def _pad_embedding(llm: dict, rows: int, seed: int) -> dict:
  """The embedding grown to ``rows`` as transformers' mean resizing does; the LM head is kept as it is
  (resize_token_embeddings grows a head of the embedding's size alongside, which is dropped here)."""
  n = int(np.shape(llm["embed_tokens"]["embedding"])[0])
  head = llm["lm_head"]
  grown = resize_token_embeddings(dict(embed_tokens=llm["embed_tokens"],
                                       lm_head=dict(kernel=np.asarray(head["kernel"])[:, :n],
                                                    bias=np.asarray(head["bias"])[:n])),
                                  rows, pad_to_multiple_of=None, seed=seed)
  return dict(llm, embed_tokens=grown["embed_tokens"])


def from_authors(src: str, out_dir: str, config, tokenizer=None, *, overrides: Sequence[str] = (),
                 seed: int | None = None) -> dict:
  """The authors' checkpoint -> a weights folder W (`segearth convert from-authors --checkpoint SRC
  --out W`; ``tokenizer``: theirs, with [SEG], saved to W/tokenizer). W/config.json is ``config`` with the
  checkpoint's shapes, then ``overrides``, then fpn='authors' (``import_authors_checkpoint``), so W loads
  with no flags. ``seed`` (default config.train.seed after the overrides): fresh LoRA A and new vocab rows.
  Returns the params."""
  if seed is None:
    seed = int(checkpoint_config(config, {}, overrides).train.seed)
  params, config = import_authors_checkpoint(src, config, overrides=overrides, seed=seed,
                                             vocab_size=len(tokenizer) if tokenizer is not None else None)
  save_weights(params, config, out_dir, tokenizer, note=dict(authors_checkpoint=os.path.abspath(src), seed=seed))
  return params


def from_authors_cli(args) -> int:
  """`segearth convert from-authors --checkpoint SRC --tokenizer DIR --out W [--config CFG] [--config.a.b=v ...]`."""
  config = load_config(args.config or DEFAULT_CONFIG)
  tokenizer = load_tokenizer(args.tokenizer)
  from_authors(args.checkpoint, args.out, config, tokenizer, overrides=getattr(args, "overrides", None) or [])
  print(f"written: {args.out} (use --weights {args.out} or --config.train.init_from={args.out})")
  return 0
