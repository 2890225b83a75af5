#!/usr/bin/env bash
# Everything this project measures on a lent CUDA GPU, in one time-boxed call. Steps, in the
# order they run (the first seven are the default, most wanted first; the rest on request):
#   quanttests   quantization tests on the GPU (tests/test_quant.py, tests/test_checkpoint_quant.py:
#                the grouped-MoE Triton kernel against its dequantize-then-matmul reference);
#   scout        benchmarks/scout_int4.py: Scout's full text model with random int4 weights built
#                on the device: weight bytes, peak memory, KV that fits on 80 GB, prefill 8K/32K,
#                decode at 32K, the MoE kernel's and the decode step's share of the HBM bound;
#   tests        kernel and cache tests on the GPU (bf16 Triton kernel against the fp64 oracle;
#                offload tiers streamed through pinned memory on a side stream);
#   cpnccl       context parallelism over NCCL: one GPU rank (two with two GPUs) equals one process;
#   attention16k benchmarks/attention.py at 16K against SDPA's default backend (the kernel's table);
#   decode1m     benchmarks/decode.py over a pinned-CPU KV cache at 1M tokens (Scout's attention
#                shape), with a profile of the steps;
#   long         the embedded model's single-needle accuracy at 1M tokens, temperature tuning on and off;
#   tune         the attention kernel's launch shapes at causal and chunk-local 16K (bf16, D 128, GQA 5);
#   attention    attention.py 1K-128K against SDPA's default backend, with the table and the fastest
#                shape of `tune`; then 16K against SDPA's flash backend;
#   decode       decode.py over a CPU-resident KV cache at 256K, 16,384- and 4,096-token segments.
# Each step has its own time limit (cut to what is left of the total), gets SIGTERM at its limit
# and SIGKILL 15 s later, and a failure does not stop the next one. After every step the logs,
# the records written so far and a summary are packed into $OUT (the device tool brings that
# folder back, also when the call itself is cut off).
#
#     OUT=/tmp/gpu bash benchmarks/gpu_session.sh [total seconds, default 560] [steps, default the first seven]
# GPU_SESSION_DRY=1 prints each step's command and the limit it would get if every earlier step
# used all of its own, instead of running anything (tests/test_gpu_scripts.py checks the commands
# on CPU). GPU_COMMIT names the commit in gpu.jsonl where the copy has no git history.
set -u
OUT=${OUT:-/tmp/gpu_session}
DRY=${GPU_SESSION_DRY:-}
LOGS=$(mktemp -d)/logs  # packed into $OUT after each step (the tool brings back only a few files)
mkdir -p "$OUT" "$LOGS"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
GPU_COMMIT=${GPU_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || true)}
export GPU_COMMIT
# Installing maps triton_kernels/ to longctx.kernels (pyproject); without installing, a link does.
[ -n "$DRY" ] || [ -e longctx/kernels ] || ln -s ../triton_kernels longctx/kernels
PY=${PY:-python3}
deadline=$(( $(date +%s) + ${1:-560} ))
touch "$LOGS/.start"
STEPS=" ${2:-quanttests scout tests cpnccl attention16k decode1m long} "
spent=0  # a dry run's clock: seconds the steps before would take at their limits
want() { [[ $STEPS == *" $1 "* ]]; }
: > "$LOGS/summary.txt"

pack() {  # the logs, the records written since the start and the summary, into $OUT
  [ -n "$DRY" ] && return
  find benchmarks/results -newer "$LOGS/.start" -type f > "$OUT/new_records.txt"
  cp "$LOGS/summary.txt" "$OUT/summary.txt"
  tar czf "$OUT/session.tgz" -C "$(dirname "$LOGS")" logs -C "$PWD" $(cat "$OUT/new_records.txt")
}

step() {  # step NAME SECONDS COMMAND...: run with a limit (cut to what is left), log, report, pack
  local name=$1 limit=$2 left=$(( deadline - $(date +%s) - spent - 15 )) t0 rc
  shift 2
  (( left < limit )) && limit=$left
  if [ -n "$DRY" ]; then
    echo "DRY $name $limit $(printf '%q ' "$@")"
    if (( limit < 10 )); then
      echo "$name dry would-be-skipped" >> "$LOGS/summary.txt"
    else
      echo "$name dry limit=${limit}s from=+$(( spent ))s" >> "$LOGS/summary.txt"
      spent=$(( spent + limit + 15 ))
    fi
    return
  fi
  if (( limit < 10 )); then
    echo "=== $name skipped: no time left"
    echo "$name skipped -" >> "$LOGS/summary.txt"
    return
  fi
  echo "=== $name (limit ${limit}s) $(date -u +%T): $*"
  t0=$(date +%s)
  timeout -k 15 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  echo "=== $name rc=$rc $(date -u +%T)"
  echo "$name rc=$rc $(( $(date +%s) - t0 ))s" >> "$LOGS/summary.txt"
  pack
}

