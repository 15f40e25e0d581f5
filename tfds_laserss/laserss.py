"""LaSeRS (SegEarth-R2) from its release layout.

  train/annotations/train_ann.json   train/images/
  val/annotations/val_ann.json       val/images/
  test/annotations/<subset>.json     test/images/      (one file per test subset; a record may be in several)

A record: {id, image_name, description, answer ('<p>phrase</p>[SEG]' per target), mask [COCO RLE, ...]}
plus extra fields (kept as JSON text in `extra`). The answer already carries the [SEG] tokens, so it is the
training target as is. A test record listed in several subset files is ONE example whose `subsets` names
them all (in the order of SUBSETS, unknown names after). `no_target` = the record has no mask.
"""
from __future__ import annotations

import json
import os

import tensorflow_datasets as tfds

from segearth_jax.data.answer import SEG_TOKEN, seg_count
from tfds_laserss import common

SUBSETS = ("semantic", "instance", "part", "single", "multiple", "explicit", "implicit", "short", "long",
           "no_target")
_CORE_KEYS = ("id", "image_name", "description", "answer", "mask")


def _ann_files(root: str, split: str) -> list[tuple[str, str | None]]:
  """(path, subset name or None) for every annotation file of a split that exists."""
  ann_dir = os.path.join(root, split, "annotations")
  if split != "test":
    path = os.path.join(ann_dir, f"{split}_ann.json")
    return [(path, None)] if os.path.isfile(path) else []
  if not os.path.isdir(ann_dir):
    return []
  names = sorted(f for f in os.listdir(ann_dir) if f.endswith(".json"))
  return [(os.path.join(ann_dir, f), f[:-len(".json")]) for f in names]


def _records(data, path):
  if isinstance(data, dict):  # tolerate {"annotations": [...]} wrappers
    for key in ("annotations", "data", "records"):
      if isinstance(data.get(key), list):
        return data[key]
  if not isinstance(data, list):
    raise common.BadRecord(path, "-", "(file)", f"expected a list of records, got {type(data).__name__}")
  return data


def _subset_order(name: str):
  return (SUBSETS.index(name), "") if name in SUBSETS else (len(SUBSETS), name)


class Laserss(common.Builder):
  """LaSeRS: language-guided segmentation of remote-sensing images (train/val/test, test subsets)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Release layout; test subsets as a feature."}
  HOMEPAGE = "https://arxiv.org/abs/2512.20013"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Unpack the LaSeRS release so that manual_dir holds train/, val/ and test/, each with annotations/ "
      "and images/ (test/annotations/<subset>.json per subset).")

  def source_features(self):
    return dict(subsets=tfds.features.Sequence(tfds.features.Text()), extra=tfds.features.Text())

  def _splits(self, root):
    return {s: self._generate_examples(root, s) for s in common.SPLITS if _ann_files(root, s)}

  def _collect(self, root: str, split: str):
    """id -> (record, file, subsets); a record in several subset files is merged into one."""
    merged: dict[str, list] = {}
    for path, subset in _ann_files(root, split):
      try:
        recs = _records(common.load_json(path), path)
      except common.BadRecord as e:
        self.policy.handle(e, split)
        continue
      for i, rec in enumerate(recs):
        rid = str(rec.get("id", f"#{i}")) if isinstance(rec, dict) else f"#{i}"
        if not isinstance(rec, dict) or "id" not in rec:
          self.policy.handle(common.BadRecord(path, rid, "id", "record has no id"), split)
          continue
        entry = merged.setdefault(rid, [rec, path, []])
        if subset is not None and subset not in entry[2]:
          entry[2].append(subset)
    return merged

  def _generate_examples(self, root: str, split: str):
    for rid, (rec, path, subsets) in self._collect(root, split).items():
      try:
        example = self._example(root, split, rid, rec, path, subsets)
      except common.BadRecord as e:
        self.policy.handle(e, split)
        continue
      yield rid, example

  def _example(self, root, split, rid, rec, path, subsets):
    for key in ("image_name", "description", "answer", "mask"):
      if key not in rec:
        raise common.BadRecord(path, rid, key, "field is missing")
    answer, masks_rle = rec["answer"], rec["mask"]
    if not isinstance(answer, str):
      raise common.BadRecord(path, rid, "answer", "expected text")
    if not isinstance(masks_rle, list):
      raise common.BadRecord(path, rid, "mask", "expected a list of COCO RLE")
    n_seg = seg_count(answer)
    if n_seg != len(masks_rle):
      raise common.BadRecord(path, rid, "mask",
                             f"{len(masks_rle)} RLE masks but {n_seg} {SEG_TOKEN} in 'answer'")
    image_path = os.path.join(root, split, "images", str(rec["image_name"]))
    image, h, w = common.read_image(image_path, rid, "image_name")
    masks = [common.mask_png(common.rle_to_mask(r, h, w, path, rid, f"mask[{k}]"))
             for k, r in enumerate(masks_rle)]
    extra = {k: v for k, v in rec.items() if k not in _CORE_KEYS}
    return dict(
        image=image, masks=masks, instruction=str(rec["description"]), answer=answer, id=rid,
        image_name=str(rec["image_name"]), no_target=not masks_rle,
        subsets=sorted(subsets, key=_subset_order), extra=json.dumps(extra, sort_keys=True, default=str))
