"""The paper recipe on LaSeRS: Mipha-3B + Mask2Former Swin-B, LoRA r8 on q/v, lambda_S 0.01,
AdamW LR 5e-5, no weight decay, 3% warmup, cosine, bf16 compute (method.md §4)."""
from segearth_jax.experiment import base_config


def get_config(arg=None):
  c = base_config("mipha3b")
  c.model.dtype = "bfloat16"
  c.model.attention_impl = "fused"
  c.model.pixel_decoder.fpn = "authors"   # their FPN; from the detectron2 checkpoint its biases start at 0
  c.data.name = "laserss"
  c.data.text_buckets = (128, 256, 512, 1024, 2048)
  c.data.max_len = 2048
  c.train.steps = 50000
  c.train.batch_size = 16
  c.train.lr = 5e-5
  c.train.weight_decay = 0.0
  c.train.warmup_ratio = 0.03
  c.loss.lambda_s = 0.01
  c.loss.ls_form = "baseline"
  c.loss.ls_target, c.loss.ls_divisor = "authors", "all"   # their L_S grid (patch centres) and batchmean
  return c
