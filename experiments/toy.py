"""Tiny model on the toy LaSeRS: trains on a laptop CPU in minutes (`make demo`).

Tuned on 2 CPU cores within the demo's 15-minute budget (experiment log in the README):
- the Swin canvas is the toy images' own 256 px (mask logits 64x64): at 128 px, vehicles and airplane
  parts shrink to 1-3 cells of the stride-4 mask and their IoU stays near 0;
- the mask head is ~95% of a step here (the LLM is ~7%), so its cost is cut where quality held: one
  Swin block per stage except the third, 32-wide pixel-decoder features;
- no system preface and a one-line prompt: the from-scratch LLM needs none, and shorter rows are cheaper;
- batch 4 x 1800 steps: same samples/s as batch 8, twice the updates;
- lambda_S 0.01, the paper's value: at 0.1 the attention loss slowed the masks (dice) visibly;
- the demo starts this stage from experiments/toy_text.py's weights (`train.init_from`), the toy's stand-in
  for a pretrained MLLM; the MLLM (SigLIP, projector, Phi) then trains at 0.2x the learning rate so the
  mask losses adapt the [SEG] states without undoing the text (at 1x, half the phrase gains were lost;
  frozen, the masks lost the instance descriptors).
"""
from segearth_jax.experiment import base_config


def get_config(arg=None):
  c = base_config("tiny")
  c.data.name = "laserss"
  c.data.data_dir = "runs/demo/tfds"
  c.data.tokenizer = "runs/demo/toy_laserss/tokenizer"
  c.data.train_template = "toy"
  c.data.eval_template = "toy"   # the from-scratch LLM never saw any other preface
  c.data.text_buckets = (160, 192)
  c.data.max_len = 192
  c.model.swin.image_size = 256
  c.model.swin.depths = (1, 1, 2, 1)
  c.model.pixel_decoder.feature_size = 32
  c.model.pixel_decoder.mask_feature_size = 32
  c.loss.num_points = 1024
  c.loss.lambda_s = 0.01
  c.train.steps = 1800
  c.train.batch_size = 4
  c.train.lr = 1.5e-3
  c.train.weight_decay = 0.0
  c.train.warmup_ratio = 0.05
  c.train.log_every = 20
  c.train.ckpt_every = 600
  # the tiny model starts from random weights: train everything that the paper trains, plus the rest
  c.train.trainable = ("vision", "projector", "llm", "lm_head", "lora", "swin", "seg_projector",
                       "pixel_decoder", "mask_decoder")
  c.train.lr_scale = dict(llm=0.2, vision=0.2, projector=0.2)
  c.mesh.fsdp = 1
  c.mesh.data = -1
  c.infer.max_new_tokens = 64
  return c
