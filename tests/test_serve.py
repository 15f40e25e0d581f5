"""`segearth serve` driven through gradio_client: a tiny random model, steered to answer with two [SEG]s, served
in-process on 127.0.0.1. An upload gives the same answer and masks as `segearth predict`; bad input gives a
message and the next request still works; a GeoTIFF gives georeferenced masks and targets.geojson. The
`served` fixture (one server per session) is shared with test_serve_browser.py."""
from __future__ import annotations

import io
import json
import os
import socket
import struct
import sys
import urllib.error
import urllib.request
import zipfile
import zlib

import jax
import numpy as np
import pytest
import rasterio
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from test_torch_export import steer
from train_fixtures import tiny_config

from segearth_jax import cli, geo
from segearth_jax import serve as serve_mod
from segearth_jax import sharding as shd
from segearth_jax.data import rle
from segearth_jax.data.tokenizer import load_tokenizer
from segearth_jax.errors import UserError
from segearth_jax.model_setup import ModelSetup
from segearth_jax.toy.release import write_toy_laserss
from segearth_jax.weights import save_weights

MAX_PIXELS = 100_000     # toy scenes are 256 x 256 = 65,536 pixels
INSTRUCTION = "segment the ships"


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def random_params(setup: ModelSetup, seed: int = 0):
  """Numpy params of the model's shapes (norm scales 1, biases 0, the rest small normal): no init compile."""
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']"):
      return np.ones(x.shape, x.dtype)
    if name.endswith("['bias']"):
      return np.zeros(x.shape, x.dtype)
    return (0.05 * rng.standard_normal(x.shape)).astype(x.dtype)

  return jax.tree_util.tree_map_with_path(leaf, setup.abstract_params)


def make_served(root) -> dict:
  """A toy release (its tokenizer makes the model 'the demo's': examples shown), a weights folder of a steered
  tiny model, and the app serving it."""
  release = str(root / "release")
  write_toy_laserss(release, images=5, seed=0, test_images=3, val_images=1)
  tok = load_tokenizer(os.path.join(release, "tokenizer"))
  config = tiny_config(f"--config.data.tokenizer={release}/tokenizer", "--config.infer.max_new_tokens=6")
  setup = ModelSetup.create(config, mesh=shd.single_device_mesh(), vocab_size=len(tok))
  params = random_params(setup)
  steer(params, tok, np.random.default_rng(0))   # greedy answers [SEG] A [SEG] A ...: two masks
  weights = str(root / "weights")
  save_weights(params, config, weights)
  images = sorted(os.listdir(os.path.join(release, "test", "images")))
  server = serve_mod.start(weights, host="127.0.0.1", port=free_port(), max_pixels=MAX_PIXELS)
  return dict(server=server, weights=weights, image=os.path.join(release, "test", "images", images[0]))


_SERVED: dict = {}


@pytest.fixture(scope="session")
def served(tmp_path_factory):
  """One server per session: test_serve_browser.py imports this fixture, which gives it a fixture of its own,
  so the server is kept here; the first user made it and closes it last (session teardown runs in reverse)."""
  first = not _SERVED
  if first:
    _SERVED.update(make_served(tmp_path_factory.mktemp("serve")))
  yield _SERVED
  if first:
    tmp_dir = _SERVED["server"].tmp_dir
    _SERVED.pop("server").close()
    assert not os.path.exists(tmp_dir)   # uploads and results are gone with the server


@pytest.fixture(scope="module")
def client(served):
  return Client(served["server"].url, verbose=False)


def segment(client, path, instruction):
  return client.predict(handle_file(path), instruction, api_name="/segment")


def png_header_only(width: int, height: int) -> bytes:
  """A PNG whose header declares width x height but holds one row: a decompression bomb's header."""
  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
          + chunk(b"IDAT", zlib.compress(b"\x00" * (3 * width + 1))) + chunk(b"IEND", b""))


def test_upload_matches_segearth_predict(served, client, tmp_path):
  overlay, answer, table, files = segment(client, served["image"], INSTRUCTION)
  out = tmp_path / "predict"
  assert cli.main(["predict", "--weights", served["weights"], "--image", served["image"],
                   "--instruction", INSTRUCTION, "--out", str(out)]) == 0
  want = json.loads((out / "prediction.json").read_text())
  by_name = {os.path.basename(f): f for f in files}
  got = json.loads(open(by_name["prediction.json"]).read())
  assert len(want["masks"]) == 2                                  # the steered model's two [SEG]s
  assert got == want                                              # answer, phrases, RLE masks, scores
  with zipfile.ZipFile(by_name["masks.zip"]) as z:
    assert sorted(z.namelist()) == ["mask_0.png", "mask_1.png"]
    for k, name in enumerate(sorted(z.namelist())):
      ours = np.asarray(Image.open(io.BytesIO(z.read(name))))
      theirs = np.asarray(Image.open(out / name))
      np.testing.assert_array_equal(ours, theirs)
      assert ours.any() and not ours.all()                        # a real mask, not empty or full
      assert rle.encode(ours > 127) == want["masks"][k]
  np.testing.assert_array_equal(np.asarray(Image.open(overlay)), np.asarray(Image.open(out / "overlay.png")))
  # each [SEG] of the answer labelled like its mask, in the mask's palette colour
  labels = [span["class_or_confidence"] for span in answer["value"] if span["token"] == "[SEG]"]
  assert labels[:2] == [f"1: {want['phrases'][0]}", f"2: {want['phrases'][1]}"]
  assert "".join(span["token"] for span in answer["value"]) == want["answer"]
  assert table["data"] == [[k + 1, p, round(s, 3), int(rle.decode(m).sum())]
                           for k, (p, s, m) in enumerate(zip(want["phrases"], want["scores"], want["masks"]))]


