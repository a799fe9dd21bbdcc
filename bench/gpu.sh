#!/usr/bin/env bash
# The CUDA tests and GPU benchmarks in one go, for a lent GPU machine with torch installed:
#   bash bench/gpu.sh OUTDIR            (STEPS="tests memory" picks steps; default: all)
# Runs tests/test_cuda.py, then records memory, pipeline, trial, trial --compile (eager and
# compiled side by side) and gpu_search (a whole search on the GPU) into bench/README.md's
# GPU blocks, copying README and logs to OUTDIR after each step (a step that runs out of
# time keeps the rest). The limits add up to ~30 min: pick STEPS to fit a device budget.
# gpu_search's GPU busy fraction needs nvidia-ml-py (a wheel in .whl/; without it: None).
# Wheels of missing pure-Python packages (imbalanced-learn, sklearn-compat) may sit in .whl/.
set -u
out=${1:?usage: bash bench/gpu.sh OUTDIR}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
threads=$(nproc)
steps=" ${STEPS:-tests memory pipeline trial trial_compile gpu_search} "
wanted() { [[ $steps == *" $1 "* ]]; }
if wanted tests; then
  echo "== tests (limit 150 s)"
  timeout 150 python3 -m pytest tests/test_cuda.py -q -p no:cacheprovider >"$out/tests.log" 2>&1
  echo "== tests rc $?"; tail -n 15 "$out/tests.log"
fi
step() {  # step NAME SECONDS ARGS...
  local name=$1 limit=$2; shift 2
  wanted "$name" || return 0
  echo "== $name (limit ${limit} s)"
  local t0=$SECONDS
  timeout "$limit" python3 "$@" --threads "$threads" --record >"$out/$name.log" 2>&1
  echo "== $name rc $? in $((SECONDS - t0)) s"; tail -n 12 "$out/$name.log"
  cp bench/README.md "$out/README.md"
}
step memory 200 bench/memory.py --device cuda
step pipeline "${PIPELINE_LIMIT:-300}" bench/pipeline.py --device cuda
step trial 200 bench/trial.py --device cuda
step trial_compile "${COMPILE_LIMIT:-400}" bench/trial.py --device cuda --compile
step gpu_search "${SEARCH_LIMIT:-590}" bench/gpu_search.py --device cuda
