"""Prompt templates: one string holds the whole conversation, and named presets hold the ones in use.

A template is literal text with three markers, each exactly once, in this order:
  '<image>'        where the image tokens go (expanded to presets.image_tokens(model) ids)
  '{instruction}'  where the instruction goes
  '{answer}'       where the assistant's answer goes; the text after it ends the turn (e.g. '<|endoftext|>')
The prompt (what eval feeds the model before generating) is the text before '{answer}' minus its trailing
whitespace; that whitespace belongs to the answer (the model generates it: a byte-level BPE puts a word's
leading space into the word's token). Training targets are `answer_lead + answer + answer_end`.
No other characters are special (no str.format), so '{' and '}' may appear in system text.

`data.train_template` / `data.eval_template` each name a preset below or are a literal template.

Tokenization (data/preprocess.py): the fixed pieces between markers are tokenized once, the instruction and
the answer per example, so no BPE merge crosses a marker. The authors tokenize each text chunk between
'<image>' markers whole (their tokenizer_image_token); with Phi-2's byte-level pre-tokenizer (GPT-2 regex)
the pre-token boundaries fall at the markers of every preset here for any stripped instruction, so the ids
are the same (tests/test_prompts.py checks both presets of theirs against their construction).
"""
from __future__ import annotations

import dataclasses
import re

from segearth_jax.data.answer import EOS_TOKEN, IMAGE_TOKEN, SEG_TOKEN
from segearth_jax.errors import UserError

INSTRUCTION = "{instruction}"
ANSWER = "{answer}"

# Mipha's 'phi-2' conversation (conv_phi_v0): "{system} USER: {human} ASSISTANT: {gpt}<|endoftext|>"
PHI_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
              "The assistant gives helpful, detailed, and polite answers to the user's questions.")
# the authors' training prefix (SegEarth-R2 LaSeRSDataset); the instruction follows after a newline
TRAIN_PROMPT = ("This is an image \n<image>\n, please doing Reasoning Segmentation according to the "
                "following instruction:\n{instruction}")
# our paraphrase of the authors' eval prefix (the default eval template before issue 14)
EVAL_PROMPT = ("This is an image \n<image>\n. Some instructions are questions and some are declarative "
               "phrases. For a question, segment the target and explain your answer; for a declarative "
               "phrase, only segment the target. Instruction:\n{instruction}")
# SegEarth-R2 eval.py: DEFAULT_PREFIX_INST, then "\n" + the stripped instruction
AUTHORS_EVAL_PREFIX = ("This is an image \n<image>\n. If the instruction is a question, provide segmentation "
                       "result + explanation; if it's a declarative phrase, provide only the segmentation "
                       "result\n. Please doing Referring or Reasoning Segmentation according to the following "
                       "instruction:")
# the system text of their 'llava_phi' conversation (LLaMA-2 separator style, sep = sep2 = <|endoftext|>)
LLAVA_PHI_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual "
                    "content that the user provides, and assist the user with a variety of tasks using "
                    "natural language.")


def _phi_chat(human: str, answer_turn: str) -> str:
  return f"{PHI_SYSTEM} USER: {human} ASSISTANT:{answer_turn}{EOS_TOKEN}"


PRESETS = {
    # today's defaults: Mipha chat with the authors' training prefix / our paraphrased eval prefix
    "phi_chat": _phi_chat(TRAIN_PROMPT, f" {ANSWER}"),
    "phi_chat_eval": _phi_chat(EVAL_PROMPT, f" {ANSWER}"),
    # experiments/toy.py: no system text, no preface (the from-scratch toy LLM needs none)
    "toy": f" USER: {IMAGE_TOKEN}\n{INSTRUCTION} ASSISTANT: {ANSWER}{EOS_TOKEN}",
    # the authors' training text (SegEarth-R2 train.py, version 'phi-2'): human turn = their prefix +
    # "\n<refer> <|assistant|>" where <refer> is replaced by the instruction's token embeddings followed by the
    # [SEG] embedding (their token_refer_id); assistant turn = "\n" + answer. That prompt [SEG] is not a mask
    # token (their SEG indices skip it; ours count [SEG] only after the prompt). Their label mask also trains
    # the last two prompt tokens (an off-by-two in preprocess_llama2); ours trains the answer only.
    "authors_train": _phi_chat(f"{TRAIN_PROMPT}{SEG_TOKEN} <|assistant|>", f" \n{ANSWER}"),
    # the authors' eval prompt (SegEarth-R2 eval.py, version 'llava_phi'): LLaMA-2 style, one human message,
    # the answer after "[/INST] " and " <|endoftext|>" after it (their get_prompt for a two-turn chat)
    "authors_eval": (f"[INST] <<SYS>>\n{LLAVA_PHI_SYSTEM}\n<</SYS>>\n\n{AUTHORS_EVAL_PREFIX}\n{INSTRUCTION} "
                     f"[/INST] {ANSWER} {EOS_TOKEN}"),
}


@dataclasses.dataclass(frozen=True)
class Template:
  prompt: tuple[str, ...]   # fixed text pieces, IMAGE_TOKEN and INSTRUCTION, in order
  answer_lead: str          # whitespace between the prompt and the answer
  answer_end: str           # text after the answer


def resolve(spec: str) -> str:
  """A preset name -> its template; a literal template -> itself."""
  if spec in PRESETS:
    return PRESETS[spec]
  if not any(m in spec for m in (IMAGE_TOKEN, INSTRUCTION, ANSWER)):
    raise UserError(f"unknown prompt template preset {spec!r}; presets: {', '.join(sorted(PRESETS))} "
                    f"(or a literal template with {IMAGE_TOKEN!r}, {INSTRUCTION!r} and {ANSWER!r})")
  return spec


def parse(spec: str) -> Template:
  template = resolve(spec)
  pieces = re.split(f"({re.escape(IMAGE_TOKEN)}|{re.escape(INSTRUCTION)}|{re.escape(ANSWER)})", template)
  markers = [p for p in pieces if p in (IMAGE_TOKEN, INSTRUCTION, ANSWER)]
  if markers != [IMAGE_TOKEN, INSTRUCTION, ANSWER]:
    raise UserError(f"prompt template needs {IMAGE_TOKEN!r}, {INSTRUCTION!r} and {ANSWER!r} once each, in "
                    f"that order; got {markers} in {template!r}")
  at = pieces.index(ANSWER)
  before, end = pieces[:at], "".join(pieces[at + 1:])
  last = before[-1]
  lead = last[len(last.rstrip()):]
  before[-1] = last[:len(last) - len(lead)]
  return Template(prompt=tuple(before), answer_lead=lead, answer_end=end)


def render(spec: str, instruction: str, answer: str | None = None) -> str:
  """The text the model sees: the prompt with `instruction` (as given: stripping is the caller's), plus the
  answer turn when `answer` is given."""
  t = parse(spec)
  text = "".join(instruction if p == INSTRUCTION else p for p in t.prompt)
  return text if answer is None else f"{text}{t.answer_lead}{answer}{t.answer_end}"
