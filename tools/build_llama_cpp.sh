#!/usr/bin/env bash
# Build the llama.cpp tools the slow tests run (tests/test_runtime_llama_cpp.py), from the
# llama.cpp source tree that ships inside the llama-cpp-python sdist on PyPI.
#
#   tools/build_llama_cpp.sh [CACHE_DIR]      (default: $CLAWCONVERT_RUNTIMES or ~/.cache/clawconvert-runtimes;
#                                              not under ~/.cache/clawconvert, which is a cache that may be emptied)
#
# Result, reused by later runs (a finished build is never redone):
#   CACHE_DIR/llama.cpp-<version>/stock/bin/{llama-mtmd-cli,llama-mtmd-debug,clawconvert-llama-probe}
#   CACHE_DIR/llama.cpp-<version>/cls-fix/bin/{llama-mtmd-cli,llama-mtmd-debug,clawconvert-llama-probe}
# clawconvert-llama-probe is tools/llama_probe.cpp (this folder), built against llama.cpp's own
# libraries: it prints the prompt's tokens, the first-token logits and greedy tokens.
# "cls-fix" is the same tree with the upstream fix for the LLaVA graph's class-token order
# (ggml-org/llama.cpp#25814, PR #25844: tools/mtmd/models/llava.cpp concatenates the class
# embedding AFTER the patches; the fix puts it first, where CLIP has it).  The patched build
# reuses the stock build's objects, so only mtmd and the two tools are rebuilt.
#
# Takes about 15 minutes on 2 cores (static build, server/tests/examples off; the download is 77 MB).
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
PY="${PYTHON:-python3}"
CACHE="${1:-${CLAWCONVERT_RUNTIMES:-$HOME/.cache/clawconvert-runtimes}}"
ROOT="$CACHE/llama.cpp-$VERSION"
JOBS="${JOBS:-$(nproc)}"
TARGETS=(llama-mtmd-cli llama-mtmd-debug clawconvert-llama-probe)
HERE="$(cd "$(dirname "$0")" && pwd)"

have_all() { for t in "${TARGETS[@]}"; do [ -x "$1/bin/$t" ] || return 1; done; }
# a changed tools/llama_probe.cpp is rebuilt (only the probe relinks)
if [ -f "$ROOT/src/tools/mtmd/clawconvert-llama-probe.cpp" ] && \
        ! cmp -s "$HERE/llama_probe.cpp" "$ROOT/src/tools/mtmd/clawconvert-llama-probe.cpp"; then
    rm -f "$ROOT"/stock/bin/clawconvert-llama-probe "$ROOT"/cls-fix/bin/clawconvert-llama-probe
fi
if have_all "$ROOT/stock" && have_all "$ROOT/cls-fix"; then
    echo "llama.cpp tools already built in $ROOT"; exit 0
fi

mkdir -p "$ROOT"
SRC="$ROOT/src"
if [ ! -f "$SRC/CMakeLists.txt" ]; then
    tmp="$(mktemp -d "$ROOT/download.XXXXXX")"
    "$PY" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$tmp"
    tar -xzf "$tmp"/llama_cpp_python-"$VERSION".tar.gz -C "$tmp"
    rm -rf "$SRC"
    mv "$tmp/llama_cpp_python-$VERSION/vendor/llama.cpp" "$SRC"
    rm -rf "$tmp"
fi

LLAVA="$SRC/tools/mtmd/models/llava.cpp"
# the probe is one more executable of tools/mtmd, linked like llama-mtmd-debug
cp "$HERE/llama_probe.cpp" "$SRC/tools/mtmd/clawconvert-llama-probe.cpp"
if ! grep -q clawconvert-llama-probe "$SRC/tools/mtmd/CMakeLists.txt"; then
    cat >>"$SRC/tools/mtmd/CMakeLists.txt" <<'CMAKE'

if (LLAMA_BUILD_TOOLS)
    add_executable(clawconvert-llama-probe clawconvert-llama-probe.cpp)
    target_link_libraries(clawconvert-llama-probe PRIVATE mtmd llama Threads::Threads)
    target_compile_features(clawconvert-llama-probe PRIVATE cxx_std_17)
endif()
CMAKE
fi
STOCK_LINE='inp = ggml_concat(ctx0, inp, model.class_embedding, 1);'
FIXED_LINE='inp = ggml_concat(ctx0, model.class_embedding, inp, 1);'

build() {  # $1: output folder
    cmake -S "$SRC" -B "$ROOT/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
        -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=ON >"$ROOT/cmake.log"
    cmake --build "$ROOT/build" --target "${TARGETS[@]}" -j "$JOBS"
    mkdir -p "$1/bin"
    for t in "${TARGETS[@]}"; do cp "$ROOT/build/bin/$t" "$1/bin/$t"; done
}

swap() {  # replace line $1 by line $2 in llava.cpp; fails when $1 is not there
    "$PY" - "$LLAVA" "$1" "$2" <<'PYEOF'
import sys
path, old, new = sys.argv[1:]
text = open(path).read()
if old not in text:
    sys.exit(f"{path}: the line {old!r} was not found; this llama.cpp version needs a look")
open(path, "w").write(text.replace(old, new))
PYEOF
}

if ! have_all "$ROOT/stock"; then
    grep -qF "$FIXED_LINE" "$LLAVA" && swap "$FIXED_LINE" "$STOCK_LINE"
    build "$ROOT/stock"
fi
if ! have_all "$ROOT/cls-fix"; then
    swap "$STOCK_LINE" "$FIXED_LINE"
    build "$ROOT/cls-fix"
    swap "$FIXED_LINE" "$STOCK_LINE"
fi
echo "built: $ROOT/stock/bin and $ROOT/cls-fix/bin"
