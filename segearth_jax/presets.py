"""Model-size presets shared by every experiment file.

Field names follow the transformers config of the class each part is checked against
(SiglipVisionConfig, PhiConfig, SwinConfig, Mask2FormerConfig) so a reader can map them one to one.
"""
from __future__ import annotations

import ml_collections


def image_grid(model_cfg) -> int:
  """Side of SigLIP's patch grid (27 in the paper). ``model_cfg``: the ``model`` ConfigDict or ModelConfig."""
  return int(model_cfg.vision.image_size) // int(model_cfg.vision.patch_size)


def image_tokens(model_cfg) -> int:
  """Image tokens spliced into the LLM input (729 in the paper): the one place this count is made."""
  return image_grid(model_cfg) ** 2


def _vision(**kw):
  base = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
              image_size=384, patch_size=14, num_channels=3, layer_norm_eps=1e-6,
              hidden_act="gelu_pytorch_tanh",
              feature_layer=-2)  # features of the second-to-last layer, no CLS (LLaVA `mm_vision_select_layer`)
  base.update(kw)
  return ml_collections.ConfigDict(base)


def _llm(**kw):
  base = dict(vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
              num_attention_heads=32, num_key_value_heads=32, partial_rotary_factor=0.4,
              rope_theta=10000.0, layer_norm_eps=1e-5, max_position_embeddings=2048,
              hidden_act="gelu_new", pad_vocab_to_multiple_of=64)
  base.update(kw)
  return ml_collections.ConfigDict(base)


def _swin(**kw):
  # Swin-B of the Mask2Former COCO-panoptic checkpoint (IN21k, window 12), read at 1024x1024.
  base = dict(image_size=1024, patch_size=4, num_channels=3, embed_dim=128, depths=(2, 2, 18, 2),
              num_heads=(4, 8, 16, 32), window_size=12, mlp_ratio=4.0, layer_norm_eps=1e-5,
              hidden_act="gelu")
  base.update(kw)
  return ml_collections.ConfigDict(base)


def _pixel_decoder(**kw):
  base = dict(feature_size=256, mask_feature_size=256, encoder_layers=6, num_attention_heads=8,
              encoder_n_points=4, encoder_feedforward_dim=1024, num_feature_levels=3,
              fpn="mask2former")  # or 'authors': SegEarth-R2's FPN (conv biases, lateral ReLU)
  base.update(kw)
  return ml_collections.ConfigDict(base)


def _mask_decoder(**kw):
  base = dict(hidden_dim=256, num_layers=9, num_attention_heads=8, dim_feedforward=2048,
              mask_embed_layers=3, pre_norm=False)
  base.update(kw)
  return ml_collections.ConfigDict(base)


def model_config(size: str = "tiny") -> ml_collections.ConfigDict:
  """`tiny`: seconds on a CPU; `mipha3b`: the paper's shapes (Mipha-3B + Mask2Former Swin-B)."""
  if size == "mipha3b":
    cfg = dict(
        vision=_vision(), llm=_llm(), swin=_swin(), pixel_decoder=_pixel_decoder(),
        mask_decoder=_mask_decoder(), projector_hidden_act="gelu", max_seg=8)
  elif size == "tiny":
    cfg = dict(
        vision=_vision(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                       num_attention_heads=4, image_size=112, patch_size=14),
        llm=_llm(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, partial_rotary_factor=0.5,
                 max_position_embeddings=512),
        swin=_swin(image_size=128, embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8),
                   window_size=4),
        pixel_decoder=_pixel_decoder(feature_size=64, mask_feature_size=64, encoder_layers=2,
                                     num_attention_heads=4, encoder_feedforward_dim=128),
        mask_decoder=_mask_decoder(hidden_dim=64, num_layers=3, num_attention_heads=4,
                                   dim_feedforward=128),
        projector_hidden_act="gelu", max_seg=4)
  else:
    raise ValueError(f"unknown model size {size!r}; choose 'tiny' or 'mipha3b'")
  cfg.update(
      lora=ml_collections.ConfigDict(dict(rank=8, alpha=16.0, dropout=0.05,
                                          targets=("q_proj", "v_proj"))),
      # 'plain': softmax attention (the reference); 'fused': jax.nn.dot_product_attention, with the
      # [SEG] rows recomputed from Q and K for the attention-supervision loss.
      attention_impl="plain",
      remat_policy="nothing_saveable",  # or 'none', 'dots_saveable', 'dots_with_no_batch_dims_saveable'
      scan_layers=True,
      dtype="float32",        # compute dtype; params stay float32 ('bfloat16' for the paper recipe)
      param_dtype="float32",
  )
  return ml_collections.ConfigDict(cfg)
