"""RefSegRS (referring segmentation) from its native layout.

  output_phrase_{train,val,test}.txt   lines '<id> <phrase>' (the phrase may contain spaces)
  images/<id>.tif                      the image (re-encoded as PNG: tfds stores PNG/JPEG)
  masks/<id>.tif                       255 = foreground, every other value background

Each line is one example (id '<split>_<line number>_<id>': one image id may appear on several lines).
Answer (training target; the source has no [SEG]): '<p>{phrase}</p>[SEG]'.
"""
from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from segearth_jax.data.answer import target_text
from tfds_laserss import common


def phrase_file(root: str, split: str) -> str:
  return os.path.join(root, f"output_phrase_{split}.txt")


def parse_line(line: str):
  """'<id> <phrase>' -> (id, phrase) or None for a line without a phrase."""
  parts = line.strip().split(None, 1)
  if len(parts) != 2 or not parts[1].strip():
    return None
  return parts[0], parts[1].strip()


class Refsegrs(common.Builder):
  """RefSegRS referring segmentation (train/val/test)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Native layout; one example per phrase line."}
  HOMEPAGE = "https://github.com/zhu-xlab/rrsis"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Unpack RefSegRS so that manual_dir holds output_phrase_{train,val,test}.txt, images/ and masks/.")

  def source_features(self):
    return dict(source_id=tfds.features.Text())

  def _splits(self, root):
    return {s: self._generate_examples(root, s) for s in common.SPLITS if os.path.isfile(phrase_file(root, s))}

  def _generate_examples(self, root, split):
    path = phrase_file(root, split)
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
    for n, line in enumerate(lines, 1):
      if not line.strip():
        continue
      parsed = parse_line(line)
      try:
        if parsed is None:
          raise common.BadRecord(path, f"line {n}", "phrase", f"expected '<id> <phrase>', got {line!r}")
        sid, phrase = parsed
        image, h, w = common.read_image(os.path.join(root, "images", f"{sid}.tif"), sid, "image")
        mpath = os.path.join(root, "masks", f"{sid}.tif")
        raw = common.read_gray(mpath, sid, "mask")
        common.check_mask_size(raw, h, w, mpath, sid, "mask")
      except common.BadRecord as e:
        self.policy.handle(e, split)
        continue
      key = f"{split}_{n}_{sid}"
      yield key, dict(
          image=image, masks=[common.mask_png((raw == 255).astype(np.uint8))], instruction=phrase,
          answer=target_text(phrase), id=key, image_name=f"{sid}.tif", no_target=False, source_id=sid)
