#!/usr/bin/env bash
# Ship the trained demo model: convert the HF checkpoint written by tools/train_demo.py with moelite's own
# converter (the path users take) into the package data, and render the model card from the training log.
# A chat-tuned checkpoint (train_demo.py --qa-dir) is also scored on the held-out pairs before (BEFORE_GGUF, the
# model it started from) and after tuning (tools/eval_demo_qa.py), and the card shows both.
#   tools/ship_demo.sh [HF_DIR=build/demo_hf] [TYPE=q8_0] [BEFORE_GGUF=build/demo_orig.gguf]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
hf=${1:-$root/build/demo_hf}
type=${2:-q8_0}
before=${3:-$root/build/demo_orig.gguf}
out=$root/src/moelite/data/demo.gguf
python3 -m moelite.converters "$hf" -o "$out" --type "$type"
size=$(stat -c %s "$out")
[ "$size" -le $((30 * 1024 * 1024)) ] || { echo "demo GGUF is $size bytes, over the 30 MB limit" >&2; exit 1; }
qa_dir=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["config"].get("qa_dir") or "")' \
  "$hf/train_log.json")
card_args=()
if [ -n "$qa_dir" ]; then
  [ -f "$before" ] || { echo "$before: the pre-tuning GGUF to compare against is missing" >&2; exit 1; }
  python3 "$root/tools/eval_demo_qa.py" "$before" --pairs "$qa_dir/heldout.jsonl" --json "$hf/qa_eval_before.json"
  python3 "$root/tools/eval_demo_qa.py" "$out" --pairs "$qa_dir/heldout.jsonl" --json "$hf/qa_eval_after.json"
  card_args=(--qa-eval "$hf/qa_eval_before.json" "$hf/qa_eval_after.json")
fi
python3 "$root/tools/demo_model_card.py" "$hf" --gguf "$out" "${card_args[@]}" > "$root/MODEL_CARD.md.tmp"
mv "$root/MODEL_CARD.md.tmp" "$root/MODEL_CARD.md"
echo "shipped $out ($size bytes, $type)"
