"""`segearth predict`: an image and an instruction in; answer text, one mask per [SEG] at the original
image size (PNG + COCO RLE JSON) and an overlay picture out. Batch mode over a folder or a JSONL file.

The image goes through the same preprocessing as evaluation (SigLIP resize, Swin letterbox); masks come
back on the letterboxed canvas and are cropped and resized to the original image.
"""
from __future__ import annotations

import colorsys
import json
import os
import re

import jax
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from segearth_jax.errors import UserError

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


# LaSeRS-style answers name each target right before its [SEG]: "<p>the tail</p>[SEG]"
PHRASE = re.compile(r"<p>(.*?)</p>\s*\[SEG\]")


def phrases_of(answer: str, n: int) -> list[str]:
  found = PHRASE.findall(answer)
  return [found[i] if i < len(found) else f"target {i + 1}" for i in range(n)]


def palette(n: int) -> list[tuple[int, int, int]]:
  return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.85, 1.0)) for i in range(n)]


def draw_overlay(image: np.ndarray, masks: list[np.ndarray], labels: list[str], title: str = "") -> Image.Image:
  base = image.astype(np.float32)
  colors = palette(len(masks))
  for m, c in zip(masks, colors):
    base[m] = 0.45 * base[m] + 0.55 * np.array(c, np.float32)
  im = Image.fromarray(base.astype(np.uint8))
  font = ImageFont.load_default()
  line_h = 14
  legend_h = line_h * (len(labels) + (1 if title else 0)) + 8
  out = Image.new("RGB", (im.width, im.height + legend_h), (255, 255, 255))
  out.paste(im, (0, 0))
  d = ImageDraw.Draw(out)
  # outlines so each target reads even where colours mix
  for m, c in zip(masks, colors):
    edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
    ys, xs = np.nonzero(edge)
    for y, x in zip(ys[::2], xs[::2]):
      d.point((int(x), int(y)), fill=c)
  y = im.height + 4
  if title:
    d.text((4, y), title[:160], fill=(0, 0, 0), font=font)
    y += line_h
  for label, c in zip(labels, colors):
    d.rectangle((4, y + 2, 14, y + 11), fill=c)
    d.text((20, y), label[:120], fill=(0, 0, 0), font=font)
    y += line_h
  return out


class Predictor:
  """A trained model ready to segment: params on one device, jitted generation + mask decoding."""

  def __init__(self, config, params, tokenizer, setup):
    from segearth_jax.data.preprocess import Preprocessor
    from segearth_jax.evaluate import make_predict_fn

    self.config, self.params, self.tokenizer, self.setup = config, params, tokenizer, setup
    self.pre = Preprocessor(config, tokenizer, train=False, source_name="predict")
    self.fn = make_predict_fn(setup, tokenizer, max_new_tokens=config.infer.max_new_tokens,
                              temperature=config.infer.temperature)
    self.rng = jax.random.key(config.infer.seed)

  @classmethod
  def from_workdir(cls, workdir: str, config=None, weights: str | None = None) -> "Predictor":
    from segearth_jax import sharding as shd
    from segearth_jax.data.tokenizer import load_tokenizer
    from segearth_jax.evaluate import load_workdir_params
    from segearth_jax.train import TrainSetup, load_workdir_config

    config = config or load_workdir_config(workdir or weights)
    tokenizer = load_tokenizer(config.data.tokenizer)
    mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    setup = TrainSetup.create(config, mesh=mesh, vocab_size=len(tokenizer))
    if weights:
      from segearth_jax.convert.checkpoint import load_params
      params = jax.tree.map(np.asarray, load_params(weights))
    else:
      params, _ = load_workdir_params(setup, workdir)
    return cls(config, params, tokenizer, setup)

  def __call__(self, image: np.ndarray, instruction: str) -> dict:
    from segearth_jax.train import device_part

    ex = self.pre(dict(id="predict", image=image, masks=[], answer="", instruction=instruction))
    batch = {k: np.asarray(v)[None] for k, v in ex.items()}
    from segearth_jax.data.preprocess import trim_to_bucket
    batch = trim_to_bucket(batch, self.pre.buckets)
    out = jax.device_get(self.fn(self.params, device_part(batch), self.rng))
    n = int(out["seg_valid"][0].sum())
    tokens = out["tokens"][0, : int(out["lengths"][0])]
    answer = self.tokenizer.decode(tokens, skip_special_tokens=False).replace(self.tokenizer.eos_token or "", "")
    h, w, rh, rw = (int(v) for v in ex["letterbox"])
    masks = []
    for k in range(n):
      m = out["masks"][0, k, :rh, :rw].astype(np.uint8) * 255
      masks.append(np.asarray(Image.fromarray(m).resize((w, h), Image.NEAREST)) > 127)
    return dict(answer=answer.strip(), masks=masks, phrases=phrases_of(answer, n), tokens=tokens.tolist())


