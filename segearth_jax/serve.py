"""`segearth serve`: a local web page to try a model (Gradio; the optional extra `pip install segearth_jax[serve]`).

The page: an image upload (PNG/JPEG/BMP/WebP; TIFF/GeoTIFF through segearth_jax.geo), an instruction box
(with examples: the first toy test scenes and their instructions when the model is the demo's, i.e. its
tokenizer sits in a toy release) and a submit button. A request gives
- the overlay (predict.draw_overlay: each target its palette colour, the phrase legend),
- the answer text with each [SEG] highlighted in its mask's colour, labelled "k: phrase",
- a table of the masks: index, phrase, score (the Segmenter's mean probability inside the mask), pixels,
- downloads: masks.zip and prediction.json, plus targets.geojson for a georeferenced scene: the files
  `segearth predict` writes for that input (masks: mask_{k}.png, 255 = target, the input's size; a GeoTIFF
  gives mask_{k}.tif in its CRS),
and the page names the model, its weights path and the device. The model loads once (Segmenter, first
local device); requests queue and run one at a time; a progress bar shows the stage.

Safe by default: binds 127.0.0.1 (a warning for any other host); gradio refuses uploads over max_file_size
and files whose suffix is not an image type; the pixel count is read from the header and checked against
max_pixels before decoding (a decompression bomb gets a message); bad input (no file, not an image, too
many pixels, an empty instruction) is a gr.Error message on the page and the server keeps serving. Uploads,
results and gradio's cache live in one temp dir (its gradio/ is gradio's upload folder and cache,
GRADIO_TEMP_DIR, set for the server's life; results/ holds a request's files until gradio has copied them
into its cache, dropped when the next request starts) that `Server.close` and process exit remove; gradio
deletes its cached files after an hour; allowed_paths is empty, so the server serves no file from elsewhere.

Python: ``server = start(path, host=, port=)`` (serving in a background thread) -> Server(url, tmp_dir, blocks);
``server.close()``.
"""
from __future__ import annotations

import atexit
import dataclasses
import html
import ipaddress
import json
import os
import shutil
import signal
import sys
import tempfile
import zipfile

import jax
import numpy as np
from PIL import Image

from segearth_jax import geo
from segearth_jax.config import load_config
from segearth_jax.data.answer import SEG_TOKEN
from segearth_jax.errors import UserError
from segearth_jax.predict import IMAGE_SUFFIXES, palette, read_image, write_prediction
from segearth_jax.segment import Segmenter
from segearth_jax.toy.release import MARKER as TOY_MARKER

DEFAULT_MAX_PIXELS = 50_000_000       # a 7000 x 7000 scene; the model sees a canvas-sized copy anyway
DEFAULT_MAX_FILE_SIZE = "50mb"
EXAMPLES = 4


def import_gradio():
  try:
    import gradio
  except ImportError:
    raise UserError("segearth serve needs Gradio: pip install segearth_jax[serve]")
  return gradio


def load_model(path: str, config=None, overrides=()) -> Segmenter:
  """The model once per server, on the first local device: requests run one at a time."""
  return Segmenter.from_pretrained(path, config=config, overrides=overrides, devices=jax.local_devices()[:1])


def run_model(model: Segmenter, path: str, instruction: str, out_dir: str) -> dict:
  """The model call: an image file -> the files `segearth predict` writes for it in out_dir (mask_{k}.png,
  prediction.json, overlay.png; a GeoTIFF: mask_{k}.tif, targets.geojson when georeferenced) and
  dict(answer, phrases, scores, pixels (per mask, None for a scene), overlay, files)."""
  if path.lower().endswith(geo.PIL_SUFFIXES):
    image = read_image(path)
    seg = model(image, instruction)
    overlay = write_prediction(dataclasses.asdict(seg), image, out_dir, instruction)
    return dict(answer=seg.answer, phrases=seg.phrases, scores=seg.scores, pixels=[int(m.sum()) for m in seg.masks],
                overlay=overlay, files=sorted(os.path.join(out_dir, f) for f in os.listdir(out_dir)))
  summary = model.segment_scene(path, instruction, out_dir)
  return dict(answer=summary["answer"], phrases=summary["phrases"], scores=summary["scores"],
              pixels=[None] * len(summary["phrases"]), overlay=os.path.join(out_dir, "overlay.png"),
              files=summary["files"])


def image_pixels(path: str, name: str) -> int:
  """Width x height from the file's header, nothing decoded: PIL for PNG/JPEG/BMP/WebP, rasterio (geo) for
  TIFF/GeoTIFF (its UserError names the file). A header PIL itself calls a decompression bomb, or a file PIL
  cannot identify, is refused."""
  if not path.lower().endswith(geo.PIL_SUFFIXES):
    scene = geo.open_scene(path)
    return scene.height * scene.width
  try:
    with Image.open(path) as im:     # reads the header only
      width, height = im.size
  except Image.DecompressionBombError:
    raise UserError(f"{name}: refused, its header declares more pixels than PIL's limit")
  except Exception:
    raise UserError(f"{name}: not an image that can be read")
  return width * height


