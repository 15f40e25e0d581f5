"""GeoTIFF in, GIS layers out: scenes read window by window, georeferenced masks and polygons written.

rasterio and shapely are an optional extra (`pip install segearth_jax[geo]`): they are imported inside the
functions that need them, so plain PNG/JPEG images and arrays work without them.

Contracts:
- `open_scene(path_or_array, *, bands=None, stretch="percentile", percentiles=(2, 98)) -> Scene`.
  A GeoTIFF (any raster rasterio reads), a PNG/JPEG (PIL), or an array [H, W] / [H, W, C].
  `bands` are 1-based, one (shown as grey) or three; by default the bands whose colour interpretation is
  red, green, blue, else the first three (fewer than three bands: the first). uint8 data is shown as is
  (`stretch` applies to other data types only): per band to 0..255 (clipped); 'percentile' maps the
  `percentiles` (default 2-98) of the band's valid pixels to 0..255, computed ONCE on a decimated read of
  the whole scene (at most STATS_SIDE per side), so every window of a scene gets the same mapping;
  'minmax' the same with the min and max; 'none' clips the raw values to 0..255.
- Valid pixels: a pixel is invalid when any selected band masks it (the nodata value, an internal or
  external mask or alpha band: rasterio `read_masks`), when a float band is NaN, when an RGBA image's
  alpha is 0, and past the scene's edge.
- `Scene.read(window=None) -> (rgb uint8 [h, w, 3], valid bool [h, w])`, window = (row0, col0, h, w) in
  pixels, may reach past the edge (those pixels are 0 and invalid). `Scene.overview(size)` is the whole
  scene decimated (area average) to max side == size, aspect kept (each side at least 1 pixel).
- `MaskWriter(path, scene, *, block=512)`: uint8 GeoTIFF, 1 target, 0 background, 255 invalid source
  pixel (nodata=255), deflate, tiled block x block, the scene's CRS and transform; closed as a
  Cloud-Optimized GeoTIFF (GDAL's COG driver: tiled, internal overviews built with 'mode' resampling).
- `mask_polygons(mask, transform, *, simplify=0.0) -> list[shapely Polygon]`: one polygon per
  4-connected component of the mask, holes kept, in the transform's coordinates; `simplify` is a
  tolerance in pixels (converted to CRS units with the pixel size).
- `write_geotiff(path, image [H, W, C], *, crs, transform, nodata=None, block=256)`: a tiled deflate
  GeoTIFF, bands 1-3 tagged RGB (toy mosaics, synthetic scenes).
- `write_geojson(path, features, crs, *, to_wgs84=False)`: an RFC 7946 FeatureCollection, one feature
  per dict(geometry, phrase, index, score) in order (an empty geometry is written as null). Coordinates in
  the source CRS with a "crs" member naming it (as GDAL writes it), or reprojected to EPSG:4326 (lon, lat).
Errors on bad files are one-line UserErrors naming the file.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import warnings

import numpy as np
from PIL import Image

from segearth_jax.errors import UserError

STRETCHES = ("percentile", "minmax", "none")
STATS_SIDE = 1024           # the stretch statistics' decimated read: max side in pixels
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
MASK_NODATA = 255


def _rasterio():
  try:
    import rasterio
    import rasterio.errors
    import rasterio.features
    import rasterio.shutil
    import rasterio.warp
  except ImportError as e:
    raise UserError(f"GeoTIFF support needs rasterio: pip install segearth_jax[geo] ({e})") from e
  return rasterio


@contextlib.contextmanager
def _quiet():
  """A raster without a CRS is an ordinary image here: no NotGeoreferencedWarning."""
  rasterio = _rasterio()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
    yield


def _shapely():
  try:
    import shapely
    import shapely.geometry
  except ImportError as e:
    raise UserError(f"polygons need shapely: pip install segearth_jax[geo] ({e})") from e
  return shapely


def _one_line(e: Exception) -> str:
  """The error and GDAL's cause (rasterio's own message often says only 'see previous exception')."""
  text = str(e)
  if e.__cause__ is not None and str(e.__cause__) not in text:
    text = f"{text} {e.__cause__}"
  return " ".join(text.split()) or type(e).__name__


def _window_box(window, height, width):
  if window is None:
    return 0, 0, height, width
  row0, col0, h, w = (int(v) for v in window)
  if h <= 0 or w <= 0:
    raise ValueError(f"window {window} has no pixels")
  return row0, col0, h, w


def _clip(row0, col0, h, w, height, width):
  """The part of the window inside the scene: (r0, c0, r1, c1) in scene pixels (empty when r1 <= r0)."""
  return max(row0, 0), max(col0, 0), min(row0 + h, height), min(col0 + w, width)


def _decimated_shape(height, width, size):
  scale = size / max(height, width)
  return max(1, round(height * scale)), max(1, round(width * scale))


class Scene:
  """An image to segment, read window by window (see the module docstring for the contract).

  height, width: pixels; crs: a rasterio CRS or None; transform: an affine.Affine (pixel -> CRS) or None;
  georeferenced: both known; path: the file or None (an array); bands: the 1-based bands shown as RGB;
  dtype: the source data type; stretch_range: per shown band (lo, hi) mapped to 0..255, or None (uint8
  data, or stretch 'none')."""

  def __init__(self, *, height, width, crs, transform, path, bands, dtype, stretch, percentiles, reader,
               mask_reader):
    self.height, self.width = int(height), int(width)
    self.crs, self.transform = crs, transform
    self.georeferenced = crs is not None and transform is not None
    self.path, self.bands, self.dtype = path, tuple(bands), np.dtype(dtype)
    # reader(r0, c0, r1, c1, out_shape=None, average=True) -> (data [k, h, w] of `dtype`, valid bool [h, w]):
    # the scene rows r0:r1, cols c0:c1 (inside the scene), resampled to out_shape when given (area average,
    # or nearest: a sample for the statistics); mask_reader(r0, c0, r1, c1) -> valid, full resolution
    self._reader = reader
    self._mask_reader = mask_reader
    self.stretch = stretch
    self.stretch_range = None
    if self.dtype != np.uint8 and stretch != "none":
      self.stretch_range = self._stretch_range(stretch, percentiles)

  def __repr__(self):
    return (f"Scene({self.path or 'array'!s}, {self.height}x{self.width}, bands {list(self.bands)}, "
            f"{self.dtype}, crs {self.crs})")

  def _stretch_range(self, stretch, percentiles):
    shape = _decimated_shape(self.height, self.width, min(STATS_SIDE, max(self.height, self.width)))
    # nearest: a sample of the pixel values (an area average would narrow their distribution)
    data, valid = self._reader(0, 0, self.height, self.width, shape, average=False)
    data = data.astype(np.float64)
    valid = valid & np.isfinite(data).all(axis=0)
    out = []
    for band in data:
      v = band[valid]
      if v.size == 0:
        out.append((0.0, 255.0))
        continue
      lo, hi = (np.percentile(v, percentiles) if stretch == "percentile" else (v.min(), v.max()))
      out.append((float(lo), float(hi)))
    return out

  def _to_rgb(self, data, valid):
    """[k, h, w] raw -> uint8 [h, w, 3]; NaNs are invalid."""
    if self.dtype == np.uint8:
      out = data.astype(np.uint8)
    else:
      data = data.astype(np.float32)
      if self.dtype.kind == "f":
        valid = valid & np.isfinite(data).all(axis=0)
        data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
      if self.stretch_range is not None:
        lo = np.asarray([r[0] for r in self.stretch_range], np.float32)[:, None, None]
        hi = np.asarray([r[1] for r in self.stretch_range], np.float32)[:, None, None]
        data = (data - lo) * (255.0 / np.maximum(hi - lo, 1e-12))
      out = np.rint(np.clip(data, 0, 255)).astype(np.uint8)
    if out.shape[0] == 1:
      out = np.repeat(out, 3, axis=0)
    out = np.moveaxis(out, 0, -1)
    out[~valid] = 0
    return np.ascontiguousarray(out), valid

  def _read_raw(self, window):
    row0, col0, h, w = _window_box(window, self.height, self.width)
    r0, c0, r1, c1 = _clip(row0, col0, h, w, self.height, self.width)
    data = np.zeros((len(self.bands), h, w), self.dtype)
    valid = np.zeros((h, w), bool)
    if r1 > r0 and c1 > c0:
      inner = (slice(r0 - row0, r1 - row0), slice(c0 - col0, c1 - col0))
      data[(slice(None),) + inner], valid[inner] = self._reader(r0, c0, r1, c1)
    return data, valid

  def read(self, window=None):
    """(rgb uint8 [h, w, 3], valid bool [h, w]) of window (row0, col0, h, w), or of the whole scene."""
    data, valid = self._read_raw(window)
    return self._to_rgb(data, valid)

  def valid_mask(self, window=None):
    """valid bool [h, w] of the window (pixel data is read only for float data, whose NaNs are invalid)."""
    row0, col0, h, w = _window_box(window, self.height, self.width)
    r0, c0, r1, c1 = _clip(row0, col0, h, w, self.height, self.width)
    valid = np.zeros((h, w), bool)
    if r1 > r0 and c1 > c0:
      valid[r0 - row0:r1 - row0, c0 - col0:c1 - col0] = self._mask_reader(r0, c0, r1, c1)
    if self.dtype.kind == "f" and valid.any():   # NaN pixels are invalid too
      data, _ = self._read_raw(window)
      valid &= np.isfinite(data).all(axis=0)
    return valid

  def overview(self, size: int):
    """The whole scene, area-averaged to max side == size (aspect kept): (rgb uint8, valid bool)."""
    shape = _decimated_shape(self.height, self.width, int(size))
    data, valid = self._reader(0, 0, self.height, self.width, shape)
    return self._to_rgb(data, valid)


# Readers ------------------------------------------------------------------------------------------

def _check_bands(bands, count, name):
  if bands is None:
    return None
  bands = [int(b) for b in bands]
  if not bands:
    raise UserError(f"{name}: --bands is empty")
  if len(bands) not in (1, 3):
    raise UserError(f"{name}: --bands takes 1 or 3 bands (shown as grey or RGB), got {bands}")
  bad = [b for b in bands if not 1 <= b <= count]
  if bad:
    raise UserError(f"{name}: band {bad[0]} out of range (the file has {count} band{'s' * (count != 1)}, "
                    f"1..{count})")
  return bands


def _default_bands(count, colorinterp=None):
  if colorinterp is not None:
    names = [getattr(c, "name", str(c)) for c in colorinterp]
    if all(n in names for n in ("red", "green", "blue")):
      return [names.index(n) + 1 for n in ("red", "green", "blue")]
  return [1, 2, 3] if count >= 3 else [1]


def _resize_stack(data, shape, resample):
  """[k, h, w] -> [k, *shape] with PIL (float32 per band)."""
  out = [np.asarray(Image.fromarray(b.astype(np.float32)).resize((shape[1], shape[0]), resample))
         for b in data]
  return np.stack(out)


def _array_scene(array, path, bands, stretch, percentiles, valid=None):
  array = np.asarray(array)
  if array.ndim == 2:
    array = array[:, :, None]
  if array.ndim != 3 or array.shape[0] == 0 or array.shape[1] == 0:
    raise UserError(f"{path or 'image array'}: expected an [H, W] or [H, W, C] image, got shape {array.shape}")
  name = path or "image array"
  count = array.shape[2]
  bands = _check_bands(bands, count, name) or _default_bands(count)
  stack = np.moveaxis(array[:, :, [b - 1 for b in bands]], -1, 0)
  if array.dtype == np.bool_:
    stack = stack.astype(np.uint8) * 255
  full_valid = np.ones(array.shape[:2], bool) if valid is None else np.asarray(valid, bool)

  def reader(r0, c0, r1, c1, out_shape=None, average=True):
    part, valid = stack[:, r0:r1, c0:c1], full_valid[r0:r1, c0:c1]
    if out_shape is None:
      return part, valid
    resample = Image.BOX if average else Image.NEAREST
    out = _resize_stack(part, out_shape, resample)
    out = np.rint(out).astype(stack.dtype) if stack.dtype.kind in "ui" else out.astype(stack.dtype)
    return out, _resize_stack(valid[None].astype(np.float32), out_shape, resample)[0] >= 0.5

  def mask_reader(r0, c0, r1, c1):
    return full_valid[r0:r1, c0:c1]

  return Scene(height=array.shape[0], width=array.shape[1], crs=None, transform=None, path=path, bands=bands,
               dtype=stack.dtype, stretch=stretch, percentiles=percentiles, reader=reader,
               mask_reader=mask_reader)


def _pil_scene(path, bands, stretch, percentiles):
  try:
    with Image.open(path) as im:
      im.load()
      if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array, valid = np.asarray(im), None
      elif im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = np.asarray(im.convert("RGBA"))
        array, valid = rgba[..., :3], rgba[..., 3] > 0
      else:
        array, valid = np.asarray(im.convert("RGB")), None
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise UserError(f"{path}: not an image PIL can read ({_one_line(e)})") from e
  return _array_scene(array, path, bands, stretch, percentiles, valid=valid)


def _raster_scene(path, bands, stretch, percentiles):
  rasterio = _rasterio()
  from rasterio.enums import MaskFlags, Resampling
  from rasterio.windows import Window
  try:
    with _quiet(), rasterio.open(path) as ds:
      count, height, width = ds.count, ds.height, ds.width
      crs, transform, colorinterp, dtypes = ds.crs, ds.transform, ds.colorinterp, ds.dtypes
      flags, nodatavals = ds.mask_flag_enums, ds.nodatavals
  except rasterio.errors.RasterioError as e:
    raise UserError(f"{path}: not a raster rasterio can read ({_one_line(e)})") from e
  if count == 0 or height == 0 or width == 0:
    raise UserError(f"{path}: the raster has no pixels or no bands ({count} bands, {height}x{width})")
  bands = _check_bands(bands, count, path) or _default_bands(count, colorinterp)
  kinds = {np.dtype(dtypes[b - 1]) for b in bands}
  dtype = kinds.pop() if len(kinds) == 1 else np.dtype(np.float64)
  if dtype.kind == "c":
    raise UserError(f"{path}: complex-valued bands are not images ({dtype})")
  georeferenced = crs is not None and not transform.is_identity
  shown_flags = [set(flags[b - 1]) for b in bands]
  nodata_only = all(f == {MaskFlags.nodata} for f in shown_flags)
  all_valid = all(f == {MaskFlags.all_valid} for f in shown_flags)
  nodata_values = [float(nodatavals[b - 1]) if nodatavals[b - 1] is not None else math.nan for b in bands]

  def _guarded(fn, r0, c0, r1, c1):
    try:
      with _quiet(), rasterio.open(path) as ds:
        return fn(ds)
    except rasterio.errors.RasterioError as e:
      raise UserError(f"{path}: cannot read window (row {r0}, col {c0}, {r1 - r0}x{c1 - c0}): "
                      f"{_one_line(e)}") from e

  def read(ds, r0, c0, r1, c1, out_shape, average):
    win = Window(c0, r0, c1 - c0, r1 - r0)
    if out_shape is not None:
      kw = dict(out_shape=(len(bands),) + tuple(out_shape),
                resampling=Resampling.average if average else Resampling.nearest)
      # read_masks: 255 valid, 0 masked; averaged, a pixel is valid when most of its area is
      return (ds.read(bands, window=win, **kw).astype(dtype, copy=False),
              (ds.read_masks(bands, window=win, **kw) >= 128).all(axis=0))
    data = ds.read(bands, window=win)
    if nodata_only:        # the mask is `value != nodata`: no second decode of the window
      valid = np.ones(data.shape[1:], bool)
      for band, value in zip(data, nodata_values):
        valid &= ~np.isnan(band) if np.isnan(value) else band != value
    elif all_valid:
      valid = np.ones(data.shape[1:], bool)
    else:
      valid = (ds.read_masks(bands, window=win) > 0).all(axis=0)
    return data.astype(dtype, copy=False), valid

  def reader(r0, c0, r1, c1, out_shape=None, average=True):
    return _guarded(lambda ds: read(ds, r0, c0, r1, c1, out_shape, average), r0, c0, r1, c1)

  def mask_reader(r0, c0, r1, c1):
    win = Window(c0, r0, c1 - c0, r1 - r0)
    return _guarded(lambda ds: (ds.read_masks(bands, window=win) > 0).all(axis=0), r0, c0, r1, c1)

  return Scene(height=height, width=width, crs=crs if georeferenced else None,
               transform=transform if georeferenced else None, path=path, bands=bands, dtype=dtype,
               stretch=stretch, percentiles=percentiles, reader=reader, mask_reader=mask_reader)


def open_scene(path_or_array, *, bands=None, stretch: str = "percentile", percentiles=(2, 98)) -> Scene:
  """A Scene from a raster file (rasterio), a PNG/JPEG (PIL) or an [H, W(, C)] array (module docstring)."""
  if stretch not in STRETCHES:
    raise UserError(f"--stretch must be one of {', '.join(STRETCHES)}, got {stretch!r}")
  lo, hi = (float(p) for p in percentiles)
  if not 0 <= lo < hi <= 100:
    raise UserError(f"stretch percentiles must satisfy 0 <= low < high <= 100, got {percentiles}")
  if isinstance(path_or_array, np.ndarray):
    return _array_scene(path_or_array, None, bands, stretch, (lo, hi))
  path = os.fspath(path_or_array)
  if not os.path.isfile(path):
    raise UserError(f"{path}: no such image file")
  if path.lower().endswith(PIL_SUFFIXES):
    return _pil_scene(path, bands, stretch, (lo, hi))
  return _raster_scene(path, bands, stretch, (lo, hi))


# Writers ------------------------------------------------------------------------------------------

def write_geotiff(path, image: np.ndarray, *, crs, transform, nodata=None, block: int = 256):
  """An image [H, W, C] (any dtype) as a tiled, deflate GeoTIFF in `crs` with `transform` (an affine or its
  six coefficients a, b, c, d, e, f); with C >= 3 the first three bands are tagged red, green, blue (the rest
  undefined). For toy mosaics and synthetic scenes."""
  rasterio = _rasterio()
  from affine import Affine
  from rasterio.enums import ColorInterp
  transform = transform if isinstance(transform, Affine) else Affine(*transform)
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[:, :, None]
  h, w, c = image.shape
  profile = dict(driver="GTiff", height=h, width=w, count=c, dtype=image.dtype.name, crs=crs,
                 transform=transform, nodata=nodata, tiled=True, blockxsize=block, blockysize=block,
                 compress="deflate")
  try:
    with _quiet(), rasterio.open(os.fspath(path), "w", **profile) as ds:
      ds.write(np.moveaxis(image, -1, 0))
      if c >= 3:
        ds.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue] + [ColorInterp.undefined] * (c - 3)
  except rasterio.errors.RasterioError as e:
    raise UserError(f"{path}: cannot write the GeoTIFF ({_one_line(e)})") from e


class MaskWriter:
  """A target's mask as a Cloud-Optimized GeoTIFF, written window by window (module docstring).

  with MaskWriter("mask_0.tif", scene) as w: w.write(row0, col0, mask_bool)
  Pixels are written as 255 where the scene is invalid. The file appears at `path` only on a clean close
  (a temporary tiled GeoTIFF beside it is converted with the COG driver, then removed)."""

  def __init__(self, path, scene: Scene, *, block: int = 512):
    self.path, self.scene, self.block = os.fspath(path), scene, int(block)
    if self.block % 16:
      raise UserError(f"MaskWriter block must be a multiple of 16, got {block}")
    self._tmp = self.path + ".partial.tif"
    self._ds = None

  def __enter__(self):
    rasterio = _rasterio()
    profile = dict(driver="GTiff", height=self.scene.height, width=self.scene.width, count=1, dtype="uint8",
                   nodata=MASK_NODATA, tiled=True, blockxsize=self.block, blockysize=self.block,
                   compress="deflate")
    if self.scene.georeferenced:
      profile.update(crs=self.scene.crs, transform=self.scene.transform)
    try:
      with _quiet():
        self._ds = rasterio.open(self._tmp, "w", **profile)
    except rasterio.errors.RasterioError as e:
      raise UserError(f"{self.path}: cannot write the mask GeoTIFF ({_one_line(e)})") from e
    return self

  def write(self, row0: int, col0: int, mask: np.ndarray):
    """Writes bool mask [h, w] at (row0, col0); the part past the scene's edge is dropped."""
    from rasterio.windows import Window
    mask = np.asarray(mask, bool)
    h, w = mask.shape
    r0, c0, r1, c1 = _clip(int(row0), int(col0), h, w, self.scene.height, self.scene.width)
    if r1 <= r0 or c1 <= c0:
      return
    part = mask[r0 - row0:r1 - row0, c0 - col0:c1 - col0]
    valid = self.scene.valid_mask((r0, c0, r1 - r0, c1 - c0))
    out = np.where(valid, part.astype(np.uint8), np.uint8(MASK_NODATA))
    self._ds.write(out[None], window=Window(c0, r0, c1 - c0, r1 - r0))

  def __exit__(self, exc_type, exc, tb):
    rasterio = _rasterio()
    self._ds.close()
    try:
      if exc_type is None:
        with _quiet():
          rasterio.shutil.copy(self._tmp, self.path, driver="COG", compress="DEFLATE", blocksize=self.block,
                               overview_resampling="mode", overviews="AUTO")
    except rasterio.errors.RasterioError as e:
      raise UserError(f"{self.path}: cannot write the mask GeoTIFF ({_one_line(e)})") from e
    finally:
      if os.path.exists(self._tmp):
        os.remove(self._tmp)
    return False


