#!/usr/bin/env bash
# llama.cpp's Hugging Face → GGUF converter (convert_hf_to_gguf.py, conversion/, gguf-py/) for
# tests/distributed/test_llama_cpp.py, unpacked from the llama-cpp-python sdist on PyPI, which vendors
# llama.cpp. Usage: bash tests/fetch_llama_cpp.sh [version]   (into $LLAMA_CPP_DIR or .cache/llama.cpp)
set -euo pipefail
VERSION=${1:-0.3.36}
DEST=${LLAMA_CPP_DIR:-"$(cd "$(dirname "$0")/.." && pwd)/.cache/llama.cpp"}
if [ -f "$DEST/convert_hf_to_gguf.py" ]; then exit 0; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$tmp"
src="llama_cpp_python-$VERSION/vendor/llama.cpp"
tar xzf "$tmp/llama_cpp_python-$VERSION.tar.gz" -C "$tmp" --wildcards \
    "$src/convert_hf_to_gguf.py" "$src/conversion/*" "$src/gguf-py/*" "$src/LICENSE"
mkdir -p "$DEST"
cp -r "$tmp/$src/convert_hf_to_gguf.py" "$tmp/$src/conversion" "$tmp/$src/gguf-py" "$tmp/$src/LICENSE" "$DEST/"
echo "llama.cpp converter (llama-cpp-python $VERSION) in $DEST"
