"""RefSegRS (referring segmentation), trained on its own train split and scored on val / test (method.md §4),
from the same weights folder as the LaSeRS recipe:

    segearth train --config experiments/refsegrs.py --workdir R --config.train.init_from=W \\
        --config.data.data_dir=D --config.data.tokenizer=W/tokenizer
    segearth eval --config experiments/refsegrs.py --workdir R --split test     # or --split val

Settings: the RRSIS-D recipe (experiments/rrsisd.py: the paper's baseline recipe, the referring prompts) on
RefSegRS, with steps 1500: our choice, about 10 passes over the ~2.2k train phrases at batch 16.
Ablations: the LaSeRS recipe's ARG (`experiments/refsegrs.py:lambda_s=0.05,ls_form=paper`, ...), listed in
laserss_mipha3b.py.
"""
import os

from segearth_jax.config import load_config

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
  c = load_config(os.path.join(HERE, "rrsisd.py" + (f":{arg}" if arg else "")))
  c.data.name = "refsegrs"
  c.train.steps = 1500
  c.train.eval_every, c.train.eval_examples = 250, 256   # val gIoU while training; W/best keeps the best
  return c
