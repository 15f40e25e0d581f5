"""The predict core: generation + mask decoding as one jitted function, and the files a prediction writes.

``make_predict_fn(setup, eos_id=, seg_id=, max_new_tokens=, temperature=, top_k=, top_p=, max_seg=)`` ->
jitted ``(params, batch, rng) -> tokens [B,T], lengths [B], seg_valid [B,K], masks bool [B,K,M,M], scores
f32 [B,K], seg_hidden [B,K,D]`` (the masks on the letterboxed M x M canvas; K = generate.seg_slots(max_seg,
model.max_seg, T): the [SEG] cap). Evaluation and segment.Segmenter both run it.
``make_tile_logits_fn(setup)`` -> jitted ``(params, swin_image [B,M,M,3], seg_hidden [B,K,D], seg_valid
[B,K]) -> f32 [B,K,M,M]``: the mask head alone on other pixels for the [SEG] states of an answer (the tiled
path of large scenes).

`segearth predict` (segment.cli_main) writes, per image: mask_{i}.png at the original image size, COCO
RLE in prediction.json and an overlay picture (``write_prediction``). The image goes through the same
preprocessing as evaluation (SigLIP resize, Swin letterbox); masks come back on the letterboxed canvas and
are cropped and resized to the original image. ``Predictor`` is the batch-1 one-device form (serve.py).
"""
from __future__ import annotations

import colorsys
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from segearth_jax import sharding as shd
from segearth_jax.data import rle
from segearth_jax.data.answer import phrases_of
from segearth_jax.data.batch import device_part
from segearth_jax.data.preprocess import Preprocessor, trim_to_bucket
from segearth_jax.data.tokenizer import load_tokenizer, seg_token_id
from segearth_jax.errors import UserError
from segearth_jax.generate import generate, seg_slots
from segearth_jax.model_setup import ModelSetup
from segearth_jax.models.mllm import make_llm
from segearth_jax.weights import load_run_config, restore_params

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


def read_image(path: str) -> np.ndarray:
  """Any PIL-readable image (RGB, gray, RGBA, palette, 16-bit TIFF) -> HxWx3 uint8."""
  try:
    with Image.open(path) as im:
      im.load()
      if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, np.float64)
        lo, hi = np.percentile(a, 0.5), np.percentile(a, 99.5)
        a = np.clip((a - lo) / max(hi - lo, 1e-9) * 255, 0, 255).astype(np.uint8)
        im = Image.fromarray(a)
      if im.mode in ("RGBA", "LA", "P"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (0, 0, 0, 255))
        im = Image.alpha_composite(bg, im)
      return np.asarray(im.convert("RGB"))
  except FileNotFoundError:
    raise UserError(f"{path}: no such image file")
  except Exception as e:
    raise UserError(f"{path}: not a readable image ({type(e).__name__}: {e})")


def mask_scores(logits, masks, letterbox=None):
  """logits f32 [B,K,M,M], masks bool [B,K,M,M] -> f32 [B,K]: the mean sigmoid probability inside each
  mask, over the image region of the canvas (letterbox i32 [B,4]; None = the whole canvas); 0 for an
  empty mask."""
  if letterbox is not None:
    m = logits.shape[-1]
    inside = ((jnp.arange(m)[None, :, None] < letterbox[:, 2, None, None])
              & (jnp.arange(m)[None, None, :] < letterbox[:, 3, None, None]))
    masks = masks & inside[:, None]
  count = masks.sum((-2, -1))
  total = jnp.where(masks, jax.nn.sigmoid(logits), 0.0).sum((-2, -1))
  return jnp.where(count > 0, total / jnp.maximum(count, 1), 0.0)


