#!/usr/bin/env bash
# The one GPU check (issue 18; about 9-10 minutes on one H100/H200, inside one 600 s device call). Prints
# JSON lines and writes them (with logs and the profile summary) under $OUT. Each part has its own timeout;
# a failure is logged and the next part still runs.
#
# Prepare once on the CPU host, in the repo root (both folders are in .git/info/exclude): the peer scripts,
# and wheels for what the device image lacks (it has jax/flax/optax/orbax/transformers/torch/peft; our
# train.py also imports the data stack: grain and its needs, ml_collections):
#   mkdir -p .peer && cp ../shared/bench/peer_torch.py ../shared/bench/peer_torch_predict.py .peer/
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl ml_collections==1.1.0 grain==0.2.12 array_record==0.8.1 more_itertools==10.7.0
# Then: run(command="bash tools/gpu_bench.sh", carry=[".peer", ".whl"], timeout_s=600)
set -x
OUT=${OUT:-runs/gpu_bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .whl/site .whl/*.whl \
    && export PYTHONPATH=$PWD/.whl/site${PYTHONPATH:+:$PYTHONPATH}
fi
PEER=${PEER_DIR:-.peer}
[ -f "$PEER/peer_torch.py" ] || PEER=../shared/bench
CFG=experiments/bench_h100.py
RES="$OUT/results.jsonl"
: > "$RES"

part() {  # part NAME SECONDS CMD...: run with a timeout, keep its log, copy its JSON lines to results
  local name=$1 secs=$2; shift 2
  local t0=$(date +%s)
  timeout -k 10 "$secs" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  grep -h '^{' "$OUT/$name.log" >> "$RES"
  echo "{\"part\": \"$name\", \"rc\": $rc, \"wall_s\": $(( $(date +%s) - t0 ))}" | tee -a "$RES"
  tail -n 5 "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, flax, optax; print(jax.__version__, flax.__version__, optax.__version__, jax.devices())"

# 1. ours, B=4 at the peer's shapes (832 tokens, L_S on), attention on cuDNN ('fused' picks it on GPU in
#    bf16), then a profile of 3 more steps (not timed): top ops by GPU time
part train_b4 150 python3 -m segearth_jax.bench profile --config "$CFG" --steps 8 --trace-dir "$OUT/trace" --top 30
# 2. the same step with the same mask-free calls on XLA's attention: what cuDNN buys
part train_b4_xla 110 python3 -m segearth_jax bench train --config "$CFG" --steps 6 \
  --config.model.attention_impl=fused_xla
# 3. ours at the authors' batch 1
part train_b1 90 python3 -m segearth_jax bench train --config "$CFG" --batch 1 --steps 8
# 4. the PyTorch peer at the same shapes: eager attention (L_S on, as the authors), B=4 and B=1
part peer_train_b4 70 env B=4 ATTN=eager N=8 python3 "$PEER/peer_torch.py"
part peer_train_b1 50 env B=1 ATTN=eager N=8 python3 "$PEER/peer_torch.py"
# 5. ours: seconds per instruction (prefill 830 tokens + exactly 128 new tokens + masks), batch 1
part predict 70 python3 -m segearth_jax bench predict --config "$CFG" --steps 5
# 6. the peer's HF generate path, same prompt and 128 new tokens
part peer_predict 60 env NEW=128 N=5 python3 "$PEER/peer_torch_predict.py"
cat "$RES"