show() {  # show NAME GREP-ARGS...: matching lines of a step's log (nothing in a dry run)
  local name=$1
  shift
  [ -f "$LOGS/$name.log" ] && grep "$@" "$LOGS/$name.log"
}

if [ -z "$DRY" ]; then
  {
    nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv
    $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    echo "commit ${GPU_COMMIT:-unknown}"
  } > "$LOGS/env.log" 2>&1
  cat "$LOGS/env.log"
fi

PYTEST="$PY -m pytest -q -rfE -p no:cacheprovider -n 8"

want quanttests && step quanttests 120 $PYTEST tests/test_quant.py tests/test_checkpoint_quant.py
want quanttests && show quanttests -E "passed|failed|error" | tail -n 15

want scout && step scout 240 $PY benchmarks/scout_int4.py --profile --record
want scout && show scout -E "^(\| |summary:|recorded|Traceback|[A-Za-z]*Error)"

want tests && step tests 150 $PYTEST tests/test_kernels.py tests/test_cache.py
want tests && show tests -E "passed|failed|error" | tail -n 15

# Context parallelism over NCCL: a world of one GPU (two with two GPUs) equals one process.
want cpnccl && step cpnccl 90 $PYTEST tests/test_distributed.py -k nccl
want cpnccl && show cpnccl -E "passed|failed|error|skipped" | tail -n 5

want attention16k && step attention16k 60 $PY benchmarks/attention.py --lengths 16384 --record
want attention16k && show attention16k -E "^ *(causal|chunk) |SDPA|backend"

want decode1m && step decode1m 150 $PY benchmarks/decode.py --context 1m --steps 16 --heads 40 --kv-heads 8 --head-dim 128 --profile --record
want decode1m && show decode1m "" | tail -n 4

want long && step long 300 $PY benchmarks/tiny_model.py --part long --lengths 1m --depths ${LONG_DEPTHS:-0.5} --samples 1 --device cuda --record
want long && show long -vE "it/s|tok/s|s/it" | tail -n 25

if want tune || want attention; then
SHAPES="table:128,128,8,2:128,128,8,3:128,64,4,3:128,32,4,4:64,64,4,3:64,128,4,3:128,64,8,4:table"
want tune && step tune 90 $PY benchmarks/attention.py --lengths 16384 --blocks "$SHAPES" --record
want tune && show tune -E "^ *(causal|chunk) "
# The fastest shape at causal 16K (the bar's case), from the record just written.
best=""
[ -z "$DRY" ] && best=$($PY - <<'EOF'
import glob, json, os
paths = sorted(glob.glob("benchmarks/results/attention-*.json"), key=os.path.getmtime)
rows = [r for r in json.load(open(paths[-1]))["rows"] if r["mode"] == "causal" and r["blocks"] != "table"] if paths else []
print(min(rows, key=lambda r: r["ours_ms"])["blocks"] if rows else "")
EOF
)
echo "fastest shape at causal 16K: ${best:-none}"

want attention && step attention 150 $PY benchmarks/attention.py --blocks "table${best:+:$best}" --record
want attention && show attention -E "^ *(causal|chunk) "
want attention && step attention_flash 45 $PY benchmarks/attention.py --lengths 16384 --sdpa-backend flash --blocks "table${best:+:$best}" --record
want attention && show attention_flash -E "^ *(causal|chunk) "
fi

if want decode; then
step decode 90 $PY benchmarks/decode.py --context 256k --steps 32 --heads 40 --kv-heads 8 --head-dim 128 --profile --record
show decode "" | tail -n 4
step decode_4k 60 $PY benchmarks/decode.py --context 256k --steps 32 --heads 40 --kv-heads 8 --head-dim 128 --segment-tokens 4096 --record
show decode_4k "" | tail -n 4
fi

echo "=== summary (step, exit status, seconds; rc=124 or 137: cut at its limit)"
column -t "$LOGS/summary.txt" 2>/dev/null || cat "$LOGS/summary.txt"
show scout "^summary:"
pack
[ -n "$DRY" ] || echo "packed into $OUT/session.tgz: logs/ $(tr '\n' ' ' < "$OUT/new_records.txt")"
