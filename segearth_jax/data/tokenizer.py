"""Tokenizers: Phi-2's (from a local folder) and the toy BPE saved with the toy dataset.

Both load through `load_tokenizer`, which makes `[SEG]` and `<image>` single, never-split ids, so the rest of
the code never cares which tokenizer it has.
"""
from __future__ import annotations

import os
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from segearth_jax.data.answer import EOS_TOKEN, IMAGE_TOKEN, SEG_TOKEN
from segearth_jax.errors import UserError

__all__ = ["load_tokenizer", "seg_token_id", "image_token_id", "train_toy_tokenizer"]

TOKENIZER_FILES = "tokenizer.json, or vocab.json + merges.txt, with tokenizer_config.json"


def _add_special_tokens(tok):
  """Adds [SEG] and <image> as special tokens when missing; pad = eos when there is no pad token."""
  vocab = tok.get_vocab()
  have = set(tok.all_special_tokens)
  missing = [t for t in (SEG_TOKEN, IMAGE_TOKEN) if t not in vocab or t not in have]
  if missing:
    tok.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
  if tok.pad_token is None:
    tok.pad_token = tok.eos_token
  return tok


def load_tokenizer(path):
  """A local tokenizer folder (Phi-2's or the toy one) with [SEG] and <image> as single special ids.

  The folder needs tokenizer.json (a fast tokenizer) or vocab.json + merges.txt (Phi-2's CodeGen BPE), and
  tokenizer_config.json; without them, or when transformers cannot read them, a one-line UserError names
  the folder and the files expected."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise UserError(f"tokenizer folder {path!r} does not exist")
  have = set(os.listdir(path))
  if "tokenizer.json" not in have and not {"vocab.json", "merges.txt"} <= have:
    raise UserError(f"{path}: no tokenizer files (expected {TOKENIZER_FILES})")
  try:
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
  except (OSError, ValueError, TypeError, KeyError) as e:
    # transformers' messages span lines (and speak of sentencepiece/tiktoken): keep one line
    raise UserError(f"{path}: cannot load its tokenizer ({' '.join(str(e).split())}); expected "
                    f"{TOKENIZER_FILES}") from e
  return _add_special_tokens(tok)


def _single_id(tok, token: str) -> int:
  ids = tok.encode(token, add_special_tokens=False)
  if len(ids) != 1:
    raise UserError(f"tokenizer splits {token!r} into {len(ids)} ids; load it with load_tokenizer()")
  return ids[0]


def seg_token_id(tok) -> int:
  return _single_id(tok, SEG_TOKEN)


def image_token_id(tok) -> int:
  return _single_id(tok, IMAGE_TOKEN)


def train_toy_tokenizer(texts: Iterable[str], out_dir, vocab_size: int = 1024):
  """Trains a byte-level BPE (CodeGen/Phi-2 style) on `texts`, saves it to `out_dir`, returns it loaded.

  Special tokens come first (ids 0, 1, 2), then the 256 byte symbols, then merges, so the vocab never
  exceeds `vocab_size`. Same texts, same files.
  """

  specials = [EOS_TOKEN, SEG_TOKEN, IMAGE_TOKEN]
  bpe = Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  # Sorted unique texts: the order of the iterable and duplicates do not change the result.
  bpe.train_from_iterator(sorted(set(texts)), trainer=trainer)
  tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                unk_token=EOS_TOKEN, pad_token=EOS_TOKEN,
                                additional_special_tokens=[SEG_TOKEN, IMAGE_TOKEN])
  os.makedirs(out_dir, exist_ok=True)
  tok.save_pretrained(out_dir)
  return load_tokenizer(out_dir)