def make_predict_fn(setup: ModelSetup, *, eos_id: int, seg_id: int, max_new_tokens: int,
                    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, max_seg: int = -1):
  """Jitted: (params, batch, rng) -> tokens [B,T], lengths [B], seg_valid [B,K], masks [B,K,M,M] (bool,
  canvas size), scores f32 [B,K] (mask_scores; inside the letterbox when the batch has one), seg_hidden
  [B,K,D] (the [SEG] states the masks come from: the tiled mask head reuses them). Decoding as `generate` (temperature 0 = greedy; top_k 0 / top_p 1.0 = off; rng the
  sampling key). K = seg_slots(max_seg, model.max_seg, max_new_tokens): -1 = model.max_seg, 0 = no cap
  (K = max_new_tokens), n = n; the mask head decodes all K slots."""
  model = setup.model
  llm = make_llm(model.config)
  M = model.config.swin.image_size
  k_slots = seg_slots(max_seg, model.config.max_seg, max_new_tokens)

  def predict(params, batch, rng):
    embeds = model.apply({"params": params}, batch["siglip_image"], batch["input_ids"], batch["image_start"],
                         method=model.prompt_embeds)
    gen = generate(llm, params["llm"], embeds, batch["prompt_len"], max_new_tokens=max_new_tokens,
                   eos_id=eos_id, seg_id=seg_id, temperature=temperature, top_k=top_k, top_p=top_p, rng=rng,
                   max_seg=k_slots)
    logits = model.apply({"params": params}, batch["swin_image"], gen["seg_hidden"], gen["seg_valid"],
                         method=model.masks_from_hidden)[-1]            # last decoder prediction [B,K,h,w]
    b, k = logits.shape[:2]
    up = jax.image.resize(logits.astype(jnp.float32), (b, k, M, M), "bilinear")
    masks = (up > 0) & gen["seg_valid"][..., None, None]
    return dict(tokens=gen["tokens"], lengths=gen["lengths"], seg_valid=gen["seg_valid"], masks=masks,
                scores=mask_scores(up, masks, batch.get("letterbox")), seg_hidden=gen["seg_hidden"])

  return jax.jit(predict)


def make_tile_logits_fn(setup: ModelSetup):
  """Jitted: (params, swin_image f32 [B,M,M,3], seg_hidden [B,K,D], seg_valid bool [B,K]) -> mask logits
  f32 [B,K,M,M] (the last decoder prediction, bilinear from stride 4 to the canvas, as make_predict_fn)."""
  model = setup.model
  M = model.config.swin.image_size

  def tile_logits(params, swin_image, seg_hidden, seg_valid):
    logits = model.apply({"params": params}, swin_image, seg_hidden, seg_valid,
                         method=model.masks_from_hidden)[-1]
    b, k = logits.shape[:2]
    return jax.image.resize(logits.astype(jnp.float32), (b, k, M, M), "bilinear")

  return jax.jit(tile_logits)


def predict_fn_of(setup: ModelSetup, tokenizer):
  """make_predict_fn with the run's tokenizer ids and ``config.infer`` decoding (the caller makes the
  key from ``infer.seed``)."""
  infer = setup.config.infer
  return make_predict_fn(setup, eos_id=tokenizer.eos_token_id, seg_id=seg_token_id(tokenizer),
                         max_new_tokens=int(infer.max_new_tokens), temperature=float(infer.temperature),
                         top_k=int(infer.top_k), top_p=float(infer.top_p), max_seg=int(infer.max_seg))


def palette(n: int) -> list[tuple[int, int, int]]:
  return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.85, 1.0)) for i in range(n)]


CAPTION_MIN_WIDTH = 480   # small images get a wider caption area so the text stays readable


def wrap_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
  """Greedy word wrap to ``width`` pixels (a word longer than a line is split by characters)."""
  lines, line = [], ""
  for word in text.split():
    trial = f"{line} {word}" if line else word
    if draw.textlength(trial, font=font) <= width:
      line = trial
      continue
    if line:
      lines.append(line)
    while draw.textlength(word, font=font) > width and len(word) > 1:
      cut = max(1, int(len(word) * width / draw.textlength(word, font=font)))
      lines.append(word[:cut])
      word = word[cut:]
    line = word
  if line:
    lines.append(line)
  return lines


def draw_overlay(image: np.ndarray, masks: list[np.ndarray], labels: list[str], title: str = "") -> Image.Image:
  """The image with each mask in its own colour (outlined), then the wrapped title and a colour legend."""
  base = image.astype(np.float32)
  colors = palette(len(masks))
  for m, c in zip(masks, colors):
    base[m] = 0.45 * base[m] + 0.55 * np.array(c, np.float32)
  im = Image.fromarray(base.astype(np.uint8))
  font = ImageFont.load_default()
  line_h = 14
  width = max(im.width, CAPTION_MIN_WIDTH)
  measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  title_lines = wrap_text(measure, title, font, width - 8) if title else []
  label_lines = [wrap_text(measure, label, font, width - 28) or [""] for label in labels]
  legend_h = line_h * (len(title_lines) + sum(len(lines) for lines in label_lines)) + 8
  out = Image.new("RGB", (width, im.height + legend_h), (255, 255, 255))
  out.paste(im, (0, 0))
  d = ImageDraw.Draw(out)
  # outlines so each target reads even where colours mix
  for m, c in zip(masks, colors):
    edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
    ys, xs = np.nonzero(edge)
    for y, x in zip(ys[::2], xs[::2]):
      d.point((int(x), int(y)), fill=c)
  y = im.height + 4
  for line in title_lines:
    d.text((4, y), line, fill=(0, 0, 0), font=font)
    y += line_h
  for lines, c in zip(label_lines, colors):
    d.rectangle((4, y + 2, 14, y + 11), fill=c)
    for line in lines:
      d.text((20, y), line, fill=(0, 0, 0), font=font)
      y += line_h
  return out


