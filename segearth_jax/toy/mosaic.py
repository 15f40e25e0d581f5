"""`segearth data mosaic`: 2x2 mosaics of toy test scenes as georeferenced GeoTIFFs, with semantic
instructions answered on the whole mosaic, for judging scenes larger than the canvas.

Layout written to `out_dir`:
  images/mosaic_{k:03d}.tif   uint8 RGB GeoTIFF, 2*size x 2*size, EPSG:32633 (UTM 33N), 0.5 m pixels; mosaic
                              k's top-left corner at (500000 + k * 1000 m, 5000000 m); scene q of its four
                              (row-major) at pixel (row, col) = (q // 2, q % 2) * size
  images/test_{i:05d}.png     the release's test scenes used (copied)
  annotations/mosaic.json     per mosaic, one record per class the toy calls semantic on it (2+ instances,
                              or roads): answer '<p>all the {plural}</p>[SEG]' (explicit) or the class's
                              explanation (implicit), GT = the union over the four scenes of that class's
                              instance masks (COCO RLE, mosaic size)
  annotations/single.json     the same instruction and answer on each of the four scenes holding the class,
                              GT = that scene's instances of the class: single-scene vs mosaic gIoU
  mosaics.json                summary (seed, sizes, CRS, the scenes of each mosaic)
Records carry the release's fields (id, image_name, description, answer, mask, granularity, multiplicity,
reasoning, length, class) plus `mosaic` (its image name) and, in single.json, `offset` [row, col] of the scene
inside the mosaic. The release stores only the masks of its sampled records, so the scenes' objects are
redrawn from the release's seed (scene i of the test split is seeded as release.py seeds it) and checked
against the stored PNGs. Same release and seed, same bytes.
"""
from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
from PIL import Image

from segearth_jax import geo
from segearth_jax.config import read_json
from segearth_jax.data import rle
from segearth_jax.data.answer import target_text
from segearth_jax.errors import UserError
from segearth_jax.toy import instructions as ins
from segearth_jax.toy.release import MARKER, SPLITS, prepare_output
from segearth_jax.toy.scenes import SCENE_TYPES, Obj, Scene, draw_scene

CRS = "EPSG:32633"
PIXEL_M = 0.5
ORIGIN = (500000.0, 5000000.0)
SPACING_M = 1000.0          # mosaics side by side along the easting
SUMMARY = "mosaics.json"


def _test_scenes(release_dir):
  """The release's test scenes with their objects, redrawn from its seed: [(image name, Scene)]."""
  marker = os.path.join(release_dir, MARKER)
  if not os.path.isfile(marker):
    raise UserError(f"--release {release_dir!r} holds no toy dataset ({MARKER}); make one with segearth data toy")
  summary = read_json(marker)
  seed, size, count = int(summary["seed"]), int(summary["size"]), int(summary["images"]["test"])
  split_index = SPLITS.index("test")
  out = []
  for i in range(count):
    # seeded as release.write_toy_laserss seeds scene i of a split
    rng = np.random.default_rng([seed & 0xFFFFFFFF, split_index, i, 0])
    scene = draw_scene(SCENE_TYPES[i % len(SCENE_TYPES)], rng, size)
    name = f"test_{i:05d}.png"
    path = os.path.join(release_dir, "test", "images", name)
    try:
      stored = np.asarray(Image.open(path).convert("RGB"))
    except OSError as e:
      raise UserError(f"{path}: cannot read the toy test image ({e})") from e
    if not np.array_equal(stored, scene.image):
      raise UserError(f"{path}: differs from the scene redrawn from the release's seed {seed} (made by another "
                      "version of the toy generator?); remake the release with segearth data toy")
    out.append((name, scene))
  return out, seed, size


