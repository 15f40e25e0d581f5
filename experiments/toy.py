"""Tiny model on the toy LaSeRS: trains on a laptop CPU in minutes (`make demo`)."""
from segearth_jax.experiment import base_config


def get_config(arg=None):
  c = base_config("tiny")
  c.data.name = "laserss"
  c.data.data_dir = "runs/demo/tfds"
  c.data.manual_dir = "runs/demo/toy_laserss"
  c.data.tokenizer = "runs/demo/toy_laserss/tokenizer"
  c.data.text_buckets = (160, 224)
  c.data.max_len = 224
  # Trained from scratch, the tiny LLM has never seen the longer eval preface: evaluate with the train prompt.
  c.data.eval_prompt = c.data.train_prompt
  c.loss.num_points = 1024
  c.train.steps = 1200
  c.train.batch_size = 8
  c.train.lr = 2e-3
  c.train.weight_decay = 0.0
  c.train.warmup_ratio = 0.05
  c.train.log_every = 10
  c.train.ckpt_every = 400
  # the tiny model starts from random weights: train everything that the paper trains, plus the rest
  c.train.trainable = ("vision", "projector", "llm", "lm_head", "lora", "swin", "seg_projector",
                       "pixel_decoder", "mask_decoder")
  c.mesh.fsdp = 1
  c.mesh.data = -1
  c.infer.max_new_tokens = 48
  return c
