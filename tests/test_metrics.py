import numpy as np
import pytest

from segearth_jax.metrics import IoUAccumulator, pair_predictions, score


def box(y0, y1, x0, x1, shape=(10, 10)):
  m = np.zeros(shape, bool)
  m[y0:y1, x0:x1] = True
  return m


def test_exact_match_and_partial():
  a = box(0, 4, 0, 4)            # 16 px
  b = box(0, 4, 0, 2)            # 8 px, inside a
  s = score([([a], [a]), ([b], [a])])
  assert s["units"] == 2
  assert s["gIoU"] == pytest.approx((1.0 + 0.5) / 2)
  assert s["cIoU"] == pytest.approx((16 + 8) / (16 + 16))


def test_fewer_predictions_repeat_the_last():
  g1, g2 = box(0, 2, 0, 2), box(5, 7, 5, 7)
  acc = IoUAccumulator()
  ious = acc.add_record([g2], [g1, g2])   # the only prediction is used for both targets
  assert ious == [0.0, 1.0]
  assert acc.giou == pytest.approx(0.5)
  assert acc.ciou == pytest.approx(4 / (8 + 4))


def test_no_predictions_are_empty_masks():
  g = box(0, 3, 0, 3)
  acc = IoUAccumulator()
  assert acc.add_record([], [g, np.zeros_like(g)]) == [0.0, 1.0]   # empty GT & empty pred: U = 0 -> 1.0
  assert acc.inter == 0 and acc.union == 9


def test_extra_predictions_are_dropped():
  g = box(0, 3, 0, 3)
  acc = IoUAccumulator()
  assert acc.add_record([g, box(5, 9, 5, 9)], [g]) == [1.0]
  assert acc.units == 1 and acc.union == 9


def test_empty_union_counts_as_one_and_not_in_ciou():
  z = np.zeros((4, 4), bool)
  acc = IoUAccumulator()
  acc.add_record([z], [z])
  assert acc.giou == 1.0 and acc.union == 0 and acc.ciou == 1.0


def test_multi_target_ciou_weights_by_area():
  big, small = box(0, 8, 0, 8), box(0, 1, 0, 1)
  acc = IoUAccumulator()
  acc.add_record([big, np.zeros_like(small)], [big, small])
  assert acc.giou == pytest.approx(0.5)
  assert acc.ciou == pytest.approx(64 / 65)


def test_record_without_targets_adds_no_unit():
  acc = IoUAccumulator()
  acc.add_record([box(0, 2, 0, 2)], [])
  assert acc.units == 0 and np.isnan(acc.giou)
  assert pair_predictions([box(0, 1, 0, 1)], 0, (10, 10)) == []


def test_shape_mismatch_is_an_error():
  with pytest.raises(ValueError):
    score([([np.zeros((3, 3))], [np.zeros((4, 4))])])
