"""The Python API: a trained model as a callable, batched over local devices, and large scenes tiled.

    segmenter = Segmenter.from_pretrained("runs/demo/train")        # weights folder or training workdir
    seg = segmenter(image, "the largest aircraft")                  # HxWx3 uint8 or a path -> Segmentation
    segs = segmenter([img_a, "b.tif"], ["the ships", "the roads"])   # lists -> list, one batched call
    segmenter.segment_scene("scene.tif", "all the airplanes", "out/")  # GeoTIFF -> georeferenced files

Segmentation: answer (text), phrases, masks (bool, the input's H x W, one per generated [SEG]), scores (the
mean sigmoid probability inside each mask on the canvas, 0.0 for an empty mask), rles (COCO RLE of the
masks), tokens (generated ids).

Batching: the mesh puts every given device on the data axis (fsdp = tensor = 1; params replicated).
Requests go in chunks of at most ``batch_size`` rows (default one per device), each chunk padded to a
multiple of the device count (the padding rows are dropped). Prefill, generation and the mask head are
predict.make_predict_fn, compiled once per (rows, text bucket) shape and kept (``compiles`` counts them).

segment_scene (tiling.py for the windows): tiles 'off' answers and segments the scene resized to the canvas
(masks upsampled, nearest); 'on' answers once on that overview, then runs the mask head with the answer's
[SEG] states on canvas-sized windows of the full-resolution scene (windowed reads, padded with the
letterbox value at the edge, the same Swin normalisation), blends the logits in the overlaps and writes
each target window strip by strip: host memory holds one strip of windows, whatever the scene's size.
'auto' tiles when the scene's longer side exceeds the canvas. ``tile_check``: the mask head, trained on images
that hold their target, marks the most target-like thing in a window that holds none; with the check each
window also answers the instruction itself (one generation per window) and a window whose answer has no
[SEG] contributes NO_TARGET_LOGIT: right for semantic instructions ('all the airplanes'), wrong for ones
about the whole scene ('the largest aircraft', which every window holding an aircraft affirms; the
overview's states still choose which one is segmented). Masks are False on nodata pixels. Written:
mask_{i}.tif (georeferenced input: geo.MaskWriter, the source's CRS and transform) or mask_{i}.png,
targets.geojson (georeferenced input: one feature per [SEG], polygons made strip by strip in pixel
coordinates, merged, simplified, then mapped to the CRS), prediction.json, overlay.png (on the overview).
Scores: tiled, the mean probability inside each full-resolution mask (accumulated strip by strip);
untiled, the overview's canvas scores.

`segearth predict` (``cli_main``): PNG/JPEG/BMP/WebP files as before (mask_i.png, prediction.json,
overlay.png per image), batched; any other raster (GeoTIFF) or ``--tiles on`` goes to segment_scene.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import ml_collections
import numpy as np
from PIL import Image

from segearth_jax import geo
from segearth_jax import sharding as shd
from segearth_jax.config import load_config
from segearth_jax.data import rle
from segearth_jax.data.batch import device_part, global_batch
from segearth_jax.data.preprocess import Preprocessor, as_padding, swin_image, trim_to_bucket
from segearth_jax.data.tokenizer import load_tokenizer
from segearth_jax.errors import UserError
from segearth_jax.model_setup import ModelSetup
from segearth_jax.predict import (IMAGE_SUFFIXES, decode_row, draw_overlay, make_tile_logits_fn, predict_fn_of,
                                  read_image, write_prediction)
from segearth_jax.tiling import stitch_rows, tile_windows
from segearth_jax.weights import load_run_config, restore_params

TILES = ("auto", "off", "on")
LETTERBOX_FILL = 128   # preprocess.swin_image pastes the image on this value: edge windows are padded alike
NODATA_LOGIT = -np.inf  # logits of nodata pixels: every window agrees, so the blend keeps it and the mask is False
# a window that answers "no target" (tile_check): strongly negative but finite, so in an overlap the blend
# still weighs a neighbour that found the target
NO_TARGET_LOGIT = -20.0


@dataclasses.dataclass
class Segmentation:
  answer: str
  phrases: list[str]
  masks: list[np.ndarray]
  scores: list[float]
  rles: list[dict]
  tokens: list[int]

  def to_json(self) -> dict:
    """Everything but the mask arrays (JSON-ready)."""
    return dict(answer=self.answer, phrases=list(self.phrases), scores=[float(s) for s in self.scores],
                rles=list(self.rles), tokens=[int(t) for t in self.tokens])


class Segmenter:
  """A model on a data-parallel mesh of local devices (see the module docstring)."""

  def __init__(self, setup: ModelSetup, params, tokenizer, *, batch_size: int | None = None):
    self.setup, self.config, self.params, self.tokenizer = setup, setup.config, params, tokenizer
    self.pre = Preprocessor(self.config, tokenizer, train=False, source_name="predict")
    self.devices = int(setup.mesh.devices.size)
    want = int(batch_size or self.devices)
    self.batch_size = -(-want // self.devices) * self.devices
    self.canvas = int(setup.model.config.swin.image_size)
    self._predict = predict_fn_of(setup, tokenizer)
    self._tile_logits = make_tile_logits_fn(setup)
    self._compiled = {}
    self._rng = jax.device_put(jax.random.key(int(self.config.infer.seed)), shd.replicated(setup.mesh))

  @classmethod
  def from_pretrained(cls, path: str, *, dtype: str | None = None, devices=None, config=None, overrides=(),
                      batch_size: int | None = None) -> "Segmenter":
    """A weights folder or a training workdir (latest checkpoint). ``dtype``: the compute dtype (e.g.
    'bfloat16'; default the stored one); ``devices``: default jax.local_devices(); ``config``: run under
    this experiment config instead of the stored one; ``overrides`` (``--config.a.b=v``) apply to the
    stored one; ``batch_size``: rows per call to the model (rounded up to a multiple of the devices)."""
    config = config or load_run_config(path, overrides)
    if dtype:
      config = ml_collections.ConfigDict(config.to_dict())
      config.model.dtype = str(dtype)
    devices = list(devices if devices is not None else jax.local_devices())
    tokenizer = load_tokenizer(config.data.tokenizer)
    mesh = shd.make_mesh(len(devices), 1, 1, devices=devices)
    setup = ModelSetup.create(config, mesh=mesh, vocab_size=len(tokenizer))
    params, _ = restore_params(setup, path)
    return cls(setup, params, tokenizer, batch_size=batch_size)

  @property
  def compiles(self) -> int:
    """Distinct (function, input shapes) compiled so far."""
    return len(self._compiled)

  def _run(self, name: str, fn, *args):
    """``fn(*args)`` through an executable compiled once per input shape (kept in ``_compiled``)."""
    key = (name,) + tuple((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(args[1:]))
    with shd.in_mesh(self.setup.mesh):
      if key not in self._compiled:
        self._compiled[key] = fn.lower(*args).compile()
      return jax.device_get(self._compiled[key](*args))

  # -- images and instructions -> Segmentations --------------------------------------------------------

  def __call__(self, images, instructions):
    """One image (HxWx3 uint8 array, a path, or a geo.Scene) and one instruction -> a Segmentation;
    lists (or one instruction for every image) -> a list, in order."""
    single = not isinstance(images, (list, tuple))
    images = [images] if single else list(images)
    if isinstance(instructions, str):
      instructions = [instructions] * len(images)
    instructions = list(instructions)
    if len(instructions) != len(images):
      raise UserError(f"{len(images)} images but {len(instructions)} instructions")
    out = []
    for i in range(0, len(images), self.batch_size):
      rows = [(*load_picture(x), text) for x, text in
              zip(images[i:i + self.batch_size], instructions[i:i + self.batch_size])]
      out += [seg for seg, _ in self._answer(rows)]
    return out[0] if single else out

  def _answer(self, rows) -> list[tuple[Segmentation, dict]]:
    """rows of (rgb uint8 [h,w,3], valid bool [h,w], instruction) -> (Segmentation, this row's raw model
    output) each; at most batch_size rows."""
    examples = [self.pre(dict(id=str(i), image=rgb, masks=[], answer="", instruction=text))
                for i, (rgb, _, text) in enumerate(rows)]
    n = len(examples)
    padded = -(-n // self.devices) * self.devices
    examples += [as_padding(examples[-1])] * (padded - n)
    batch = trim_to_bucket({k: np.stack([e[k] for e in examples]) for k in examples[0]}, self.pre.buckets)
    letterbox = batch["letterbox"]
    out = self._run("predict", self._predict, self.params, global_batch(device_part(batch),
                                                                        self.setup.batch_sharding), self._rng)
    results = []
    for b, (_, valid, _) in enumerate(rows):
      row = {k: v[b] for k, v in out.items()}
      results.append((self._segmentation(row, letterbox[b], valid), row))
    return results

  def _segmentation(self, row: dict, letterbox, valid: np.ndarray) -> Segmentation:
    answer, phrases, masks, tokens = decode_row(self.tokenizer, row, letterbox, valid)
    return Segmentation(answer=answer, phrases=phrases, masks=masks,
                        scores=[float(row["scores"][k]) for k in range(len(masks))],
                        rles=[rle.encode(m) for m in masks], tokens=tokens)

  # -- large scenes --------------------------------------------------------------------------------

  def segment_scene(self, path_or_scene, instruction: str, out_dir: str, *, tiles: str = "auto",
                    overlap: int | None = None, tile_check: bool = False, bands=None,
                    stretch: str = "percentile", simplify: float = 0.0, to_wgs84: bool = False) -> dict:
    """A scene (a path geo.open_scene reads, or a geo.Scene) -> files in ``out_dir`` (module docstring);
    returns the summary written to prediction.json. ``overlap``: pixels between neighbouring windows
    (default canvas // 4); ``tile_check``: each window answers the instruction too and one that finds no
    target stays empty (module docstring); ``simplify``: polygon tolerance in pixels."""
    if tiles not in TILES:
      raise UserError(f"--tiles must be one of {', '.join(TILES)}, got {tiles!r}")
    scene = path_or_scene if isinstance(path_or_scene, geo.Scene) else geo.open_scene(
        path_or_scene, bands=bands, stretch=stretch)
    M, H, W = self.canvas, scene.height, scene.width
    overlap = M // 4 if overlap is None else int(overlap)
    if not 0 <= overlap < M:
      raise UserError(f"--overlap {overlap}: pixels between windows, 0 <= overlap < the canvas ({M})")
    tiled = tiles == "on" or (tiles == "auto" and max(H, W) > M)
    small = max(H, W) <= M
    ov_rgb, ov_valid = scene.read() if small else scene.overview(M)
    (seg, row), = self._answer([(ov_rgb, ov_valid, instruction)])
    n = len(seg.masks)
    os.makedirs(out_dir, exist_ok=True)
    out = _SceneOutput(scene, n, out_dir, ov_rgb.shape[:2], with_polygons=scene.georeferenced)
    with out:
      if tiled and n:
        scores = self._tiled_masks(scene, row, n, overlap, out, instruction if tile_check else None)
      else:
        _upsampled_masks(scene, seg.masks, out)
        scores = seg.scores
    files = out.files
    summary = dict(instruction=instruction, answer=seg.answer, phrases=seg.phrases,
                   scores=[round(float(s), 4) for s in scores], tokens=seg.tokens, tiles="on" if tiled else "off",
                   overlap=overlap if tiled else None, tile_check=bool(tile_check) if tiled else None, size=[H, W],
                   crs=scene.crs.to_string() if scene.georeferenced else None)
    if scene.georeferenced:
      features = [dict(geometry=g, phrase=p, index=i, score=s)
                  for i, (g, p, s) in enumerate(zip(out.geometries(scene.transform, simplify), seg.phrases, scores))]
      path = os.path.join(out_dir, "targets.geojson")
      geo.write_geojson(path, features, scene.crs, to_wgs84=to_wgs84)
      files.append(path)
    else:
      summary["masks"] = [rle.encode(m) for m in out.full]
    overlay = os.path.join(out_dir, "overlay.png")
    draw_overlay(ov_rgb, list(out.overview_masks), seg.phrases,
                 title=f"Q: {instruction}  A: {seg.answer}").save(overlay)
    summary["files"] = files + [overlay, os.path.join(out_dir, "prediction.json")]
    with open(os.path.join(out_dir, "prediction.json"), "w") as f:
      json.dump(summary, f, indent=2)
    return summary

  def _tiled_masks(self, scene, row: dict, n: int, overlap: int, out: "_SceneOutput",
                   check: str | None = None) -> list[float]:
    """The mask head on every window with the overview answer's [SEG] states (``check``: windows whose own
    answer to that instruction has no [SEG] are empty); returns the scores of the full-resolution masks."""
    M = self.canvas
    windows = tile_windows(scene.height, scene.width, M, overlap)
    by_row: dict[int, list] = {}
    for w in windows:
      by_row.setdefault(w[0], []).append(w)
    cached: dict = {}

    def logits_of(win):
      if win not in cached:   # a whole row of windows at once: one batched call per batch_size windows
        cached.clear()
        todo = by_row[win[0]]
        for i in range(0, len(todo), self.batch_size):
          cached.update(zip(todo[i:i + self.batch_size], self._window_logits(scene, todo[i:i + self.batch_size],
                                                                             row, n, check)))
      return cached[win]

    prob_sum, count = np.zeros(n), np.zeros(n)

    def write_rows(row0, logits):
      masks = logits > 0
      prob_sum[:] += np.where(masks, 1.0 / (1.0 + np.exp(-np.where(masks, logits, 0.0))), 0.0).sum((1, 2))
      count[:] += masks.sum((1, 2))
      out.write(row0, masks)

    stitch_rows(windows, logits_of, scene.height, scene.width, n, write_rows)
    return [float(s / c) if c else 0.0 for s, c in zip(prob_sum, count)]

  def _window_logits(self, scene, windows, row: dict, n: int, check: str | None = None) -> list[np.ndarray]:
    """float32 [n, h, w] per window: the mask logits of the first n [SEG] slots (NODATA_LOGIT on invalid
    pixels). ``check``: the instruction, answered on each window first; a window whose own answer has no
    [SEG] gets NO_TARGET_LOGIT everywhere."""
    M = self.canvas
    rows = -(-len(windows) // self.devices) * self.devices
    canvases, valids = [], []
    for r0, c0, h, w in windows:
      rgb, valid = scene.read((r0, c0, h, w))
      canvas = np.full((M, M, 3), LETTERBOX_FILL, np.uint8)
      canvas[:h, :w] = rgb
      canvases.append(canvas)
      valids.append(valid)
    images = np.stack([swin_image(c, M)[0] for c in canvases + [canvases[0]] * (rows - len(windows))])  # padded
    hidden = np.broadcast_to(row["seg_hidden"][None], (rows,) + row["seg_hidden"].shape)
    seg_valid = np.broadcast_to(row["seg_valid"][None], (rows,) + row["seg_valid"].shape)
    host = dict(swin_image=images, seg_hidden=np.ascontiguousarray(hidden), seg_valid=np.ascontiguousarray(seg_valid))
    g = global_batch(host, self.setup.batch_sharding)
    logits = self._run("tile", self._tile_logits, self.params, g["swin_image"], g["seg_hidden"], g["seg_valid"])
    if check is not None:
      answers = self._answer([(c, np.ones((M, M), bool), check) for c in canvases])
      found = np.array([len(seg.masks) > 0 for seg, _ in answers] + [True] * (rows - len(windows)))
      logits = np.where(found[:, None, None, None], logits, np.float32(NO_TARGET_LOGIT))
    out = []
    for i, ((_, _, h, w), valid) in enumerate(zip(windows, valids)):
      win = logits[i, :n, :h, :w]
      out.append(np.where(valid[None], win, np.float32(NODATA_LOGIT)).astype(np.float32))
    return out


def load_picture(image) -> tuple[np.ndarray, np.ndarray]:
  """An HxWx3 uint8 array, a path or a geo.Scene -> (rgb uint8 [h,w,3], valid bool [h,w]). PNG/JPEG/BMP/
  WebP paths read as `segearth predict` always read them; other rasters (GeoTIFF) and other arrays through
  geo.open_scene (bands, stretch, nodata)."""
  if isinstance(image, geo.Scene):
    return image.read()
  if isinstance(image, np.ndarray):
    if image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8:
      return image, np.ones(image.shape[:2], bool)
    return geo.open_scene(image).read()
  path = os.fspath(image)
  if path.lower().endswith(geo.PIL_SUFFIXES):
    rgb = read_image(path)
    return rgb, np.ones(rgb.shape[:2], bool)
  return geo.open_scene(path).read()


def _upsampled_masks(scene, masks: list[np.ndarray], out: "_SceneOutput", rows_per_strip: int = 512):
  """Masks at the overview's size -> the scene's, nearest, strip by strip, False on nodata."""
  if not masks:
    return
  oh, ow = masks[0].shape
  stack = np.stack(masks)
  cols = np.minimum(((np.arange(scene.width) + 0.5) * ow / scene.width).astype(int), ow - 1)
  for r0 in range(0, scene.height, rows_per_strip):
    h = min(rows_per_strip, scene.height - r0)
    src = np.minimum(((np.arange(r0, r0 + h) + 0.5) * oh / scene.height).astype(int), oh - 1)
    valid = scene.valid_mask((r0, 0, h, scene.width))
    out.write(r0, stack[:, src][:, :, cols] & valid[None])


class _SceneOutput:
  """Where a scene's masks go, strip by strip: mask_{i}.tif (georeferenced) or a full array per target
  (mask_{i}.png at close); overview-sized copies for the overlay; per-strip polygons in pixel coordinates."""

  def __init__(self, scene, n: int, out_dir: str, overview_shape, *, with_polygons: bool):
    self.scene, self.n, self.out_dir = scene, n, out_dir
    self.georeferenced = scene.georeferenced
    oh, ow = overview_shape
    self.overview_masks = np.zeros((n, oh, ow), bool)
    # overview pixel -> the scene pixel it shows (nearest)
    self._ov_rows = np.minimum(((np.arange(oh) + 0.5) * scene.height / oh).astype(int), scene.height - 1)
    self._ov_cols = np.minimum(((np.arange(ow) + 0.5) * scene.width / ow).astype(int), scene.width - 1)
    self.with_polygons = with_polygons
    self._polygons = [[] for _ in range(n)]
    self.full = None if self.georeferenced else [np.zeros((scene.height, scene.width), bool) for _ in range(n)]
    self.files = []
    self._writers = []

  def __enter__(self):
    if self.georeferenced:
      for i in range(self.n):
        path = os.path.join(self.out_dir, f"mask_{i}.tif")
        self._writers.append(geo.MaskWriter(path, self.scene).__enter__())
        self.files.append(path)
    return self

  def write(self, row0: int, masks: np.ndarray):
    """masks bool [n, rows, width] of scene rows row0.."""
    rows = masks.shape[1]
    pick = (self._ov_rows >= row0) & (self._ov_rows < row0 + rows)
    for i in range(self.n):
      m = masks[i]
      self.overview_masks[i, pick] = m[self._ov_rows[pick] - row0][:, self._ov_cols]
      if self.georeferenced:
        self._writers[i].write(row0, 0, m)
      else:
        self.full[i][row0:row0 + rows] = m
      if self.with_polygons and m.any():
        self._polygons[i] += [_translated(p, row0) for p in geo.mask_polygons(m, None)]

  def __exit__(self, exc_type, exc, tb):
    for w in self._writers:
      w.__exit__(exc_type, exc, tb)
    if exc_type is None and not self.georeferenced:
      for i, m in enumerate(self.full):
        path = os.path.join(self.out_dir, f"mask_{i}.png")
        Image.fromarray(m.astype(np.uint8) * 255).save(path)
        self.files.append(path)
    return False

  def geometries(self, transform, simplify: float) -> list:
    """Per target: the strips' polygons merged (exact: integer pixel coordinates), simplified by
    ``simplify`` pixels, then mapped through ``transform`` (pixel -> CRS); None when empty."""
    import shapely          # the geo extra (optional), as geo.py imports it
    import shapely.affinity
    matrix = [transform.a, transform.b, transform.d, transform.e, transform.c, transform.f]
    out = []
    for polys in self._polygons:
      if not polys:
        out.append(None)
        continue
      merged = shapely.union_all(polys)
      if simplify > 0:
        merged = merged.simplify(float(simplify), preserve_topology=True)
      out.append(shapely.affinity.affine_transform(merged, matrix))
    return out


def _translated(polygon, rows: int):
  import shapely.affinity   # the geo extra (optional), as geo.py imports it
  return shapely.affinity.translate(polygon, yoff=rows)


# -- segearth predict ----------------------------------------------------------------------------------

def _jobs(args) -> list[tuple[str, str]]:
  if args.jsonl:
    jobs = []
    with open(args.jsonl) as f:
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          rec = json.loads(line)
          jobs.append((rec["image"], rec["instruction"]))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
          raise UserError(f"{args.jsonl}: line {n}: needs {{\"image\": ..., \"instruction\": ...}} ({e})")
    return jobs
  if not args.image:
    raise UserError("give --image (a file or a folder) or --jsonl")
  if not args.instruction:
    raise UserError("give --instruction")
  if os.path.isdir(args.image):
    files = sorted(f for f in os.listdir(args.image) if f.lower().endswith(IMAGE_SUFFIXES))
    if not files:
      raise UserError(f"{args.image}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return [(os.path.join(args.image, f), args.instruction) for f in files]
  return [(args.image, args.instruction)]


def parse_bands(text: str | None) -> list[int] | None:
  """'4,3,2' -> [4, 3, 2] (1-based band numbers)."""
  if not text:
    return None
  try:
    return [int(b) for b in text.split(",")]
  except ValueError:
    raise UserError(f"--bands {text!r}: comma-separated 1-based band numbers, e.g. 4,3,2")


def cli_main(args) -> int:
  jobs = _jobs(args)
  for path, _ in jobs:   # fail before loading the model
    if not os.path.isfile(path):
      raise UserError(f"{path}: no such image file")
  bands = parse_bands(args.bands)
  if args.tiles not in TILES:
    raise UserError(f"--tiles must be one of {', '.join(TILES)}, got {args.tiles!r}")
  plain = [(i, p, t) for i, (p, t) in enumerate(jobs) if p.lower().endswith(geo.PIL_SUFFIXES)
           and args.tiles != "on" and bands is None]
  # rasters opened (headers, bands, stretch statistics) before the model loads: a bad file fails fast
  scenes = [(i, p, t, geo.open_scene(p, bands=bands, stretch=args.stretch))
            for i, (p, t) in enumerate(jobs) if (i, p, t) not in plain]
  # --config runs the stored params under that experiment file; otherwise the run's own config.json,
  # with the --config.a.b=v overrides applied to it
  config = load_config(args.config, args.overrides) if args.config else None
  segmenter = Segmenter.from_pretrained(args.workdir or args.weights, config=config, overrides=args.overrides)

  def out_dir(i, path):
    stem = os.path.splitext(os.path.basename(path))[0]
    return args.out if len(jobs) == 1 else os.path.join(args.out, f"{i:04d}_{stem}")

  done = {}
  for c in range(0, len(plain), segmenter.batch_size):
    chunk = plain[c:c + segmenter.batch_size]
    images = [read_image(p) for _, p, _ in chunk]
    for (i, path, instruction), image, seg in zip(chunk, images, segmenter(images, [t for _, _, t in chunk])):
      overlay = write_prediction(dataclasses.asdict(seg), image, out_dir(i, path), instruction)
      done[i] = dict(image=path, instruction=instruction, answer=seg.answer, masks=len(seg.masks),
                     overlay=overlay)
  for i, path, instruction, scene in scenes:
    summary = segmenter.segment_scene(scene, instruction, out_dir(i, path), tiles=args.tiles,
                                      overlap=args.overlap, tile_check=args.tile_check, simplify=args.simplify,
                                      to_wgs84=args.to_wgs84)
    done[i] = dict(image=path, instruction=instruction, answer=summary["answer"], masks=len(summary["phrases"]),
                   tiles=summary["tiles"], overlay=os.path.join(out_dir(i, path), "overlay.png"))
  for i in sorted(done):
    print(json.dumps(done[i]))
  return 0
