"""Bad input: each case raises a UserError naming file, record and field; --skip-bad counts and reports."""
import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from segearth_jax import experiment
from segearth_jax.cli import main
from segearth_jax.data.pipeline import make_dataset
from segearth_jax.data.preprocess import Preprocessor
from segearth_jax.data.templates import PHI_SYSTEM
from segearth_jax.data.tokenizer import train_toy_tokenizer
from segearth_jax.errors import UserError
from tests import native_fixtures as nf
from tfds_laserss.build import build


def _edit_json(path, fn):
  data = json.loads(open(path).read())
  fn(data)
  with open(path, "w") as f:
    json.dump(data, f)


def _laserss(tmp_path):
  src = tmp_path / "src"
  nf.write_laserss_odd(src)
  return src, src / "train" / "annotations" / "train_ann.json"


def test_malformed_json_laserss(tmp_path):
  src, ann = _laserss(tmp_path)
  ann.write_text('[{"id": 101, "image_name": ')
  with pytest.raises(UserError, match=r"train_ann\.json.*malformed JSON"):
    build("laserss", src, tmp_path / "out")
  # every train record lost: still an error, listing what was skipped
  with pytest.raises(UserError, match=r"(?s)split \"train\".*skipped 1 bad records.*train_ann\.json"):
    build("laserss", src, tmp_path / "out2", skip_bad=True)


def test_malformed_json_earthreason_names_record(tmp_path):
  src = tmp_path / "src"
  nf.write_earthreason(src, orphan_label=False)
  (src / "val" / "QAs" / "c3.json").write_text("{not json")
  with pytest.raises(UserError, match=r"c3\.json: record c3: field '\(file\)': malformed JSON"):
    build("earthreason", src, tmp_path / "out")


def test_rle_count_differs_from_seg_count(tmp_path):
  src, ann = _laserss(tmp_path)
  _edit_json(ann, lambda d: d[1]["mask"].pop())  # record 102: 2 [SEG], now 1 RLE
  with pytest.raises(UserError, match=r"train_ann\.json: record 102: field 'mask': 1 RLE masks but 2 \[SEG\]"):
    build("laserss", src, tmp_path / "out")
  b = build("laserss", src, tmp_path / "out2", skip_bad=True)
  assert [r["record"] for r in b.skipped.records] == ["102"]
  assert b.info.splits["train"].num_examples == 1
  assert "skipped 1 bad records" in b.skipped.summary() and "record 102" in b.skipped.summary()


def test_missing_image(tmp_path):
  src, _ = _laserss(tmp_path)
  os.remove(src / "train" / "images" / "img_101.png")
  with pytest.raises(UserError, match=r"img_101\.png: record 101: field 'image_name': image file is missing"):
    build("laserss", src, tmp_path / "out")


def test_unreadable_image(tmp_path):
  src = tmp_path / "src"
  nf.write_rrsisd(src)
  (src / "images" / "rrsisd" / "JPEGImages" / "00003.jpg").write_bytes(b"not a jpeg")
  with pytest.raises(UserError, match=r"00003\.jpg: record 2 \(image 3\): field 'file_name': image cannot be read"):
    build("rrsisd", src, tmp_path / "out")


def test_mask_size_differs_laserss(tmp_path):
  src, ann = _laserss(tmp_path)
  _edit_json(ann, lambda d: d[0]["mask"][0].update(size=[20, 20]))
  with pytest.raises(UserError, match=r"record 101: field 'mask\[0\]': mask size \[20, 20\] != image size"):
    build("laserss", src, tmp_path / "out")


def test_mask_size_differs_refsegrs(tmp_path):
  src = tmp_path / "src"
  nf.write_refsegrs(src)
  Image.fromarray(np.zeros((16, 16), np.uint8)).save(src / "masks" / "12.tif")
  with pytest.raises(UserError, match=r"12\.tif: record 12: field 'mask': mask size \[16, 16\] != image size"):
    build("refsegrs", src, tmp_path / "out")


def test_mask_size_differs_rrsisd_coco(tmp_path):
  src = tmp_path / "src"
  nf.write_rrsisd(src)
  _edit_json(src / "rrsisd" / "instances.json", lambda d: d["images"][1].update(height=50))
  with pytest.raises(UserError, match=r"instances\.json: record 2: field 'images.height/width'"):
    build("rrsisd", src, tmp_path / "out")


