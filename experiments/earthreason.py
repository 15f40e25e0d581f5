"""EarthReason (reasoning segmentation: questions, explained answers, no-target questions), trained on its
own train split and scored on val / test, from the same weights folder as the LaSeRS recipe:

    segearth train --config experiments/earthreason.py --workdir R --config.train.init_from=W \\
        --config.data.data_dir=D --config.data.tokenizer=W/tokenizer
    segearth eval --config experiments/earthreason.py --workdir R --split test     # or --split val

Settings:
- model, loss, optimizer, schedule, batch: the LaSeRS recipe (experiments/laserss_mipha3b.py), the paper's
  baseline recipe (method.md §4);
- prompts: the LaSeRS ones (method.md §5): the authors' reasoning-segmentation training text ('phi_chat')
  and the eval prefix's question branch ("segment the target and explain", 'phi_chat_eval'); EarthReason's
  instructions are questions and its answers explanations, as LaSeRS's implicit ones;
- steps 3000: our choice (method.md gives no per-benchmark schedule), a few thousand steps at batch 16 for
  its ~2.4k train images with several questions each.

Ablations: the LaSeRS recipe's ARG (`experiments/earthreason.py:no_ls`, ...), listed in laserss_mipha3b.py.
"""
import os

from segearth_jax.config import load_config

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
  c = load_config(os.path.join(HERE, "laserss_mipha3b.py" + (f":{arg}" if arg else "")))
  c.data.name = "earthreason"
  c.data.train_template, c.data.eval_template = "phi_chat", "phi_chat_eval"
  c.train.steps = 3000
  c.train.eval_every, c.train.eval_examples = 500, 256   # val gIoU while training; W/best keeps the best
  return c
