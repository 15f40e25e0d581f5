"""Per-example preprocessing: one decoded TFDS example -> numpy arrays with static shapes.

Images: SigLIP canvas S x S (bicubic, (x/255 - 0.5)/0.5); Swin canvas M x M letterboxed (scale = M / max(h, w),
bilinear, pasted top-left on value 128, then ImageNet mean/std). Masks: letterboxed like the Swin image
(nearest) and, for L_S, resized to S x S (nearest) and max-pooled over P x P patches (a patch is foreground
if the mask touches it; the G*P <= S pixels the patch conv sees).

Text: f"{system}{sep}{user_role}: {prompt}{sep}{assistant_role}: {answer}{eos}" with the single '<image>'
placeholder expanded to N_img = presets.image_tokens(model) image-token ids. The template pieces are
tokenized once; per example only the instruction and the answer are (so a BPE merge never crosses a piece
boundary — the same at train and eval).
Too long: the instruction is cut first, then the answer's end; both counted. Every example is padded to the
longest bucket; `trim_to_bucket` cuts a batch to the smallest bucket that fits it.
"""
from __future__ import annotations

import json
import logging
import re

import numpy as np
from PIL import Image

from segearth_jax import presets
from segearth_jax.data import rle
from segearth_jax.data.answer import IMAGE_TOKEN, SEG_TOKEN, seg_count
from segearth_jax.data.batch import IGNORE
from segearth_jax.data.tokenizer import image_token_id, seg_token_id
from segearth_jax.errors import UserError

INSTRUCTION = "{instruction}"   # where a prompt template takes the instruction
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
_WARN_EVERY = 1000
log = logging.getLogger(__name__)


def _text(v) -> str:
  return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def siglip_image(img: np.ndarray, size: int) -> np.ndarray:
  im = Image.fromarray(img).resize((size, size), Image.BICUBIC)
  x = np.asarray(im, dtype=np.float32)
  x *= 2.0 / 255.0
  x -= 1.0
  return x


def letterbox_size(h: int, w: int, canvas: int) -> tuple[int, int]:
  scale = canvas / max(h, w)
  return max(1, min(canvas, int(round(h * scale)))), max(1, min(canvas, int(round(w * scale))))


# x/255 -> (x - mean)/std as one multiply-add per channel
_SWIN_SCALE = (1.0 / (255.0 * IMAGENET_STD)).astype(np.float32)
_SWIN_BIAS = (-IMAGENET_MEAN / IMAGENET_STD).astype(np.float32)


def swin_image(img: np.ndarray, canvas: int) -> tuple[np.ndarray, tuple[int, int]]:
  h, w = img.shape[:2]
  rh, rw = letterbox_size(h, w, canvas)
  pasted = np.full((canvas, canvas, 3), 128, np.uint8)
  pasted[:rh, :rw] = img if (rh, rw) == (h, w) else np.asarray(
      Image.fromarray(img).resize((rw, rh), Image.BILINEAR))
  x = pasted.astype(np.float32)
  x *= _SWIN_SCALE
  x += _SWIN_BIAS
  return x, (rh, rw)


def letterbox_mask(mask: np.ndarray, canvas: int, rh: int, rw: int) -> np.ndarray:
  out = np.zeros((canvas, canvas), np.uint8)
  h, w = mask.shape
  out[:rh, :rw] = mask if (rh, rw) == (h, w) else np.asarray(
      Image.fromarray(mask).resize((rw, rh), Image.NEAREST))
  return out


def mask_grid(mask: np.ndarray, size: int, grid: int, patch: int) -> np.ndarray:
  """(h, w) mask -> f32 (grid, grid): a patch is 1 where the size x size mask touches it."""
  m = np.asarray(Image.fromarray(mask).resize((size, size), Image.NEAREST))[:grid * patch, :grid * patch]
  return m.reshape(grid, patch, grid, patch).max(axis=(1, 3)).astype(np.float32)


def _template_pieces(template: str) -> list[str]:
  """'a <image> b {instruction} c' -> ['a ', '<image>', ' b ', '{instruction}', ' c']."""
  pieces = re.split(f"({re.escape(IMAGE_TOKEN)}|{re.escape(INSTRUCTION)})", template)
  if pieces.count(IMAGE_TOKEN) != 1 or pieces.count(INSTRUCTION) != 1:
    raise UserError(f"prompt template needs exactly one {IMAGE_TOKEN!r} and one {INSTRUCTION!r}: {template!r}")
  return pieces


