"""Tiling: the windows cover the scene with the asked overlap, and a stand-in mask head whose logits are a
known function of the global pixel position stitches back to exactly that function, seams included,
handing out every row once and holding one strip at a time."""
from __future__ import annotations

import numpy as np
import pytest

from segearth_jax.tiling import blend_weights, stitch_rows, tile_windows


def field(rows: np.ndarray, cols: np.ndarray, k: int) -> np.ndarray:
  """float32 [k, len(rows), len(cols)]: a smooth, everywhere-different function of the global pixel."""
  r, c = np.meshgrid(rows.astype(np.float32), cols.astype(np.float32), indexing="ij")
  return np.stack([np.sin(0.05 * (j + 1) * r) + np.cos(0.031 * c + j) + 1e-3 * r for j in range(k)]
                  ).astype(np.float32)


@pytest.mark.parametrize("height,width,tile,overlap", [(200, 333, 64, 16), (64, 64, 64, 8), (50, 130, 64, 0),
                                                       (129, 97, 32, 31)])
def test_windows_cover_the_scene(height, width, tile, overlap):
  wins = tile_windows(height, width, tile, overlap)
  count = np.zeros((height, width), int)
  for r, c, h, w in wins:
    assert 0 < h <= tile and 0 < w <= tile and r + h <= height and c + w <= width
    assert h == min(tile, height - r) and w == min(tile, width - c)   # clipped only at the scene's end
    count[r:r + h, c:c + w] += 1
  assert count.min() >= 1
  assert wins == sorted(wins)                                         # row-major
  rows, cols = sorted({w[0] for w in wins}), sorted({w[1] for w in wins})
  assert all(b - a == tile - overlap for a, b in zip(rows, rows[1:]))
  assert all(b - a == tile - overlap for a, b in zip(cols, cols[1:]))


def test_blend_weights_ramp_and_positive():
  w = blend_weights(16, 4)
  assert w.dtype == np.float32 and w.shape == (16, 16) and w.min() > 0
  np.testing.assert_allclose(w[8, :5], [0.2, 0.4, 0.6, 0.8, 1.0])
  np.testing.assert_array_equal(w, w.T)
  np.testing.assert_array_equal(w, w[::-1, ::-1])
  assert (blend_weights(8, 0) == 1).all()


@pytest.mark.parametrize("height,width,tile,overlap", [(200, 333, 64, 16), (50, 130, 64, 0), (129, 97, 32, 31)])
def test_stitched_logits_equal_the_global_function(height, width, tile, overlap):
  k = 3
  wins = tile_windows(height, width, tile, overlap)
  seen, strips = [], []

  def logits_of(win):
    r, c, h, w = win
    seen.append(win)
    return field(np.arange(r, r + h), np.arange(c, c + w), k)

  out = np.full((k, height, width), np.nan, np.float32)

  def write_rows(row0, strip):
    assert strip.shape[0] == k and strip.shape[2] == width
    assert np.isnan(out[:, row0:row0 + strip.shape[1]]).all()      # every row handed out once
    out[:, row0:row0 + strip.shape[1]] = strip
    strips.append(strip.shape[1])

  stitch_rows(wins, logits_of, height, width, k, write_rows)
  assert seen == wins
  assert max(strips) <= tile and sum(strips) == height
  # equal up to float32 rounding of the weighted sums (values are O(1); a wrong weight or an offset by one
  # pixel differs by > 1e-3)
  np.testing.assert_allclose(out, field(np.arange(height), np.arange(width), k), rtol=0, atol=2e-5)


def test_overlaps_are_blended_not_overwritten():
  """Windows that disagree: in an overlap the result lies strictly between the two windows' values, and
  next to a window's own border its neighbour dominates (the ramp)."""
  wins = tile_windows(1, 24, 16, 8)      # columns [0, 16) and [8, 24)
  assert [w[1] for w in wins] == [0, 8]
  out = {}
  stitch_rows(wins, lambda win: np.full((1,) + win[2:], float(win[1] == 0), np.float32), 1, 24, 1,
              lambda r, s: out.setdefault("v", s[0, 0]))
  v = out["v"]
  assert (v[:8] == 1).all() and (v[16:] == 0).all()
  assert ((v[8:16] > 0) & (v[8:16] < 1)).all() and np.all(np.diff(v[8:16]) < 0)
