"""Instructions and answers for toy scenes, along the four LaSeRS dimensions plus `no_target`.

A record kind is (granularity, multiplicity, reasoning, length); `build_record` turns a scene and a kind into
a description, an answer with one `<p>phrase</p>[SEG]` (data/answer.py) per target, and the target masks in
[SEG] order, or None when the scene cannot support that kind.
"""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from segearth_jax.data.answer import target_text
from segearth_jax.toy.scenes import CLASSES, PLURAL

GRANULARITY = ("semantic", "instance", "part")
MULTIPLICITY = ("single", "multiple")
REASONING = ("explicit", "implicit")
LENGTH = ("short", "long")
SUBSETS = GRANULARITY + MULTIPLICITY + REASONING + LENGTH + ("no_target",)
KINDS = tuple(itertools.product(GRANULARITY, MULTIPLICITY, REASONING, LENGTH)) + tuple(
    ("no_target", r, l) for r in REASONING for l in LENGTH)

# class -> (implicit question, explanation with {P}, what it looks like)
CLASS_TEXT = {
    "airplane": ("what here could fly passengers to another city", "Passengers fly in {P}.",
                 "the white aircraft with swept wings"),
    "ship": ("what here could carry cargo across the sea", "Cargo crosses the sea on {P}.",
             "the long hulls floating on the water"),
    "storage tank": ("what stores oil here", "Oil is stored in {P}.", "the round white roofs with a grey rim"),
    "building": ("where could people live or work", "People live and work in {P}.",
                 "the rectangular roofs that cast shadows"),
    "road": ("what do cars drive on here", "Cars drive on {P}.", "the dark asphalt strip with a dashed line"),
    "vehicle": ("what here could drive people around", "People are driven around in {P}.",
                "the small coloured cars"),
    "ground track field": ("where could athletes run a race", "Athletes run races on {P}.",
                           "the red oval track around a green field"),
    "tennis court": ("where could people play tennis", "Tennis is played on {P}.",
                     "the court with white lines and a net"),
    "basketball court": ("where could a team play basketball", "Basketball is played on {P}.",
                         "the orange court with a centre circle"),
}
# functional noun for implicit instance questions ("which vessel is the largest?")
NOUN = {"airplane": "aircraft", "ship": "vessel", "storage tank": "oil container", "building": "house",
        "vehicle": "car", "ground track field": "running track", "tennis court": "tennis venue",
        "basketball court": "basketball venue", "road": "street"}
# part -> (implicit question about {R}, explanation, looks)
PART_TEXT = {
    "engines": ("which parts of {R} produce thrust", "Thrust comes from {P}.", "the dark pods under the wings"),
    "wings": ("which parts of {R} give it lift", "Lift comes from {P}.", "the long swept surfaces on both sides"),
    "tail": ("what keeps {R} stable in flight", "Stability comes from {P}.", "the small surfaces at the rear"),
    "fuselage": ("where do passengers sit in {R}", "Passengers sit in {P}.", "the long central body"),
    "track": ("where do runners go around {R}", "Runners go around {P}.", "the red ring with white lanes"),
    "field": ("where could a helicopter land in {R}", "A helicopter could land on {P}.",
              "the green grass inside the track"),
}
PART_PHRASE = {"engines": "the engines of {R}", "wings": "the wings of {R}", "tail": "the tail of {R}",
               "fuselage": "the fuselage of {R}", "track": "the track of {R}",
               "field": "the grass field inside {R}"}
# descriptor -> (phrase template, implicit predicate)
DESCRIPTORS = {
    "largest": ("the largest {c}", "the largest"), "smallest": ("the smallest {c}", "the smallest"),
    "leftmost": ("the leftmost {c}", "furthest to the left"),
    "rightmost": ("the rightmost {c}", "furthest to the right"),
    "topmost": ("the {c} nearest the top", "nearest the top"),
    "bottommost": ("the {c} nearest the bottom", "nearest the bottom"),
    "top left": ("the {c} at the top left", "at the top left"),
    "top right": ("the {c} at the top right", "at the top right"),
    "bottom left": ("the {c} at the bottom left", "at the bottom left"),
    "bottom right": ("the {c} at the bottom right", "at the bottom right"),
}
PLACE = {"airport": "an airport apron", "harbour": "a harbour", "city": "a city block",
         "sports": "a sports park", "industrial": "an industrial site"}
