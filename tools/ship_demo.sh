#!/usr/bin/env bash
# Ship the trained demo model: convert the HF checkpoint written by tools/train_demo.py with moelite's own
# converter (the path users take) into the package data, and render the model card from the training log.
#   tools/ship_demo.sh [HF_DIR=build/demo_hf] [TYPE=q8_0]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
hf=${1:-$root/build/demo_hf}
type=${2:-q8_0}
out=$root/src/moelite/data/demo.gguf
python3 -m moelite.converters "$hf" -o "$out" --type "$type"
size=$(stat -c %s "$out")
[ "$size" -le $((30 * 1024 * 1024)) ] || { echo "demo GGUF is $size bytes, over the 30 MB limit" >&2; exit 1; }
python3 "$root/tools/demo_model_card.py" "$hf" --gguf "$out" > "$root/MODEL_CARD.md"
echo "shipped $out ($size bytes, $type)"