class Preprocessor:
  """Callable: decoded example dict -> dict of numpy arrays (the batch contract: data/batch.py), plus
  `length` (real tokens) that trim_to_bucket consumes."""

  def __init__(self, config, tokenizer, train: bool, source_name: str = "dataset"):
    m, d = config.model, config.data
    self.train, self.source_name = train, source_name
    self.S, self.P = int(m.vision.image_size), int(m.vision.patch_size)
    self.G, self.n_img = presets.image_grid(m), presets.image_tokens(m)
    self.M, self.K = int(m.swin.image_size), int(m.max_seg)
    self.buckets = tuple(sorted(int(b) for b in d.text_buckets))
    self.max_len = min(int(d.max_len), self.buckets[-1])
    self.skip_bad = bool(d.skip_bad)
    self.tok = tokenizer
    self.seg_id, self.image_id = seg_token_id(tokenizer), image_token_id(tokenizer)
    pad = tokenizer.pad_token_id
    self.pad_id = int(pad if pad is not None else tokenizer.eos_token_id)
    self.eos = d.eos
    # token ids of the fixed pieces, once
    pieces = _template_pieces(d.train_prompt if train else d.eval_prompt)
    pieces[0] = f"{d.system}{d.sep}{d.user_role}: " + pieces[0]
    pieces[-1] = pieces[-1] + f"{d.sep}{d.assistant_role}:"
    self.pieces = [p if p in (IMAGE_TOKEN, INSTRUCTION) else self._encode(p) for p in pieces]
    self.fixed_len = sum(self.n_img if p == IMAGE_TOKEN else len(p) for p in self.pieces if p != INSTRUCTION)
    self.stats = {"examples": 0, "seg_capped": 0, "seg_dropped": 0, "text_cut": 0, "bad_skipped": 0}

  def _encode(self, text: str) -> list[int]:
    return list(self.tok.encode(text, add_special_tokens=False)) if text else []

  def _warn(self, key: str, what: str):
    n = self.stats[key]
    if n == 1 or n % _WARN_EVERY == 0:
      log.warning("%s: %d so far (%s)", what, n, self.source_name)

  # -- text ------------------------------------------------------------------------------------

  def tokens(self, instruction: str, answer: str | None):
    """(ids, labels, image_start, prompt_len) before padding; answer None = eval prompt only."""
    instr = self._encode(instruction)
    ans = self._encode(f" {answer}{self.eos}") if answer is not None else []
    over = self.fixed_len + len(instr) + len(ans) - self.max_len
    if over > 0:
      self.stats["text_cut"] += 1
      self._warn("text_cut", f"text longer than {self.max_len} tokens cut")
      cut = min(over, len(instr))
      instr = instr[:len(instr) - cut]
      over -= cut
      if over > 0:
        if over > len(ans):
          raise UserError(f"data.max_len={self.max_len} is shorter than the fixed prompt "
                          f"({self.fixed_len} tokens with {self.n_img} image tokens)")
        ans = ans[:len(ans) - over]
    ids, image_start = [], 0
    for p in self.pieces:
      if p == IMAGE_TOKEN:
        image_start = len(ids)
        ids.extend([self.image_id] * self.n_img)
      elif p == INSTRUCTION:
        ids.extend(instr)
      else:
        ids.extend(p)
    prompt_len = len(ids)
    ids.extend(ans)
    labels = [IGNORE] * prompt_len + ans
    return ids, labels, image_start, prompt_len

  # -- whole example -----------------------------------------------------------------------------

  def __call__(self, ex: dict):
    rid = _text(ex.get("id", "?"))
    try:
      return self._process(ex, rid)
    except UserError as e:
      if not self.skip_bad:
        raise
      self.stats["bad_skipped"] += 1
      log.warning("skipped bad record (%d so far): %s", self.stats["bad_skipped"], e)
      return None

  def _process(self, ex: dict, rid: str):
    img = np.asarray(ex["image"])
    if img.ndim != 3 or img.shape[2] != 3:
      raise UserError(f"{self.source_name}: record {rid}: field 'image': expected HxWx3, got {img.shape}")
    h, w = img.shape[:2]
    masks = [np.asarray(m)[..., 0] if np.ndim(m) == 3 else np.asarray(m) for m in ex["masks"]]
    for k, m in enumerate(masks):
      if m.shape != (h, w):
        raise UserError(f"{self.source_name}: record {rid}: field 'masks[{k}]': mask size {list(m.shape)} "
                        f"!= image size {[h, w]}")
    answer = _text(ex["answer"])
    n_seg = seg_count(answer)
    if n_seg != len(masks):
      raise UserError(f"{self.source_name}: record {rid}: field 'masks': {len(masks)} masks but "
                      f"{n_seg} {SEG_TOKEN} in 'answer'")
    self.stats["examples"] += 1
    ids, labels, image_start, prompt_len = self.tokens(_text(ex["instruction"]),
                                                       answer if self.train else None)
    K, L = self.K, self.max_len
    if self.train:
      seg_pos = [i for i in range(prompt_len, len(ids)) if ids[i] == self.seg_id]
      if len(seg_pos) < len(masks):  # [SEG]s lost to the answer cut take their masks with them
        self.stats["seg_dropped"] += len(masks) - len(seg_pos)
        masks = masks[:len(seg_pos)]
    else:
      seg_pos = []
    n = len(masks)
    beyond_cap = masks[K:]
    if n > K:
      self.stats["seg_capped"] += 1
      self._warn("seg_capped", f"records with more than {K} [SEG] capped to {K}")
      masks, seg_pos = masks[:K], seg_pos[:K]
    out = {}
    out["siglip_image"] = siglip_image(img, self.S)
    out["swin_image"], (rh, rw) = swin_image(img, self.M)
    lb = np.zeros((K, self.M, self.M), np.uint8)
    grid = np.zeros((K, self.G, self.G), np.float32)
    for k, m in enumerate(masks):
      lb[k] = letterbox_mask(m, self.M, rh, rw)
      grid[k] = mask_grid(m, self.S, self.G, self.P)
    input_ids = np.full((L,), self.pad_id, np.int32)
    input_ids[:len(ids)] = ids
    attn = np.zeros((L,), np.int32)
    attn[:len(ids)] = 1
    out["input_ids"], out["attention_mask"] = input_ids, attn
    lab = np.full((L,), IGNORE, np.int32)
    lab[:len(labels)] = labels
    out["labels"] = lab
    out["image_start"] = np.int32(image_start)
    sp = np.zeros((K,), np.int32)
    sp[:len(seg_pos)] = seg_pos
    out["seg_positions"] = sp
    valid = np.zeros((K,), bool)
    valid[:len(masks)] = True
    out["seg_valid"] = valid
    out["masks"], out["mask_grid"] = lb, grid
    out["letterbox"] = np.array([h, w, rh, rw], np.int32)
    out["sample_valid"] = np.bool_(True)
    out["length"] = np.int32(len(ids))
    out["example_id"] = np.str_(rid)
    if not self.train:
      out["prompt_len"] = np.int32(prompt_len)
      out["answer"] = np.str_(answer)
      subsets = ex.get("subsets", [])
      out["subsets"] = np.str_("|".join(_text(s) for s in subsets))
      # Targets past the [SEG] cap still count in evaluation (as targets the model could not answer):
      # their canvas masks, cropped to the image, travel as COCO RLE in one string field.
      out["beyond_cap"] = np.str_(json.dumps([rle.encode(letterbox_mask(m, self.M, rh, rw)[:rh, :rw])
                                              for m in beyond_cap]))
    return out


def as_padding(example: dict) -> dict:
  """A copy of a processed example that marks an eval padding row."""
  out = dict(example)
  out["sample_valid"] = np.bool_(False)
  out["example_id"] = np.str_("")
  return out


def trim_to_bucket(batch: dict, buckets) -> dict:
  """Cuts the text arrays of a batch to the smallest bucket that fits its longest row."""
  longest = int(np.max(batch.pop("length")))
  L = next((b for b in sorted(buckets) if b >= longest), max(buckets))
  for k in ("input_ids", "attention_mask", "labels"):
    batch[k] = np.ascontiguousarray(batch[k][:, :L])
  return batch