NUMBER = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
EXPLICIT_SHORT = ("{P}", "Segment {P}.", "Find {P}.", "Show {P}.")


@dataclasses.dataclass
class Target:
  phrase: str
  mask: np.ndarray
  cls: str
  key: tuple                          # what it refers to (object index, part), to keep targets distinct
  question: str                       # implicit question (lower case, no '?')
  explain: str                        # explanation with {P}
  look: str                           # what it looks like (long instructions)


def _by_class(scene):
  out = {}
  for i, o in enumerate(scene.objects):
    out.setdefault(o.cls, []).append(i)
  return out


def _descriptors(scene, idxs):
  """Descriptors that pick out exactly one object among `idxs` (same class), as {index: [names]}."""
  objs = [scene.objects[i] for i in idxs]
  size = scene.image.shape[0]
  gap = 22 * size / 256
  found = {i: [] for i in idxs}
  areas = [o.area for o in objs]
  order = np.argsort(areas, kind="stable")
  if areas[order[-1]] >= 1.25 * areas[order[-2]]:
    found[idxs[order[-1]]].append("largest")
  if areas[order[1]] >= 1.25 * areas[order[0]]:
    found[idxs[order[0]]].append("smallest")
  cents = [o.centroid for o in objs]
  for axis, lo, hi in ((0, "leftmost", "rightmost"), (1, "topmost", "bottommost")):
    v = [c[axis] for c in cents]
    o = np.argsort(v, kind="stable")
    if v[o[1]] - v[o[0]] >= gap:
      found[idxs[o[0]]].append(lo)
    if v[o[-1]] - v[o[-2]] >= gap:
      found[idxs[o[-1]]].append(hi)
  quads = []
  for x, y in cents:
    clear = abs(x - size / 2) > gap and abs(y - size / 2) > gap
    quads.append((("top" if y < size / 2 else "bottom") + " " + ("left" if x < size / 2 else "right"))
                 if clear else None)
  for k, q in enumerate(quads):
    if q is not None and quads.count(q) == 1 and all(
        (abs(x - size / 2) > gap / 2 and abs(y - size / 2) > gap / 2) for x, y in cents):
      found[idxs[k]].append(q)
  return found


def _referents(scene, cls):
  """(phrase, object index, implicit predicate or None) for objects of `cls` that can be named uniquely."""
  idxs = _by_class(scene).get(cls, [])
  if len(idxs) == 1:
    return [(f"the {cls}", idxs[0], None)]
  if len(idxs) < 2:
    return []
  return [(DESCRIPTORS[d][0].format(c=cls), i, DESCRIPTORS[d][1])
          for i, ds in _descriptors(scene, idxs).items() for d in ds]


def semantic_targets(scene):
  out = []
  for cls, idxs in _by_class(scene).items():
    if len(idxs) >= 2 or cls == "road":
      mask = np.any([scene.objects[i].mask for i in idxs], axis=0)
      q, e, look = CLASS_TEXT[cls]
      phrase = f"all the {PLURAL[cls]}" if len(idxs) >= 2 else f"the {cls}"
      out.append(Target(phrase, mask, cls, ("class", cls), q, e, look))
  return out


def instance_targets(scene):
  out = []
  for cls in _by_class(scene):
    if cls == "road":
      continue
    q, e, look = CLASS_TEXT[cls]
    for phrase, i, pred in _referents(scene, cls):
      question = q if pred is None else f"which {NOUN[cls]} is {pred}"
      out.append(Target(phrase, scene.objects[i].mask, cls, ("obj", i), question, e, look))
  return out


