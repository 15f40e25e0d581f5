"""The paper's shapes on one H100/H200 with the GPU fast path, at the PyTorch peer's batch
(../shared/bench/peer_torch.py: B=4, 729 image + 100 text tokens = 829 -> bucket 832, 2 [SEG] each).

Starts from experiments/laserss_mipha3b.py (bf16 compute, float32 params, 'fused' attention, L_S on with
lambda_s 0.01 in the official per-layer form, LoRA r8 q/v, the paper's trainable parts). Remat: none.
At B=4 x 832 tokens the activations of the 32 Phi layers (bf16, plus the float32 softmax of XLA's
attention) fit beside ~14 GiB of float32 params on an 80 GB card, and remat would only add recompute;
for larger batches use --config.model.remat_policy=dots_with_no_batch_dims_saveable (or nothing_saveable).
"""
import importlib.util
import os


def get_config(arg=None):
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "laserss_mipha3b.py")
  spec = importlib.util.spec_from_file_location("_laserss_mipha3b", path)
  paper = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(paper)
  c = paper.get_config(arg)
  c.data.text_buckets = (832,)
  c.data.max_len = 832
  c.train.batch_size = 4
  c.model.remat_policy = "none"
  c.model.attention_impl = "fused"
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  return c
