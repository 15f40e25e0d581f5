"""Experiment configs: ml_collections ConfigDict files loaded by path, overridable from the command line.

An experiment file defines ``get_config(arg=None) -> ConfigDict``. ``path.py:arg`` passes ``arg``: everything
after the first ':' (e.g. ``experiments/laserss_mipha3b.py:lambda_s=0.05,no_ls``); ``parse_arg`` reads it as
comma-separated ``key=value`` pairs and bare ``key`` switches (big_vision's variant form).
Overrides use the big_vision / absl form ``--config.train.steps=20``; values are parsed as Python
literals when they parse, else kept as strings, and must match the type of the field they replace.
"""
from __future__ import annotations

import ast
import contextlib
import importlib.util
import json
import os
from typing import Iterable

import ml_collections

from segearth_jax.errors import UserError


class ConfigError(UserError, ValueError):
  """A config file or override that cannot be used; the message says which and why."""


def read_json(path: str):
  """A JSON file's contents; an unreadable or malformed file is a UserError naming it."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: not a readable JSON file ({e})") from e


def load_config(spec: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"config file not found: {path}")
  mod_spec = importlib.util.spec_from_file_location(
      "_segearth_config_" + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(mod_spec)
  try:
    mod_spec.loader.exec_module(module)
  except Exception as e:  # surface the file that failed, keep the cause
    raise ConfigError(f"{path}: could not be loaded: {type(e).__name__}: {e}") from e
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path}: defines no get_config()")
  config = module.get_config(arg) if arg else module.get_config()
  apply_overrides(config, overrides)
  return config


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """An experiment's variant string -> one field per default, each of its default's type (bool, int, float,
  str). ``"lambda_s=0.05,no_ls"`` with ``lambda_s=0.01, no_ls=False`` -> lambda_s 0.05, no_ls True: a bare key
  switches a bool on. A key with no default (the error lists the known ones), a repeated key or a value of
  the wrong type is a ConfigError."""
  out = ml_collections.ConfigDict(defaults)
  seen = set()
  for item in filter(None, (p.strip() for p in (arg or "").split(","))):
    key, has_value, text = (p.strip() for p in item.partition("="))
    if key not in defaults:
      raise ConfigError(f"variant {item!r}: unknown key {key!r}; known: {', '.join(sorted(defaults))}")
    if key in seen:
      raise ConfigError(f"variant {key!r} given twice in {arg!r}")
    seen.add(key)
    default = defaults[key]
    if not has_value:
      if not isinstance(default, bool):
        raise ConfigError(f"variant {key!r} needs a value: {key}=<{type(default).__name__}>")
      out[key] = True
      continue
    try:
      if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
          raise ValueError(text)
        value = text.lower() in ("true", "1")
      else:
        value = type(default)(text)
    except ValueError:
      raise ConfigError(f"variant {item!r}: {key} takes a {type(default).__name__} value, got {text!r}") \
          from None
    out[key] = value
  return out


def parse_override(text: str) -> tuple[str, object]:
  """'--config.a.b=3' or 'a.b=3' -> ('a.b', 3)."""
  body = text[2:] if text.startswith("--") else text
  if body.startswith("config."):
    body = body[len("config."):]
  if "=" not in body:
    raise ConfigError(f"override {text!r} needs the form --config.a.b=value")
  key, value = body.split("=", 1)
  try:
    parsed = ast.literal_eval(value)
  except (ValueError, SyntaxError):
    parsed = value
  return key, parsed


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> None:
  for text in overrides:
    key, value = parse_override(text)
    node = config
    parts = key.split(".")
    for part in parts[:-1]:
      if part not in node:
        raise ConfigError(f"override {text!r}: no field {part!r} in the config")
      node = node[part]
    leaf = parts[-1]
    if leaf not in node:
      raise ConfigError(f"override {text!r}: no field {key!r} in the config")
    old = node[leaf]
    if isinstance(old, (tuple, list)) and isinstance(value, (tuple, list)):
      value = type(old)(value)
    elif isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    elif old is not None and not isinstance(value, type(old)):
      raise ConfigError(
          f"override {text!r}: {key} is {type(old).__name__}, got {type(value).__name__}")
    with node.unlocked() if hasattr(node, "unlocked") else contextlib.nullcontext():
      node[leaf] = value

