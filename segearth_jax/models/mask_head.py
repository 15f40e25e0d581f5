"""The mask head of SegEarth-R2: Swin backbone -> pixel decoder -> masked-attention decoder on [SEG] queries.

Submodules are named 'swin', 'pixel_decoder', 'mask_decoder' (the checkpoint converters' ours-prefixes).
The [SEG] projector (LLM width -> hidden_dim) lives with the assembled model, not here.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from segearth_jax.models.mask_decoder import MaskDecoder, MaskDecoderConfig
from segearth_jax.models.pixel_decoder import PixelDecoder, PixelDecoderConfig
from segearth_jax.models.swin import SwinBackbone, SwinConfig


class MaskHead(nn.Module):
  swin_cfg: SwinConfig
  pixel_cfg: PixelDecoderConfig
  decoder_cfg: MaskDecoderConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  # the Swin's blocks (blocks/ stacked or blocks_{j}, as the converters' scan_layers); the pixel decoder's
  # encoder is one nn.scan either way (so are its converters)
  scan_layers: bool = True
  remat_policy: str = "none"  # the trained pixel decoder's encoder layers (their sampled values are large)

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.swin = SwinBackbone(self.swin_cfg, scan_layers=self.scan_layers, **kw)
    self.pixel_decoder = PixelDecoder(self.pixel_cfg, remat_policy=self.remat_policy, **kw)
    self.mask_decoder = MaskDecoder(self.decoder_cfg, **kw)

  def features(self, swin_image):
    """swin_image [B,H,W,3] (normalised, NHWC) -> (mask_features [B,H/4,W/4,Cm], 3 maps strides 32/16/8).

    Depends only on the image: inference can run it once and decode many [SEG] sets against it."""
    return self.pixel_decoder(self.swin(swin_image))

  def decode(self, mask_features, multi_scale, queries, query_valid, **kw):
    return self.mask_decoder(queries, query_valid, multi_scale, mask_features, **kw)

  def __call__(self, swin_image, queries, query_valid, **kw):
    """-> mask logits [num_layers+1, B, K, H/4, W/4] (every decoder prediction; the last is the output)."""
    mask_features, multi_scale = self.features(swin_image)
    return self.decode(mask_features, multi_scale, queries, query_valid, **kw)
