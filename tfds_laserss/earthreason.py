"""EarthReason (geospatial reasoning segmentation) from its native layout.

  {train,val,test}/images/<stem>.{jpg,png}
  {train,val,test}/labels/<stem>.png       nonzero = foreground
  {train,val,test}/QAs/<stem>.json         {"questions": [...], "answer": [...]}

Files are matched by stem (never by sorted position); an image, label or QA file without its partners is
reported (an error naming it, or counted with skip_bad). Each question is one example (id '<stem>_<k>').
Answer (training target): the answer texts joined by spaces + ' [SEG]'. An empty answer list means the
image has no target: no_target=True, the mask is the (empty) label, answer 'No target. [SEG]' — one [SEG]
is kept so the example still has one GT unit to score (IoU 1 when prediction and target are both empty).
"""
from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from segearth_jax.data.answer import SEG_TOKEN
from tfds_laserss import common

IMAGE_EXTS = (".jpg", ".jpeg", ".png")
NO_TARGET_ANSWER = "No target."


def _stems(folder: str, exts) -> dict[str, str]:
  if not os.path.isdir(folder):
    return {}
  out = {}
  for f in sorted(os.listdir(folder)):
    stem, ext = os.path.splitext(f)
    if ext.lower() in exts:
      out.setdefault(stem, os.path.join(folder, f))
  return out


class Earthreason(common.Builder):
  """EarthReason reasoning segmentation (train/val/test)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Native layout; one example per question."}
  HOMEPAGE = "https://github.com/earth-insights/SegEarth-R1"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Unpack EarthReason so that manual_dir holds {train,val,test}/ each with images/, labels/ and QAs/.")

  def source_features(self):
    return dict(stem=tfds.features.Text())

  def _splits(self, root):
    return {s: self._generate_examples(os.path.join(root, s), s)
            for s in common.SPLITS if os.path.isdir(os.path.join(root, s, "images"))}

  def _generate_examples(self, base, split):
    images = _stems(os.path.join(base, "images"), IMAGE_EXTS)
    labels = _stems(os.path.join(base, "labels"), (".png",))
    qas = _stems(os.path.join(base, "QAs"), (".json",))
    for kind, files in (("labels", labels), ("QAs", qas)):
      for stem in sorted(set(files) - set(images)):
        self.policy.handle(common.BadRecord(files[stem], stem, kind, "has no image with the same stem"), split)
    for stem, image_path in images.items():
      try:
        for kind, files in (("labels", labels), ("QAs", qas)):
          if stem not in files:
            raise common.BadRecord(image_path, stem, kind, f"no {kind} file with the same stem")
        yield from self._examples(stem, image_path, labels[stem], qas[stem])
      except common.BadRecord as e:
        self.policy.handle(e, split)

  def _examples(self, stem, image_path, label_path, qa_path):
    qa = common.load_json(qa_path, stem)
    if not isinstance(qa, dict):
      raise common.BadRecord(qa_path, stem, "(file)", "expected an object with 'questions' and 'answer'")
    questions, answers = qa.get("questions"), qa.get("answer")
    if not isinstance(questions, list) or not questions:
      raise common.BadRecord(qa_path, stem, "questions", "expected a non-empty list")
    if not isinstance(answers, list):
      raise common.BadRecord(qa_path, stem, "answer", "expected a list")
    image, h, w = common.read_image(image_path, stem, "image")
    label = common.read_gray(label_path, stem, "labels")
    common.check_mask_size(label, h, w, label_path, stem, "labels")
    mask = common.mask_png((label != 0).astype(np.uint8))
    no_target = not answers
    text = NO_TARGET_ANSWER if no_target else " ".join(str(a).strip() for a in answers)
    examples = []  # validate every question before yielding any: a bad file yields nothing
    for k, q in enumerate(questions):
      if not isinstance(q, str) or not q.strip():
        raise common.BadRecord(qa_path, stem, f"questions[{k}]", "expected non-empty text")
      key = f"{stem}_{k}"
      examples.append((key, dict(
          image=image, masks=[mask], instruction=q.strip(), answer=f"{text} {SEG_TOKEN}", id=key,
          image_name=os.path.basename(image_path), no_target=no_target, stem=stem)))
    return examples
