"""The package's import graph, read from the source (ast): no cycles, and imports run one way.

  entry points (cli, demo, bench, aot, serve -> segment -> train, evaluate, predict)
    -> model_setup / weights / generate / data / toy / convert / geo, tiling
    -> models -> models.layers, sharding, presets, errors
models/ never imports data/, toy/, convert/, train, evaluate, predict, segment, serve, geo; convert/ never
imports train, evaluate, predict, segment, serve; data/ never imports models/; geo and tiling (the scene I/O
and the window arithmetic) import no model. Project imports sit at module top (a function-body import hides an
edge of this graph), except the TFDS builders, which pull in tensorflow_datasets.
"""
from __future__ import annotations

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("segearth_jax", "tfds_laserss")
LAZY_OK = ("tfds_laserss",)   # heavy optional: tensorflow_datasets


def _module_name(path: str) -> str:
  rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
  return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _modules() -> dict[str, str]:
  out = {}
  for pkg in PACKAGES:
    for root, _, files in os.walk(os.path.join(REPO, pkg)):
      for f in files:
        if f.endswith(".py"):
          out[_module_name(os.path.join(root, f))] = os.path.join(root, f)
  return out


def _imports(path: str, name: str, known: set[str]):
  """(imported project module, line, inside a function?) for each import statement of the file."""
  tree = ast.parse(open(path).read(), path)
  is_pkg = path.endswith("__init__.py")
  funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
  in_func = {id(n) for f in funcs for n in ast.walk(f) if n is not f}
  for node in ast.walk(tree):
    targets = []
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:   # relative: resolve against this module's package
        base = name.split(".") if is_pkg else name.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        mod = ".".join(base + ([node.module] if node.module else []))
      else:
        mod = node.module or ""
      # `from pkg import sub` depends on pkg.sub (a name from a module counts as that module)
      targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
    for t in targets:
      # the longest known module the import names
      parts = t.split(".")
      for i in range(len(parts), 0, -1):
        cand = ".".join(parts[:i])
        if cand in known:
          if cand != name:
            yield cand, node.lineno, id(node) in in_func
          break


def _graph():
  mods = _modules()
  known = set(mods)
  edges = {m: {} for m in mods}
  lazy = []
  for m, path in mods.items():
    for dep, line, inside in _imports(path, m, known):
      edges[m].setdefault(dep, line)
      if inside and not dep.startswith(LAZY_OK):
        lazy.append(f"{os.path.relpath(path, REPO)}:{line} imports {dep} inside a function")
  return mods, edges, lazy


def _cycles(edges) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in edges[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(edges):
    if v not in index:
      visit(v)
  return out


def _in(mod: str, *prefixes: str) -> bool:
  return any(mod == p or mod.startswith(p + ".") for p in prefixes)


FORBIDDEN = [
    # (importer, imported, why)
    (("segearth_jax.models",), ("segearth_jax.data", "segearth_jax.toy", "segearth_jax.convert",
                                "segearth_jax.train", "segearth_jax.evaluate", "segearth_jax.predict",
                                "segearth_jax.weights", "segearth_jax.model_setup", "tfds_laserss",
                                "segearth_jax.segment", "segearth_jax.serve", "segearth_jax.geo"),
     "models/ is below data, conversion and the entry points"),
    (("segearth_jax.convert",), ("segearth_jax.train", "segearth_jax.evaluate", "segearth_jax.predict",
                                 "segearth_jax.bench", "segearth_jax.demo", "segearth_jax.aot",
                                 "segearth_jax.segment", "segearth_jax.serve"),
     "converters never import trainers, eval or predict"),
    (("segearth_jax.data", "tfds_laserss"), ("segearth_jax.models",), "data never imports models"),
    (("segearth_jax.weights", "segearth_jax.model_setup", "segearth_jax.checkpointing"),
     ("segearth_jax.train", "segearth_jax.evaluate", "segearth_jax.predict", "segearth_jax.convert"),
     "our on-disk params sit below the trainer and the converters"),
    (("segearth_jax.geo", "segearth_jax.tiling"),
     ("segearth_jax.models", "segearth_jax.model_setup", "segearth_jax.predict", "segearth_jax.segment",
      "segearth_jax.serve"), "scene I/O and window arithmetic know no model"),
    (("segearth_jax.predict", "segearth_jax.segment", "segearth_jax.evaluate", "segearth_jax.train"),
     ("segearth_jax.serve",), "the page sits on the inference API, never below it"),
]


@pytest.fixture(scope="module")
def graph():
  return _graph()


def test_no_import_cycle(graph):
  _, edges, _ = graph
  assert _cycles(edges) == []


def test_imports_run_one_way(graph):
  mods, edges, _ = graph
  bad = [f"{os.path.relpath(mods[m], REPO)}:{line} imports {dep} ({why})"
         for m in sorted(edges) for dep, line in sorted(edges[m].items())
         for importers, imported, why in FORBIDDEN if _in(m, *importers) and _in(dep, *imported)]
  assert bad == []


def test_project_imports_at_module_top(graph):
  _, _, lazy = graph
  assert lazy == []


def test_checker_sees_a_cycle_and_a_wrong_way_import(tmp_path):
  """The checks above can fail: a two-module cycle and a models -> data import are found."""
  edges = {"a": {"b": 1}, "b": {"a": 2}, "c": {}}
  assert _cycles(edges) == [["a", "b"]]
  pkg = tmp_path / "segearth_jax" / "models"
  pkg.mkdir(parents=True)
  f = pkg / "x.py"
  f.write_text("import os\nfrom segearth_jax.data.batch import dummy_batch\n\ndef g():\n  from segearth_jax import train\n")
  found = list(_imports(str(f), "segearth_jax.models.x",
                        {"segearth_jax.data.batch", "segearth_jax.train", "segearth_jax.models.x"}))
  assert ("segearth_jax.data.batch", 2, False) in found and ("segearth_jax.train", 5, True) in found
