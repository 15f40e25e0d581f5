"""Synthetic overhead scenes for the toy LaSeRS.

Every object is a set of polygons. Each polygon is drawn once into the RGB image and, with the same
coordinates, into an instance-label map and a part-label map, so a mask is exactly the visible drawn
geometry (later shapes cover earlier ones). Shadows, paint lines and roof shading go into the image only.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image, ImageDraw

SCENE_TYPES = ("airport", "harbour", "city", "sports", "industrial")
CLASSES = ("airplane", "ship", "storage tank", "building", "road", "vehicle", "ground track field",
           "tennis court", "basketball court")
PLURAL = {"airplane": "airplanes", "ship": "ships", "storage tank": "storage tanks",
          "building": "buildings", "road": "roads", "vehicle": "vehicles",
          "ground track field": "ground track fields", "tennis court": "tennis courts",
          "basketball court": "basketball courts"}
# Part names per class, in drawing order (later parts cover earlier ones).
PARTS = {"airplane": ("wings", "tail", "fuselage", "engines"), "ground track field": ("track", "field")}


@dataclasses.dataclass
class Obj:
  cls: str
  mask: np.ndarray                    # bool (H, W): visible pixels of the whole object
  parts: dict                         # part name -> bool (H, W) visible pixels

  @property
  def area(self) -> int:
    return int(self.mask.sum())

  @property
  def centroid(self):
    ys, xs = np.nonzero(self.mask)
    return float(xs.mean()), float(ys.mean())


@dataclasses.dataclass
class Scene:
  kind: str
  image: np.ndarray                   # uint8 (H, W, 3)
  objects: list


# Geometry ------------------------------------------------------------------------------------------

def _xform(pts, cx, cy, ang):
  c, s = math.cos(ang), math.sin(ang)
  return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def _ellipse(cx, cy, rx, ry, ang=0.0, n=40):
  t = np.linspace(0, 2 * np.pi, n, endpoint=False)
  return _xform(list(zip(rx * np.cos(t), ry * np.sin(t))), cx, cy, ang)


def _rect(cx, cy, w, h, ang=0.0):
  return _xform([(-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2)], cx, cy, ang)


def _stadium(a, b, n=16):
  """Local outline of a running-track shape: length a along x, width b."""
  r, off = b / 2, a / 2 - b / 2
  right = [(off + r * math.cos(t), r * math.sin(t)) for t in np.linspace(-np.pi / 2, np.pi / 2, n)]
  left = [(-off + r * math.cos(t), r * math.sin(t)) for t in np.linspace(np.pi / 2, 3 * np.pi / 2, n)]
  return right + left


def _mirror(pts):
  return [(x, -y) for x, y in pts]


def _shift(pts, dx, dy):
  return [(x + dx, y + dy) for x, y in pts]


def _col(rgb, rng, jitter=10):
  return tuple(int(np.clip(c + rng.integers(-jitter, jitter + 1), 0, 255)) for c in rgb)


# Canvas --------------------------------------------------------------------------------------------

class _Canvas:
  def __init__(self, rgb: np.ndarray):
    self.size = rgb.shape[0]
    self.img = Image.fromarray(rgb)
    self.draw = ImageDraw.Draw(self.img)
    self.inst = Image.new("L", (self.size, self.size), 0)
    self.part = Image.new("L", (self.size, self.size), 0)
    self.dinst, self.dpart = ImageDraw.Draw(self.inst), ImageDraw.Draw(self.part)
    self.blocked = np.zeros((self.size, self.size), bool)            # every object so far, grown by its pad
    self.vehicle_blocked = np.zeros((self.size, self.size), bool)    # the vehicles on roads so far
    self.objects = []                 # (cls, part names)

  def paint(self, poly, color):
    """Image only (shadows, lines, shading)."""
    self.draw.polygon(poly, fill=color)

  def shape(self, poly, color, part=0):
    """Object geometry: image + labels of the object being drawn."""
    self.draw.polygon(poly, fill=color)
    self.dinst.polygon(poly, fill=len(self.objects))
    self.dpart.polygon(poly, fill=part)

  def footprint(self, polys):
    m = Image.new("L", (self.size, self.size), 0)
    d = ImageDraw.Draw(m)
    for p in polys:
      d.polygon(p, fill=255)
    return np.asarray(m) > 0

  def fits(self, polys, allowed, margin, blocked) -> bool:
    """Inside the canvas by `margin`, within `allowed`, clear of `blocked`."""
    lo, hi = margin, self.size - 1 - margin
    if any(not (lo <= x <= hi and lo <= y <= hi) for p in polys for x, y in p):
      return False
    fp = self.footprint(polys)
    return not ((fp & blocked).any() or (fp & ~allowed).any())

  def begin(self, cls, polys, pad=4):
    """Starts an object: later objects keep `pad` pixels away from its footprint."""
    self.objects.append((cls, PARTS.get(cls, ())))
    self.blocked |= self.grown(polys, pad)

  def grown(self, polys, pad):
    m = Image.new("L", (self.size, self.size), 0)
    d = ImageDraw.Draw(m)
    for p in polys:              # a fat outline grows the polygon by `pad` on each side
      d.polygon(p, fill=255)
      d.line(list(p) + [p[0]], fill=255, width=2 * pad + 1, joint="curve")
    return np.asarray(m) > 0

  def finish(self, kind, noise_rng):
    rgb = np.asarray(self.img).astype(np.float32)
    rgb += noise_rng.normal(0, 3.0, rgb.shape)           # sensor noise
    image = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    inst, part = np.asarray(self.inst), np.asarray(self.part)
    objects = []
    for i, (cls, names) in enumerate(self.objects, start=1):
      m = inst == i
      if m.sum() < 20:
        continue
      parts = {n: m & (part == k) for k, n in enumerate(names, start=1)}
      if any(p.sum() < 8 for p in parts.values()):
        parts = {}
      objects.append(Obj(cls, m, parts))
    return Scene(kind, image, objects)


def _place(cv, rng, cls, make, allowed, *, tries=60, margin=3, blocked=None, pad=4):
  """Tries random parameters `make(rng)` until their footprint fits (clear of `blocked`, by default every
  object so far), then starts a `cls` object there; the params, or None when nothing fitted (left out)."""
  for _ in range(tries):
    params = make(rng)
    if cv.fits(params["foot"], allowed, margin, cv.blocked if blocked is None else blocked):
      cv.begin(cls, params["foot"], pad)
      return params
  return None


# Backgrounds ---------------------------------------------------------------------------------------

def _lowfreq(rng, size, cells, amp):
  g = rng.normal(0, 1, (cells, cells)).astype(np.float32)
  img = Image.fromarray(g, mode="F").resize((size, size), Image.BILINEAR)
  return np.asarray(img) * amp


def _background(rng, size, base, amp=10.0):
  rgb = np.empty((size, size, 3), np.float32)
  lf = _lowfreq(rng, size, 6, amp)
  for c in range(3):
    rgb[..., c] = base[c] + lf + _lowfreq(rng, size, 24, amp * 0.4)
  return rgb


def _patches(rgb, rng, n, tints, size, lo, hi):
  """Fields / blocks: tinted rotated rectangles baked into the background."""
  for _ in range(n):
    m = Image.new("L", (size, size), 0)
    ImageDraw.Draw(m).polygon(
        _rect(rng.uniform(0, size), rng.uniform(0, size), rng.uniform(lo, hi), rng.uniform(lo, hi),
              rng.uniform(0, np.pi)), fill=1)
    sel = np.asarray(m) > 0
    rgb[sel] += np.asarray(tints[rng.integers(len(tints))], np.float32)
  return rgb


def _land(rng, size):
  rgb = _background(rng, size, _col((105, 118, 72), rng, 12), 9.0)
  return _patches(rgb, rng, int(rng.integers(2, 6)), [(25, 20, -5), (-20, -10, -10), (20, 5, -15),
                                                       (-10, 10, -5)], size, size * 0.3, size * 0.7)


def _urban(rng, size):
  g = rng.integers(118, 138)
  rgb = _background(rng, size, (g, g, g + 4), 7.0)
  return _patches(rgb, rng, int(rng.integers(2, 5)), [(12, 12, 12), (-12, -12, -10)], size, size * 0.2,
                  size * 0.5)


def _tarmac(rng, size):
  g = rng.integers(150, 168)
  return _patches(_background(rng, size, (g, g, g - 3), 5.0), rng, 2, [(-15, -15, -15), (10, 10, 8)], size,
                  size * 0.3, size * 0.6)


def _water_region(rng, size):
  """A coast: water on one side of a wavy line; returns a bool mask."""
  side = int(rng.integers(4))
  frac = rng.uniform(0.42, 0.55)
  t = np.arange(size)
  line = size * frac + size * 0.03 * np.sin(t / size * 2 * np.pi * rng.uniform(0.5, 1.5) + rng.uniform(0, 6))
  yy = np.arange(size)[:, None]
  water = yy < line[None, :]                          # water on top
  return np.rot90(water, side).copy()


# Objects -------------------------------------------------------------------------------------------

def _airplane(cv, rng, allowed, s):
  def make(r):
    L = r.uniform(105, 140) * s
    ang, cx, cy = r.uniform(0, 2 * np.pi), r.uniform(0, cv.size), r.uniform(0, cv.size)
    f = 0.06 * L
    fus = [(0.5 * L, 0), (0.45 * L, 0.6 * f), (0.38 * L, f), (-0.4 * L, f), (-0.5 * L, 0.3 * f)]
    fus = fus + _mirror(fus[::-1])[1:-1]
    wing = [(0.14 * L, 0.9 * f), (-0.12 * L, 0.5 * L), (-0.24 * L, 0.5 * L), (-0.1 * L, 0.9 * f)]
    tail = [(-0.33 * L, 0.8 * f), (-0.44 * L, 0.2 * L), (-0.5 * L, 0.2 * L), (-0.47 * L, 0.8 * f)]
    ys = (0.2,) if r.random() < 0.6 else (0.17, 0.33)
    eng = []
    for y in ys:
      x = 0.14 * L - 0.26 * L * (y * L - 0.9 * f) / (0.5 * L - 0.9 * f) + 0.01 * L
      eng += [_ellipse(x, y * L, 0.08 * L, 0.04 * L), _ellipse(x, -y * L, 0.08 * L, 0.04 * L)]
    parts = {"wings": [wing, _mirror(wing)], "tail": [tail, _mirror(tail)], "fuselage": [fus], "engines": eng}
    parts = {k: [_xform(p, cx, cy, ang) for p in v] for k, v in parts.items()}
    return dict(parts=parts, foot=[p for v in parts.values() for p in v])
  params = _place(cv, rng, "airplane", make, allowed)
  if params is None:
    return
  body = _col((232, 234, 236), rng, 8)
  d = 7 * s
  for polys in params["parts"].values():
    for p in polys:
      cv.paint(_shift(p, d, d), (70, 72, 75))
  colors = {"wings": tuple(c - 12 for c in body), "tail": body, "fuselage": body,
            "engines": _col((70, 74, 82), rng, 10)}
  for k, name in enumerate(PARTS["airplane"], start=1):
    for p in params["parts"][name]:
      cv.shape(p, colors[name], part=k)


def _ship(cv, rng, allowed, s):
  def make(r):
    L, ang = r.uniform(80, 120) * s, r.uniform(0, 2 * np.pi)
    cx, cy, W = r.uniform(0, cv.size), r.uniform(0, cv.size), 0.21 * L
    hull = [(0.5 * L, 0), (0.3 * L, W / 2), (-0.46 * L, W / 2), (-0.5 * L, 0.35 * W),
            (-0.5 * L, -0.35 * W), (-0.46 * L, -W / 2), (0.3 * L, -W / 2)]
    bridge = _rect(-0.3 * L, 0, 0.15 * L, 0.7 * W)
    cargo = [_rect(x * L, 0, 0.1 * L, 0.6 * W) for x in (-0.12, 0.0, 0.12)]
    return dict(hull=_xform(hull, cx, cy, ang), bridge=_xform(bridge, cx, cy, ang),
                cargo=[_xform(c, cx, cy, ang) for c in cargo], foot=[_xform(hull, cx, cy, ang)])
  params = _place(cv, rng, "ship", make, allowed)
  if params is None:
    return
  cv.paint(_shift(params["hull"], 4 * s, 4 * s), (20, 40, 60))
  cv.shape(params["hull"], _col((205, 200, 195), rng, 15))
  cv.paint(params["bridge"], (245, 245, 245))
  palette = [(170, 60, 50), (60, 100, 160), (200, 150, 60), (90, 140, 90)]
  for c in params["cargo"]:
    cv.paint(c, palette[int(rng.integers(len(palette)))])


def _tank(cv, rng, allowed, s):
  def make(r):
    rad, cx, cy = r.uniform(16, 26) * s, r.uniform(0, cv.size), r.uniform(0, cv.size)
    return dict(rad=rad, cx=cx, cy=cy, foot=[_ellipse(cx, cy, rad, rad)])
  p = _place(cv, rng, "storage tank", make, allowed)
  if p is None:
    return
  rad, cx, cy = p["rad"], p["cx"], p["cy"]
  cv.paint(_ellipse(cx + 0.3 * rad, cy + 0.3 * rad, rad, rad), (55, 58, 55))
  cv.shape(p["foot"][0], _col((150, 152, 155), rng, 8))
  cv.paint(_ellipse(cx, cy, rad - 3.5 * s, rad - 3.5 * s), _col((232, 232, 228), rng, 8))
  cv.paint(_ellipse(cx, cy, 2.5 * s, 2.5 * s), (120, 120, 120))


def _building(cv, rng, allowed, s):
  def make(r):
    w, h = r.uniform(38, 72) * s, r.uniform(30, 58) * s
    ang = r.choice([0.0, np.pi / 2]) + r.uniform(-0.12, 0.12)
    cx, cy = r.uniform(0, cv.size), r.uniform(0, cv.size)
    return dict(w=w, h=h, ang=ang, cx=cx, cy=cy, foot=[_rect(cx, cy, w, h, ang)])
  p = _place(cv, rng, "building", make, allowed)
  if p is None:
    return
  roofs = [(175, 85, 62), (112, 116, 128), (198, 178, 148), (84, 110, 140), (150, 60, 55)]
  roof = _col(roofs[int(rng.integers(len(roofs)))], rng, 10)
  d = 0.22 * min(p["w"], p["h"])
  cv.paint(_shift(p["foot"][0], d, d), (45, 45, 48))
  cv.shape(p["foot"][0], roof)
  half = _rect(p["cx"], p["cy"], p["w"], p["h"] / 2, p["ang"])
  half = _xform([(x, y + p["h"] / 4) for x, y in
                 [(-p["w"] / 2, -p["h"] / 4), (p["w"] / 2, -p["h"] / 4), (p["w"] / 2, p["h"] / 4),
                  (-p["w"] / 2, p["h"] / 4)]], p["cx"], p["cy"], p["ang"])
  cv.paint(half, tuple(max(c - 28, 0) for c in roof))


def _road(cv, rng, s, horizontal, allowed):
  """A straight road across the scene; returns its bool area (for vehicles) or None."""
  w = rng.uniform(20, 28) * s
  for _ in range(30):
    c = rng.uniform(0.15, 0.85) * cv.size
    n = cv.size
    poly = [(-1, c - w / 2), (n, c - w / 2), (n, c + w / 2), (-1, c + w / 2)]
    if not horizontal:
      poly = [(y, x) for x, y in poly]
    fp = cv.footprint([poly])
    if (fp & ~allowed).sum() == 0:                     # roads come first and may cross
      break
  else:
    return None
  cv.objects.append(("road", ()))
  cv.shape(poly, _col((68, 68, 72), rng, 6))
  for x0 in np.arange(0, n, 16 * s):                   # dashed centre line
    dash = [(x0, c - 1.2 * s), (x0 + 8 * s, c - 1.2 * s), (x0 + 8 * s, c + 1.2 * s), (x0, c + 1.2 * s)]
    cv.paint(dash if horizontal else [(y, x) for x, y in dash], (215, 205, 120))
  cv.blocked |= fp                                      # others avoid it; vehicles use `fp` instead
  return fp, c, w


def _vehicle(cv, rng, allowed, s, road=None):
  def make(r):
    if road is not None:
      fp, c, w, horizontal = road
      along, lane = r.uniform(0, cv.size), c + r.choice([-1, 1]) * w / 4
      cx, cy = (along, lane) if horizontal else (lane, along)
      ang = (0.0 if horizontal else np.pi / 2) + r.choice([0, np.pi])
    else:
      cx, cy, ang = r.uniform(0, cv.size), r.uniform(0, cv.size), r.uniform(0, 2 * np.pi)
    return dict(cx=cx, cy=cy, ang=ang, foot=[_rect(cx, cy, 28 * s, 14 * s, ang)])
  # on a road: inside the road, clear of the other road vehicles (the road itself blocks everything else)
  p = _place(cv, rng, "vehicle", make, allowed if road is None else road[0], tries=40, margin=2,
             blocked=None if road is None else cv.vehicle_blocked, pad=3)
  if p is None:
    return
  cv.vehicle_blocked |= cv.grown(p["foot"], 3)
  colors = [(200, 40, 40), (240, 200, 40), (40, 90, 200), (240, 240, 240), (30, 30, 30), (40, 160, 90)]
  col = colors[int(rng.integers(len(colors)))]
  cv.paint(_shift(p["foot"][0], 2 * s, 2 * s), (35, 35, 35))
  cv.shape(p["foot"][0], col)
  cv.paint(_xform([(5 * s, -5 * s), (9 * s, -5 * s), (9 * s, 5 * s), (5 * s, 5 * s)], p["cx"], p["cy"], p["ang"]),
           (40, 50, 60))


def _track_field(cv, rng, allowed, s):
  def make(r):
    a = r.uniform(135, 165) * s
    b = 0.6 * a
    ang = r.choice([0.0, np.pi / 2]) + r.uniform(-0.2, 0.2)
    cx, cy = r.uniform(0, cv.size), r.uniform(0, cv.size)
    t = 0.13 * b
    return dict(outer=_xform(_stadium(a, b), cx, cy, ang), inner=_xform(_stadium(a - 2 * t, b - 2 * t), cx, cy, ang),
                lanes=[_xform(_stadium(a - k * t / 2, b - k * t / 2), cx, cy, ang) for k in (1, 2, 3)],
                line=_xform([(-0.5 * s, -(b / 2 - t)), (0.5 * s, -(b / 2 - t)), (0.5 * s, b / 2 - t),
                             (-0.5 * s, b / 2 - t)], cx, cy, ang),
                circle=_ellipse(cx, cy, 0.12 * b, 0.12 * b),
                foot=[_xform(_stadium(a, b), cx, cy, ang)])
  p = _place(cv, rng, "ground track field", make, allowed)
  if p is None:
    return
  track = _col((178, 82, 62), rng, 10)
  cv.shape(p["outer"], track, part=1)
  for lane in p["lanes"]:
    cv.draw.line(lane + lane[:1], fill=(230, 220, 215), width=1)
  cv.shape(p["inner"], _col((72, 142, 70), rng, 10), part=2)
  cv.draw.line(p["line"][:2], fill=(235, 235, 235), width=1)
  cv.draw.line(p["circle"] + p["circle"][:1], fill=(235, 235, 235), width=1)
  cv.draw.line([((p["line"][0][0] + p["line"][1][0]) / 2, (p["line"][0][1] + p["line"][1][1]) / 2),
                ((p["line"][2][0] + p["line"][3][0]) / 2, (p["line"][2][1] + p["line"][3][1]) / 2)],
               fill=(235, 235, 235), width=1)


def _court(cv, rng, allowed, s, cls):
  w, h = ((96, 46) if cls == "tennis court" else (100, 56))
  def make(r):
    k = r.uniform(0.9, 1.1) * s
    ang = r.choice([0.0, np.pi / 2]) + r.uniform(-0.1, 0.1)
    cx, cy = r.uniform(0, cv.size), r.uniform(0, cv.size)
    return dict(cx=cx, cy=cy, ang=ang, w=w * k, h=h * k, foot=[_rect(cx, cy, w * k, h * k, ang)])
  p = _place(cv, rng, cls, make, allowed)
  if p is None:
    return
  cx, cy, ang, W, H = p["cx"], p["cy"], p["ang"], p["w"], p["h"]
  white = (240, 240, 240)
  if cls == "tennis court":
    surface = [(62, 128, 84), (52, 92, 150)][int(rng.integers(2))]
    cv.shape(p["foot"][0], _col(surface, rng, 8))
    for poly in (_rect(cx, cy, W - 8 * s, H - 8 * s, ang), _rect(cx, cy, 0.5 * W, H - 8 * s, ang)):
      cv.draw.line(poly + poly[:1], fill=white, width=max(1, int(s)))
    net = _xform([(0, -H / 2 + 2 * s), (0, H / 2 - 2 * s)], cx, cy, ang)
    cv.draw.line(net, fill=(30, 30, 30), width=max(2, int(2 * s)))
  else:
    cv.shape(p["foot"][0], _col([(206, 142, 86), (186, 104, 70)][int(rng.integers(2))], rng, 8))
    out = _rect(cx, cy, W - 6 * s, H - 6 * s, ang)
    cv.draw.line(out + out[:1], fill=white, width=max(1, int(s)))
    cv.draw.line(_xform([(0, -H / 2 + 3 * s), (0, H / 2 - 3 * s)], cx, cy, ang), fill=white, width=max(1, int(s)))
    c = _ellipse(cx, cy, 0.15 * H, 0.15 * H)
    cv.draw.line(c + c[:1], fill=white, width=max(1, int(s)))
    for sx in (-1, 1):
      key = _xform(_rect(sx * (W / 2 - 3 * s - 0.1 * W), 0, 0.2 * W, 0.3 * H), cx, cy, ang)
      cv.paint(key, (160, 70, 50))


# Scenes --------------------------------------------------------------------------------------------

def draw_scene(kind: str, rng: np.random.Generator, size: int = 256) -> Scene:
  s = size / 256.0
  everywhere = np.ones((size, size), bool)
  noise_rng = np.random.default_rng(rng.integers(2**63))
  if kind == "airport":
    cv = _Canvas(np.clip(_tarmac(rng, size), 0, 255).astype(np.uint8))
    _yellow_lines(cv, rng, s)
    for _ in range(int(rng.integers(1, 3))):
      _airplane(cv, rng, everywhere, s)
    if rng.random() < 0.5:
      _building(cv, rng, everywhere, s)
    for _ in range(int(rng.integers(2, 5))):
      _vehicle(cv, rng, everywhere, s)
  elif kind == "harbour":
    water = _water_region(rng, size)
    rgb = _land(rng, size) if rng.random() < 0.5 else _urban(rng, size)
    wb = _background(rng, size, _col((36, 72, 108), rng, 8), 5.0)
    rgb[water] = wb[water]
    cv = _Canvas(np.clip(rgb, 0, 255).astype(np.uint8))
    land, sea = ~_dilate(water, 4), ~_dilate(~water, 4)     # keep objects off the coast line
    for _ in range(int(rng.integers(2, 4))):
      _ship(cv, rng, sea, s)
    for _ in range(int(rng.integers(2, 5))):
      _tank(cv, rng, land, s)
  elif kind == "city":
    cv = _Canvas(np.clip(_urban(rng, size), 0, 255).astype(np.uint8))
    roads = _roads(cv, rng, s, everywhere, int(rng.integers(1, 3)))
    for _ in range(int(rng.integers(3, 6))):
      _building(cv, rng, everywhere, s)
    _road_vehicles(cv, rng, s, roads, int(rng.integers(2, 5)))
  elif kind == "sports":
    cv = _Canvas(np.clip(_land(rng, size), 0, 255).astype(np.uint8))
    roads = _roads(cv, rng, s, everywhere, int(rng.random() < 0.5))
    if rng.random() < 0.65:
      _track_field(cv, rng, everywhere, s)
    for cls in ("tennis court", "basketball court"):
      for _ in range(int(rng.integers(0, 3))):
        _court(cv, rng, everywhere, s, cls)
    if len(cv.objects) - len(roads) < 2:
      _court(cv, rng, everywhere, s, "tennis court")
      _court(cv, rng, everywhere, s, "basketball court")
    for _ in range(int(rng.integers(0, 2))):
      _building(cv, rng, everywhere, s)
    _road_vehicles(cv, rng, s, roads, int(rng.integers(0, 3)))
  elif kind == "industrial":
    cv = _Canvas(np.clip(_land(rng, size) if rng.random() < 0.5 else _urban(rng, size), 0, 255).astype(np.uint8))
    roads = _roads(cv, rng, s, everywhere, 1)
    for _ in range(int(rng.integers(3, 7))):
      _tank(cv, rng, everywhere, s)
    for _ in range(int(rng.integers(1, 3))):
      _building(cv, rng, everywhere, s)
    _road_vehicles(cv, rng, s, roads, int(rng.integers(0, 3)))
  else:
    raise ValueError(f"unknown scene type {kind!r}")
  return cv.finish(kind, noise_rng)


def _dilate(m, r):
  """Square dilation of a bool mask by r pixels (separable max)."""
  out = m.copy()
  for axis in (0, 1):
    src = out.copy()
    for d in range(1, r + 1):
      if axis == 0:
        out[d:] |= src[:-d]
        out[:-d] |= src[d:]
      else:
        out[:, d:] |= src[:, :-d]
        out[:, :-d] |= src[:, d:]
  return out


def _yellow_lines(cv, rng, s):
  for _ in range(2):
    y = rng.uniform(0.1, 0.9) * cv.size
    cv.draw.line([(0, y), (cv.size, y + rng.uniform(-20, 20))], fill=(205, 180, 70), width=max(1, int(2 * s)))


def _roads(cv, rng, s, allowed, n):
  out, horizontal = [], bool(rng.random() < 0.5)
  for _ in range(n):
    got = _road(cv, rng, s, horizontal, allowed)
    if got is not None:
      out.append(got + (horizontal,))
    horizontal = not horizontal
  return out


def _road_vehicles(cv, rng, s, roads, n):
  if not roads:
    return
  for i in range(n):
    _vehicle(cv, rng, None, s, road=roads[i % len(roads)])