def mask_polygons(mask: np.ndarray, transform=None, *, simplify: float = 0.0) -> list:
  """Shapely polygons (holes kept) of the 4-connected components of bool mask [h, w], in the
  coordinates of `transform` (pixel -> CRS; None = pixel coordinates); `simplify` in pixels."""
  _rasterio()
  shapely = _shapely()
  import rasterio.features
  from affine import Affine
  transform = Affine.identity() if transform is None else transform
  mask = np.asarray(mask, bool)
  if not mask.any():
    return []
  tolerance = float(simplify) * math.sqrt(abs(transform.determinant))
  out = []
  for geom, _ in rasterio.features.shapes(mask.astype(np.uint8), mask=mask, connectivity=4,
                                          transform=transform):
    poly = shapely.geometry.shape(geom)
    if tolerance > 0:
      poly = poly.simplify(tolerance, preserve_topology=True)
    if not poly.is_empty:
      out.append(poly)
  return out


def _as_geometry(geometry):
  """A shapely geometry (or None when empty) from a geometry, a GeoJSON-like dict or a list of polygons."""
  shapely = _shapely()
  if geometry is None:
    return None
  if isinstance(geometry, dict):
    geometry = shapely.geometry.shape(geometry)
  elif isinstance(geometry, (list, tuple)):
    polys = [p for g in geometry for p in (getattr(g, "geoms", None) or [g])]
    geometry = shapely.geometry.MultiPolygon(polys) if len(polys) > 1 else (polys[0] if polys else None)
  return None if geometry is None or geometry.is_empty else geometry