def test_unknown_split_rrsisd(tmp_path):
  src = tmp_path / "src"
  nf.write_rrsisd(src)
  refs = pickle.load(open(src / "rrsisd" / "refs(unc).p", "rb"))
  refs[2]["split"] = "trainval"
  nf.write_refs(src, refs)
  with pytest.raises(UserError, match=r"refs\(unc\)\.p: record 2: field 'split': unknown split 'trainval'"):
    build("rrsisd", src, tmp_path / "out")
  b = build("rrsisd", src, tmp_path / "out2", skip_bad=True)
  assert [r["record"] for r in b.skipped.records] == ["2"] and "val" not in b.info.splits


@pytest.mark.parametrize("name, needs", [("laserss", "annotations/"), ("refsegrs", "output_phrase_"),
                                         ("earthreason", "QAs/"), ("rrsisd", "refs pickle is missing")])
def test_manual_dir_without_the_layout(tmp_path, name, needs):
  """A manual_dir that holds nothing of the dataset's layout: an error naming the dataset and what it wants."""
  (tmp_path / "src" / "unrelated").mkdir(parents=True)
  with pytest.raises(UserError, match=rf"(?s){name}.*{needs}") as e:
    build(name, tmp_path / "src", tmp_path / "out")
  assert str(tmp_path / "src") in str(e.value)


def test_unknown_split_pipeline_and_dataset(tmp_path):
  src = tmp_path / "src"
  nf.write_refsegrs(src)
  build("refsegrs", src, tmp_path / "out")
  c = experiment.base_config("tiny")
  c.data.name, c.data.data_dir = "refsegrs", str(tmp_path / "out")
  with pytest.raises(UserError, match=r"refsegrs.*unknown split 'dev'"):
    make_dataset(c, "dev", tokenizer=None, train=False)
  with pytest.raises(UserError, match="unknown dataset 'nope'"):
    build("nope", src, tmp_path / "out3")


def test_restricted_unpickler(tmp_path):
  src = tmp_path / "src"
  nf.write_rrsisd(src)

  class Evil:
    def __reduce__(self):
      return (os.system, ("echo pwned",))

  with open(src / "rrsisd" / "refs(unc).p", "wb") as f:
    pickle.dump([{"ref_id": 0, "x": Evil()}], f)
  with pytest.raises(UserError, match=r"refs\(unc\)\.p.*cannot be unpickled safely.*refuses"):
    build("rrsisd", src, tmp_path / "out")


def test_orphan_qa_and_cli_message(tmp_path, capsys):
  src = tmp_path / "src"
  nf.write_earthreason(src, orphan_label=False)
  os.remove(src / "train" / "labels" / "b2.png")
  rc = main(["data", "build", "earthreason", "--manual-dir", str(src), "--data-dir", str(tmp_path / "o")])
  err = capsys.readouterr().err
  assert rc == 2 and "b2.png: record b2: field 'labels': no labels file" in err
  assert not os.path.exists(tmp_path / "o" / "earthreason" / "1.0.0")
  rc = main(["data", "build", "earthreason", "--manual-dir", str(src), "--data-dir", str(tmp_path / "o"),
             "--skip-bad"])
  out = capsys.readouterr().out
  assert rc == 0 and "skipped 1 bad records" in out and "record b2" in out


def test_pipeline_bad_record_named_and_skipped(tmp_path):
  """A record the builder let through but the pipeline cannot use (masks vs [SEG]) is named, or skipped."""
  c = experiment.base_config("tiny")
  tok = train_toy_tokenizer([PHI_SYSTEM, "a b c"], tmp_path / "tok", vocab_size=300)
  ex = dict(image=np.zeros((8, 8, 3), np.uint8), masks=[np.zeros((8, 8, 1), np.uint8)] * 2,
            instruction=b"x", answer=b"<p>a</p>[SEG]", id=b"rec-7")
  with pytest.raises(UserError, match=r"record rec-7: field 'masks': 2 masks but 1 \[SEG\]"):
    Preprocessor(c, tok, train=True, source_name="src")(ex)
  ex2 = dict(ex, masks=[np.zeros((4, 8, 1), np.uint8)])
  with pytest.raises(UserError, match=r"record rec-7: field 'masks\[0\]': mask size \[4, 8\] != image size"):
    Preprocessor(c, tok, train=True, source_name="src")(ex2)
  c.data.skip_bad = True
  pre = Preprocessor(c, tok, train=True)
  assert pre(ex) is None and pre.stats["bad_skipped"] == 1