def write_prediction(result: dict, image: np.ndarray, out_dir: str, instruction: str) -> str:
  from segearth_jax.data import rle

  os.makedirs(out_dir, exist_ok=True)
  rles = []
  for i, m in enumerate(result["masks"]):
    Image.fromarray(m.astype(np.uint8) * 255).save(os.path.join(out_dir, f"mask_{i}.png"))
    rles.append(rle.encode(m))
  with open(os.path.join(out_dir, "prediction.json"), "w") as f:
    json.dump(dict(instruction=instruction, answer=result["answer"], phrases=result["phrases"], masks=rles),
              f, indent=2)
  overlay = os.path.join(out_dir, "overlay.png")
  draw_overlay(image, result["masks"], result["phrases"], title=f"Q: {instruction}  A: {result['answer']}").save(overlay)
  return overlay


def _jobs(args) -> list[tuple[str, str]]:
  if args.jsonl:
    jobs = []
    with open(args.jsonl) as f:
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          rec = json.loads(line)
          jobs.append((rec["image"], rec["instruction"]))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
          raise UserError(f"{args.jsonl}: line {n}: needs {{\"image\": ..., \"instruction\": ...}} ({e})")
    return jobs
  if not args.image:
    raise UserError("give --image (a file or a folder) or --jsonl")
  if not args.instruction:
    raise UserError("give --instruction")
  if os.path.isdir(args.image):
    files = sorted(f for f in os.listdir(args.image) if f.lower().endswith(IMAGE_SUFFIXES))
    if not files:
      raise UserError(f"{args.image}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return [(os.path.join(args.image, f), args.instruction) for f in files]
  return [(args.image, args.instruction)]


def cli_main(args) -> int:
  jobs = _jobs(args)
  for path, _ in jobs:   # fail before loading the model
    if not os.path.isfile(path):
      raise UserError(f"{path}: no such image file")
  config = None
  if args.config:
    from segearth_jax.config import load_config
    config = load_config(args.config, args.overrides)
  predictor = Predictor.from_workdir(args.workdir, config, weights=args.weights)
  for i, (path, instruction) in enumerate(jobs):
    image = read_image(path)
    result = predictor(image, instruction)
    stem = os.path.splitext(os.path.basename(path))[0]
    out_dir = args.out if len(jobs) == 1 else os.path.join(args.out, f"{i:04d}_{stem}")
    overlay = write_prediction(result, image, out_dir, instruction)
    print(json.dumps(dict(image=path, instruction=instruction, answer=result["answer"],
                          masks=len(result["masks"]), overlay=overlay)))
  return 0


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
  predictor = Predictor.from_workdir(workdir, config)
  paths = []
  for rec in picked:
    image = read_image(os.path.join(release_dir, "test", "images", rec["image_name"]))
    result = predictor(image, rec["description"])
    paths.append(write_prediction(result, image, os.path.join(out_dir, str(rec["id"])), rec["description"]))
  return paths