def check_image(path: str, name: str, max_pixels: int) -> None:
  """Refuses a file that is not an image type, cannot be read, or declares more than max_pixels, before
  anything is decoded."""
  if not name.lower().endswith(IMAGE_SUFFIXES):
    raise UserError(f"{name}: not an image type (accepted: {', '.join(IMAGE_SUFFIXES)})")
  pixels = image_pixels(path, name)
  if pixels > max_pixels:
    raise UserError(f"{name}: {pixels:,} pixels is over the limit ({max_pixels:,})")


def answer_spans(answer: str, phrases: list[str]) -> list[tuple[str, str | None]]:
  """The answer as gr.HighlightedText spans: the k-th [SEG] labelled 'k: phrase' (one label per mask),
  [SEG]s past the masks and the text between unlabelled."""
  parts = answer.split(SEG_TOKEN)
  spans = []
  for k, text in enumerate(parts):
    if text:
      spans.append((text, None))
    if k < len(parts) - 1:
      spans.append((SEG_TOKEN, mask_label(k, phrases[k]) if k < len(phrases) else None))
  return spans


def mask_label(k: int, phrase: str) -> str:
  return f"{k + 1}: {phrase}"


def hex_color(rgb: tuple[int, int, int]) -> str:
  return "#{:02x}{:02x}{:02x}".format(*rgb)


def toy_examples(config, out_dir: str, n: int = EXAMPLES) -> list[list[str]]:
  """[image path, instruction] of the first n toy test records (distinct scenes, copied into out_dir) when
  the model's tokenizer sits in a toy release (the demo's model); else []."""
  release = os.path.dirname(os.path.abspath(str(config.data.tokenizer)))
  ann_dir = os.path.join(release, "test", "annotations")
  if not (os.path.isfile(os.path.join(release, TOY_MARKER)) and os.path.isdir(ann_dir)):
    return []
  os.makedirs(out_dir, exist_ok=True)
  examples, scenes = [], set()
  for f in sorted(os.listdir(ann_dir)):     # one subset file after another: varied kinds of instruction
    with open(os.path.join(ann_dir, f)) as fh:
      rec = next((r for r in json.load(fh) if r["image_name"] not in scenes), None)
    if rec is None:
      continue
    scenes.add(rec["image_name"])
    dst = os.path.join(out_dir, rec["image_name"])
    shutil.copyfile(os.path.join(release, "test", "images", rec["image_name"]), dst)
    examples.append([dst, rec["description"]])
    if len(examples) == n:
      break
  return examples


def model_summary(model: Segmenter, path: str) -> str:
  """Markdown: the model (sizes), its weights path and the device it runs on."""
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(model.params))
  m = model.config.model
  device = model.setup.mesh.devices.flat[0]
  return (f"**Model** SegEarth-R2, {n_params / 1e6:.1f} M parameters, mask canvas {m.swin.image_size} px, "
          f"at most {m.max_seg} masks  \n**Weights** `{html.escape(os.path.abspath(path))}`  \n"
          f"**Device** {html.escape(f'{device.platform} ({device.device_kind})')}")


def _segment_request(model: Segmenter, results_dir: str, max_pixels: int, gr, file_path, instruction, progress):
  """One page request -> (overlay path, answer spans, table rows, download paths)."""
  if not file_path:
    raise gr.Error("Upload an image first.")
  instruction = (instruction or "").strip()
  if not instruction:
    raise gr.Error("Type an instruction, e.g. 'segment the ships'.")
  name = os.path.basename(file_path)
  # one request at a time (the queue): the previous request's files were copied into gradio's cache
  for old in os.listdir(results_dir):
    shutil.rmtree(os.path.join(results_dir, old), ignore_errors=True)
  out_dir = tempfile.mkdtemp(dir=results_dir)
  try:
    progress(0.05, desc="checking the image")
    check_image(file_path, name, max_pixels)
    progress(0.2, desc="running the model")
    result = run_model(model, file_path, instruction, out_dir)
  except UserError as e:
    raise gr.Error(str(e).replace(file_path, name))
  progress(0.9, desc="packing the masks")
  masks = [f for f in result["files"] if os.path.basename(f).startswith("mask_")]
  masks_zip = os.path.join(out_dir, "masks.zip")
  with zipfile.ZipFile(masks_zip, "w") as z:
    for f in masks:
      z.write(f, os.path.basename(f))
  downloads = [masks_zip] + [f for f in result["files"]
                             if os.path.basename(f) in ("prediction.json", "targets.geojson")]
  colors = palette(len(result["phrases"]))
  color_map = {mask_label(k, p): hex_color(c) for k, (p, c) in enumerate(zip(result["phrases"], colors))}
  rows = [[k + 1, p, "n/a" if s is None else round(float(s), 3), "n/a" if n is None else n]
          for k, (p, s, n) in enumerate(zip(result["phrases"], result["scores"], result["pixels"]))]
  spans = gr.HighlightedText(value=answer_spans(result["answer"], result["phrases"]), color_map=color_map)
  return result["overlay"], spans, rows, downloads


