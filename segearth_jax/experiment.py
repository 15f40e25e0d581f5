"""The base experiment config every file in experiments/ starts from (big_vision style)."""
from __future__ import annotations

import ml_collections

from segearth_jax import presets

# Mipha / Phi chat template (llava-phi `conv_phi_v0`): system prompt, 'USER: ... ASSISTANT: ...<|endoftext|>'.
PHI_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
              "The assistant gives helpful, detailed, and polite answers to the user's questions.")
TRAIN_PROMPT = ("This is an image \n<image>\n, please doing Reasoning Segmentation according to the "
                "following instruction:\n{instruction}")
EVAL_PROMPT = ("This is an image \n<image>\n. Some instructions are questions and some are declarative "
               "phrases. For a question, segment the target and explain your answer; for a declarative "
               "phrase, only segment the target. Instruction:\n{instruction}")


def base_config(model_size: str = "tiny") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = presets.model_config(model_size)

  c.data = ml_collections.ConfigDict(dict(
      name="laserss",             # TFDS builder name in tfds_laserss/
      data_dir="",                # TFDS data dir (built ArrayRecords)
      tokenizer="",               # local tokenizer folder (Phi-2 for real runs; the toy one is saved with toy data)
      text_buckets=(128, 256),    # sequence lengths to pad to (static shapes: one compile per bucket)
      max_len=256,                # longer sequences are cut (answer end kept)
      system=PHI_SYSTEM,
      user_role="USER", assistant_role="ASSISTANT", sep=" ", eos="<|endoftext|>",
      train_prompt=TRAIN_PROMPT,
      eval_prompt=EVAL_PROMPT,
      shuffle_seed=0,
      workers=0,                  # grain worker processes (0 = in-process)
      skip_bad=False,
  ))

  c.loss = ml_collections.ConfigDict(dict(
      text_weight=1.0, bce_weight=5.0, dice_weight=5.0,
      lambda_s=0.01,              # attention-supervision weight (0 disables)
      ls_form="paper",            # 'paper' (layer/head-averaged map) | 'baseline' (per layer, heads summed, summed)
      num_points=12544, oversample_ratio=3.0, importance_sample_ratio=0.75,
  ))

  c.train = ml_collections.ConfigDict(dict(
      steps=5000, batch_size=8, grad_accum=1, seed=0,
      lr=5e-5, warmup_ratio=0.03, schedule="cosine", weight_decay=0.0, grad_clip=1.0,
      b1=0.9, b2=0.999,
      # which parts train. Frozen parts get no optimizer state.
      trainable=("lora", "lm_head", "seg_projector", "pixel_decoder", "mask_decoder"),
      log_every=10, ckpt_every=500, keep_checkpoints=3,
      init_from="",               # a workdir/weights folder from `segearth convert from-hf`
      # per-part learning-rate multipliers, {part: x}: the innermost path component named wins, e.g.
      # dict(llm=0.2) with lr 1e-3 trains llm/... at 2e-4; parts not named use 1
      lr_scale=ml_collections.ConfigDict(),
      # 'segearth': the loss of method.md §4; 'text': next-token loss only, mask head not run (pre-trains a
      # from-scratch MLLM, e.g. the toy's, before the SegEarth-R2 stage: experiments/toy_text.py)
      objective="segearth",
  ))

  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))  # -1 = the rest of the devices
  c.distributed = ml_collections.ConfigDict(dict(
      enabled=False, coordinator_address="", num_processes=1, process_id=0, local_device_ids=()))

  c.infer = ml_collections.ConfigDict(dict(max_new_tokens=128, temperature=0.0, seed=0))
  return c
