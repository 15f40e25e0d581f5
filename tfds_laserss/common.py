"""Pieces every builder shares: the feature set, image/mask codecs, and the bad-record policy.

Every builder writes the same core features so one input pipeline reads them all:
  image        tfds Image (the source PNG/JPEG bytes when they are already RGB PNG/JPEG, else re-encoded PNG)
  masks        Sequence(Image(shape=(None, None, 1))) of PNG bytes, values 0/1, one per target, in answer order
  instruction  the user's instruction / referring expression / question
  answer       the assistant turn the model is trained to write, with one [SEG] per mask (data/answer.py)
  id           a unique example id (text)
  image_name   the source image file name (or COCO image id for rrsisd)
  no_target    True when the instruction has no target in the image
plus each dataset's own source ids (ref_id/ann_id/sent_id, file stems, LaSeRS test subsets ...).

No TensorFlow at build or read time: Image features get encoded bytes only (tfds then never calls TF),
files are ArrayRecord, reading goes through `tfds.data_source`.
"""
from __future__ import annotations

import abc
import io
import json
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from segearth_jax.errors import UserError

FILE_FORMAT = "array_record"
SPLITS = ("train", "val", "test")   # the splits a release may hold; each builder builds those it finds


def core_features(**extra) -> dict:
  feats = dict(
      image=tfds.features.Image(shape=(None, None, 3)),
      masks=tfds.features.Sequence(tfds.features.Image(shape=(None, None, 1))),
      instruction=tfds.features.Text(),
      answer=tfds.features.Text(),
      id=tfds.features.Text(),
      image_name=tfds.features.Text(),
      no_target=np.bool_,
  )
  feats.update(extra)
  return feats


# -- bad records ---------------------------------------------------------------------------------


class BadRecord(UserError):
  """One record that cannot be used; the message names file, record and field."""

  def __init__(self, file, record, field_name, why):
    self.file, self.record, self.field = os.fspath(file), str(record), field_name
    super().__init__(f"{self.file}: record {self.record}: field '{field_name}': {why}")


@dataclass
class Skipped:
  """Bad records skipped with --skip-bad: counted and listed, never hidden."""
  records: list = field(default_factory=list)

  def add(self, err: BadRecord, split: str):
    self.records.append(dict(split=split, file=err.file, record=err.record, field=err.field, error=str(err)))

  def summary(self) -> str:
    if not self.records:
      return "skipped 0 bad records"
    lines = [f"skipped {len(self.records)} bad records:"]
    lines += [f"  [{r['split']}] {r['error']}" for r in self.records]
    return "\n".join(lines)


class BadRecordPolicy:
  """Raises a BadRecord, or with skip_bad counts it and lets the caller move on."""

  def __init__(self, skip_bad: bool):
    self.skip_bad = skip_bad
    self.skipped = Skipped()

  def handle(self, err: BadRecord, split: str):
    if not self.skip_bad:
      raise err
    self.skipped.add(err, split)


# -- images and masks ----------------------------------------------------------------------------


