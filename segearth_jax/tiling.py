"""Scenes larger than the canvas: overlapping canvas-sized windows, logits blended in the overlaps, written
strip by strip (pure numpy and a callable: no model here).

Windows (row0, col0, h, w) start at 0, stride = tile - overlap, along each axis until one reaches the
scene's end; the last one is clipped there (h or w < tile) and the caller pads it to the canvas, bottom and
right, as the letterbox pads an image. Rows of windows share row0 and come in row-major order.

Blending: window logits [k, h, w] are weighted by ``blend_weights`` (a linear ramp across the overlap at
every side, > 0 everywhere, so the first and last pixels count too) and the weighted sum is divided by the
summed weights: where every window agrees (a head whose logits depend on the global pixel only) the
stitched value is exactly that value, seams included. ``stitch_rows`` holds one strip of windows (k x tile x
width floats) at a time; rows no later window touches go to ``write_rows`` at once.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

Window = tuple[int, int, int, int]   # row0, col0, h, w


def _starts(size: int, tile: int, stride: int) -> list[int]:
  starts = [0]
  while starts[-1] + tile < size:
    starts.append(starts[-1] + stride)
  return starts


def tile_windows(height: int, width: int, tile: int, overlap: int) -> list[Window]:
  """Row-major windows of at most tile x tile covering height x width, neighbours overlapping by
  ``overlap`` pixels (0 <= overlap < tile)."""
  if not 0 <= overlap < tile:
    raise ValueError(f"overlap {overlap} must be in [0, tile={tile})")
  stride = tile - overlap
  return [(r, c, min(tile, height - r), min(tile, width - c))
          for r in _starts(height, tile, stride) for c in _starts(width, tile, stride)]


def blend_weights(tile: int, overlap: int) -> np.ndarray:
  """float32 [tile, tile]: the outer product of a 1-D ramp rising over the first ``overlap`` pixels and
  falling over the last ones ((i + 1) / (overlap + 1)), 1 in between."""
  i = np.arange(tile, dtype=np.float32)
  ramp = np.minimum(1.0, np.minimum(i + 1, tile - i) / np.float32(overlap + 1))
  return np.outer(ramp, ramp).astype(np.float32)


def stitch_rows(windows: list[Window], logits_of: Callable[[Window], np.ndarray], height: int, width: int,
                k: int, write_rows: Callable[[int, np.ndarray], None]) -> None:
  """Blends ``logits_of(window) -> float32 [k, h, w]`` over ``windows`` (tile_windows' order; the tile
  and overlap are read from them) and hands finished strips to ``write_rows(row0, logits [k, rows,
  width])``, top to bottom, every row once."""
  if not windows:
    return
  tile = max(max(h, w) for _, _, h, w in windows)
  weights = blend_weights(tile, _overlap_of(windows, tile))
  row_starts = sorted({r for r, _, _, _ in windows})
  by_row = {r: [w for w in windows if w[0] == r] for r in row_starts}
  # the strip buffer covers rows [top, top + tile): the current row of windows and what the previous left
  top = row_starts[0]
  acc = np.zeros((k, tile, width), np.float32)
  wsum = np.zeros((tile, width), np.float32)
  for i, r in enumerate(row_starts):
    if r != top:   # rows [top, r) are written: move the rest up
      shift = r - top
      acc[:, :-shift], acc[:, -shift:] = acc[:, shift:].copy(), 0.0
      wsum[:-shift], wsum[-shift:] = wsum[shift:].copy(), 0.0
      top = r
    for win in by_row[r]:
      r0, c0, h, w = win
      logits = np.asarray(logits_of(win), np.float32)
      if logits.shape != (k, h, w):
        raise ValueError(f"logits_of{win} gave {logits.shape}, expected {(k, h, w)}")
      wt = weights[:h, :w]
      acc[:, :h, c0:c0 + w] += logits * wt
      wsum[:h, c0:c0 + w] += wt
    done = (row_starts[i + 1] if i + 1 < len(row_starts) else height) - top
    write_rows(top, acc[:, :done] / wsum[None, :done])


def _overlap_of(windows: list[Window], tile: int) -> int:
  rows = sorted({r for r, _, _, _ in windows})
  cols = sorted({c for _, c, _, _ in windows})
  for starts in (rows, cols):
    if len(starts) > 1:
      return tile - (starts[1] - starts[0])
  return 0
