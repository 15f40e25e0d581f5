"""Tests run on 8 fake CPU devices (for the sharding tests) with float32 'highest' matmul precision
(parity tests compare against transformers' PyTorch modules in float32).

One persistent XLA compilation cache per test session (a fresh temp folder, removed at the end; the
subprocess tests inherit it): the same tiny step built by several tests or processes compiles once, so
`make test` stays within its time on 2 cores. Nothing from an earlier session is reused."""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="segearth-test-xla-cache-")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def repo_root():
  return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def toy_dataset(tmp_path_factory):
  """A small toy LaSeRS, built into TFDS once per test session: dict(manual_dir, data_dir, tokenizer)."""
  from segearth_jax.toy.release import write_toy_laserss
  from tfds_laserss.build import build

  root = tmp_path_factory.mktemp("toy")
  manual = root / "release"
  write_toy_laserss(str(manual), images=30, seed=0)
  build("laserss", manual_dir=str(manual), data_dir=str(root / "tfds"))
  return dict(manual_dir=str(manual), data_dir=str(root / "tfds"), tokenizer=str(manual / "tokenizer"))
