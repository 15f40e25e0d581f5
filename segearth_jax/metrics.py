"""gIoU / cIoU with SegEarth-R2's pairing rules (method.md §7).

Each GT mask is one unit. Prediction i pairs with GT i by order; with fewer predictions than targets the
last prediction repeats; with none, empty masks; extra predictions are dropped. IoU = I/U, and 1.0 when
U = 0. gIoU = mean IoU over units; cIoU = sum I / sum U.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import numpy as np


def pair_predictions(preds: Sequence[np.ndarray], n_targets: int, shape) -> list[np.ndarray]:
  if n_targets == 0:
    return []
  if len(preds) == 0:
    return [np.zeros(shape, bool)] * n_targets
  out = list(preds[:n_targets])
  while len(out) < n_targets:
    out.append(preds[-1])
  return out


def intersection_union(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int]:
  p, g = pred.astype(bool), gt.astype(bool)
  if p.shape != g.shape:
    raise ValueError(f"prediction shape {p.shape} != target shape {g.shape}")
  return int(np.logical_and(p, g).sum()), int(np.logical_or(p, g).sum())


@dataclasses.dataclass
class IoUAccumulator:
  """Sums over units: IoU for gIoU, I and U for cIoU."""
  iou_sum: float = 0.0
  units: int = 0
  inter: int = 0
  union: int = 0

  def add_record(self, preds: Sequence[np.ndarray], gts: Sequence[np.ndarray]) -> list[float]:
    shape = gts[0].shape if len(gts) else None
    ious = []
    for p, g in zip(pair_predictions(preds, len(gts), shape), gts):
      i, u = intersection_union(p, g)
      iou = 1.0 if u == 0 else i / u
      self.iou_sum += iou
      self.units += 1
      self.inter += i
      self.union += u
      ious.append(iou)
    return ious

  def merge(self, other: "IoUAccumulator") -> None:
    self.iou_sum += other.iou_sum
    self.units += other.units
    self.inter += other.inter
    self.union += other.union

  @property
  def giou(self) -> float:
    return self.iou_sum / self.units if self.units else float("nan")

  @property
  def ciou(self) -> float:
    return self.inter / self.union if self.union else (1.0 if self.units else float("nan"))

  def summary(self) -> dict:
    return {"gIoU": self.giou, "cIoU": self.ciou, "units": self.units}


def score(records: Iterable[tuple[Sequence[np.ndarray], Sequence[np.ndarray]]]) -> dict:
  acc = IoUAccumulator()
  for preds, gts in records:
    acc.add_record(preds, gts)
  return acc.summary()