def part_targets(scene):
  out = []
  for cls in ("airplane", "ground track field"):
    for ref, i, _ in _referents(scene, cls):
      for part, mask in scene.objects[i].parts.items():
        q, e, look = PART_TEXT[part]
        out.append(Target(PART_PHRASE[part].format(R=ref), mask, cls, ("part", i, part), q.format(R=ref), e,
                          look))
  return out


def _join(items):
  return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _scene_sentence(scene):
  byc = _by_class(scene)
  parts = [f"{NUMBER[min(len(v), 10)]} {PLURAL[c] if len(v) > 1 else c}" for c, v in byc.items()]
  return f"This overhead image shows {PLACE[scene.kind]} with {_join(parts)}."


def _cap(s):
  return s[:1].upper() + s[1:]


def build_record(scene, kind, rng):
  """A dict with description/answer/masks/dimension fields, or None when the scene cannot make `kind`."""
  if kind[0] == "no_target":
    return _no_target(scene, kind, rng)
  gran, mult, reason, length = kind
  pool = {"semantic": semantic_targets, "instance": instance_targets, "part": part_targets}[gran](scene)
  n = 1 if mult == "single" else (3 if rng.random() < 0.25 else 2)
  if len(pool) < n:
    return None
  order = rng.permutation(len(pool))
  chosen, used = [], set()
  for k in order:
    t = pool[k]
    obj = t.key[:2]
    # distinct objects for instance; distinct (object, part) for parts; distinct classes for semantic
    if t.key in used or (gran == "instance" and obj in used):
      continue
    chosen.append(t)
    used.update({t.key, obj})
    if len(chosen) == n:
      break
  if len(chosen) < n:
    return None
  segs = [target_text(t.phrase) for t in chosen]
  looks = _join(list(dict.fromkeys(t.look for t in chosen)))
  if reason == "explicit":
    if length == "short":
      desc = EXPLICIT_SHORT[int(rng.integers(len(EXPLICIT_SHORT)))].format(P=_join([t.phrase for t in chosen]))
    else:
      desc = (f"{_scene_sentence(scene)} Please segment {_join([t.phrase for t in chosen])}; "
              f"look for {looks}.")
    answer = _join(segs) + "."
  else:
    question = _cap(", and ".join(t.question for t in chosen)) + "?"
    if length == "short":
      desc = question
    else:
      desc = f"{_scene_sentence(scene)} {question} Think about what {looks} are used for, then explain and segment."
    answer = " ".join(t.explain.format(P=s) for t, s in zip(chosen, segs))
  classes = list(dict.fromkeys(t.cls for t in chosen))
  return dict(description=desc, answer=answer, masks=[t.mask for t in chosen], granularity=gran,
              multiplicity=mult, reasoning=reason, length=length, **{"class": ", ".join(classes)})


def _no_target(scene, kind, rng):
  _, reason, length = kind
  absent = [c for c in CLASSES if c not in _by_class(scene)]
  if not absent:
    return None
  cls = absent[int(rng.integers(len(absent)))]
  semantic = bool(rng.random() < 0.5)
  phrase = f"all the {PLURAL[cls]}" if semantic else f"the {cls}"
  if reason == "explicit":
    core = EXPLICIT_SHORT[int(rng.integers(len(EXPLICIT_SHORT)))].format(P=phrase)
  else:
    core = _cap(CLASS_TEXT[cls][0]) + "?"
  desc = core if length == "short" else f"{_scene_sentence(scene)} {core} Look carefully at the whole image."
  return dict(description=desc, answer=f"There is no {cls} in this image.", masks=[],
              granularity="semantic" if semantic else "instance", multiplicity="none", reasoning=reason,
              length=length, **{"class": cls})


def subsets_of(record) -> list:
  """The test subset files a record belongs to (`no_target` records only in no_target)."""
  if record["multiplicity"] == "none":
    return ["no_target"]
  return [record["granularity"], record["multiplicity"], record["reasoning"], record["length"]]
