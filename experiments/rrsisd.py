"""RRSIS-D (referring segmentation), trained on its own train split and scored on val / test (method.md §4:
the referring benchmarks are trained separately), from the same weights folder as the LaSeRS recipe:

    segearth train --config experiments/rrsisd.py --workdir R --config.train.init_from=W \\
        --config.data.data_dir=D --config.data.tokenizer=W/tokenizer
    segearth eval --config experiments/rrsisd.py --workdir R --split test     # or --split val

Settings:
- model, loss, optimizer, LR 5e-5, warmup 3%, cosine, bf16, batch 16: the LaSeRS recipe
  (experiments/laserss_mipha3b.py), i.e. the paper's baseline recipe (method.md §4);
- train prompt: the authors' training text with 'Reasoning Segmentation' -> 'Referring Segmentation' (our
  choice: RRSIS-D's instructions are referring expressions, its answers '<p>{category}</p>[SEG]');
- eval prompt: 'phi_chat_eval', our paraphrase of the authors' eval prefix, whose declarative-phrase
  branch ("only segment the target") is the referring case (the authors' own: experiments/authors_eval.py);
- steps 8000: our choice (method.md gives no per-benchmark schedule): about 10 passes over the ~12k train
  expressions at batch 16.

Ablations: the LaSeRS recipe's ARG (`experiments/rrsisd.py:no_ls` is the paper's RRSIS-D L_S ablation,
`:lambda_s=0.05`, `:ls_form=paper`, `:lora_rank=16`, combinable), listed in laserss_mipha3b.py.
"""
import os

from segearth_jax.config import ConfigError, load_config
from segearth_jax.data import templates

HERE = os.path.dirname(os.path.abspath(__file__))
REASONING, REFERRING = "Reasoning Segmentation", "Referring Segmentation"


def get_config(arg=None):
  c = load_config(os.path.join(HERE, "laserss_mipha3b.py" + (f":{arg}" if arg else "")))
  c.data.name = "rrsisd"
  train = templates.PRESETS["phi_chat"]
  if REASONING not in train:
    raise ConfigError(f"rrsisd.py: the 'phi_chat' template no longer says {REASONING!r}; update the referring one")
  c.data.train_template = train.replace(REASONING, REFERRING)
  c.data.eval_template = "phi_chat_eval"
  c.train.steps = 8000
  c.train.eval_every, c.train.eval_examples = 1000, 256   # val gIoU while training; W/best keeps the best
  return c
