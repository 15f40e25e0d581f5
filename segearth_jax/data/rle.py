"""COCO RLE <-> mask for the JSON we write and read (compressed counts as an ASCII string).

One place for the pycocotools round trip: toy annotations, prediction.json, the picture grid and the eval
rows' targets past the [SEG] cap. Reading *datasets* (uncompressed counts, size checks, errors naming the
record) is tfds_laserss.common.rle_to_mask.
"""
from __future__ import annotations

import numpy as np


def encode(mask: np.ndarray) -> dict:
  """(h, w) bool/0-1 mask -> {"size": [h, w], "counts": str}."""
  from pycocotools import mask as mask_utils
  rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
  return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode(rle: dict) -> np.ndarray:
  """{"size", "counts": str} -> (h, w) bool mask."""
  from pycocotools import mask as mask_utils
  return mask_utils.decode({"size": list(rle["size"]), "counts": rle["counts"].encode("ascii")}).astype(bool)
