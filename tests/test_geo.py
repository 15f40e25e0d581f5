"""GeoTIFF in, GIS layers out (segearth_jax.geo) and the toy mosaics (segearth_jax.toy.mosaic).

Every input raster is written here with rasterio directly; results are read back with rasterio/shapely."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import rasterio
import rasterio.features
import shapely.geometry
from PIL import Image
from rasterio.enums import ColorInterp
from rasterio.transform import from_origin

from segearth_jax import geo
from segearth_jax.data import rle
from segearth_jax.errors import UserError
from segearth_jax.toy.mosaic import write_toy_mosaics
from segearth_jax.toy.release import write_toy_laserss

UTM = "EPSG:32633"
TRANSFORM = from_origin(500000.0, 5000000.0, 0.5, 0.5)   # UTM 33N: easting 500 km is the 15 deg E meridian


def _write(path, data, *, colorinterp=None, nodata=None, mask=None, crs=UTM, transform=TRANSFORM):
  """data [k, h, w] -> a GeoTIFF (optionally an internal mask: 0 = masked)."""
  k, h, w = data.shape
  with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(
      path, "w", driver="GTiff", height=h, width=w, count=k, dtype=data.dtype.name, crs=crs,
      transform=transform, nodata=nodata) as ds:
    ds.write(data)
    if colorinterp is not None:
      ds.colorinterp = colorinterp
    if mask is not None:
      ds.write_mask(mask.astype(np.uint8) * 255)
  return str(path)


def _iou(a, b):
  return (a & b).sum() / max((a | b).sum(), 1)


@pytest.fixture(scope="module")
def utm_rgb(tmp_path_factory):
  """A 1100 x 900 uint8 RGB GeoTIFF in UTM 33N (larger than one 512 block, so the COG has overviews)."""
  rng = np.random.default_rng(0)
  data = rng.integers(0, 256, (3, 1100, 900), dtype=np.uint8)
  return _write(tmp_path_factory.mktemp("utm") / "scene.tif", data), data


def test_mask_writer_keeps_the_grid_and_writes_a_cog(utm_rgb, tmp_path):
  path, data = utm_rgb
  scene = geo.open_scene(path)
  assert scene.georeferenced and scene.crs.to_epsg() == 32633 and scene.transform == TRANSFORM
  mask = np.zeros((1100, 900), bool)
  mask[100:700, 50:600] = True
  mask[300:400, 200:300] = False
  out = tmp_path / "mask_0.tif"
  with geo.MaskWriter(out, scene) as w:
    for row0 in range(0, 1100, 300):            # strips that do not line up with the 512 blocks
      w.write(row0, 0, mask[row0:row0 + 300])
  assert sorted(os.listdir(tmp_path)) == ["mask_0.tif"]      # no temporary left behind
  with rasterio.open(out) as ds:
    assert ds.crs.to_epsg() == 32633 and ds.transform == TRANSFORM and (ds.height, ds.width) == (1100, 900)
    assert ds.count == 1 and ds.dtypes[0] == "uint8" and ds.nodata == 255
    assert ds.profile["tiled"] and ds.block_shapes[0] == (512, 512)
    assert ds.compression.name == "deflate"
    assert ds.overviews(1)                                      # internal overviews
    assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
    np.testing.assert_array_equal(ds.read(1), mask.astype(np.uint8))


def test_16bit_four_bands_nodata_and_rgb_colorinterp(tmp_path):
  rng = np.random.default_rng(1)
  h, w = 120, 160
  # blue, green, red, nir: distinct ranges, so a wrong band order shows
  data = np.stack([rng.integers(100, 200, (h, w)), rng.integers(1000, 2000, (h, w)),
                   rng.integers(10000, 20000, (h, w)), rng.integers(30000, 40000, (h, w))]).astype(np.uint16)
  nodata = np.zeros((h, w), bool)
  nodata[:10, :] = True                          # a nodata border in every band
  nodata[rng.random((h, w)) < 0.05] = True
  data[:, nodata] = 0
  only_green = np.zeros((h, w), bool)
  only_green[50:55, 70:80] = True                # nodata in one shown band: invalid too
  data[1, only_green] = 0
  path = _write(tmp_path / "ms.tif", data, nodata=0,
                colorinterp=[ColorInterp.blue, ColorInterp.green, ColorInterp.red, ColorInterp.undefined])
  scene = geo.open_scene(path)
  assert scene.bands == (3, 2, 1) and scene.dtype == np.uint16
  rgb, valid = scene.read()
  np.testing.assert_array_equal(~valid, nodata | only_green)
  assert (rgb[~valid] == 0).all()
  # the red channel comes from band 3: its stretch range lies inside band 3's values
  lo, hi = scene.stretch_range[0]
  assert 10000 <= lo < hi <= 20000
  # a mask that is everywhere True is written as 255 exactly on the nodata pixels, 1 elsewhere
  with geo.MaskWriter(tmp_path / "m.tif", scene) as mw:
    mw.write(0, 0, np.ones((h, w), bool))
  with rasterio.open(tmp_path / "m.tif") as ds:
    written = ds.read(1)
  np.testing.assert_array_equal(written == 255, nodata | only_green)
  assert (written[valid] == 1).all()
  # a window past the edge: zero and invalid there, the same pixels as the full read inside
  win_rgb, win_valid = scene.read((h - 20, w - 30, 64, 64))
  assert win_rgb.shape == (64, 64, 3) and not win_valid[20:].any() and not win_valid[:, 30:].any()
  np.testing.assert_array_equal(win_rgb[:20, :30], rgb[h - 20:, w - 30:])
  # explicit bands, and the overview keeps the aspect with max side == size
  nir = geo.open_scene(path, bands=[4])
  assert nir.bands == (4,)
  grey, _ = nir.read((20, 0, 4, 4))
  assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 0] == grey[..., 2]).all()
  ov, ov_valid = scene.overview(40)
  assert ov.shape == (30, 40, 3) and ov_valid.shape == (30, 40) and not ov_valid[:2].any()


def test_internal_mask_is_invalid(tmp_path):
  data = np.full((3, 40, 50), 120, np.uint8)
  keep = np.ones((40, 50), bool)
  keep[5:15, 20:30] = False
  scene = geo.open_scene(_write(tmp_path / "masked.tif", data, mask=keep))
  rgb, valid = scene.read()
  np.testing.assert_array_equal(valid, keep)
  assert (rgb[keep] == 120).all()                # uint8 is shown as is


def test_percentile_stretch_is_global_and_clipped(tmp_path):
  ramp = np.arange(200 * 300, dtype=np.float64).reshape(1, 200, 300) * 0.5 + 1000.0
  path = _write(tmp_path / "ramp.tif", ramp.astype(np.float32))
  scene = geo.open_scene(path)                   # one band -> grey RGB
  lo, hi = np.percentile(ramp, (2, 98))
  np.testing.assert_allclose(scene.stretch_range[0], (lo, hi), rtol=1e-6)
  rgb, valid = scene.read()
  expect = np.rint(np.clip((ramp[0] - lo) * 255 / (hi - lo), 0, 255))
  assert valid.all() and np.abs(rgb[..., 0].astype(int) - expect).max() <= 1
  assert (rgb[..., 0] == rgb[..., 2]).all()
  flat = rgb[..., 0].ravel()
  assert 0.015 < (flat == 0).mean() < 0.03 and 0.015 < (flat == 255).mean() < 0.03
  # a window is stretched with the scene's range, not its own
  win, _ = scene.read((150, 200, 30, 40))
  np.testing.assert_array_equal(win, rgb[150:180, 200:240])
  mm, _ = geo.open_scene(path, stretch="minmax").read()
  assert mm[0, 0, 0] == 0 and mm[-1, -1, 0] == 255
  raw, _ = geo.open_scene(path, stretch="none").read()
  assert (raw == 255).all()                      # values >= 1000 clip to 255
  with pytest.raises(UserError, match="--stretch"):
    geo.open_scene(path, stretch="gamma")


def _hole_and_two_parts():
  mask = np.zeros((200, 240), bool)
  yy, xx = np.mgrid[:200, :240]
  mask[((yy - 80) ** 2 + (xx - 90) ** 2) < 60 ** 2] = True       # a disc ...
  mask[((yy - 80) ** 2 + (xx - 90) ** 2) < 20 ** 2] = False      # ... with a hole
  mask[150:190, 170:230] = True                                  # and a second component
  return mask


def test_polygons_rasterise_back_to_the_mask(tmp_path):
  mask = _hole_and_two_parts()
  polys = geo.mask_polygons(mask, TRANSFORM)
  assert len(polys) == 2 and sorted(len(p.interiors) for p in polys) == [0, 1]
  back = [rasterio.features.rasterize([p], out_shape=mask.shape, transform=TRANSFORM).astype(bool)
          for p in polys]
  for b in back:                                 # each polygon is one component of the mask
    assert (b & ~mask).sum() == 0
  assert _iou(np.any(back, axis=0), mask) >= 0.99
  # through the GeoJSON file: one MultiPolygon feature per target, in the source CRS, named as GDAL does
  path = tmp_path / "targets.geojson"
  geo.write_geojson(path, [dict(geometry=polys, phrase="all the tanks", index=0, score=0.75),
                           dict(geometry=[], phrase="the ship", index=1, score=0.0)],
                    rasterio.crs.CRS.from_string(UTM))
  fc = json.loads(path.read_text())
  assert fc["type"] == "FeatureCollection" and fc["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32633"
  first, empty = fc["features"]
  assert first["properties"] == {"phrase": "all the tanks", "index": 0, "score": 0.75}
  assert empty["geometry"] is None and empty["properties"]["index"] == 1
  geom = shapely.geometry.shape(first["geometry"])
  assert geom.geom_type == "MultiPolygon"
  raster = rasterio.features.rasterize([geom], out_shape=mask.shape, transform=TRANSFORM).astype(bool)
  assert _iou(raster, mask) >= 0.99
  # simplification (tolerance in pixels): fewer vertices, close to the mask
  simple = geo.mask_polygons(mask, TRANSFORM, simplify=2.0)
  assert sum(len(p.exterior.coords) for p in simple) < 0.5 * sum(len(p.exterior.coords) for p in polys)
  raster = rasterio.features.rasterize(simple, out_shape=mask.shape, transform=TRANSFORM).astype(bool)
  assert _iou(raster, mask) >= 0.95
  assert geo.mask_polygons(np.zeros((5, 5), bool), TRANSFORM) == []


def test_to_wgs84_gives_lon_lat(tmp_path):
  mask = _hole_and_two_parts()
  path = tmp_path / "wgs84.geojson"
  geo.write_geojson(path, [dict(geometry=geo.mask_polygons(mask, TRANSFORM), phrase="x", index=0, score=1.0)],
                    rasterio.crs.CRS.from_string(UTM), to_wgs84=True)
  fc = json.loads(path.read_text())
  assert "crs" not in fc                          # RFC 7946: WGS 84 lon/lat is the default
  coords = np.asarray([c for poly in fc["features"][0]["geometry"]["coordinates"] for ring in poly for c in ring])
  lon, lat = coords[:, 0], coords[:, 1]
  # 0..120 m east of the 15 deg E meridian, about 5000 km north of the equator
  assert (lon >= 15.0).all() and (lon < 15.01).all() and (lat > 45.1).all() and (lat < 45.2).all()
  with pytest.raises(UserError, match="georeferenced"):
    geo.write_geojson(tmp_path / "x.geojson", [], None, to_wgs84=True)


def test_arrays_and_pngs():
  rgb = np.random.default_rng(2).integers(0, 256, (30, 50, 3), dtype=np.uint8)
  scene = geo.open_scene(rgb)
  assert not scene.georeferenced and scene.crs is None and scene.transform is None
  got, valid = scene.read()
  np.testing.assert_array_equal(got, rgb)
  assert valid.all()
  ov, _ = scene.overview(25)
  assert ov.shape == (15, 25, 3)


def test_png_with_alpha(tmp_path):
  rgba = np.full((20, 30, 4), 200, np.uint8)
  rgba[:5, :, 3] = 0
  Image.fromarray(rgba).save(tmp_path / "a.png")
  _, valid = geo.open_scene(tmp_path / "a.png").read()
  assert not valid[:5].any() and valid[5:].all()


def test_without_the_geo_extra(tmp_path, utm_rgb, monkeypatch):
  """Importing geo pulls in no rasterio/shapely; without them a GeoTIFF is a one-line 'pip install' error
  and arrays still work."""
  code = "import sys, segearth_jax.geo; assert not {'rasterio', 'shapely'} & set(sys.modules)"
  subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
  monkeypatch.setitem(sys.modules, "rasterio", None)          # `import rasterio` now raises ImportError
  with pytest.raises(UserError, match=r"pip install segearth_jax\[geo\]"):
    geo.open_scene(utm_rgb[0])
  assert geo.open_scene(np.zeros((4, 4, 3), np.uint8)).read()[0].shape == (4, 4, 3)


def _one_line_naming(excinfo, path):
  msg = str(excinfo.value)
  assert "\n" not in msg and str(path) in msg
  return msg


def test_bad_files_are_one_line_user_errors(tmp_path, utm_rgb):
  text = tmp_path / "notes.tif"
  text.write_text("this is not a GeoTIFF\njust text\n")
  with pytest.raises(UserError) as e:
    geo.open_scene(text)
  assert "not a raster" in _one_line_naming(e, text)
  with pytest.raises(UserError) as e:
    geo.open_scene(utm_rgb[0], bands=[1, 2, 7])
  assert "band 7 out of range" in _one_line_naming(e, utm_rgb[0])
  # a tiled file whose tile data is garbage: it opens, the window read fails
  data = np.random.default_rng(3).integers(0, 256, (3, 600, 600), dtype=np.uint8)
  broken = tmp_path / "broken.tif"
  with rasterio.open(broken, "w", driver="GTiff", height=600, width=600, count=3, dtype="uint8", crs=UTM,
                     transform=TRANSFORM, tiled=True, blockxsize=256, blockysize=256, compress="deflate") as ds:
    ds.write(data)
  raw = bytearray(broken.read_bytes())
  raw[len(raw) // 3:len(raw) // 3 + 20000] = np.random.default_rng(4).integers(0, 256, 20000, np.uint8).tobytes()
  broken.write_bytes(bytes(raw))
  scene = geo.open_scene(broken)
  with pytest.raises(UserError) as e:
    scene.read()
  assert "cannot read window" in _one_line_naming(e, broken)


@pytest.fixture(scope="module")
def mosaics(tmp_path_factory):
  root = tmp_path_factory.mktemp("mosaic")
  write_toy_laserss(root / "release", images=7, seed=0, size=64, test_images=5, val_images=1)
  summary = write_toy_mosaics(root / "release", root / "out", n=3, seed=0)
  return root, summary


def _load(path):
  with open(path) as f:
    return json.load(f)


def test_mosaics_are_georeferenced_2x2_scenes(mosaics):
  root, summary = mosaics
  out = root / "out"
  assert summary["mosaic_size"] == 128 and len(summary["mosaics"]) == 3
  for m in summary["mosaics"]:
    path = out / "images" / m["image_name"]
    with rasterio.open(path) as ds:
      assert (ds.height, ds.width) == (128, 128) and ds.crs.to_epsg() == 32633 and ds.res == (0.5, 0.5)
      assert (ds.transform.c, ds.transform.f) == tuple(m["origin"])
      image = np.moveaxis(ds.read(), 0, -1)
    parts = [np.asarray(Image.open(root / "release" / "test" / "images" / n).convert("RGB")) for n in m["scenes"]]
    expect = np.concatenate([np.concatenate(parts[:2], axis=1), np.concatenate(parts[2:], axis=1)], axis=0)
    np.testing.assert_array_equal(image, expect)
    rgb, valid = geo.open_scene(path).read()      # RGB colour interpretation, uint8 as is
    np.testing.assert_array_equal(rgb, image)
    assert valid.all()


def test_mosaic_gt_is_the_union_of_the_scenes(mosaics):
  root, _ = mosaics
  out = root / "out"
  mosaic_recs = _load(out / "annotations" / "mosaic.json")
  single = _load(out / "annotations" / "single.json")
  assert mosaic_recs and all(r["granularity"] == "semantic" and len(r["mask"]) == 1 for r in mosaic_recs)
  # the release's own semantic records ("all the {plural}": every instance of the class in a test scene)
  release = {}
  for name in os.listdir(root / "release" / "test" / "annotations"):
    for r in _load(root / "release" / "test" / "annotations" / name):
      if r["granularity"] == "semantic" and r["multiplicity"] == "single" and r["answer"].count("[SEG]") == 1:
        release[(r["image_name"], r["class"])] = rle.decode(r["mask"][0])
  checked = 0
  for rec in mosaic_recs:
    gt = rle.decode(rec["mask"][0])
    assert gt.shape == (128, 128) and gt.any()
    assert rec["answer"].count("[SEG]") == 1
    union = np.zeros_like(gt)
    for s in (s for s in single if s["id"].startswith(rec["id"] + "_q")):
      assert s["description"] == rec["description"] and s["answer"] == rec["answer"] and s["class"] == rec["class"]
      m = rle.decode(s["mask"][0])
      r0, c0 = s["offset"]
      union[r0:r0 + 64, c0:c0 + 64] |= m
      if (s["image_name"], s["class"]) in release:
        np.testing.assert_array_equal(m, release[(s["image_name"], s["class"])])
        checked += 1
    np.testing.assert_array_equal(gt, union)
  assert checked >= 1                            # the redrawn objects match the release's stored masks


def test_mosaics_are_deterministic_and_check_their_input(mosaics, tmp_path):
  root, _ = mosaics
  write_toy_mosaics(root / "release", tmp_path / "again", n=3, seed=0)
  for sub in ("images", "annotations"):
    for name in os.listdir(root / "out" / sub):
      assert (root / "out" / sub / name).read_bytes() == (tmp_path / "again" / sub / name).read_bytes(), name
  with pytest.raises(UserError, match="toy_laserss.json"):
    write_toy_mosaics(tmp_path / "nothing", tmp_path / "o", n=1)