def png_bytes(arr: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
  return buf.getvalue()


def mask_png(mask: np.ndarray) -> bytes:
  """A 2-D 0/1 mask as PNG bytes of shape (h, w, 1) after decoding."""
  return png_bytes(np.ascontiguousarray(mask, dtype=np.uint8))


def read_image(path, record, field_name="image") -> tuple[bytes, int, int]:
  """Encoded RGB image bytes (source bytes kept when they are RGB PNG/JPEG) and (h, w).

  A missing or unreadable file is a BadRecord naming the file and the record.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise BadRecord(path, record, field_name, "image file is missing")
  try:
    with open(path, "rb") as f:
      data = f.read()
    with Image.open(io.BytesIO(data)) as im:
      im.load()
      fmt, mode, (w, h) = im.format, im.mode, im.size
      if fmt in ("PNG", "JPEG") and mode == "RGB":
        return data, h, w
      return png_bytes(np.asarray(im.convert("RGB"))), h, w
  except (OSError, ValueError, SyntaxError) as e:
    raise BadRecord(path, record, field_name, f"image cannot be read: {e}") from e


def read_gray(path, record, field_name) -> np.ndarray:
  """A single-channel label image as a 2-D array (first channel of multi-channel files)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise BadRecord(path, record, field_name, "file is missing")
  try:
    with Image.open(path) as im:
      arr = np.asarray(im)
  except (OSError, ValueError, SyntaxError) as e:
    raise BadRecord(path, record, field_name, f"cannot be read: {e}") from e
  return arr[..., 0] if arr.ndim == 3 else arr


def rle_to_mask(rle, h: int, w: int, file, record, field_name="mask") -> np.ndarray:
  """COCO RLE (compressed str/bytes counts or uncompressed list counts) -> (h, w) uint8 0/1."""
  from pycocotools import mask as mask_util
  if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
    raise BadRecord(file, record, field_name, f"expected a COCO RLE {{size, counts}}, got {type(rle).__name__}")
  size = list(rle["size"])
  if size != [h, w]:
    raise BadRecord(file, record, field_name, f"mask size {size} != image size {[h, w]}")
  counts = rle["counts"]
  try:
    if isinstance(counts, list):
      if sum(counts) != h * w:
        raise BadRecord(file, record, field_name, f"uncompressed RLE counts sum to {sum(counts)}, not {h * w}")
      rle = mask_util.frPyObjects({"size": size, "counts": counts}, h, w)
    elif isinstance(counts, str):
      rle = {"size": size, "counts": counts.encode("ascii")}
    m = mask_util.decode(rle)
  except BadRecord:
    raise
  except Exception as e:  # pycocotools raises plain exceptions on corrupt strings
    raise BadRecord(file, record, field_name, f"RLE cannot be decoded: {e}") from e
  return m.astype(np.uint8)


def polygons_to_mask(polys, h: int, w: int, file, record, field_name="segmentation") -> np.ndarray:
  """COCO polygons (one or several parts) -> (h, w) 0/1 mask; parts are OR-ed, never summed."""
  from pycocotools import mask as mask_util
  try:
    parts = [list(map(float, p)) for p in polys]
    if not parts or any(len(p) < 6 or len(p) % 2 for p in parts):
      raise ValueError("each polygon part needs >= 3 (x, y) pairs")
    rles = mask_util.frPyObjects(parts, h, w)
    return mask_util.decode(mask_util.merge(rles)).astype(np.uint8)
  except (TypeError, ValueError) as e:
    raise BadRecord(file, record, field_name, f"bad polygon: {e}") from e


def check_mask_size(mask: np.ndarray, h: int, w: int, file, record, field_name):
  if mask.shape[:2] != (h, w):
    raise BadRecord(file, record, field_name, f"mask size {list(mask.shape[:2])} != image size {[h, w]}")


def load_json(path, record="-", field_name="(file)"):
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise BadRecord(path, record, field_name, "file is missing")
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise BadRecord(path, record, field_name, f"malformed JSON: {e}") from e


class Builder(tfds.core.GeneratorBasedBuilder):
  """Base: manual_dir input, ArrayRecord output, a skip_bad switch, the skipped records kept.

  A dataset gives its HOMEPAGE, its own features next to the core ones (`source_features`) and
  `_splits(root)`: split name -> example generator for the splits found in manual_dir. Its module
  docstring (the native layout it reads) is the dataset's description.
  """

  HOMEPAGE = ""
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Unpack the release into a folder and pass it as manual_dir."

  def __init__(self, *, skip_bad: bool = False, **kwargs):
    kwargs.setdefault("file_format", FILE_FORMAT)
    self.policy = BadRecordPolicy(skip_bad)
    super().__init__(**kwargs)

  @property
  def skipped(self) -> Skipped:
    return self.policy.skipped

  def source_features(self) -> dict:
    """Features beyond core_features: the dataset's own source ids."""
    return {}

  @abc.abstractmethod
  def _splits(self, root: str) -> dict:
    """split name -> example generator, for the splits present under `root` (manual_dir)."""

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description=sys.modules[type(self).__module__].__doc__,
        features=tfds.features.FeaturesDict(core_features(**self.source_features())), homepage=self.HOMEPAGE)

  def _split_generators(self, dl_manager):
    root = self._manual_dir(dl_manager)
    splits = self._splits(root)
    if not splits:
      raise UserError(f"{self.name}: nothing to build in {root}. {self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    return splits

  def _manual_dir(self, dl_manager):
    path = dl_manager.manual_dir
    if path is None or not os.path.isdir(os.fspath(path)):
      raise UserError(f"{self.name}: manual_dir {path} does not exist. {self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    return os.fspath(path)
