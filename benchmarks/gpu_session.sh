#!/usr/bin/env bash
# Everything this project measures on a lent CUDA GPU, in one time-boxed call:
#   1. kernel and cache tests on the GPU (bf16 Triton kernel against the fp64 oracle; offload
#      tiers streamed through pinned memory on a side stream);
#   2. the kernel's launch shapes at causal and chunk-local 16K (bf16, D 128, GQA 5);
#   3. benchmarks/attention.py, 1K-128K, against SDPA's default backend, with the kernel's own
#      table and the fastest shape of step 2; then 16K against SDPA's flash backend alone;
#   4. benchmarks/decode.py over a CPU-resident KV cache (Scout's attention shape);
#   5. the embedded model's single-needle accuracy at 1M tokens, temperature tuning on and off.
# Each step has its own time limit and a failure does not stop the next one. Logs and new
# records are packed into $OUT (the device tool brings that folder back).
#
#     OUT=/tmp/gpu bash benchmarks/gpu_session.sh [total seconds, default 560] [steps, default all]
# steps: a space-separated subset of "tests tune attention decode long".
set -u
OUT=${OUT:-/tmp/gpu_session}
LOGS=$(mktemp -d)/logs  # packed into $OUT at the end (the tool brings back only a few files)
mkdir -p "$OUT" "$LOGS"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# Installing maps triton_kernels/ to longctx.kernels (pyproject); without installing, a link does.
[ -e longctx/kernels ] || ln -s ../triton_kernels longctx/kernels
PY=${PY:-python3}
deadline=$(( $(date +%s) + ${1:-560} ))
touch "$LOGS/.start"
STEPS=" ${2:-tests tune attention decode long} "
want() { [[ $STEPS == *" $1 "* ]]; }

step() {  # step NAME SECONDS COMMAND...: run with a limit (cut to what is left), log, report
  local name=$1 limit=$2 left=$(( deadline - $(date +%s) ))
  shift 2
  (( left < limit )) && limit=$left
  if (( limit < 10 )); then echo "=== $name skipped: no time left"; return; fi
  echo "=== $name (limit ${limit}s) $(date -u +%T): $*"
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
  echo "=== $name rc=$? $(date -u +%T)"
}

{
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$LOGS/env.log" 2>&1
cat "$LOGS/env.log"

want tests && step tests 150 $PY -m pytest -q -rfE -p no:cacheprovider -n 8 tests/test_kernels.py tests/test_cache.py
want tests && tail -n 15 "$LOGS/tests.log"

if want tune || want attention; then
SHAPES="table:128,128,8,2:128,128,8,3:128,64,4,3:128,32,4,4:64,64,4,3:64,128,4,3:128,64,8,4:table"
want tune && step tune 90 $PY benchmarks/attention.py --lengths 16384 --blocks "$SHAPES" --record
want tune && grep -E "^ *(causal|chunk) " "$LOGS/tune.log"
# The fastest shape at causal 16K (the bar's case), from the record just written.
best=$($PY - <<'EOF'
import glob, json, os
paths = sorted(glob.glob("benchmarks/results/attention-*.json"), key=os.path.getmtime)
rows = [r for r in json.load(open(paths[-1]))["rows"] if r["mode"] == "causal" and r["blocks"] != "table"] if paths else []
print(min(rows, key=lambda r: r["ours_ms"])["blocks"] if rows else "")
EOF
)
echo "fastest shape at causal 16K: ${best:-none}"

want attention && step attention 150 $PY benchmarks/attention.py --blocks "table${best:+:$best}" --record
grep -E "^ *(causal|chunk) " "$LOGS/attention.log"
want attention && step attention_flash 45 $PY benchmarks/attention.py --lengths 16384 --sdpa-backend flash --blocks "table${best:+:$best}" --record
grep -E "^ *(causal|chunk) " "$LOGS/attention_flash.log"
fi

if want decode; then
step decode 90 $PY benchmarks/decode.py --context 256k --steps 32 --heads 40 --kv-heads 8 --head-dim 128 --profile --record
tail -n 4 "$LOGS/decode.log"
step decode_4k 60 $PY benchmarks/decode.py --context 256k --steps 32 --heads 40 --kv-heads 8 --head-dim 128 --segment-tokens 4096 --record
tail -n 4 "$LOGS/decode_4k.log"
fi

if want long; then
step long 300 $PY benchmarks/tiny_model.py --part long --lengths 1m --depths ${LONG_DEPTHS:-0.5} --samples 1 --device cuda --record
grep -vE "it/s|tok/s|s/it" "$LOGS/long.log" | tail -n 25
fi

find benchmarks/results -newer "$LOGS/.start" -type f > "$OUT/new_records.txt"
tar czf "$OUT/session.tgz" -C "$(dirname "$LOGS")" logs -C "$PWD" $(cat "$OUT/new_records.txt")
echo "packed: $(cat "$OUT/new_records.txt" | tr '\n' ' ')"
