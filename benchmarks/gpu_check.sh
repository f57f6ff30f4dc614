#!/usr/bin/env bash
# The CUDA tests and the GPU benchmark in one command, on a bare GPU machine, from the repository root:
#
#     GIT_COMMIT=<sha> GIT_DIRTY=<true|false> bash benchmarks/gpu_check.sh OUT_DIR
#
# Before it, here (where pip can reach its index): bash benchmarks/prepare_gpu_wheels.sh, which fills
# .whl/ (ignored by git) with what the GPU image lacks; carry .whl/ along with the working tree.
# GIT_COMMIT / GIT_DIRTY name the commit when the copy of the tree there has no .git (optional);
# GPU_CHECK_SECONDS, GPU_CHECK_TEST_SECONDS, GPU_CHECK_SITE (default /tmp/site), PYTHON (python3) and
# GPU_CHECK_BENCH_ARGS (default --device cuda) change the budgets, the install folder, the interpreter
# and the benchmark's options.
#
# In order, each step's output under OUT_DIR, the whole within GPU_CHECK_SECONDS (default 480):
#   1. the wheels in .whl/ (if any) installed into /tmp/site, on PYTHONPATH; the repository
#      itself on PYTHONPATH ahead of it (no pip install -e)
#   2. environment.txt   nvidia-smi, the Python packages' versions, what was installed
#   3. cuda_tests.log, cuda_tests.xml   python3 -m pytest tests/test_cuda.py -m cuda, under `timeout`
#      (GPU_CHECK_TEST_SECONDS, default 200); with --noconftest where datasets cannot be imported
#   4. benchmark.log, gpu/results.json, gpu/table.md   python3 -m benchmarks.gpu --device cuda with a
#      --time_budget of what is left less a margin, under a hard `timeout` as well
#   5. summary.txt   each step's start, return code and duration
# Nothing stops it before it has written what it has; it exits with the tests' return code, else
# the benchmark's.
set -u -o pipefail
cd "$(dirname "$0")/.."
if [ $# -ne 1 ]; then
    echo "usage: bash benchmarks/gpu_check.sh OUT_DIR" >&2
    exit 2
fi
mkdir -p "$1/gpu"
OUT=$(cd "$1" && pwd)
TOTAL=${GPU_CHECK_SECONDS:-480}
TEST_SECONDS=${GPU_CHECK_TEST_SECONDS:-200}
MARGIN=60   # seconds between the benchmark's budget and the end: its last configuration stops at its next step
PY=${PYTHON:-python3}
SITE=${GPU_CHECK_SITE:-/tmp/site}
# What the benchmark is asked (a CPU dry run of this script: GPU_CHECK_BENCH_ARGS="--device cpu --quick").
read -r -a BENCH_ARGS <<< "${GPU_CHECK_BENCH_ARGS:---device cuda}"
START=$SECONDS
left() { echo $((TOTAL - (SECONDS - START))); }
note() { echo "[$(date -u +%H:%M:%S) +$((SECONDS - START))s] $*" | tee -a "$OUT/summary.txt"; }

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}  # the resume test runs deterministic kernels
: > "$OUT/summary.txt"
note "gpu_check: ${TOTAL}s in all, repository $(pwd), commit ${GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"

# 1. Packages the image lacks (benchmarks/prepare_gpu_wheels.sh), then the repository, on the path.
if compgen -G ".whl/*.whl" > /dev/null; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
            >> "$OUT/environment.txt" 2>&1; then
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
        note "installed into $SITE: $(cd .whl && ls *.whl | tr '\n' ' ')"
    else
        note "pip install from .whl/ failed (environment.txt); going on with the image's own packages"
    fi
else
    note "no .whl/ here: the image's own packages only (transformers there may be older than the package needs)"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# 2. The machine and the versions.
{
    echo "## nvidia-smi"
    timeout 30 nvidia-smi 2>&1 || echo "(nvidia-smi failed)"
    echo
    echo "## versions (PYTHONPATH=$PYTHONPATH)"
    timeout 60 "$PY" - <<'EOF' 2>&1
import importlib, platform
print("python", platform.python_version(), platform.platform())
for name in ("torch", "transformers", "accelerate", "datasets", "huggingface_hub", "tokenizers", "safetensors",
             "peft", "pyarrow", "fsspec", "pytest", "hf_adahessian"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')} {getattr(module, '__file__', '')}")
    except Exception as err:
        print(f"{name}: not importable ({type(err).__name__}: {err})")
import torch
print("cuda available", torch.cuda.is_available(), "| cuda runtime", torch.version.cuda,
      "| device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
EOF
} >> "$OUT/environment.txt" 2>&1
note "environment.txt written"

# 3. The CUDA tests.
CONFTEST=()
if ! "$PY" -c "import datasets" > /dev/null 2>&1; then
    CONFTEST=(--noconftest)
    note "datasets is not importable: pytest runs with --noconftest (tests/test_cuda.py needs no fixture of conftest.py)"
fi
note "pytest tests/test_cuda.py -m cuda, at most ${TEST_SECONDS}s"
timeout -k 10 "$TEST_SECONDS" "$PY" -m pytest tests/test_cuda.py -m cuda -v -rs -p no:cacheprovider ${CONFTEST[@]+"${CONFTEST[@]}"} \
    --junitxml="$OUT/cuda_tests.xml" 2>&1 | tee "$OUT/cuda_tests.log"
TESTS_RC=${PIPESTATUS[0]}
note "pytest rc=$TESTS_RC$([ "$TESTS_RC" -eq 124 ] && echo " (stopped by its ${TEST_SECONDS}s budget)")"

# 4. The benchmark, in what is left.
BUDGET=$(($(left) - MARGIN))
BENCH_RC=0
if [ "$BUDGET" -gt 20 ]; then
    note "python3 -m benchmarks.gpu ${BENCH_ARGS[*]} --time_budget $BUDGET (hard stop after $(($(left) - 15))s)"
    timeout -k 10 "$(($(left) - 15))" "$PY" -m benchmarks.gpu "${BENCH_ARGS[@]}" --time_budget "$BUDGET" \
        --output_dir "$OUT/gpu" 2>&1 | tee "$OUT/benchmark.log"
    BENCH_RC=${PIPESTATUS[0]}
    note "benchmark rc=$BENCH_RC$([ "$BENCH_RC" -eq 124 ] && echo " (stopped from outside: results.json holds what was done)")"
else
    BENCH_RC=3
    note "benchmark not run: ${BUDGET}s left for it"
fi

note "done in $((SECONDS - START))s; files: $(cd "$OUT" && find . -type f | sort | tr '\n' ' ')"
if [ "$TESTS_RC" -ne 0 ]; then
    exit "$TESTS_RC"
fi
exit "$BENCH_RC"
