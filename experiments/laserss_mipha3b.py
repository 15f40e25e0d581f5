"""The paper recipe on LaSeRS: Mipha-3B + Mask2Former Swin-B, LoRA r8 on q/v, lambda_S 0.01,
AdamW LR 5e-5, no weight decay, 3% warmup, cosine, bf16 compute (method.md §4).

Start from a weights folder (`segearth convert from-hf ... --out W`, then `--config.train.init_from=W`).

Ablations (`experiments/laserss_mipha3b.py:ARG`, ARG = comma-separated `key=value` pairs and bare switches,
combinable, e.g. `:lambda_s=0.05,ls_form=paper`; the benchmark recipes rrsisd.py, refsegrs.py and
earthreason.py take the same ARG):
  lambda_s=X           L_S weight (the paper's 0.01; it reports 0.05 and 0.1 worse)
  no_ls                no attention supervision (lambda_S 0; the paper: -1.3 gIoU on RRSIS-D)
  ls_form=paper|baseline
                       the L_S expression: the paper's (attention averaged over layers and heads) or the
                       authors' code's (per layer, heads summed, summed over layers; the default here)
  ls_target=authors|touches
                       the L_S patch grid: the authors' (patch centres, the default here) or every patch the
                       mask touches (the paper's wording)
  ls_divisor=all|kept  L_S mean over every [SEG] row (the authors' batchmean, the default) or the rows
                       with a foreground
  lora_rank=R          LoRA rank (the paper's 8); alpha = 2 x R keeps alpha/r at the paper's 16/8 (our
                       choice). The weights folder must hold LoRA params of that rank: convert with
                       `segearth convert from-hf --config experiments/laserss_mipha3b.py:lora_rank=R ...`
"""
from segearth_jax.config import ConfigError, parse_arg
from segearth_jax.experiment import base_config

LS_FORMS = ("paper", "baseline")
LS_TARGETS = ("authors", "touches")
LS_DIVISORS = ("all", "kept")


def get_config(arg=None):
  v = parse_arg(arg, lambda_s=0.01, no_ls=False, ls_form="baseline", ls_target="authors", ls_divisor="all",
                lora_rank=8)
  for key, allowed in (("ls_form", LS_FORMS), ("ls_target", LS_TARGETS), ("ls_divisor", LS_DIVISORS)):
    if v[key] not in allowed:
      raise ConfigError(f"laserss_mipha3b.py: {key}={v[key]!r}; one of {', '.join(allowed)}")
  if v.no_ls and v.lambda_s != 0.01:
    raise ConfigError("laserss_mipha3b.py: no_ls and lambda_s contradict each other; give one")
  if v.lambda_s < 0 or v.lora_rank < 1:
    raise ConfigError(f"laserss_mipha3b.py: lambda_s={v.lambda_s} must be >= 0, lora_rank={v.lora_rank} >= 1")
  c = base_config("mipha3b")
  c.model.dtype = "bfloat16"
  c.model.attention_impl = "fused"
  c.model.pixel_decoder.fpn = "authors"   # their FPN; from the detectron2 checkpoint its biases start at 0
  c.model.lora.rank = v.lora_rank
  c.model.lora.alpha = 2.0 * v.lora_rank
  c.data.name = "laserss"
  c.data.text_buckets = (128, 256, 512, 1024, 2048)
  c.data.max_len = 2048
  c.train.steps = 50000
  c.train.eval_every, c.train.eval_examples = 2500, 256   # val gIoU while training; W/best keeps the best
  c.train.batch_size = 16
  c.train.lr = 5e-5
  c.train.weight_decay = 0.0
  c.train.warmup_ratio = 0.03
  c.loss.lambda_s = 0.0 if v.no_ls else v.lambda_s
  c.loss.ls_form = v.ls_form
  c.loss.ls_target, c.loss.ls_divisor = v.ls_target, v.ls_divisor   # default: their grid and batchmean
  return c
