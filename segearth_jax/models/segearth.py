"""SegEarth-R2: the one model definition used by train, eval, predict and export.

image -> SigLIP -> projector -> spliced into the Phi-2 (+LoRA) input at the image placeholder ->
[SEG] hidden states (final LayerNorm) -> [SEG] projector -> Mask2Former masked-attention decoder over
the Swin / pixel-decoder features of the 1024 copy of the image -> mask logits (one mask per [SEG]).

``ModelConfig`` is the typed form of the experiment's ``model`` ConfigDict (presets.model_config), made
once by ``build_model``; every module reads its part config from it. Params: vision/, projector/, llm/
(the MLLM), seg_projector/, mask_head/{swin, pixel_decoder, mask_decoder}.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from segearth_jax.errors import UserError
from segearth_jax.models.attention import ATTENTION_IMPLS
from segearth_jax.models.layers import activation, config_from_dict, dense, dtype_of, remat_policy
from segearth_jax.models.lora import LoraConfig
from segearth_jax.models.mask_decoder import MaskDecoderConfig
from segearth_jax.models.mask_head import MaskHead
from segearth_jax.models.mllm import MLLM
from segearth_jax.models.phi import PhiConfig
from segearth_jax.models.pixel_decoder import PixelDecoderConfig
from segearth_jax.models.siglip import SiglipConfig
from segearth_jax.models.swin import SwinConfig

_PARTS = ("vision", "llm", "lora", "swin", "pixel_decoder", "mask_decoder")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Frozen and hashable (a flax module attribute). Defaults are presets.model_config('mipha3b');
  dtypes stay strings (layers.dtype_of converts where used); ``lora`` None means no LoRA."""
  vision: SiglipConfig = SiglipConfig()
  llm: PhiConfig = PhiConfig()
  lora: LoraConfig | None = LoraConfig()
  swin: SwinConfig = SwinConfig()
  pixel_decoder: PixelDecoderConfig = PixelDecoderConfig(feature_channels=SwinConfig().dims)
  mask_decoder: MaskDecoderConfig = MaskDecoderConfig()
  projector_hidden_act: str = "gelu"
  max_seg: int = 8                          # [SEG] slots per sample (static shapes)
  attention_impl: str = "plain"             # 'plain' (the reference), 'fused' or 'fused_xla'
  remat_policy: str = "nothing_saveable"    # or 'none', a layers.remat_policy name
  scan_layers: bool = True                  # SigLIP, Phi and Swin layers as one nn.scan each
  dtype: str = "float32"                    # compute dtype
  param_dtype: str = "float32"

  def __post_init__(self):
    if self.pixel_decoder.feature_channels != self.swin.dims:
      raise UserError(f"model.pixel_decoder: feature_channels {self.pixel_decoder.feature_channels} differ "
                      f"from the Swin's stage widths {self.swin.dims}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise UserError(f"model.attention_impl={self.attention_impl!r}: choose one of {list(ATTENTION_IMPLS)}")
    if self.max_seg < 1:
      raise UserError(f"model.max_seg={self.max_seg} must be >= 1")
    # fail here, with the field's name, rather than deep inside a trace
    for name in ("dtype", "param_dtype"):
      try:
        dtype_of(getattr(self, name))
      except UserError as e:
        raise UserError(f"model.{name}: {e}") from None
    try:
      remat_policy(self.remat_policy)
      activation(self.projector_hidden_act)
    except UserError as e:
      raise UserError(f"model: {e}") from None

  @classmethod
  def from_dict(cls, cfg: Mapping[str, Any]) -> "ModelConfig":
    """From the experiment's ``model`` ConfigDict (or a plain dict; strict at every level). A part left
    out takes its dataclass defaults; ``lora`` None or ``lora.rank`` 0 means no LoRA."""
    d = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    parts = {name: d.pop(name, {}) for name in _PARTS}
    lora = parts["lora"]
    swin = SwinConfig.from_dict(parts["swin"])
    return config_from_dict(
        cls, d, "model",
        vision=SiglipConfig.from_dict(parts["vision"]),
        llm=PhiConfig.from_dict(parts["llm"]),
        lora=None if lora is None or dict(lora).get("rank") == 0 else LoraConfig.from_dict(lora),
        swin=swin,
        pixel_decoder=PixelDecoderConfig.from_dict(parts["pixel_decoder"], swin.dims),
        mask_decoder=MaskDecoderConfig.from_dict(parts["mask_decoder"]))


def gather_rows(x: jax.Array, positions: jax.Array) -> jax.Array:
  """x [B,L,D], positions [B,K] -> [B,K,D]."""
  return jnp.take_along_axis(x, positions[..., None].astype(jnp.int32), axis=1)


class SegEarthR2(MLLM):
  """The MLLM (vision, projector, llm; models/mllm.py) plus the [SEG] projector and the mask head."""

  def setup(self):
    super().setup()
    c = self.config
    dtype, pdtype = dtype_of(c.dtype), dtype_of(c.param_dtype)
    self.seg_projector = dense(c.mask_decoder.hidden_dim, ("embed", "head_embed"), dtype=dtype,
                               param_dtype=pdtype)
    self.mask_head = MaskHead(c.swin, c.pixel_decoder, c.mask_decoder, dtype=dtype, param_dtype=pdtype,
                              scan_layers=c.scan_layers, remat_policy=c.remat_policy)

  def masks_from_hidden(self, swin_image, seg_hidden, seg_valid):
    """swin_image [B,H,W,3], seg_hidden [B,K,D] (the LLM's [SEG] rows), seg_valid [B,K] -> mask logits
    [num_layers+1, B, K, H/4, W/4]. Generation calls it on the hidden states it collected."""
    queries = self.seg_projector(seg_hidden)
    return self.mask_head(swin_image, queries, seg_valid)

  def __call__(self, batch: dict, *, train: bool = False, with_seg_attn: bool = True) -> dict:
    """Teacher-forced forward: logits, [SEG]->image attention (for L_S), mask logits [P,B,K,h,w]."""
    out = self.language(batch, train=train, with_seg_attn=with_seg_attn)
    seg_hidden = gather_rows(out["hidden"], batch["seg_positions"])
    mask_logits = self.masks_from_hidden(batch["swin_image"], seg_hidden, batch["seg_valid"])
    return dict(logits=out["logits"], seg_attn=out.get("seg_attn"), mask_logits=mask_logits)


def build_model(model_cfg: Mapping | ModelConfig, vocab_size: int | None = None) -> SegEarthR2:
  """The model of a ``model`` ConfigDict or a ModelConfig. ``vocab_size`` (the tokenizer's) grows the
  LLM's vocab, never shrinks it, rounded up to llm.pad_vocab_to_multiple_of for even sharding."""
  cfg = model_cfg if isinstance(model_cfg, ModelConfig) else ModelConfig.from_dict(model_cfg)
  if vocab_size is not None:
    mult = cfg.llm.pad_vocab_to_multiple_of or 1
    grown = max(cfg.llm.vocab_size, -(-int(vocab_size) // mult) * mult)
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, vocab_size=grown))
  return SegEarthR2(cfg)
