"""SegEarth-R2 in PyTorch, assembled from transformers classes; loads `segearth convert to-torch` folders.

Parts (state_dict prefixes): `vision_tower` (SiglipVisionModel), `projector` (Linear-GELU-Linear),
`llm` (PhiForCausalLM; PEFT LoRA on q_proj/v_proj from DIR/adapter, or merged), `seg_projector` (Linear),
`mask_head` (Mask2FormerModel: Swin backbone + pixel decoder + masked-attention decoder; config.json's
`pixel_decoder_fpn` = 'authors' adds the authors' FPN conv biases and lateral ReLU, see `authors_fpn`).

Semantics match the JAX model (segearth_jax/models/segearth.py, generate.py, evaluate.py):
- image tokens: SigLIP hidden state `feature_layer` (HF hidden_states index), projected, spliced over the
  `<image>` placeholder run of the prompt;
- decoding with a KV cache, greedy or sampled (transformers' temperature / top-k / top-p warpers); every
  generated token is fed back, and the final hidden state (after the final LayerNorm) of each fed [SEG]
  (up to the infer.max_seg cap) is that [SEG]'s query;
- the mask decoder runs each [SEG] query alone (batch element per query, the learned queries replaced, zero
  query position), which is the JAX decoder's diagonal self-attention; the last prediction is upsampled
  bilinearly to the Swin canvas, thresholded at 0, cropped to the letterbox and resized (nearest) to the image.
"""
from __future__ import annotations

import copy
import json
import os

import ml_collections
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from segearth_jax.data.preprocess import Preprocessor
from segearth_jax.data.tokenizer import load_tokenizer
from segearth_jax.generate import seg_slots
from segearth_jax.tensor_io import SafetensorsReader

_BUFFERS = ("position_ids", "relative_position_index", "inv_freq")


def authors_fpn(decoder: nn.Module) -> None:
  """Makes a transformers Mask2FormerPixelDecoder compute the authors' FPN (model.pixel_decoder.fpn=
  'authors'): a bias on every FPN conv (`adapter_{k}.0.bias`, `layer_{k}.0.bias`) and a ReLU closing the
  lateral `adapter_{k}` path. In place: the decoder's forward runs these same Sequential modules."""
  for name, module in decoder.named_children():
    if name.startswith(("adapter_", "layer_")):
      conv = module[0]
      conv.bias = nn.Parameter(torch.zeros(conv.out_channels))
      if name.startswith("adapter_"):
        module.append(nn.ReLU())