def test_geotiff_gives_georeferenced_masks_and_geojson(served, client, tmp_path):
  scene = tmp_path / "scene.tif"
  crs, transform = "EPSG:32633", (0.5, 0.0, 500000.0, 0.0, -0.5, 4000000.0)
  geo.write_geotiff(scene, np.asarray(Image.open(served["image"]))[:64, :64], crs=crs, transform=transform)
  _, answer, table, files = segment(client, str(scene), INSTRUCTION)
  by_name = {os.path.basename(f): f for f in files}
  assert sorted(by_name) == ["masks.zip", "prediction.json", "targets.geojson"]
  features = json.loads(open(by_name["targets.geojson"]).read())["features"]
  assert len(features) == len(table["data"]) == 2
  with zipfile.ZipFile(by_name["masks.zip"]) as z:
    assert sorted(z.namelist()) == ["mask_0.tif", "mask_1.tif"]
    z.extractall(tmp_path / "masks")
  with rasterio.open(tmp_path / "masks" / "mask_0.tif") as ds:
    assert ds.crs.to_string() == crs and ds.transform[2] == 500000.0 and ds.shape == (64, 64)


@pytest.mark.parametrize("case", ["text file", "not an image", "not a raster", "too many pixels", "bomb",
                                  "empty instruction"])
def test_bad_input_gives_a_message_and_serving_goes_on(served, client, tmp_path, case):
  instruction = INSTRUCTION
  if case == "text file":
    path, message = tmp_path / "notes.txt", "Invalid file type"
    path.write_text("hello")
  elif case == "not an image":
    path, message = tmp_path / "fake.png", "not an image that can be read"
    path.write_text("hello")
  elif case == "not a raster":
    path, message = tmp_path / "fake.tif", "fake.tif: not a raster rasterio can read"
    path.write_text("hello")
  elif case == "too many pixels":
    path, message = tmp_path / "big.png", "160,000 pixels is over the limit"
    Image.new("RGB", (400, 400)).save(path)
  elif case == "bomb":
    path, message = tmp_path / "bomb.png", "refused, its header declares more pixels than PIL's limit"
    path.write_bytes(png_header_only(100_000, 100_000))
  else:
    path, message, instruction = served["image"], "Type an instruction", "   "
  with pytest.raises(AppError, match=message):
    segment(client, str(path), instruction)
  _, answer, _, _ = segment(client, served["image"], INSTRUCTION)     # the next good request works
  assert answer["value"]


def test_served_on_loopback_with_toy_examples(served):
  server = served["server"]
  assert server.url.startswith("http://127.0.0.1:")
  assert os.path.dirname(os.environ["GRADIO_TEMP_DIR"]) == server.tmp_dir   # gradio's uploads + cache
  uploaded = [f for _, _, files in os.walk(server.tmp_dir) for f in files]
  assert os.path.basename(served["image"]) in uploaded                 # the earlier tests' upload
  # a file outside the temp dir is not served, even one the server itself read
  outside = os.path.join(served["weights"], "config.json")
  with pytest.raises(urllib.error.HTTPError) as e:
    urllib.request.urlopen(f"{server.url}gradio_api/file={outside}")
  assert e.value.code in (403, 404)
  assert len(os.listdir(os.path.join(server.tmp_dir, "examples"))) == 3   # the release's 3 test scenes
  assert serve_mod.is_loopback("127.0.0.1") and serve_mod.is_loopback("::1")
  assert not serve_mod.is_loopback("0.0.0.0")


def test_missing_gradio_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "gradio", None)   # import gradio -> ImportError
  with pytest.raises(UserError, match=r"pip install segearth_jax\[serve\]"):
    serve_mod.import_gradio()


def test_serve_command_line_defaults():
  args = cli.build_parser().parse_args(["serve", "--weights", "W"])
  assert (args.host, args.port, args.handler) == ("127.0.0.1", 7860, "segearth_jax.serve:cli_main")
