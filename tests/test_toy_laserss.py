"""The toy LaSeRS: valid RLE, one mask per [SEG], every subset file filled, deterministic per seed, CLI errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from segearth_jax.data.preview import draw_grid
from segearth_jax.data.tokenizer import load_tokenizer, seg_token_id
from segearth_jax.errors import UserError
from segearth_jax.toy import instructions as ins
from segearth_jax.toy.release import write_toy_laserss

SUBSETS = ("semantic", "instance", "part", "single", "multiple", "explicit", "implicit", "short", "long",
           "no_target")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
  out = tmp_path_factory.mktemp("toy0")
  summary = write_toy_laserss(out, images=50, seed=0)
  return out, summary


def _files(root):
  out = {}
  for d, _, names in os.walk(root):
    for n in names:
      p = os.path.join(d, n)
      out[os.path.relpath(p, root)] = open(p, "rb").read()
  return out


def _load(path):
  with open(path) as f:
    return json.load(f)


def _all_records(root):
  recs = {"train": _load(root / "train/annotations/train_ann.json"),
          "val": _load(root / "val/annotations/val_ann.json")}
  recs["test"] = {}
  for s in SUBSETS:
    for r in _load(root / f"test/annotations/{s}.json"):
      recs["test"][r["id"]] = r
  recs["test"] = list(recs["test"].values())
  return recs


def test_layout_and_records(toy):
  root, summary = toy
  assert summary["images"] == {"train": 35, "val": 5, "test": 10}
  for s in SUBSETS:
    subset = _load(root / f"test/annotations/{s}.json")
    assert subset, f"empty subset {s}"
    for r in subset:
      assert s in ins.subsets_of(r)
  ids = []
  for split, recs in _all_records(root).items():
    assert recs
    sizes = {}
    for r in recs:
      ids.append(r["id"])
      for field in ("id", "image_name", "description", "answer", "mask", "granularity", "multiplicity",
                    "reasoning", "length", "class"):
        assert field in r, (r["id"], field)
      if r["image_name"] not in sizes:
        with Image.open(root / split / "images" / r["image_name"]) as im:
          assert im.mode == "RGB"
          sizes[r["image_name"]] = (im.height, im.width)
      h, w = sizes[r["image_name"]]
      assert (h, w) == (256, 256)
      assert r["answer"].count("[SEG]") == len(r["mask"]), r["id"]
      if r["multiplicity"] == "none":
        assert r["mask"] == [] and "[SEG]" not in r["answer"]
      else:
        assert len(r["mask"]) >= 1
        assert (len(r["mask"]) >= 2) == (r["multiplicity"] == "multiple")
        assert r["answer"].count("<p>") == len(r["mask"])
      for rle in r["mask"]:
        assert rle["size"] == [h, w] and isinstance(rle["counts"], str)
        m = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
        assert m.shape == (h, w) and m.sum() > 0
  assert len(ids) == len(set(ids))


def test_masks_are_drawn_geometry(toy):
  """Storage-tank masks are discs over the white roof drawn with the same geometry."""
  root, _ = toy
  recs = _all_records(root)["train"]
  tanks = [r for r in recs if r["class"] == "storage tank" and r["granularity"] == "instance"
           and r["multiplicity"] == "single"]
  assert tanks
  for r in tanks[:5]:
    m = mask_utils.decode({"size": r["mask"][0]["size"], "counts": r["mask"][0]["counts"].encode()}) > 0
    ys, xs = np.nonzero(m)
    hgt, wid = np.ptp(ys) + 1, np.ptp(xs) + 1
    assert abs(hgt - wid) <= 2 and abs(m.sum() / (np.pi * hgt * wid / 4) - 1) < 0.1
    img = np.asarray(Image.open(root / "train/images" / r["image_name"])).astype(float)
    inner = m & np.roll(m, 5, 0) & np.roll(m, -5, 0) & np.roll(m, 5, 1) & np.roll(m, -5, 1)
    assert img[inner].mean() > 180                         # white roof inside the mask


def test_same_seed_same_bytes_other_seed_differs(toy, tmp_path):
  root, _ = toy
  write_toy_laserss(tmp_path / "again", images=50, seed=0)
  a, b = _files(root), _files(tmp_path / "again")
  assert a.keys() == b.keys()
  assert [k for k in a if a[k] != b[k]] == []
  write_toy_laserss(tmp_path / "other", images=50, seed=1)
  c = _files(tmp_path / "other")
  assert a["train/images/train_00000.png"] != c["train/images/train_00000.png"]
  assert a["train/annotations/train_ann.json"] != c["train/annotations/train_ann.json"]


def test_tokenizer_saved_with_data(toy):
  root, summary = toy
  tok = load_tokenizer(root / "tokenizer")
  assert len(tok) <= 1024
  seg = seg_token_id(tok)
  for split, recs in _all_records(root).items():
    for r in recs:
      ids = tok.encode(r["answer"], add_special_tokens=False)
      assert ids.count(seg) == r["answer"].count("[SEG]") == len(r["mask"])
      assert tok.decode(ids) == r["answer"]


def test_grid_preview(toy, tmp_path):
  root, _ = toy
  out = draw_grid(root, "test", 6, tmp_path / "g.png")
  with Image.open(out) as im:
    assert im.width > 3 * 256 and im.height > 256


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "segearth_jax", "data", *args], capture_output=True, text=True,
                        timeout=120)


def test_cli(tmp_path):
  p = _cli("toy", "--out", str(tmp_path / "t"), "--images", "50")
  assert p.returncode == 0, p.stderr
  assert "35/5/10 scenes" in p.stdout
  assert os.path.exists(tmp_path / "t/test/annotations/part.json")
  # running again over its own output is allowed (replaces it)
  for bad, why in ((["--images", "0"], "positive integer"), (["--images", "2"], "at least 3")):
    p = _cli("toy", "--out", str(tmp_path / "x"), *bad)
    assert p.returncode == 2 and "Traceback" not in p.stderr and why in p.stderr, p.stderr
  f = tmp_path / "file"
  f.write_text("x")
  p = _cli("toy", "--out", str(f), "--images", "5")
  assert p.returncode == 2 and "Traceback" not in p.stderr
  assert p.stderr.strip().count("\n") == 0 and "not a folder" in p.stderr
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "mine.txt").write_text("keep")
  p = _cli("toy", "--out", str(tmp_path / "full"), "--images", "5")
  assert p.returncode == 2 and "not empty" in p.stderr and (tmp_path / "full" / "mine.txt").exists()
  p = _cli("grid", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "g.png"))
  assert p.returncode == 2 and "Traceback" not in p.stderr and "nope" in p.stderr


def test_too_few_images_is_a_user_error(tmp_path):
  with pytest.raises(UserError, match="at least 3"):
    write_toy_laserss(tmp_path, images=2)


def test_fixed_test_count_keeps_the_test_set_when_train_grows(tmp_path):
  small = write_toy_laserss(tmp_path / "small", images=8, seed=3, test_images=3, val_images=1)
  big = write_toy_laserss(tmp_path / "big", images=14, seed=3, test_images=3, val_images=1)
  assert small["images"] == {"train": 4, "val": 1, "test": 3}
  assert big["images"] == {"train": 10, "val": 1, "test": 3}
  assert _files(tmp_path / "small" / "test") == _files(tmp_path / "big" / "test")
  assert small["records"]["train"] < big["records"]["train"]
  with pytest.raises(UserError, match="at least one scene for each split"):
    write_toy_laserss(tmp_path / "none", images=5, test_images=4, val_images=1)
