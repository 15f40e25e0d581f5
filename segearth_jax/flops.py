"""Model FLOPs of one training sample, by formula (XLA's cost analysis counts a scan body once), and the
chips' dense bf16 peak they are measured against (MFU).

Matmul FLOPs = 2 * multiply-adds. Backward costs: a trained part 2x its forward (grads w.r.t.
activations and weights); a frozen part the gradient flows through (the LLM base under LoRA) 1x; a
frozen part nothing flows back into (SigLIP, projector, Swin) 0x.
"""
from __future__ import annotations

from segearth_jax.presets import image_tokens

# Dense bf16 peak FLOP/s per device, by substring of jax's device_kind (first match wins).
PEAK_FLOPS = (
    ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
    ("A100", 312e12), ("L4", 121e12), ("B200", 2250e12),
    ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v6", 918e12),
    ("TPU v4", 275e12),
)


def peak_flops(device) -> float | None:
  if device.platform == "cpu":
    return None
  kind = getattr(device, "device_kind", "")
  for key, value in PEAK_FLOPS:
    if key.lower() in kind.lower():
      return value
  return None


def _transformer_layer(d, ffn, tokens, kv_tokens=None):
  kv_tokens = tokens if kv_tokens is None else kv_tokens
  proj = 2 * tokens * 4 * d * d                  # q, k, v, o
  mlp = 2 * tokens * 2 * d * ffn
  attn = 2 * 2 * tokens * kv_tokens * d          # QK^T and AV
  return proj + mlp + attn


def forward_flops(model_cfg, text_tokens: int) -> dict:
  v, l = model_cfg.vision, model_cfg.llm
  n_img = image_tokens(model_cfg)
  seq = n_img + text_tokens
  out = {}
  out["vision"] = v.num_hidden_layers * _transformer_layer(v.hidden_size, v.intermediate_size, n_img) \
      + 2 * n_img * v.patch_size ** 2 * 3 * v.hidden_size
  out["projector"] = 2 * n_img * (v.hidden_size * l.hidden_size + l.hidden_size ** 2)
  out["llm"] = l.num_hidden_layers * _transformer_layer(l.hidden_size, l.intermediate_size, seq)
  out["lm_head"] = 2 * seq * l.hidden_size * l.vocab_size
  s = model_cfg.swin
  res = s.image_size // s.patch_size
  swin = 2 * res * res * s.patch_size ** 2 * 3 * s.embed_dim
  for i, depth in enumerate(s.depths):
    d = s.embed_dim * 2 ** i
    r = res // 2 ** i
    w = min(s.window_size, r)
    swin += depth * _transformer_layer(d, int(d * s.mlp_ratio), r * r, w * w)
    if i + 1 < len(s.depths):
      swin += 2 * (r // 2) ** 2 * 4 * d * 2 * d
  out["swin"] = swin
  p = model_cfg.pixel_decoder
  c = p.feature_size
  tok = sum((s.image_size // st) ** 2 for st in (8, 16, 32))
  per = 2 * tok * (c * c + c * p.num_attention_heads * 3 * 3 * p.encoder_n_points + c * c) \
      + 2 * tok * 2 * c * p.encoder_feedforward_dim
  hw4 = (s.image_size // 4) ** 2
  out["pixel_decoder"] = p.encoder_layers * per + 2 * hw4 * (s.embed_dim * c + 9 * c * c + c * p.mask_feature_size)
  m = model_cfg.mask_decoder
  k = model_cfg.max_seg
  per_dec = 0
  for i in range(m.num_layers):
    kv = (s.image_size // (32, 16, 8)[i % 3]) ** 2
    per_dec += 2 * k * 4 * m.hidden_dim ** 2 + 2 * 2 * k * kv * m.hidden_dim \
        + _transformer_layer(m.hidden_dim, m.dim_feedforward, k)
  out["mask_decoder"] = per_dec + (m.num_layers + 1) * 2 * k * hw4 * m.hidden_dim
  return out


def train_flops_per_sample(model_cfg, text_tokens: int, trainable=(), *, mask_head: bool = True) -> float:
  """``mask_head`` False: the text objective's step (the MLLM only)."""
  fwd = forward_flops(model_cfg, text_tokens)
  if not mask_head:
    fwd = {k: v for k, v in fwd.items() if k not in ("swin", "pixel_decoder", "mask_decoder")}
  trainable = set(trainable)
  mult = dict(vision=1.0, projector=1.0, swin=1.0,
              llm=3.0 if "llm" in trainable else 2.0,
              lm_head=3.0, pixel_decoder=3.0, mask_decoder=3.0)
  for part in ("vision", "projector", "swin"):
    if part in trainable:
      mult[part] = 3.0
  return float(sum(mult[k] * v for k, v in fwd.items()))