class Predictor:
  """A trained model ready to segment: params on one device, jitted generation + mask decoding."""

  def __init__(self, setup: ModelSetup, params, tokenizer):
    self.setup, self.config, self.params, self.tokenizer = setup, setup.config, params, tokenizer
    self.pre = Preprocessor(self.config, tokenizer, train=False, source_name="predict")
    self.fn = predict_fn_of(setup, tokenizer)
    self.rng = jax.random.key(self.config.infer.seed)

  @classmethod
  def load(cls, path: str, config=None, overrides=()) -> "Predictor":
    """A training workdir (latest checkpoint) or a weights folder. ``config``: run with this experiment
    config instead of the stored one; ``overrides`` apply to the stored one."""
    config = config or load_run_config(path, overrides)
    tokenizer = load_tokenizer(config.data.tokenizer)
    mesh = shd.single_device_mesh()
    setup = ModelSetup.create(config, mesh=mesh, vocab_size=len(tokenizer))
    params, _ = restore_params(setup, path)
    return cls(setup, params, tokenizer)

  def __call__(self, image: np.ndarray, instruction: str) -> dict:
    ex = self.pre(dict(id="predict", image=image, masks=[], answer="", instruction=instruction))
    batch = trim_to_bucket({k: np.asarray(v)[None] for k, v in ex.items()}, self.pre.buckets)
    out = jax.device_get(self.fn(self.params, device_part(batch), self.rng))
    answer, phrases, masks, tokens = decode_row(self.tokenizer, {k: v[0] for k, v in out.items()}, ex["letterbox"])
    return dict(answer=answer, masks=masks, phrases=phrases, tokens=tokens)


def decode_row(tokenizer, row: dict, letterbox, valid: np.ndarray | None = None):
  """One row of the predict fn's output -> (answer text, phrases, masks at the input's size, token ids):
  the letterbox cropped and resized back (nearest); ``valid`` (bool [h, w]) keeps masks off nodata."""
  n = int(row["seg_valid"].sum())
  tokens = row["tokens"][: int(row["lengths"])]
  answer = tokenizer.decode(tokens, skip_special_tokens=False).replace(tokenizer.eos_token or "", "")
  h, w, rh, rw = (int(v) for v in letterbox)
  masks = []
  for k in range(n):
    m = row["masks"][k, :rh, :rw].astype(np.uint8) * 255
    m = np.asarray(Image.fromarray(m).resize((w, h), Image.NEAREST)) > 127
    masks.append(m if valid is None else m & valid)
  return answer.strip(), phrases_of(answer, n), masks, [int(t) for t in tokens]


def write_prediction(result: dict, image: np.ndarray, out_dir: str, instruction: str) -> str:
  os.makedirs(out_dir, exist_ok=True)
  rles = []
  for i, m in enumerate(result["masks"]):
    Image.fromarray(m.astype(np.uint8) * 255).save(os.path.join(out_dir, f"mask_{i}.png"))
    rles.append(rle.encode(m))
  with open(os.path.join(out_dir, "prediction.json"), "w") as f:
    record = dict(instruction=instruction, answer=result["answer"], phrases=result["phrases"], masks=rles)
    if "scores" in result:
      record["scores"] = [round(float(v), 4) for v in result["scores"]]
    json.dump(record, f, indent=2)
  overlay = os.path.join(out_dir, "overlay.png")
  draw_overlay(image, result["masks"], result["phrases"], title=f"Q: {instruction}  A: {result['answer']}").save(overlay)
  return overlay


def predict_examples(config, workdir: str, release_dir: str, out_dir: str, n: int = 8) -> list[str]:
  """Overlays for the first n records of each test subset file, round robin (the demo's pictures)."""
  ann_dir = os.path.join(release_dir, "test", "annotations")
  per_file = []
  for f in sorted(os.listdir(ann_dir)):
    with open(os.path.join(ann_dir, f)) as fh:
      per_file.append(json.load(fh))
  picked, seen = [], set()
  for i in range(max(len(r) for r in per_file)):
    for recs in per_file:
      if i < len(recs) and recs[i]["id"] not in seen and len(picked) < n:
        picked.append(recs[i])
        seen.add(recs[i]["id"])
  predictor = Predictor.load(workdir, config)
  paths = []
  for rec in picked:
    image = read_image(os.path.join(release_dir, "test", "images", rec["image_name"]))
    result = predictor(image, rec["description"])
    paths.append(write_prediction(result, image, os.path.join(out_dir, str(rec["id"])), rec["description"]))
  return paths