class SegEarthR2Torch(nn.Module):

  def __init__(self, config: dict):
    super().__init__()
    from transformers import (Mask2FormerConfig, Mask2FormerModel, PhiConfig, PhiForCausalLM, SiglipVisionConfig,
                              SiglipVisionModel, SwinConfig)
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerTransformerModule

    self.config = config
    vcfg = SiglipVisionConfig(**{k: v for k, v in config["vision_config"].items()
                                 if k not in ("architectures", "model_type")})
    vcfg._attn_implementation = "eager"
    self.vision_tower = SiglipVisionModel(vcfg)
    dv, dl = vcfg.hidden_size, config["text_config"]["hidden_size"]
    act = config["projector_hidden_act"]
    if act != "gelu":
      raise ValueError(f"projector_hidden_act={act!r}: only 'gelu' (LLaVA mlp2x_gelu) is supported")
    self.projector = nn.Sequential(nn.Linear(dv, dl), nn.GELU(), nn.Linear(dl, dl))
    tcfg = PhiConfig(**{k: v for k, v in config["text_config"].items() if k not in ("architectures", "model_type")})
    tcfg._attn_implementation = "eager"
    self.llm = PhiForCausalLM(tcfg)
    m2f = dict(config["mask2former_config"])
    bb = {k: v for k, v in m2f.pop("backbone_config").items() if k not in ("model_type", "architectures")}
    mcfg = Mask2FormerConfig(backbone_config=SwinConfig(**bb), **m2f)
    self.mask_head = Mask2FormerModel(mcfg)
    if config.get("mask_decoder_heads", mcfg.num_attention_heads) != mcfg.num_attention_heads:
      dcfg = copy.deepcopy(mcfg)  # HF shares one head count; ours may differ per part
      dcfg.num_attention_heads = config["mask_decoder_heads"]
      self.mask_head.transformer_module = Mask2FormerTransformerModule(in_features=mcfg.feature_size, config=dcfg)
    if config.get("pixel_decoder_fpn", "mask2former") == "authors":
      authors_fpn(self.mask_head.pixel_level_module.decoder)
    self.seg_projector = nn.Linear(dl, mcfg.hidden_dim)
    self.tokenizer = None
    self._pre = None

  # ------------------------------------------------------------------------------------ loading
  @classmethod
  def from_pretrained(cls, path: str) -> "SegEarthR2Torch":
    with open(os.path.join(path, "config.json")) as f:
      config = json.load(f)
    model = cls(config)
    reader = SafetensorsReader(path, framework="pt")
    state = {k: reader.get(k) for k in reader.keys()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(_BUFFERS)]
    if missing or unexpected:
      raise ValueError(f"{path}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    lora = config.get("lora") or {}
    if lora.get("adapter"):
      from peft import PeftModel
      model.llm = PeftModel.from_pretrained(model.llm, os.path.join(path, lora["adapter"]))
    tok_dir = os.path.join(path, "tokenizer")
    if os.path.isdir(tok_dir):
      model.tokenizer = load_tokenizer(tok_dir)
    return model.eval()

  # ------------------------------------------------------------------------------------ pieces
  def _lm(self):
    return self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm

  def image_tokens(self, siglip_image: torch.Tensor) -> torch.Tensor:
    """[B,S,S,3] normalised (NHWC, as our preprocessing makes it) -> [B, N, D_llm]."""
    out = self.vision_tower(pixel_values=siglip_image.permute(0, 3, 1, 2), output_hidden_states=True)
    return self.projector(out.hidden_states[self.config["feature_layer"]])

  def mask_logits(self, swin_image: torch.Tensor, seg_hidden: torch.Tensor) -> torch.Tensor:
    """swin_image [1,M,M,3] (NHWC), seg_hidden [K, D_llm] -> last decoder prediction [K, M/4, M/4]."""
    plm = self.mask_head.pixel_level_module(swin_image.permute(0, 3, 1, 2))
    feats, mask_features = plm.decoder_hidden_states, plm.decoder_last_hidden_state
    tm = self.mask_head.transformer_module
    k = seg_hidden.shape[0]
    queries = self.seg_projector(seg_hidden)                       # [K, C]
    src, pos, sizes = [], [], []
    for i in range(tm.num_feature_levels):
      f = feats[i].expand(k, -1, -1, -1)                           # each [SEG] is its own batch element
      sizes.append(f.shape[-2:])
      pos.append(tm.position_embedder(f.shape, f.device, f.dtype, None).flatten(2).permute(2, 0, 1))
      src.append((tm.input_projections[i](f).flatten(2) + tm.level_embed.weight[i][None, :, None]).permute(2, 0, 1))
    out = tm.decoder(inputs_embeds=queries[None], multi_stage_positional_embeddings=pos,
                     pixel_embeddings=mask_features.expand(k, -1, -1, -1), encoder_hidden_states=src,
                     query_position_embeddings=torch.zeros_like(queries[None]), feature_size_list=sizes,
                     return_dict=True)
    return out.masks_queries_logits[-1][:, 0]

  def preprocessor(self):
    if self._pre is None:
      if self.tokenizer is None:
        raise ValueError("no tokenizer: load with from_pretrained(DIR) where DIR/tokenizer exists")
      cfg = ml_collections.ConfigDict(self.config["segearth_config"])
      self._pre = Preprocessor(cfg, self.tokenizer, train=False, source_name="segment")
    return self._pre

  # ------------------------------------------------------------------------------------ segment
  @torch.no_grad()
  def segment(self, image, instruction: str, max_new_tokens: int | None = None, *, temperature: float | None = None,
              top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
              max_seg: int | None = None) -> dict:
    """image: HxWx3 uint8 array or PIL image -> dict(answer, tokens, masks (HxW bool each), logits
    [generated, vocab] (the logits each token was picked from, before any warper), mask_logits [K, M/4, M/4]).

    Decoding options as the run's ``infer`` config (the exported one's values where None): temperature 0 =
    greedy; otherwise transformers' temperature, top-k (0 = off), top-p (1.0 = off) warpers and a
    multinomial draw from a torch Generator seeded with ``seed`` (the same distribution as the JAX model,
    not the same draws); ``max_seg`` the [SEG] cap (-1 = model.max_seg, 0 = none, n = n)."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    if isinstance(image, Image.Image):
      image = np.asarray(image.convert("RGB"))
    pre = self.preprocessor()
    ex = pre(dict(id="segment", image=np.asarray(image), masks=[], answer="", instruction=instruction))
    cfg = self.config
    infer = cfg["segearth_config"]["infer"]

    def option(value, name):
      return infer[name] if value is None else value

    T = int(max_new_tokens or infer["max_new_tokens"])
    temperature = float(option(temperature, "temperature"))
    top_k, top_p = int(option(top_k, "top_k")), float(option(top_p, "top_p"))
    eos, seg = cfg["eos_token_id"], cfg["seg_token_id"]
    max_seg = seg_slots(option(max_seg, "max_seg"), cfg["max_seg"], T)
    # transformers' sampling warpers in generate's order, each only when it changes the scores
    warpers = [] if temperature <= 0 else (
        ([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else [])
        + ([TopKLogitsWarper(top_k)] if top_k > 0 else []) + ([TopPLogitsWarper(top_p)] if top_p < 1.0 else []))
    generator = torch.Generator().manual_seed(int(option(seed, "seed")))

    def pick(logits):
      if temperature <= 0:
        return int(torch.argmax(logits[0]))
      scores = logits.float()
      for w in warpers:
        scores = w(None, scores)
      return int(torch.multinomial(F.softmax(scores, dim=-1), 1, generator=generator)[0, 0])

    p, s = int(ex["prompt_len"]), int(ex["image_start"])
    lm = self._lm()
    ids = torch.from_numpy(ex["input_ids"][:p].astype(np.int64))[None]
    emb = lm.model.embed_tokens(ids)
    img = self.image_tokens(torch.from_numpy(ex["siglip_image"])[None]).to(emb.dtype)
    emb = torch.cat([emb[:, :s], img, emb[:, s + img.shape[1]:]], 1)
    out = lm.model(inputs_embeds=emb, use_cache=True)
    cache = out.past_key_values
    logits = lm.lm_head(out.last_hidden_state[:, -1])
    tokens, step_logits, seg_hidden = [], [], []
    for _ in range(T):
      tok = pick(logits)
      tokens.append(tok)
      step_logits.append(logits[0])
      if tok == eos:  # ours feeds EOS too, but nothing it yields is kept
        break
      o = lm.model(inputs_embeds=lm.model.embed_tokens(torch.tensor([[tok]])), past_key_values=cache,
                   use_cache=True)
      cache = o.past_key_values
      if tok == seg and len(seg_hidden) < max_seg:
        seg_hidden.append(o.last_hidden_state[0, -1])
      logits = lm.lm_head(o.last_hidden_state[:, -1])
    tok = self.tokenizer
    answer = tok.decode(tokens, skip_special_tokens=False).replace(tok.eos_token or "", "").strip()
    h, w, rh, rw = (int(v) for v in ex["letterbox"])
    masks, mask_logits = [], None
    if seg_hidden:
      mask_logits = self.mask_logits(torch.from_numpy(ex["swin_image"])[None], torch.stack(seg_hidden))
      M = pre.M
      up = F.interpolate(mask_logits[None].float(), size=(M, M), mode="bilinear", align_corners=False)[0] > 0
      for m in up.numpy():
        crop = m[:rh, :rw].astype(np.uint8) * 255
        masks.append(np.asarray(Image.fromarray(crop).resize((w, h), Image.NEAREST)) > 127)
      mask_logits = mask_logits.numpy()
    return dict(answer=answer, tokens=tokens, masks=masks, logits=torch.stack(step_logits).numpy(),
                mask_logits=mask_logits)
