"""RRSIS-D (referring segmentation) from its native layout.

  rrsisd/refs(unc).p       pickle: list of refs {ref_id, ann_id, image_id, category_id, split, sentences
                           [{raw, sent, tokens, sent_id}]}; loaded with a RESTRICTED unpickler (builtin
                           containers and scalars only: a pickle is code, the release is not trusted)
  rrsisd/instances.json    COCO: images {id, file_name, height, width}, annotations {id, image_id,
                           segmentation (polygons, parts OR-ed; or RLE, compressed or not)}, categories
  images/rrsisd/JPEGImages/<file_name>

Refs join images by image_id and masks by ann_id. Each sentence is one example (id '<ref_id>_<sent_id>');
instruction = sentence['sent'] (else 'raw'). Answer (training target, no [SEG] in the source):
'<p>{category name}</p>[SEG]' ('target' when the category is unknown). Splits from ref['split'].
"""
from __future__ import annotations

import io
import os
import pickle

import numpy as np
import tensorflow_datasets as tfds

from segearth_jax.data.answer import target_text
from tfds_laserss import common

REFS = os.path.join("rrsisd", "refs(unc).p")
INSTANCES = os.path.join("rrsisd", "instances.json")
IMAGES = os.path.join("images", "rrsisd", "JPEGImages")

# Only these may be looked up by name inside the pickle; calling them builds plain data.
_SAFE_GLOBALS = {("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "str", "int",
                                           "float", "bool", "bytes", "complex")}
_SAFE_GLOBALS |= {("__builtin__", n) for _, n in list(_SAFE_GLOBALS)}


class _RestrictedUnpickler(pickle.Unpickler):
  def find_class(self, module, name):
    if (module, name) in _SAFE_GLOBALS:
      return super().find_class(module, name)
    raise pickle.UnpicklingError(f"refuses {module}.{name}: only builtin containers and scalars are allowed")


def load_refs(path) -> list:
  """The refs pickle with only builtin containers and scalars allowed (Python 2 pickles: latin1)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise common.BadRecord(path, "-", "(file)", "refs pickle is missing")
  with open(path, "rb") as f:
    data = f.read()
  try:
    refs = _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
  except Exception as e:  # UnpicklingError, EOFError, ... all mean: this file cannot be used
    raise common.BadRecord(path, "-", "(file)", f"cannot be unpickled safely: {e}") from e
  if not isinstance(refs, list):
    raise common.BadRecord(path, "-", "(file)", f"expected a list of refs, got {type(refs).__name__}")
  return refs


class Rrsisd(common.Builder):
  """RRSIS-D referring remote-sensing image segmentation (train/val/test)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Native layout; one example per sentence."}
  HOMEPAGE = "https://github.com/Lsan2401/RMSIN"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Unpack RRSIS-D so that manual_dir holds rrsisd/refs(unc).p, rrsisd/instances.json and "
      "images/rrsisd/JPEGImages/.")

  def source_features(self):
    return dict(ref_id=np.int64, ann_id=np.int64, sent_id=np.int64, image_id=np.int64,
                category=tfds.features.Text())

  def _splits(self, root):
    refs_path = os.path.join(root, REFS)
    refs = load_refs(refs_path)
    by_split: dict[str, list] = {s: [] for s in common.SPLITS}
    for i, ref in enumerate(refs):
      rid = ref.get("ref_id", f"#{i}") if isinstance(ref, dict) else f"#{i}"
      split = ref.get("split") if isinstance(ref, dict) else None
      if split not in by_split:
        self.policy.handle(common.BadRecord(refs_path, rid, "split", f"unknown split {split!r}; "
                                            f"expected one of {list(common.SPLITS)}"), "?")
        continue
      by_split[split].append(ref)
    coco = self._load_coco(os.path.join(root, INSTANCES))
    return {s: self._generate_examples(root, refs_path, refs_s, coco, s)
            for s, refs_s in by_split.items() if refs_s}

  def _load_coco(self, path):
    data = common.load_json(path)
    try:
      images = {int(im["id"]): im for im in data["images"]}
      anns = {int(a["id"]): a for a in data["annotations"]}
    except (KeyError, TypeError, ValueError) as e:
      raise common.BadRecord(path, "-", "images/annotations", f"not a COCO instances file: {e}") from e
    cats = {int(c["id"]): str(c.get("name", "target")) for c in data.get("categories", [])}
    return path, images, anns, cats

  def _generate_examples(self, root, refs_path, refs, coco, split):
    for ref in refs:
      rid = ref.get("ref_id", "?")
      try:
        image, image_name, masks, category = self._ref_parts(root, refs_path, ref, coco)
      except common.BadRecord as e:
        self.policy.handle(e, split)
        continue
      sentences = ref.get("sentences") or []
      for k, sent in enumerate(sentences):
        sid = sent.get("sent_id", k) if isinstance(sent, dict) else k
        text = (sent.get("sent") or sent.get("raw")) if isinstance(sent, dict) else None
        if not isinstance(text, str) or not text.strip():
          self.policy.handle(common.BadRecord(refs_path, f"{rid}/sent {sid}", "sentences.sent", "no text"),
                             split)
          continue
        key = f"{rid}_{sid}"
        yield key, dict(
            image=image, masks=masks, instruction=text, answer=target_text(category), id=key,
            image_name=image_name, no_target=False, ref_id=int(rid), ann_id=int(ref["ann_id"]),
            sent_id=int(sid), image_id=int(ref["image_id"]), category=category)

  def _ref_parts(self, root, refs_path, ref, coco):
    inst_path, images, anns, cats = coco
    rid = ref.get("ref_id", "?")
    for key in ("ref_id", "ann_id", "image_id"):
      if not isinstance(ref.get(key), int):
        raise common.BadRecord(refs_path, rid, key, f"expected an integer, got {ref.get(key)!r}")
    img = images.get(ref["image_id"])
    if img is None:
      raise common.BadRecord(inst_path, rid, "image_id", f"image {ref['image_id']} is not in 'images'")
    ann = anns.get(ref["ann_id"])
    if ann is None:
      raise common.BadRecord(inst_path, rid, "ann_id", f"annotation {ref['ann_id']} is not in 'annotations'")
    if int(ann.get("image_id", -1)) != ref["image_id"]:
      raise common.BadRecord(inst_path, rid, "ann_id", f"annotation {ref['ann_id']} belongs to image "
                             f"{ann.get('image_id')}, the ref to image {ref['image_id']}")
    image_path = os.path.join(root, IMAGES, str(img.get("file_name")))
    image, h, w = common.read_image(image_path, f"{rid} (image {ref['image_id']})", "file_name")
    ch, cw = img.get("height"), img.get("width")
    if (ch, cw) != (h, w):
      raise common.BadRecord(inst_path, rid, "images.height/width",
                             f"COCO says {[ch, cw]}, the image file {image_path} is {[h, w]}")
    seg = ann.get("segmentation")
    where = f"{rid} (annotation {ref['ann_id']})"
    if isinstance(seg, dict):
      mask = common.rle_to_mask(seg, h, w, inst_path, where, "segmentation")
    elif isinstance(seg, list):
      mask = common.polygons_to_mask(seg, h, w, inst_path, where, "segmentation")
    else:
      raise common.BadRecord(inst_path, where, "segmentation", "expected polygons or RLE")
    category = cats.get(int(ref.get("category_id", ann.get("category_id", -1))), "target")
    return image, str(img["file_name"]), [common.mask_png(mask)], category
