#!/usr/bin/env bash
# One prepared command for a GPU machine that is bare and offline: the torch, Triton and Python
# already installed there are used as they are, nothing is downloaded.
#
#   bash bench/gpu_check.sh                 # install, gpu_smoke tests, python -m bench --device cuda --quick
#   bash bench/gpu_check.sh --no-tests      # install + benchmark only
#   bash bench/gpu_check.sh --no-bench      # install + tests only
#   bash bench/gpu_check.sh --with-cpu      # also build the C++ CPU backend posattn._C (needs cmake, ninja)
#
# Written for an H200 with Python 3.12 / torch 2.11 / Triton 3.6 (also runs on CI's 3.11 / 2.13 /
# 3.9 stack). Steps, all within 8 minutes (each step gets what is left of that budget):
#   1. checks: a CUDA device that torch sees, triton and pytest importable; else it stops at once
#      with exit code 2 and says what is missing;
#   2. installs posattn from this working tree: pip --no-index --no-deps --no-build-isolation -e .
#      (the CPU extension is skipped unless --with-cpu: the GPU checks do not need it);
#   3. pytest -m gpu_smoke (the Triton kernels on the GPU, forward and backward, every position
#      spec; tests/conftest.py GPU_SMOKE) with a JUnit XML report;
#   4. python -m bench --device cuda --quick, one case at a time, so that a case cut off by the
#      time budget loses only itself: CSV rows and one PNG per case;
#   5. the plain case again with POSATTN_TMA=0 (pointer loads instead of TMA descriptors on
#      sm_90), into $OUT/pointers: its ratio to SDPA against step 4's says whether TMA pays.
# Everything goes to $OUT when that variable is set (else bench/results/): gpu_check.log,
# gpu_smoke.xml, bench.csv, <case>.png. PYTHON picks the interpreter (default: python3).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
OUTDIR=${OUT:-bench/results}
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
CASES=${GPU_CHECK_CASES:-plain causal alibi relbias t5 rope window varlen decode}
RUN_TESTS=1 RUN_BENCH=1 WITH_CPU=0
for arg in "$@"; do
  case "$arg" in
    --no-tests) RUN_TESTS=0 ;;
    --no-bench) RUN_BENCH=0 ;;
    --with-cpu) WITH_CPU=1 ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUTDIR"
LOG="$OUTDIR/gpu_check.log"
exec > >(tee "$LOG") 2>&1
START=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
step() { echo; echo "== [$(( $(date +%s) - START )) s] $*"; }

step "environment"
echo "python: $(command -v "$PY") | out: $OUTDIR | budget ${BUDGET_S} s"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader \
  || echo "nvidia-smi: not found"
if ! "$PY" - <<'PYEOF'
import importlib.util, sys
missing = [m for m in ("torch", "triton", "pytest") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check: FAILED: {', '.join(missing)} not importable by {sys.executable}; this script installs "
             f"nothing from the network: use a Python that has torch (CUDA build), triton and pytest")
import torch, triton
print(f"python {sys.version.split()[0]} | torch {torch.__version__} (CUDA {torch.version.cuda}) | triton {triton.__version__}")
if not torch.cuda.is_available():
    sys.exit("gpu_check: FAILED: torch sees no CUDA device (torch.cuda.is_available() is False"
             + ("; this torch is a CPU-only build" if torch.version.cuda is None else "") + "): run this on a GPU machine")
print(f"GPU: {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})")
PYEOF
then
  exit 2
fi

step "install posattn from this tree (no network)"
BUILD_CPU=0
if [ "$WITH_CPU" = 1 ]; then BUILD_CPU=1; fi
install() { POSATTN_BUILD_CPU=$BUILD_CPU timeout "$(left)" "$1" -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1; }
if ! msg=$(install "$PY"); then
  echo "$msg"
  if grep -q externally-managed <<<"$msg"; then
    # a distribution's own Python (PEP 668): install into a venv that sees its packages instead
    echo "gpu_check: $PY is externally managed: using a venv with --system-site-packages, build/gpu-check-venv"
    "$PY" -m venv --system-site-packages build/gpu-check-venv && PY=build/gpu-check-venv/bin/python && msg=$(install "$PY") \
      || { echo "$msg"; echo "gpu_check: FAILED: installing posattn into build/gpu-check-venv"; exit 1; }
  else
    echo "gpu_check: FAILED: pip install --no-index --no-deps --no-build-isolation -e . (see above)"
    exit 1
  fi
fi
"$PY" -c "import posattn, posattn.ops as o; print('posattn', posattn.__version__, 'from', posattn.__file__, '| posattn._C:', 'loaded' if o._C_ERROR is None else 'not built')"

status=0
if [ "$RUN_TESTS" = 1 ]; then
  step "pytest -m gpu_smoke"
  timeout "$(left)" "$PY" -m pytest -q -ra -m gpu_smoke --durations=10 --junitxml="$OUTDIR/gpu_smoke.xml" tests
  rc=$?
  [ $rc -ne 0 ] && { echo "gpu_check: gpu_smoke FAILED (exit $rc$([ $rc = 124 ] && echo ': out of time'))"; status=1; }
fi

if [ "$RUN_BENCH" = 1 ]; then
  for case in $CASES; do
    t=$(left)
    if [ "$t" -lt 20 ]; then echo "gpu_check: time budget spent: benchmark cases from '$case' on skipped"; status=1; break; fi
    step "python -m bench --device cuda --quick --only $case"
    timeout "$t" "$PY" -m bench --device cuda --quick --only "$case" --out "$OUTDIR"
    rc=$?
    [ $rc -ne 0 ] && { echo "gpu_check: bench $case FAILED (exit $rc$([ $rc = 124 ] && echo ': out of time'))"; status=1; }
  done
  t=$(left)
  if [ "$t" -ge 20 ]; then
    step "POSATTN_TMA=0 python -m bench --device cuda --quick --only plain (pointer loads, for the TMA A/B)"
    mkdir -p "$OUTDIR/pointers"
    POSATTN_TMA=0 timeout "$t" "$PY" -m bench --device cuda --quick --only plain --out "$OUTDIR/pointers" \
      || { echo "gpu_check: bench plain with POSATTN_TMA=0 FAILED"; status=1; }
  fi
fi

step "done: exit $status; log, CSV and plots in $OUTDIR"
ls -l "$OUTDIR"
exit $status
