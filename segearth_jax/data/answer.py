"""The answer format: the token strings and the `<p>phrase</p>[SEG]` target text, written and parsed here only.

An assistant answer names each target right before its mask token: "Oil is stored in <p>the tanks</p>[SEG]."
The k-th [SEG] of an answer is the k-th mask. Answers without phrases are valid (EarthReason writes
"<text> [SEG]"); `phrases_of` then labels the masks "target 1", "target 2", ...
  SEG_TOKEN     "[SEG]"           one mask per occurrence; a single, never-split tokenizer id
  IMAGE_TOKEN   "<image>"         the prompt placeholder the image tokens replace; a single id too
  EOS_TOKEN     "<|endoftext|>"   Phi-2's end of text (the toy tokenizer's eos/pad/bos/unk as well)
"""
from __future__ import annotations

import re

SEG_TOKEN = "[SEG]"
IMAGE_TOKEN = "<image>"
EOS_TOKEN = "<|endoftext|>"

# a phrase, then its [SEG] (spaces between them tolerated: generated answers may have them); the phrase holds
# no <p> or </p>, so an earlier phrase without a [SEG] is not swallowed into the next one
PHRASE = re.compile(r"<p>((?:(?!</?p>).)*)</p>\s*" + re.escape(SEG_TOKEN))


def target_text(phrase: str) -> str:
  """One named target as the answer writes it: '<p>{phrase}</p>[SEG]'."""
  return f"<p>{phrase}</p>{SEG_TOKEN}"


def phrases_of(answer: str, n: int) -> list[str]:
  """The phrases of the first `n` targets of `answer`, in [SEG] order; 'target {i+1}' where none is named."""
  found = PHRASE.findall(answer)
  return [found[i] if i < len(found) else f"target {i + 1}" for i in range(n)]


def seg_count(answer: str) -> int:
  """How many masks the answer asks for (its [SEG] tokens)."""
  return answer.count(SEG_TOKEN)
