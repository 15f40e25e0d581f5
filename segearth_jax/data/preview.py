"""`segearth data grid`: a picture grid of dataset examples, masks overlaid in distinct colours, instruction
as a caption (Pillow only)."""
from __future__ import annotations

import json
import os
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from segearth_jax.data import rle
from segearth_jax.errors import UserError

COLORS = ((255, 40, 40), (40, 200, 255), (255, 220, 0), (200, 60, 255), (60, 255, 90), (255, 140, 0))
TILE, CAPTION, COLS = 256, 84, 4


def _records(release_dir, split):
  ann = os.path.join(release_dir, split, "annotations")
  path = os.path.join(ann, f"{split}_ann.json")
  if split == "test":
    # every test record once, in subset-file order
    if not os.path.isdir(ann):
      raise UserError(f"no test annotations in {ann!r}")
    seen, out = set(), []
    for name in sorted(os.listdir(ann)):
      if name.endswith(".json"):
        for r in _load(os.path.join(ann, name)):
          if r["id"] not in seen:
            seen.add(r["id"])
            out.append(r)
    return sorted(out, key=lambda r: str(r["id"]))
  if not os.path.exists(path):
    raise UserError(f"annotation file {path!r} does not exist (is --data a LaSeRS release folder?)")
  return _load(path)


def _load(path):
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"cannot read {path!r}: {e}") from e


def _tile(release_dir, split, rec):
  path = os.path.join(release_dir, split, "images", rec["image_name"])
  try:
    img = Image.open(path).convert("RGB")
  except OSError as e:
    raise UserError(f"record {rec['id']}: cannot read image {path!r}") from e
  rgb = np.asarray(img).astype(np.float32)
  for k, r in enumerate(rec.get("mask", [])):
    m = rle.decode(r)
    if m.shape != rgb.shape[:2]:
      raise UserError(f"record {rec['id']}: mask {k} is {m.shape}, image is {rgb.shape[:2]}")
    color = np.asarray(COLORS[k % len(COLORS)], np.float32)
    rgb[m] = 0.45 * rgb[m] + 0.55 * color
    edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
    rgb[edge] = color
  tile = Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).resize((TILE, TILE), Image.BILINEAR)
  canvas = Image.new("RGB", (TILE, TILE + CAPTION), (255, 255, 255))
  canvas.paste(tile, (0, 0))
  d = ImageDraw.Draw(canvas)
  font = ImageFont.load_default()
  lines = textwrap.wrap(rec["description"], 42)[:4] + textwrap.wrap("-> " + rec["answer"], 42)[:2]
  for i, line in enumerate(lines[:6]):
    d.text((3, TILE + 2 + 13 * i), line, fill=(0, 0, 0) if i < len(lines) - 2 else (90, 90, 90), font=font)
  return canvas


def draw_grid(release_dir, split: str, n: int, out_png) -> str:
  """Draws the first n records of `split` (spread over distinct images where possible) to `out_png`."""
  release_dir = os.fspath(release_dir)
  if not os.path.isdir(release_dir):
    raise UserError(f"--data {release_dir!r} does not exist")
  recs = _records(release_dir, split)
  if not recs:
    raise UserError(f"split {split!r} of {release_dir!r} has no records")
  # one record per image first, so the grid shows n different scenes
  firsts, rest, seen = [], [], set()
  for r in recs:
    (rest if r["image_name"] in seen else firsts).append(r)
    seen.add(r["image_name"])
  chosen = (firsts + rest)[:n]
  cols = min(COLS, len(chosen))
  rows = -(-len(chosen) // cols)
  grid = Image.new("RGB", (cols * (TILE + 4), rows * (TILE + CAPTION + 4)), (255, 255, 255))
  for i, r in enumerate(chosen):
    grid.paste(_tile(release_dir, split, r), ((i % cols) * (TILE + 4), (i // cols) * (TILE + CAPTION + 4)))
  out_png = os.fspath(out_png)
  os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
  try:
    grid.save(out_png, format="PNG")
  except OSError as e:
    raise UserError(f"cannot write {out_png!r}: {e}") from e
  return out_png


def cli_main(args) -> int:
  path = draw_grid(args.data, args.split, args.n, args.out)
  print(f"wrote {path}")
  return 0
