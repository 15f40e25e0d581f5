"""segment.Segmenter on a tiny random model saved as a weights folder, on the 8 CPU test devices: a batched
call equals single calls, padding and one compile per shape; `segearth predict` on a PNG (the files it always
wrote) and on a 16-bit 4-band UTM GeoTIFF with nodata, tiled (georeferenced masks, polygons that rasterise
back to them, nothing on nodata)."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from train_fixtures import tiny_config

from segearth_jax import cli
from segearth_jax import sharding as shd
from segearth_jax.data import rle
from segearth_jax.data.templates import EVAL_PROMPT
from segearth_jax.data.tokenizer import seg_token_id, train_toy_tokenizer
from segearth_jax.model_setup import ModelSetup
from segearth_jax.segment import Segmenter
from segearth_jax.weights import save_weights

CANVAS = 64   # tiny_config's Swin canvas: a 150 x 200 scene is 4 x 4 tiles at overlap 16


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  """A random tiny model whose greedy answer is all [SEG] (a large lm_head bias): every call has masks."""
  tmp = tmp_path_factory.mktemp("segment")
  texts = [EVAL_PROMPT, "the ships near the harbour", "all the roads", "<p>ship</p>[SEG] and the road"]
  tok = train_toy_tokenizer(texts * 3, str(tmp / "tok"), vocab_size=300)
  config = tiny_config(f"--config.data.tokenizer={tmp / 'tok'}", "--config.infer.max_new_tokens=3")
  setup = ModelSetup.create(config, mesh=shd.make_mesh(1, 1, 1, devices=jax.devices()[:1]), vocab_size=len(tok))
  # numpy draws instead of the model's init (no init compile): norm scales 1, biases 0, weights N(0, 0.02)
  rng = np.random.default_rng(0)

  def draw(path, x):
    name = str(path[-1].key)
    if name == "scale":
      return np.ones(x.shape, x.dtype)
    if name == "bias":
      return np.zeros(x.shape, x.dtype)
    return (0.02 * rng.standard_normal(x.shape)).astype(x.dtype)

  params = jax.tree_util.tree_map_with_path(draw, setup.abstract_params)
  params["llm"]["lm_head"]["bias"][seg_token_id(tok)] = 1e3
  W = str(tmp / "weights")
  save_weights(params, config, W, tok)
  return W


@pytest.fixture(scope="module")
def segmenter(weights):
  return Segmenter.from_pretrained(weights)


def _images():
  rng = np.random.default_rng(0)
  return [rng.integers(0, 255, size=s + (3,), dtype=np.uint8) for s in [(40, 56), (64, 30), (20, 20), (80, 64),
                                                                        (33, 47)]]


def test_batched_call_equals_single_calls(segmenter):
  assert segmenter.devices == 8 and segmenter.batch_size == 8 and segmenter.canvas == CANVAS
  images = _images()[:2]
  texts = ["the ships near the harbour", "all the roads"]
  both = segmenter(images, texts)
  singles = [segmenter(im, t) for im, t in zip(images, texts)]
  assert len(both) == 2
  for b, s, im in zip(both, singles, images):
    assert b.tokens == s.tokens and b.answer == s.answer and b.phrases == s.phrases
    assert len(b.masks) == len(s.masks) == 2                      # max_seg = 2 [SEG] slots filled
    for mb, ms in zip(b.masks, s.masks):
      assert mb.shape == im.shape[:2] and mb.dtype == bool
      np.testing.assert_array_equal(mb, ms)
    np.testing.assert_allclose(b.scores, s.scores, atol=1e-6)
  # different images and instructions give different masks: the rows do not leak into each other
  assert not np.array_equal(both[0].masks[0][:20, :20], both[1].masks[0][:20, :20])
  assert segmenter.compiles == 1


def test_batch_of_five_pads_and_compiles_once_per_shape(segmenter):
  images = _images()
  first = segmenter(images, "all the roads")
  compiled = segmenter.compiles
  again = segmenter(images, "all the roads")
  assert segmenter.compiles == compiled                           # the same (rows, bucket) shape: no compile
  assert len(first) == 5
  for a, b, im in zip(first, again, images):
    assert a.tokens == b.tokens and [m.shape for m in a.masks] == [im.shape[:2]] * len(a.masks)
  alone = segmenter(images[4], "all the roads")
  assert alone.tokens == first[4].tokens
  for m1, m2 in zip(alone.masks, first[4].masks):
    np.testing.assert_array_equal(m1, m2)
  s = first[0]
  record = json.loads(json.dumps(s.to_json()))
  assert set(record) == {"answer", "phrases", "scores", "rles", "tokens"}
  for m, r in zip(s.masks, record["rles"]):
    np.testing.assert_array_equal(rle.decode(r), m)
  for m, score in zip(s.masks, s.scores):
    assert (0.5 < score <= 1.0) if m.any() else score == 0.0      # mean probability inside the mask


def test_tiling_a_canvas_sized_scene_is_the_whole_image_path(segmenter, tmp_path):
  """One window covering the whole canvas-sized scene: the tiled mask head sees exactly the image the answer
  saw, so tiled masks equal the untiled ones; tile_check answers on that window what the overview answered,
  so it keeps them."""
  image = _images()[3][:CANVAS, :CANVAS]
  want = segmenter(image, "all the roads")
  got = segmenter.segment_scene(image, "all the roads", str(tmp_path / "on"), tiles="on")
  checked = segmenter.segment_scene(image, "all the roads", str(tmp_path / "checked"), tiles="on", tile_check=True)
  off = segmenter.segment_scene(image, "all the roads", str(tmp_path / "off"), tiles="off")
  assert got["tiles"] == checked["tiles"] == "on" and off["tiles"] == "off" and got["answer"] == want.answer
  assert got["tile_check"] is False and checked["tile_check"] is True and off["tile_check"] is None
  for summary in (got, checked, off):
    masks = [rle.decode(r) for r in summary["masks"]]
    assert len(masks) == len(want.masks)
    for m, w in zip(masks, want.masks):
      agree = (m == w).mean()
      assert agree >= 0.995, agree                # bilinear in one jit vs another: a few edge pixels at most
    assert all(os.path.exists(f) for f in summary["files"])


def test_tile_check_empties_the_windows_that_answer_no_target(segmenter, tmp_path, monkeypatch):
  """Two side-by-side windows (overlap 0): when the right one's own answer has no [SEG], its half of every
  mask is empty and the left half is the unchecked tiled mask."""
  from segearth_jax.segment import Segmentation

  image = np.concatenate([_images()[3][:CANVAS, :CANVAS]] * 2, axis=1)          # 64 x 128: two windows
  plain = segmenter.segment_scene(image, "all the roads", str(tmp_path / "plain"), tiles="on", overlap=0)
  real = segmenter._answer

  def right_window_finds_nothing(rows):
    out = real(rows)
    if len(rows) == 2:   # the check of the two windows (the overview is one row)
      out[1] = (Segmentation(answer="no road", phrases=[], masks=[], scores=[], rles=[], tokens=[]), out[1][1])
    return out

  monkeypatch.setattr(segmenter, "_answer", right_window_finds_nothing)
  checked = segmenter.segment_scene(image, "all the roads", str(tmp_path / "checked"), tiles="on", overlap=0,
                                    tile_check=True)
  assert checked["answer"] == plain["answer"] and len(checked["masks"]) == len(plain["masks"]) > 0
  for want, got in zip(plain["masks"], checked["masks"]):
    want, got = rle.decode(want), rle.decode(got)
    assert want[:, CANVAS:].any() and not got[:, CANVAS:].any()
    np.testing.assert_array_equal(got[:, :CANVAS], want[:, :CANVAS])


def _write_utm_geotiff(path, height=150, width=200):
  """uint16, 4 bands (B, G, R, NIR as colour interpretation says), nodata 0 in a corner block; UTM 32N."""
  import rasterio
  from rasterio.enums import ColorInterp
  from rasterio.transform import from_origin

  rng = np.random.default_rng(1)
  data = rng.integers(100, 4000, size=(4, height, width)).astype(np.uint16)
  data[:, 100:, 150:] = 0
  transform = from_origin(500000.0, 5600000.0, 10.0, 10.0)
  with rasterio.open(path, "w", driver="GTiff", height=height, width=width, count=4, dtype="uint16",
                     crs="EPSG:32632", transform=transform, nodata=0) as ds:
    ds.write(data)
    ds.colorinterp = [ColorInterp.blue, ColorInterp.green, ColorInterp.red, ColorInterp.undefined]
  return transform


def test_predict_cli_png_as_before_and_geotiff_tiled(segmenter, weights, tmp_path, monkeypatch):
  """Through cli.main with the module's segmenter (its loading is the fixture's; a second load would only
  compile the same functions again)."""
  import rasterio
  import rasterio.features
  import shapely.geometry

  png = tmp_path / "scene.png"
  image = _images()[0]
  Image.fromarray(image).save(png)
  tif = tmp_path / "scene.tif"
  transform = _write_utm_geotiff(tif)
  jobs = tmp_path / "jobs.jsonl"
  jobs.write_text(json.dumps(dict(image=str(png), instruction="all the roads")) + "\n"
                  + json.dumps(dict(image=str(tif), instruction="all the roads")) + "\n")
  out = tmp_path / "out"
  loaded = []
  monkeypatch.setattr(Segmenter, "from_pretrained",
                      classmethod(lambda cls, path, **kw: loaded.append(path) or segmenter))
  rc = cli.main(["predict", "--weights", weights, "--jsonl", str(jobs), "--out", str(out), "--tiles", "auto",
                 "--overlap", "16"])
  assert rc == 0 and loaded == [weights]

  # the PNG: mask_i.png, prediction.json, overlay.png, as `segearth predict` always wrote, = the API's masks
  png_dir = out / "0000_scene"
  want = segmenter(image, "all the roads")
  pred = json.loads((png_dir / "prediction.json").read_text())
  assert pred["instruction"] == "all the roads" and pred["answer"] == want.answer
  assert pred["phrases"] == want.phrases and len(pred["masks"]) == len(want.masks) == 2
  for i, (r, m) in enumerate(zip(pred["masks"], want.masks)):
    np.testing.assert_array_equal(rle.decode(r), m)
    np.testing.assert_array_equal(np.asarray(Image.open(png_dir / f"mask_{i}.png")) > 127, m)
  assert (png_dir / "overlay.png").exists()

  # the GeoTIFF (150 x 200 > the 64 canvas: tiled under 'auto')
  geo_dir = out / "0001_scene"
  pred = json.loads((geo_dir / "prediction.json").read_text())
  assert pred["tiles"] == "on" and pred["size"] == [150, 200] and len(pred["phrases"]) == 2
  with rasterio.open(tif) as ds:
    nodata = ~(ds.read_masks(1) > 0)
  collection = json.loads((geo_dir / "targets.geojson").read_text())
  assert "32632" in json.dumps(collection["crs"]) and len(collection["features"]) == 2
  for i, feature in enumerate(collection["features"]):
    with rasterio.open(geo_dir / f"mask_{i}.tif") as ds:
      assert ds.crs.to_epsg() == 32632 and ds.transform == transform
      assert (ds.height, ds.width, ds.count, ds.dtypes[0], ds.nodata) == (150, 200, 1, "uint8", 255)
      band = ds.read(1)
    assert set(np.unique(band)) <= {0, 1, 255}
    assert (band[nodata] == 255).all() and (band[~nodata] != 255).all()   # no foreground on nodata
    mask = band == 1
    assert 0 < mask.sum() < (~nodata).sum()
    assert feature["properties"]["index"] == i and feature["properties"]["phrase"] == pred["phrases"][i]
    assert feature["properties"]["score"] == pytest.approx(pred["scores"][i], abs=1e-4)
    geom = shapely.geometry.shape(feature["geometry"])
    back = rasterio.features.rasterize([(geom, 1)], out_shape=mask.shape, transform=transform).astype(bool)
    iou = (back & mask).sum() / (back | mask).sum()
    assert iou >= 0.99, iou
  assert (geo_dir / "overlay.png").exists()

  # untiled: the overview's masks upsampled to the scene, georeferenced alike, still nothing on nodata
  off = segmenter.segment_scene(str(tif), "all the roads", str(tmp_path / "off"), tiles="off", to_wgs84=True)
  assert off["tiles"] == "off" and off["answer"] == pred["answer"]
  with rasterio.open(tmp_path / "off" / "mask_0.tif") as ds:
    band = ds.read(1)
    assert (ds.height, ds.width) == (150, 200) and ds.transform == transform
  assert (band[nodata] == 255).all() and set(np.unique(band[~nodata])) <= {0, 1}
  lonlat = json.loads((tmp_path / "off" / "targets.geojson").read_text())
  assert "crs" not in lonlat
  x, y = np.asarray(shapely.geometry.shape(lonlat["features"][0]["geometry"]).centroid.coords[0])
  assert 8.9 < x < 9.1 and 50.5 < y < 50.6                      # UTM 32N (500 km E, 5600 km N) in lon/lat
