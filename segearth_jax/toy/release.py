"""`segearth data toy`: a synthetic LaSeRS in the release layout, with its own small BPE tokenizer.

Layout (method.md §6): train/annotations/train_ann.json, train/images/, val/annotations/val_ann.json,
val/images/, test/annotations/<subset>.json (one file per subset value + no_target), test/images/, and
tokenizer/. A test record is listed in each subset file it belongs to; `no_target` records (answer without
[SEG], no masks, multiplicity 'none') only in no_target.json. Same seed, same bytes.
"""
from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
from PIL import Image

from segearth_jax.data import rle, templates
from segearth_jax.data.tokenizer import train_toy_tokenizer
from segearth_jax.errors import UserError
from segearth_jax.toy import instructions as ins
from segearth_jax.toy.scenes import SCENE_TYPES, draw_scene

SPLITS = ("train", "val", "test")
RECORDS_PER_SCENE = {"train": 6, "val": 3, "test": 4}
MARKER = "toy_laserss.json"


def split_sizes(n: int, test: int | None = None, val: int | None = None) -> dict:
  """Scenes per split: 20% test and 10% val unless given. Scene i of a split is seeded by (seed, split, i),
  so a fixed test count gives the same test set whatever the train count (more training scenes, same
  benchmark)."""
  if n < 3:
    raise UserError(f"--images must be at least 3 (one scene per split), got {n}")
  test = max(1, round(0.2 * n)) if test is None else int(test)
  val = max(1, round(0.1 * n)) if val is None else int(val)
  if test < 1 or val < 1 or n - test - val < 1:
    raise UserError(f"--images {n} must leave at least one scene for each split "
                    f"(test {test}, val {val}, train {n - test - val})")
  return {"train": n - test - val, "val": val, "test": test}


def _pick_kinds(rng, split, covered):
  """Kinds to try for one scene, best first. Test prefers kinds that cover still-empty subset files."""
  kinds = [ins.KINDS[i] for i in rng.permutation(len(ins.KINDS))]
  if split == "test":
    def gain(k):
      subs = ["no_target"] if k[0] == "no_target" else list(k)
      return -sum(s not in covered for s in subs)
    kinds.sort(key=gain)          # stable: the random order breaks ties
  else:
    # about one record in eight asks for an absent class
    nt = [k for k in kinds if k[0] == "no_target"]
    kinds = [k for k in kinds if k[0] != "no_target"]
    if rng.random() < 0.125:
      kinds = nt[:1] + kinds
  return kinds


def _scene_records(scene, rng, split, covered, count):
  out, seen = [], set()
  while len(out) < count:
    made = False
    for kind in _pick_kinds(rng, split, covered):
      rec = ins.build_record(scene, kind, rng)
      if rec is None or rec["description"] in seen:
        continue
      seen.add(rec["description"])
      covered.update(ins.subsets_of(rec))
      out.append(rec)
      made = True
      break
    if not made:
      break
  return out


def _write_json(path, obj):
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    f.write("\n")


def prepare_output(out_dir, marker: str, owned: tuple, subdirs: tuple, what: str) -> str:
  """An output folder for a generator: created, or emptied of a previous run's own entries (``owned``; the
  run is recognised by its ``marker`` file). A non-empty folder of anything else is refused, untouched."""
  out_dir = os.fspath(out_dir)
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise UserError(f"--out {out_dir!r} exists and is not a folder")
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    if not os.path.exists(os.path.join(out_dir, marker)):
      raise UserError(f"--out {out_dir!r} is not empty and holds no {what} ({marker}); pick a new folder")
    for name in owned:     # a previous run's output: replace it whole
      p = os.path.join(out_dir, name)
      if os.path.isdir(p):
        shutil.rmtree(p)
      elif os.path.exists(p):
        os.remove(p)
  try:
    os.makedirs(out_dir, exist_ok=True)
    for sub in subdirs:
      os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
  except OSError as e:
    raise UserError(f"cannot create --out {out_dir!r}: {e.strerror}") from e
  if not os.access(out_dir, os.W_OK):
    raise UserError(f"--out {out_dir!r} is not writable")
  return out_dir


def write_toy_laserss(out_dir, images: int = 200, seed: int = 0, size: int = 256, *,
                      test_images: int | None = None, val_images: int | None = None) -> dict:
  """Writes the toy dataset to `out_dir`; returns a summary (counts per split and per test subset).

  `images` scenes in all; `test_images`/`val_images` fix those splits (default 20% / 10%)."""
  if images is None or int(images) <= 0:
    raise UserError(f"--images must be a positive integer, got {images}")
  sizes = split_sizes(int(images), test_images, val_images)
  out_dir = prepare_output(out_dir, MARKER, SPLITS + ("tokenizer", MARKER),
                           tuple(os.path.join(sp, d) for sp in SPLITS for d in ("annotations", "images")),
                           "toy dataset")
  texts, summary = [], {"images": dict(sizes), "records": {}, "seed": int(seed), "size": int(size)}
  for s_idx, split in enumerate(SPLITS):
    records, covered = [], set()
    for i in range(sizes[split]):
      scene_rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, s_idx, i, 0])
      text_rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, s_idx, i, 1])
      # Scene types cycle from 'airport' so even one test scene can make part-level records.
      scene = draw_scene(SCENE_TYPES[i % len(SCENE_TYPES)], scene_rng, size)
      name = f"{split}_{i:05d}.png"
      Image.fromarray(scene.image).save(os.path.join(out_dir, split, "images", name), format="PNG",
                                        compress_level=1)      # fast; noise does not compress anyway
      for k, rec in enumerate(_scene_records(scene, text_rng, split, covered, RECORDS_PER_SCENE[split])):
        masks = rec.pop("masks")
        rec.update(id=f"{split}_{i:05d}_{k}", image_name=name, mask=[rle.encode(m) for m in masks])
        records.append(rec)
        texts += _conversations(rec["description"], rec["answer"])
    if split == "test":
      by_subset = {s: [r for r in records if s in ins.subsets_of(r)] for s in ins.SUBSETS}
      missing = [s for s, v in by_subset.items() if not v]
      if missing:
        raise UserError(f"--images {images} is too few to fill test subsets {missing}; use more")
      for s, v in by_subset.items():
        _write_json(os.path.join(out_dir, "test", "annotations", f"{s}.json"), v)
      summary["test_subsets"] = {s: len(v) for s, v in by_subset.items()}
    else:
      _write_json(os.path.join(out_dir, split, "annotations", f"{split}_ann.json"), records)
    summary["records"][split] = len(records)
  tok = train_toy_tokenizer(texts, os.path.join(out_dir, "tokenizer"))
  summary["vocab_size"] = len(tok)
  _write_json(os.path.join(out_dir, MARKER), summary)
  return summary


def _conversations(description, answer):
  """The record as the model sees it (both prompt templates), so the template tokenizes compactly."""
  return [templates.render(p, description, answer) for p in ("phi_chat", "phi_chat_eval")]


def cli_main(args) -> int:
  t0 = time.time()
  summary = write_toy_laserss(args.out, images=args.images, seed=args.seed, test_images=args.test_images,
                              val_images=args.val_images)
  r, sub = summary["records"], summary["test_subsets"]
  print(f"toy LaSeRS -> {args.out}: {summary['images']['train']}/{summary['images']['val']}/"
        f"{summary['images']['test']} scenes, {r['train']}/{r['val']}/{r['test']} records (train/val/test), "
        f"tokenizer vocab {summary['vocab_size']}, {time.time() - t0:.1f}s")
  print("test subsets: " + ", ".join(f"{k} {v}" for k, v in sub.items()))
  return 0
