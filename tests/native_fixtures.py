"""Writers of tiny native-format dataset folders (RRSIS-D, RefSegRS, EarthReason, LaSeRS odd cases).

Each writer returns what a reader must get back: {split: {example id: dict(image=HxWx3 uint8,
masks=[HxW 0/1 uint8], instruction, answer, no_target, ...ids)}}. Expected masks come from numpy shapes
drawn here (RLE fixtures) or from pycocotools' polygon rasteriser (polygon fixtures, parts OR-ed), so the
builders' own decoding is what is under test.
"""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
from PIL import Image


def _rng(seed):
  return np.random.default_rng(seed)


def rand_image(rng, h, w):
  return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def rect_mask(h, w, y0, y1, x0, x1):
  m = np.zeros((h, w), np.uint8)
  m[y0:y1, x0:x1] = 1
  return m


def save_image(path, arr, **kw):
  """Writes `arr` and returns what PIL reads back (JPEG is lossy: the expectation is the decoded file)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(arr).save(path, **kw)
  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"))


def rle_compressed(mask):
  from pycocotools import mask as mask_util
  r = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
  return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": r["counts"].decode("ascii")}


def rle_uncompressed(mask):
  """COCO uncompressed RLE: column-major run lengths starting with a run of zeros."""
  flat = mask.astype(np.uint8).flatten(order="F")
  counts, cur, run = [], 0, 0
  for v in flat:
    if v == cur:
      run += 1
    else:
      counts.append(run)
      cur, run = v, 1
  counts.append(run)
  return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def write_json(path, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(data, f)


# -- LaSeRS ----------------------------------------------------------------------------------------


def write_laserss_odd(root, seed=0):
  """A LaSeRS release with the odd cases: a test record in several subset files, a no-target record,
  a non-square image, two targets, extra fields, a val split."""
  rng = _rng(seed)
  expected = {"train": {}, "val": {}, "test": {}}
  recs = {"train": [], "val": [], "test": []}
  specs = [  # (split, id, h, w, n_targets)
      ("train", 101, 40, 40, 1), ("train", 102, 32, 48, 2), ("val", 201, 36, 36, 1),
      ("test", 301, 40, 40, 2), ("test", 302, 40, 40, 0), ("test", 303, 48, 32, 1)]
  for split, rid, h, w, n in specs:
    name = f"img_{rid}.png"
    image = save_image(os.path.join(root, split, "images", name), rand_image(rng, h, w))
    masks = [rect_mask(h, w, 2 + 3 * k, 10 + 5 * k, 3 + 4 * k, 20) for k in range(n)]
    answer = " and ".join(f"the <p>thing {k}</p>[SEG]" for k in range(n)) or "There is no such target."
    rec = dict(id=rid, image_name=name, description=f"find things in {rid}", answer=answer,
               mask=[rle_compressed(m) for m in masks], category="ship", num_targets=n)
    recs[split].append(rec)
    expected[split][str(rid)] = dict(image=image, masks=masks, instruction=rec["description"], answer=answer,
                                     no_target=n == 0, image_name=name, subsets=[],
                                     extra={"category": "ship", "num_targets": n})
  write_json(os.path.join(root, "train", "annotations", "train_ann.json"), recs["train"])
  write_json(os.path.join(root, "val", "annotations", "val_ann.json"), recs["val"])
  by_id = {r["id"]: r for r in recs["test"]}
  subsets = {"instance": [301, 303], "multiple": [301], "single": [303], "no_target": [302],
             "short": [301, 302, 303]}
  for name, ids in subsets.items():
    write_json(os.path.join(root, "test", "annotations", f"{name}.json"), [by_id[i] for i in ids])
    for i in ids:
      expected["test"][str(i)]["subsets"].append(name)
  order = ("semantic", "instance", "part", "single", "multiple", "explicit", "implicit", "short", "long",
           "no_target")
  for e in expected["test"].values():
    e["subsets"].sort(key=order.index)
  return expected


# -- RRSIS-D ---------------------------------------------------------------------------------------


def write_rrsisd(root, seed=0):
  """Odd cases: a multi-part (overlapping) polygon, compressed and uncompressed RLE, two refs sharing an
  image, several sentences per ref, a ref whose ref_id order differs from the image order."""
  from pycocotools import mask as mask_util
  rng = _rng(seed)
  h, w = 40, 48
  img_dir = os.path.join(root, "images", "rrsisd", "JPEGImages")
  images, pixels = [], {}
  for iid in (7, 3):
    name = f"{iid:05d}.jpg"
    pixels[iid] = save_image(os.path.join(img_dir, name), rand_image(rng, h, w), quality=95)
    images.append({"id": iid, "file_name": name, "height": h, "width": w})
  poly = [[2, 2, 20, 2, 20, 15, 2, 15], [10, 10, 30, 10, 30, 30, 10, 30]]  # overlapping parts
  poly_mask = np.zeros((h, w), np.uint8)
  for part in mask_util.frPyObjects(poly, h, w):
    poly_mask = np.maximum(poly_mask, mask_util.decode(part))
  m_c = rect_mask(h, w, 5, 25, 30, 45)
  m_u = rect_mask(h, w, 0, 12, 0, 8)
  anns = [
      {"id": 11, "image_id": 7, "category_id": 1, "segmentation": poly, "bbox": [2, 2, 28, 28]},
      {"id": 12, "image_id": 7, "category_id": 2, "segmentation": rle_compressed(m_c), "bbox": [30, 5, 15, 20]},
      {"id": 13, "image_id": 3, "category_id": 1, "segmentation": rle_uncompressed(m_u), "bbox": [0, 0, 8, 12]},
  ]
  cats = [{"id": 1, "name": "vehicle"}, {"id": 2, "name": "storage tank"}]
  refs = [
      dict(ref_id=0, ann_id=11, image_id=7, category_id=1, split="train", sentences=[
          dict(raw="The Vehicle on the left", sent="the vehicle on the left", tokens=[], sent_id=100),
          dict(raw="left car", sent="left car", tokens=[], sent_id=101)]),
      dict(ref_id=1, ann_id=12, image_id=7, category_id=2, split="train", sentences=[
          dict(raw="storage tank", sent="storage tank at right", tokens=[], sent_id=102)]),
      dict(ref_id=2, ann_id=13, image_id=3, category_id=1, split="val", sentences=[
          dict(raw="top left vehicle", sent="top left vehicle", tokens=[], sent_id=103)]),
      dict(ref_id=3, ann_id=12, image_id=7, category_id=2, split="test", sentences=[
          dict(raw="round tank", sent="round tank", tokens=[], sent_id=104)]),
  ]
  os.makedirs(os.path.join(root, "rrsisd"), exist_ok=True)
  write_refs(root, refs)
  write_json(os.path.join(root, "rrsisd", "instances.json"),
             {"images": images, "annotations": anns, "categories": cats})
  mask_of = {11: poly_mask, 12: m_c, 13: m_u}
  cat_of = {1: "vehicle", 2: "storage tank"}
  expected = {"train": {}, "val": {}, "test": {}}
  for ref in refs:
    for s in ref["sentences"]:
      key = f"{ref['ref_id']}_{s['sent_id']}"
      expected[ref["split"]][key] = dict(
          image=pixels[ref["image_id"]], masks=[mask_of[ref["ann_id"]]], instruction=s["sent"],
          answer=f"<p>{cat_of[ref['category_id']]}</p>[SEG]", no_target=False,
          image_name=f"{ref['image_id']:05d}.jpg", ref_id=ref["ref_id"], ann_id=ref["ann_id"],
          sent_id=s["sent_id"], image_id=ref["image_id"])
  return expected


def write_refs(root, refs, protocol=2):
  with open(os.path.join(root, "rrsisd", "refs(unc).p"), "wb") as f:
    pickle.dump(refs, f, protocol=protocol)


# -- RefSegRS --------------------------------------------------------------------------------------


def write_refsegrs(root, seed=0):
  """Odd cases: phrases with spaces, mask values other than 0/255 (only 255 is foreground), an image id
  used on two lines, a blank line."""
  rng = _rng(seed)
  h, w = 32, 32
  expected = {"train": {}, "val": {}, "test": {}}
  lines = {"train": [(5, "road along the river"), (9, "building"), (5, "the long road")],
           "val": [(12, "vehicle in the parking lot")], "test": [(20, "low vegetation")]}
  made = {}
  for split, items in lines.items():
    text = []
    for n, (sid, phrase) in enumerate(items, 1):
      text.append(f"{sid} {phrase}")
      if sid not in made:
        img = save_image(os.path.join(root, "images", f"{sid}.tif"), rand_image(rng, h, w))
        raw = np.zeros((h, w), np.uint8)
        raw[4:20, 6:26] = 255
        raw[0:3, :] = 128   # not foreground
        raw[25:, 25:] = 254  # not foreground
        os.makedirs(os.path.join(root, "masks"), exist_ok=True)
        Image.fromarray(raw).save(os.path.join(root, "masks", f"{sid}.tif"))
        made[sid] = (img, (raw == 255).astype(np.uint8))
      img, m = made[sid]
      expected[split][f"{split}_{n}_{sid}"] = dict(
          image=img, masks=[m], instruction=phrase, answer=f"<p>{phrase}</p>[SEG]", no_target=False,
          image_name=f"{sid}.tif", source_id=str(sid))
    with open(os.path.join(root, f"output_phrase_{split}.txt"), "w") as f:
      f.write("\n".join(text) + "\n\n")
  return expected


# -- EarthReason -----------------------------------------------------------------------------------


def write_earthreason(root, seed=0, orphan_label=True):
  """Odd cases: .jpg and .png images, an empty answer list (no target), two questions on one image,
  label values other than 1 (nonzero = foreground) and, with orphan_label, a label without QA/image."""
  rng = _rng(seed)
  h, w = 36, 40
  expected = {"train": {}, "val": {}, "test": {}}
  items = [("train", "a1", ".jpg", ["What could hold oil?", "Where is fuel stored?"], ["The tanks hold oil."]),
           ("train", "b2", ".png", ["Where could a plane land?"], []),
           ("val", "c3", ".png", ["Where is water?"], ["The lake", "is water."]),
           ("test", "d4", ".jpg", ["Which area is farmland?"], ["The fields."])]
  for split, stem, ext, qs, ans in items:
    base = os.path.join(root, split)
    kw = {"quality": 95} if ext == ".jpg" else {}
    img = save_image(os.path.join(base, "images", stem + ext), rand_image(rng, h, w), **kw)
    label = np.zeros((h, w), np.uint8)
    if ans:
      label[3:20, 5:30] = 1
      label[22:30, 2:8] = 200
    os.makedirs(os.path.join(base, "labels"), exist_ok=True)
    Image.fromarray(label).save(os.path.join(base, "labels", stem + ".png"))
    write_json(os.path.join(base, "QAs", stem + ".json"), {"questions": qs, "answer": ans})
    text = " ".join(ans) if ans else "No target."
    for k, q in enumerate(qs):
      expected[split][f"{stem}_{k}"] = dict(
          image=img, masks=[(label != 0).astype(np.uint8)], instruction=q, answer=f"{text} [SEG]",
          no_target=not ans, image_name=stem + ext, stem=stem)
  if orphan_label:
    Image.fromarray(np.zeros((h, w), np.uint8)).save(os.path.join(root, "train", "labels", "zz9.png"))
  return expected


def write_laserss_many(root, n=12, seed=0, n_targets=(1, 2, 0, 3)):
  """A LaSeRS release with n train and n test records cycling through n_targets targets (3 > the tiny
  max_seg 2, to exercise the [SEG] cap); returns {split: {id: record}}."""
  rng = _rng(seed)
  out = {}
  for split in ("train", "test"):
    recs = []
    for i in range(n):
      h, w = (40, 40) if i % 3 else (32, 48)
      name = f"{split}_{i}.png"
      save_image(os.path.join(root, split, "images", name), rand_image(rng, h, w))
      k = n_targets[i % len(n_targets)]
      masks = [rect_mask(h, w, 2 + 2 * j, 12 + 3 * j, 1 + 5 * j, 18 + j) for j in range(k)]
      answer = " ".join(f"the <p>object {j}</p>[SEG]" for j in range(k)) or "No target."
      recs.append(dict(id=f"{split}{i}", image_name=name, description=f"segment the objects of scene {i}",
                       answer=answer, mask=[rle_compressed(m) for m in masks]))
    ann = "train_ann.json" if split == "train" else "single.json"
    write_json(os.path.join(root, split, "annotations", ann), recs)
    out[split] = {r["id"]: r for r in recs}
  return out
