"""Per-example preprocessing: one decoded TFDS example -> numpy arrays with static shapes.

Images: SigLIP canvas S x S (bicubic, (x/255 - 0.5)/0.5); Swin canvas M x M letterboxed (scale = M / max(h, w),
bilinear, pasted top-left on value 128, then ImageNet mean/std). Masks: letterboxed like the Swin image
(nearest) and, for L_S, a G x G patch grid of the mask stretched to the SigLIP canvas (`loss.ls_target`):
  'touches'  nearest to S x S, then max over each P x P patch: a patch is 1 if the mask touches the G*P <= S
             pixels the patch conv sees (the default);
  'authors'  the authors' target: nearest to 800 x 800, bilinear (align_corners=False, no antialias) to
             G x G, > 0 -- i.e. the mask sampled near the patch centres (torch.nn.functional.interpolate's
             index arithmetic, float32).

Text: the `data.train_template` / `data.eval_template` conversation (data/templates.py: a preset name or a
literal template) with the single '<image>' expanded to N_img = presets.image_tokens(model) image-token ids.
The fixed pieces of the template are tokenized once; per example only the instruction (stripped first when
`data.strip_instruction`, as the authors do) and the answer turn are, so a BPE merge never crosses a piece
boundary -- the same at train and eval. Train rows are prompt + answer turn (labels: the answer turn only);
eval rows are the prompt.
Too long: the instruction is cut first, then the answer's end; both counted. Every example is padded to the
longest bucket; `trim_to_bucket` cuts a batch to the smallest bucket that fits it.
"""
from __future__ import annotations

import json
import logging

import numpy as np
from PIL import Image

from segearth_jax import presets
from segearth_jax.data import rle, templates
from segearth_jax.data.answer import IMAGE_TOKEN, SEG_TOKEN, seg_count
from segearth_jax.data.batch import IGNORE
from segearth_jax.data.tokenizer import image_token_id, seg_token_id
from segearth_jax.errors import UserError

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


def mask_grid_touches(mask: np.ndarray, size: int, grid: int, patch: int) -> np.ndarray:
  """(h, w) mask -> f32 (grid, grid): a patch is 1 where the size x size mask touches it."""
  m = np.asarray(Image.fromarray(mask).resize((size, size), Image.NEAREST))[:grid * patch, :grid * patch]
  return m.reshape(grid, patch, grid, patch).max(axis=(1, 3)).astype(np.float32)


AUTHORS_LS_CANVAS = 800   # the authors resize every mask to 800 x 800 before the L_S downsample


def _torch_nearest_index(n_in: int, n_out: int) -> np.ndarray:
  """Source index of each output index of torch's mode='nearest': floor(i * (in/out)) in float32."""
  scale = np.float32(n_in) / np.float32(n_out)
  return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64), n_in - 1)


def _torch_bilinear_taps(n_in: int, n_out: int):
  """torch's bilinear, align_corners=False, no antialias, along one axis: (i0, i1, w0, w1) per output
  index, float32 source positions (i + 0.5) * in/out - 0.5 clamped at 0."""
  scale = np.float32(n_in) / np.float32(n_out)
  src = np.maximum(scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5),
                   np.float32(0))
  i0 = src.astype(np.int64)
  i1 = i0 + (i0 < n_in - 1)
  w1 = src - i0.astype(np.float32)
  return i0, i1, np.float32(1) - w1, w1


def resize_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """(h, w) float array -> size, as torch's F.interpolate(mode='bilinear', align_corners=False) without
  antialias (the authors' GT resize in their eval.py)."""
  r0, r1, rw0, rw1 = _torch_bilinear_taps(x.shape[0], size[0])
  c0, c1, cw0, cw1 = _torch_bilinear_taps(x.shape[1], size[1])
  x = np.asarray(x, np.float32)
  rows = rw0[:, None] * x[r0] + rw1[:, None] * x[r1]
  return cw0[None] * rows[:, c0] + cw1[None] * rows[:, c1]


def mask_grid_authors(mask: np.ndarray, grid: int, canvas: int = AUTHORS_LS_CANVAS) -> np.ndarray:
  """(h, w) mask -> f32 (grid, grid): the authors' L_S target, nearest to canvas x canvas, bilinear to
  grid x grid, > 0. Only the canvas pixels the bilinear taps read are formed."""
  h, w = mask.shape
  r0, r1, rw0, rw1 = _torch_bilinear_taps(canvas, grid)
  c0, c1, cw0, cw1 = _torch_bilinear_taps(canvas, grid)
  near_r, near_c = _torch_nearest_index(h, canvas), _torch_nearest_index(w, canvas)
  m = (np.asarray(mask) > 0).astype(np.float32)

  def tap(r, c):
    return m[np.ix_(near_r[r], near_c[c])]
  # the same weighted sum as torch (h-weights outside, w-weights inside) so a zero weight never counts
  val = (rw0[:, None] * (cw0[None] * tap(r0, c0) + cw1[None] * tap(r0, c1))
         + rw1[:, None] * (cw0[None] * tap(r1, c0) + cw1[None] * tap(r1, c1)))
  return (val > 0).astype(np.float32)


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
    self.strip_instruction = bool(d.strip_instruction)
    # teacher-forced eval feeds the reference answer as training does and reads its [SEG] states
    self.with_answer = train or bool(config.eval.teacher_forced)
    self.ls_target = str(config.loss.ls_target)
    if self.ls_target not in ("touches", "authors"):
      raise UserError(f"loss.ls_target must be 'touches' or 'authors', got {self.ls_target!r}")
    # token ids of the fixed pieces, once
    self.template = templates.parse(d.train_template if train else d.eval_template)
    self.pieces = [p if p in (IMAGE_TOKEN, templates.INSTRUCTION) else self._encode(p)
                   for p in self.template.prompt]
    self.fixed_len = sum(self.n_img if p == IMAGE_TOKEN else len(p) for p in self.pieces
                         if p != templates.INSTRUCTION)
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
    instr = self._encode(instruction.strip() if self.strip_instruction else instruction)
    t = self.template
    ans = self._encode(f"{t.answer_lead}{answer}{t.answer_end}") if answer is not None else []
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
      elif p == templates.INSTRUCTION:
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
    targets = masks   # eval scores every target: past the [SEG] cap or the text cut too
    ids, labels, image_start, prompt_len = self.tokens(_text(ex["instruction"]),
                                                       answer if self.with_answer else None)
    K, L = self.K, self.max_len
    if self.with_answer:
      seg_pos = [i for i in range(prompt_len, len(ids)) if ids[i] == self.seg_id]
      if len(seg_pos) < len(masks):  # [SEG]s lost to the answer cut take their masks with them
        self.stats["seg_dropped"] += len(masks) - len(seg_pos)
        masks = masks[:len(seg_pos)]
    else:
      seg_pos = []
    n = len(masks)
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
      grid[k] = (mask_grid_authors(m, self.G) if self.ls_target == "authors"
                 else mask_grid_touches(m, self.S, self.G, self.P))
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
      # every target at the image's own size (the eval protocol decides how it meets the canvas; targets
      # past the [SEG] cap count as targets the model could not answer), as COCO RLE in one string field
      out["targets"] = np.str_(json.dumps([rle.encode(m > 0) for m in targets]))
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