def _mosaic(scenes, size):
  """Four scenes -> one Scene of side 2*size (objects' masks placed in their quadrant)."""
  image = np.zeros((2 * size, 2 * size, 3), np.uint8)
  objects = []
  for q, scene in enumerate(scenes):
    r, c = (q // 2) * size, (q % 2) * size
    image[r:r + size, c:c + size] = scene.image
    for o in scene.objects:
      mask = np.zeros((2 * size, 2 * size), bool)
      mask[r:r + size, c:c + size] = o.mask
      objects.append(Obj(o.cls, mask, {}))
  return Scene("mosaic", image, objects)


def _instruction(target, rng):
  """(description, answer, reasoning): explicit or implicit, short, one target."""
  if rng.random() < 0.5:
    template = ins.EXPLICIT_SHORT[int(rng.integers(len(ins.EXPLICIT_SHORT)))]
    return template.format(P=target.phrase), target_text(target.phrase) + ".", "explicit"
  question, explain, _ = ins.CLASS_TEXT[target.cls]
  return question[:1].upper() + question[1:] + "?", explain.format(P=target_text(target.phrase)), "implicit"


def _record(rec_id, image_name, mosaic_name, description, answer, reasoning, cls, mask):
  return {"id": rec_id, "image_name": image_name, "mosaic": mosaic_name, "description": description,
          "answer": answer, "mask": [rle.encode(mask)], "granularity": "semantic", "multiplicity": "single",
          "reasoning": reasoning, "length": "short", "class": cls}


def _write_json(path, obj):
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    f.write("\n")


def write_toy_mosaics(release_dir, out_dir, n: int = 8, seed: int = 0) -> dict:
  """Writes `n` mosaics of four distinct test scenes of the toy release (module docstring); returns the
  summary written to mosaics.json."""
  release_dir, out_dir = os.fspath(release_dir), os.fspath(out_dir)
  if int(n) <= 0:
    raise UserError(f"--n must be a positive integer, got {n}")
  scenes, release_seed, size = _test_scenes(release_dir)
  if len(scenes) < 4:
    raise UserError(f"--release {release_dir!r} has {len(scenes)} test scenes; a mosaic needs 4")
  out_dir = prepare_output(out_dir, SUMMARY, ("images", "annotations", SUMMARY), ("images", "annotations"), "toy mosaics")
  rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x6D6F73])
  mosaic_records, single_records, mosaics, used = [], [], [], set()
  for k in range(int(n)):
    picks = [int(i) for i in rng.choice(len(scenes), 4, replace=False)]
    names = [scenes[i][0] for i in picks]
    parts = [scenes[i][1] for i in picks]
    mosaic = _mosaic(parts, size)
    mosaic_name = f"mosaic_{k:03d}.tif"
    x0, y0 = ORIGIN[0] + k * SPACING_M, ORIGIN[1]
    geo.write_geotiff(os.path.join(out_dir, "images", mosaic_name), mosaic.image, crs=CRS,
                      transform=(PIXEL_M, 0.0, x0, 0.0, -PIXEL_M, y0))
    used.update(names)
    targets = sorted(ins.semantic_targets(mosaic), key=lambda t: t.cls)
    for j, target in enumerate(targets):
      description, answer, reasoning = _instruction(target, rng)
      rec_id = f"mosaic_{k:03d}_{j}"
      mosaic_records.append(_record(rec_id, mosaic_name, mosaic_name, description, answer, reasoning,
                                    target.cls, target.mask))
      for q, (name, scene) in enumerate(zip(names, parts)):
        masks = [o.mask for o in scene.objects if o.cls == target.cls]
        if masks:
          rec = _record(f"{rec_id}_q{q}", name, mosaic_name, description, answer, reasoning, target.cls,
                        np.any(masks, axis=0))
          rec["offset"] = [(q // 2) * size, (q % 2) * size]
          single_records.append(rec)
    mosaics.append({"image_name": mosaic_name, "scenes": names, "classes": [t.cls for t in targets],
                    "origin": [x0, y0]})
  for name in sorted(used):
    shutil.copyfile(os.path.join(release_dir, "test", "images", name), os.path.join(out_dir, "images", name))
  _write_json(os.path.join(out_dir, "annotations", "mosaic.json"), mosaic_records)
  _write_json(os.path.join(out_dir, "annotations", "single.json"), single_records)
  summary = {"release_seed": release_seed, "seed": int(seed), "n": int(n), "scene_size": size,
             "mosaic_size": 2 * size, "crs": CRS, "pixel_m": PIXEL_M, "records": {
                 "mosaic": len(mosaic_records), "single": len(single_records)}, "mosaics": mosaics}
  _write_json(os.path.join(out_dir, SUMMARY), summary)
  return summary


def cli_main(args) -> int:
  t0 = time.time()
  summary = write_toy_mosaics(args.release, args.out, n=args.n, seed=args.seed)
  r = summary["records"]
  print(f"toy mosaics -> {args.out}: {summary['n']} mosaics of 2x2 scenes ({summary['mosaic_size']} px, "
        f"{summary['crs']}, {summary['pixel_m']} m), {r['mosaic']} mosaic records, {r['single']} single-scene "
        f"records, {time.time() - t0:.1f}s")
  return 0