def build_app(model: Segmenter, path: str, tmp_dir: str, *, max_pixels: int = DEFAULT_MAX_PIXELS):
  """The gr.Blocks page of the module docstring, its files under tmp_dir."""
  gr = import_gradio()
  results_dir = os.path.join(tmp_dir, "results")
  os.makedirs(results_dir, exist_ok=True)
  examples = toy_examples(model.config, os.path.join(tmp_dir, "examples"))

  def segment(file_path, instruction, progress=gr.Progress()):
    return _segment_request(model, results_dir, max_pixels, gr, file_path, instruction, progress)

  # analytics off: the page makes no outside request; delete_cache: gradio's cached outputs older than an hour
  with gr.Blocks(title="SegEarth-R2", analytics_enabled=False, delete_cache=(600, 3600)) as blocks:
    gr.Markdown("# SegEarth-R2: language to masks\nUpload a remote-sensing image, type what to segment, "
                "press **Segment**.")
    gr.Markdown(model_summary(model, path), elem_id="model-info")
    with gr.Row():
      with gr.Column():
        image_in = gr.File(label="image (PNG, JPEG, TIFF)", file_types=list(IMAGE_SUFFIXES), type="filepath",
                           elem_id="image-in")
        instruction_in = gr.Textbox(label="instruction", placeholder="segment the ships near the harbour",
                                    lines=2, elem_id="instruction-in")
        button = gr.Button("Segment", variant="primary", elem_id="segment-button")
        if examples:
          gr.Examples(examples, inputs=[image_in, instruction_in], label="toy test scenes")
      with gr.Column():
        overlay_out = gr.Image(label="overlay", type="filepath", interactive=False, elem_id="overlay-out")
        answer_out = gr.HighlightedText(label="answer (each mask token coloured like its mask)", show_legend=True,
                                        combine_adjacent=False, elem_id="answer-out")
        table_out = gr.Dataframe(headers=["#", "phrase", "score", "pixels"], label="masks", interactive=False,
                                 elem_id="masks-out")
        files_out = gr.File(label="downloads", file_count="multiple", interactive=False, elem_id="files-out")
    button.click(segment, [image_in, instruction_in], [overlay_out, answer_out, table_out, files_out],
                 api_name="segment", concurrency_limit=1)
  return blocks.queue(default_concurrency_limit=1, max_size=32)


@dataclasses.dataclass
class Server:
  """A running page: ``url``, ``tmp_dir`` (uploads + results, removed by close), the gr.Blocks."""
  blocks: object
  url: str
  tmp_dir: str
  _env_before: str | None

  def close(self) -> None:
    if self.blocks is not None:
      self.blocks.close()
    shutil.rmtree(self.tmp_dir, ignore_errors=True)
    if self._env_before is None:
      os.environ.pop("GRADIO_TEMP_DIR", None)
    else:
      os.environ["GRADIO_TEMP_DIR"] = self._env_before


def is_loopback(host: str) -> bool:
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def start(path: str, *, host: str = "127.0.0.1", port: int = 7860, config=None, overrides=(),
          max_pixels: int = DEFAULT_MAX_PIXELS, max_file_size: str | int = DEFAULT_MAX_FILE_SIZE) -> Server:
  """Loads the model once (a weights folder or a training workdir) and serves the page on host:port in a
  background thread (``server.blocks.block_thread()`` waits on it)."""
  import_gradio()
  if not is_loopback(host):
    print(f"segearth serve: warning: listening on {host}: anyone who can reach this machine can upload "
          f"files and run the model", file=sys.stderr)
  model = load_model(path, config, overrides)
  tmp_dir = tempfile.mkdtemp(prefix="segearth_serve_")
  atexit.register(shutil.rmtree, tmp_dir, True)
  env_before = os.environ.get("GRADIO_TEMP_DIR")
  # gradio's upload folder + cache (read while serving); our results sit beside it, so gradio copies them in
  os.environ["GRADIO_TEMP_DIR"] = os.path.join(tmp_dir, "gradio")
  server = Server(None, "", tmp_dir, env_before)
  try:
    server.blocks = build_app(model, path, tmp_dir, max_pixels=max_pixels)
    server.blocks.launch(server_name=host, server_port=port, max_file_size=max_file_size, allowed_paths=[],
                         prevent_thread_lock=True, show_error=True, quiet=True, share=False, inbrowser=False,
                         ssr_mode=False)
  except OSError as e:
    server.close()
    raise UserError(f"cannot listen on {host}:{port} ({e}); pick another --port")
  server.url = server.blocks.local_url
  return server


def _interrupt(signum, frame):
  raise KeyboardInterrupt


def cli_main(args) -> int:
  signal.signal(signal.SIGTERM, _interrupt)   # a service manager's stop cleans up like Ctrl-C
  config = load_config(args.config, args.overrides) if args.config else None
  server = start(args.workdir or args.weights, host=args.host, port=args.port, config=config,
                 overrides=args.overrides, max_pixels=args.max_pixels, max_file_size=args.max_file_size)
  print(f"segearth serve: {server.url} (Ctrl-C stops)", flush=True)
  try:
    server.blocks.block_thread()
  finally:
    server.close()
  return 0