def _crs_member(crs):
  epsg = crs.to_epsg()
  name = f"urn:ogc:def:crs:EPSG::{epsg}" if epsg else crs.to_string()
  return {"type": "name", "properties": {"name": name}}


def write_geojson(path, features: list, crs, *, to_wgs84: bool = False) -> dict:
  """Writes a FeatureCollection of dict(geometry, phrase, index, score) (module docstring); returns it.

  geometry: a shapely geometry, a GeoJSON-like dict, a list of polygons (one MultiPolygon feature) or
  None / empty (a feature with a null geometry: a [SEG] whose mask is empty keeps its feature)."""
  shapely = _shapely()
  if to_wgs84 and crs is None:
    raise UserError(f"{path}: --to-wgs84 needs a georeferenced source (the scene has no CRS)")
  collection = {"type": "FeatureCollection"}
  if crs is not None and not to_wgs84:
    collection["crs"] = _crs_member(crs)
  out = []
  for f in features:
    geom = _as_geometry(f.get("geometry"))
    mapping = None if geom is None else shapely.geometry.mapping(geom)
    if mapping is not None and to_wgs84:
      rasterio = _rasterio()
      mapping = rasterio.warp.transform_geom(crs, "EPSG:4326", mapping)
    out.append({"type": "Feature", "id": int(f["index"]), "geometry": _plain(mapping),
                "properties": {"phrase": f["phrase"], "index": int(f["index"]), "score": float(f["score"])}})
  collection["features"] = out
  with open(path, "w", encoding="utf-8") as fh:
    json.dump(collection, fh, ensure_ascii=False)
    fh.write("\n")
  return collection


def _plain(obj):
  """GeoJSON mapping with tuples as lists (shapely and rasterio give tuples), for a stable JSON."""
  if isinstance(obj, dict):
    return {k: _plain(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_plain(v) for v in obj]
  return obj
