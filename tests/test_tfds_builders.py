"""Each builder builds its native fixture (no TensorFlow) and reads back every field equal to the source."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from segearth_jax.errors import UserError
from segearth_jax.toy.release import write_toy_laserss
from tests import native_fixtures as nf
from tfds_laserss.build import build


def _read_all(name, data_dir):
  import tensorflow_datasets as tfds

  import tfds_laserss  # noqa: F401  (registers the builders)
  out = {}
  for split in ("train", "val", "test"):
    try:
      src = tfds.data_source(name, split=split, data_dir=str(data_dir))
    except Exception:
      continue
    out[split] = {ex["id"].decode(): ex for ex in (src[i] for i in range(len(src)))}
  return out


def _check(got, expected, id_fields=()):
  assert set(got) == {s for s, v in expected.items() if v}
  for split, exp_split in expected.items():
    if not exp_split:
      continue
    assert set(got[split]) == set(exp_split), split
    for key, exp in exp_split.items():
      ex = got[split][key]
      np.testing.assert_array_equal(ex["image"], exp["image"])
      assert len(ex["masks"]) == len(exp["masks"])
      for m, e in zip(ex["masks"], exp["masks"]):
        assert m.shape == e.shape + (1,)
        np.testing.assert_array_equal(m[..., 0], e)
      assert ex["instruction"].decode() == exp["instruction"]
      assert ex["answer"].decode() == exp["answer"]
      assert ex["answer"].decode().count("[SEG]") == len(exp["masks"])
      assert bool(ex["no_target"]) == exp["no_target"]
      assert ex["image_name"].decode() == exp["image_name"]
      for f in id_fields:
        v = ex[f].decode() if isinstance(ex[f], bytes) else int(ex[f])
        assert v == exp[f], (key, f)


def test_laserss_odd_cases(tmp_path):
  expected = nf.write_laserss_odd(tmp_path / "src")
  build("laserss", tmp_path / "src", tmp_path / "tfds")
  got = _read_all("laserss", tmp_path / "tfds")
  _check(got, expected)
  for split, exp_split in expected.items():
    for key, exp in exp_split.items():
      ex = got[split][key]
      assert [s.decode() for s in ex["subsets"]] == exp["subsets"]
      assert json.loads(ex["extra"].decode()) == exp["extra"]
  assert [s.decode() for s in got["test"]["301"]["subsets"]] == ["instance", "multiple", "short"]
  assert got["test"]["302"]["no_target"] and len(got["test"]["302"]["masks"]) == 0
  assert got["test"]["303"]["image"].shape == (48, 32, 3)


def test_laserss_toy_generator(tmp_path):
  from pycocotools import mask as mask_util

  write_toy_laserss(tmp_path / "toy", images=4, seed=1, size=48)
  build("laserss", tmp_path / "toy", tmp_path / "tfds")
  got = _read_all("laserss", tmp_path / "tfds")
  for split in ("train", "val", "test"):
    ann_dir = tmp_path / "toy" / split / "annotations"
    recs, subsets = {}, {}
    for f in sorted(os.listdir(ann_dir)):
      for r in json.loads((ann_dir / f).read_text()):
        recs[str(r["id"])] = r
        if split == "test":
          subsets.setdefault(str(r["id"]), set()).add(f[:-5])
    assert set(got[split]) == set(recs)
    for rid, r in recs.items():
      ex = got[split][rid]
      assert ex["instruction"].decode() == r["description"]
      assert ex["answer"].decode() == r["answer"]
      assert len(ex["masks"]) == len(r["mask"]) == r["answer"].count("[SEG]")
      for m, rle in zip(ex["masks"], r["mask"]):
        ref = mask_util.decode({"size": rle["size"], "counts": rle["counts"].encode()})
        np.testing.assert_array_equal(m[..., 0], ref)
      from PIL import Image
      with Image.open(tmp_path / "toy" / split / "images" / r["image_name"]) as im:
        np.testing.assert_array_equal(ex["image"], np.asarray(im.convert("RGB")))
      if split == "test":
        assert {s.decode() for s in ex["subsets"]} == subsets[rid]


def test_rrsisd(tmp_path):
  expected = nf.write_rrsisd(tmp_path / "src")
  build("rrsisd", tmp_path / "src", tmp_path / "tfds")
  got = _read_all("rrsisd", tmp_path / "tfds")
  _check(got, expected, id_fields=("ref_id", "ann_id", "sent_id", "image_id"))
  poly = got["train"]["0_100"]["masks"][0]
  assert poly.max() == 1  # overlapping polygon parts OR-ed, never summed to 2


def test_refsegrs(tmp_path):
  expected = nf.write_refsegrs(tmp_path / "src")
  build("refsegrs", tmp_path / "src", tmp_path / "tfds")
  _check(_read_all("refsegrs", tmp_path / "tfds"), expected, id_fields=("source_id",))


def test_earthreason_and_orphans(tmp_path):
  expected = nf.write_earthreason(tmp_path / "src")
  with pytest.raises(UserError, match="zz9"):
    build("earthreason", tmp_path / "src", tmp_path / "bad")
  b = build("earthreason", tmp_path / "src", tmp_path / "tfds", skip_bad=True)
  assert len(b.skipped.records) == 1 and "zz9.png" in b.skipped.records[0]["file"]
  assert "skipped 1 bad records" in b.skipped.summary()
  _check(_read_all("earthreason", tmp_path / "tfds"), expected, id_fields=("stem",))


def test_no_tensorflow_and_cli(tmp_path, repo_root):
  """Build through `segearth data build` and read back in a fresh interpreter: TF never imported."""
  nf.write_refsegrs(tmp_path / "src")
  code = (
      "import sys, tensorflow_datasets as tfds\n"
      "from segearth_jax.cli import main\n"
      f"rc = main(['data', 'build', 'refsegrs', '--manual-dir', {str(tmp_path / 'src')!r}, "
      f"'--data-dir', {str(tmp_path / 'tfds')!r}, '--skip-bad'])\n"
      "assert rc == 0, rc\n"
      f"src = tfds.data_source('refsegrs', split='train', data_dir={str(tmp_path / 'tfds')!r})\n"
      "assert len(src) == 3 and src[0]['image'].shape == (32, 32, 3)\n"
      "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
      "print('OK')\n")
  r = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 0, r.stderr[-3000:]
  assert "OK" in r.stdout and "skipped 0 bad records" in r.stdout
  assert os.path.isdir(tmp_path / "tfds" / "refsegrs" / "1.0.0")
