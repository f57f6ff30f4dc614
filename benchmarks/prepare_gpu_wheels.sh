#!/usr/bin/env bash
# Fill .whl/ with the wheels a bare GPU machine lacks for tests/test_cuda.py and benchmarks.gpu, run HERE
# (where pip reaches its index), from anywhere in the checkout:
#
#     bash benchmarks/prepare_gpu_wheels.sh
#
# then carry .whl/ along with the working tree and run `bash benchmarks/gpu_check.sh OUT_DIR` there.
# The GPU image (Python 3.12, x86-64; nothing can be downloaded there) has torch, accelerate, pytest and
# every requirement of these wheels except the ones carried:
#   transformers  the image's is 5.17, which lacks Trainer.loss_is_scaled_for_ga (the package reads it);
#                 pure Python; its requirements (huggingface-hub>=1.31, tokenizers>=0.23.1, safetensors,
#                 regex, typer, ...) are in the image
#   datasets      tests/conftest.py imports it; needs dill and multiprocess besides what the image has
#                 (pyarrow, pandas, fsspec, xxhash, huggingface-hub, ...)
#   dill, multiprocess
# Each at the version installed in this environment (the one CI tests), as Python 3.12 manylinux
# x86-64 wheels; one version of each in .whl/ (pip refuses two). .whl/ is ignored by git
# (.gitignore, and .git/info/exclude as the device's README asks).
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=(transformers datasets dill multiprocess)
PY=${PYTHON:-python3}
LIMIT_MB=40

exclude=$(git rev-parse --git-path info/exclude 2>/dev/null || true)
if [ -n "$exclude" ]; then
    mkdir -p "$(dirname "$exclude")"
    grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
fi

pins=()
for name in "${PACKAGES[@]}"; do
    version=$("$PY" -c "import importlib.metadata as m; print(m.version('$name'))" 2>/dev/null) || {
        echo "error: $name is not installed here; pip install -e '.[test]' first" >&2
        exit 1
    }
    pins+=("$name==$version")
done

fresh=$(mktemp -d)
trap 'rm -rf "$fresh"' EXIT
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$fresh" "${pins[@]}"

mkdir -p .whl
for wheel in "$fresh"/*.whl; do
    file=$(basename "$wheel")
    dist=${file%%-*}
    # One version of each distribution: an older wheel of the same name would stop the whole install.
    find .whl -maxdepth 1 -name "$dist-*.whl" ! -name "$file" -delete
    mv -f "$wheel" .whl/
done

echo "in .whl/ (pinned: ${pins[*]}):"
for wheel in .whl/*.whl; do
    echo "  $(basename "$wheel")  $(du -k "$wheel" | cut -f1) KiB"
    unzip -p "$wheel" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' | sed 's/^/      /' || true
done
total_kb=$(du -ck .whl/*.whl | tail -1 | cut -f1)
echo "total: $((total_kb / 1024)) MiB ($total_kb KiB)"
if [ "$total_kb" -gt $((LIMIT_MB * 1024)) ]; then
    echo "warning: over ${LIMIT_MB} MiB; the working tree that travels is limited to 64 MiB in all" >&2
fi
