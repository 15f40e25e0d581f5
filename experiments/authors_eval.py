"""The authors' evaluation protocol (SegEarth-R2's segearth_r2/eval/eval.py), for a checkpoint trained with
their code and imported with `segearth convert from-authors`:

- prompt: their DEFAULT_PREFIX_INST + "\\n" + the stripped instruction in the 'llava_phi' conversation
  (data.eval_template 'authors_eval', data.strip_instruction);
- decoding: sampling at temperature 0.2, transformers' default top_k 50, top_p 1.0, 1 beam, 128 new tokens,
  every generated [SEG] decoded (infer preset 'authors'; the seed is infer.seed);
- float32 compute (eval.dtype);
- GT masks stretched bilinearly to the canvas and thresholded > 0, scored on the whole canvas
  (eval.gt_resize 'authors');
- the model: the paper's (the checkpoint's own config.json, written by from-authors, holds its shapes and the
  'authors' pixel-decoder FPN).

    segearth convert from-authors --checkpoint THEIRS --tokenizer THEIR_TOKENIZER --out W
    segearth eval --config experiments/authors_eval.py --workdir W --config.data.data_dir=D

Variants (`experiments/authors_eval.py:ARG`):
  toy            the same protocol on the toy model and data (runs on a CPU; a smoke test of the protocol)
  teacher_forced their earlier contest protocol: the masks of the reference answer's [SEG] (no generation)
"""
import os

from segearth_jax.config import load_config
from segearth_jax.experiment import apply_decoding

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
  variants = set(filter(None, (arg or "").split(",")))
  unknown = variants - {"toy", "teacher_forced"}
  if unknown:
    raise ValueError(f"authors_eval.py: unknown variant(s) {sorted(unknown)}; known: toy, teacher_forced")
  c = load_config(os.path.join(HERE, "toy.py" if "toy" in variants else "laserss_mipha3b.py"))
  c.data.eval_template = "authors_eval"
  c.data.strip_instruction = True
  apply_decoding(c, "authors")
  c.eval.dtype = "float32"
  c.eval.gt_resize = "authors"
  c.eval.teacher_forced = "teacher_forced" in variants
  if "toy" in variants:   # the toy BPE never saw their long preface: it takes many more tokens
    c.data.text_buckets, c.data.max_len = (384,), 384
  return c
