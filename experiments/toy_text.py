"""Stage 1 of the toy demo: pre-train the tiny MLLM (SigLIP, projector, Phi) on the toy answers alone.

The paper starts from a pretrained Mipha-3B that already reads and copies text; the toy model starts from
random weights. Its answers mostly copy phrases out of the instruction, in order ("... the building and the
leftmost vehicle" -> "<p>the building</p>[SEG] and <p>the leftmost vehicle</p>[SEG]."), and trained jointly
with the mask head it learned that too slowly: half of the test masks were lost to a wrong or missing phrase
(README experiment log). The next-token objective skips the mask head (~95% of a joint step), so this stage
is cheap; `experiments/toy.py` then starts from its weights (`train.init_from`).
"""
import os

from segearth_jax.config import load_config


def get_config(arg=None):
  c = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy.py"))
  c.train.objective = "text"
  c.train.init_from = ""
  c.train.trainable = ("vision", "projector", "llm", "lm_head", "lora")
  c.train.lr_scale = {}          # toy.py slows the MLLM in stage 2; here it is all that trains
  # 600 x 16 answers: text loss ~0.05 from step ~300 on (2 cores: ~2 min)
  c.train.steps = 600
  c.train.batch_size = 16
  c.train.lr = 2e-3
  c.train.warmup_ratio = 0.05
  c.train.ckpt_every = 600
  return c
