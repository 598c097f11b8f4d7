#!/usr/bin/env bash
# llama.cpp for tests/distributed/test_llama_cpp.py, from the llama-cpp-python sdist on PyPI (which vendors
# llama.cpp): its Hugging Face → GGUF converter (convert_hf_to_gguf.py, conversion/, gguf-py/) unpacked into
# $LLAMA_CPP_DIR (default .cache/llama.cpp) and, with --install, llama-cpp-python itself compiled from the
# same sdist (~10 minutes on 2 cores) so that `pytest -m llama_cpp` can compare llama.cpp's logits.
#   bash tests/fetch_llama_cpp.sh [--install]
set -euo pipefail
VERSION=0.3.36
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST=${LLAMA_CPP_DIR:-"$ROOT/.cache/llama.cpp"}
SDIST="$ROOT/.cache/llama_cpp_python-$VERSION.tar.gz"
mkdir -p "$ROOT/.cache" "$DEST"
if [ ! -f "$SDIST" ]; then
    python -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$ROOT/.cache"
fi
if [ ! -f "$DEST/convert_hf_to_gguf.py" ]; then
    tmp=$(mktemp -d)
    src="llama_cpp_python-$VERSION/vendor/llama.cpp"
    tar xzf "$SDIST" -C "$tmp" --wildcards "$src/convert_hf_to_gguf.py" "$src/conversion/*" "$src/gguf-py/*" "$src/LICENSE"
    cp -r "$tmp/$src/convert_hf_to_gguf.py" "$tmp/$src/conversion" "$tmp/$src/gguf-py" "$tmp/$src/LICENSE" "$DEST/"
    rm -rf "$tmp"
fi
echo "llama.cpp converter (llama-cpp-python $VERSION) in $DEST"
if [ "${1:-}" = "--install" ] && ! python -c "import llama_cpp" 2>/dev/null; then
    # The compiled wheel is kept in the user's cache (like pip's own wheel cache), keyed by version and Python:
    # a machine compiles it once (~10 minutes on 2 cores), later runs install it in seconds.
    WHEELS="${XDG_CACHE_HOME:-$HOME/.cache}/mixtral-tune/llama-cpp-python-$VERSION-$(python -c 'import sys; print(sys.implementation.cache_tag)')"
    if ! ls "$WHEELS"/llama_cpp_python-*.whl >/dev/null 2>&1; then
        mkdir -p "$WHEELS"
        # CPU only, no examples/tools/server: the library the Python bindings load
        CMAKE_ARGS="-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
        CMAKE_BUILD_PARALLEL_LEVEL=2 python -m pip wheel -q --no-deps "$SDIST" -w "$WHEELS" > "$ROOT/.cache/llama_cpp_build.log" 2>&1
        echo "llama-cpp-python $VERSION compiled into $WHEELS (log: .cache/llama_cpp_build.log)"
    fi
    python -m pip install -q "$WHEELS"/llama_cpp_python-*.whl
    echo "llama-cpp-python $VERSION installed from $WHEELS"
fi
