#!/usr/bin/env bash
# CPU quickstart: build a tiny random model offline, convert it to our Megatron format at
# tp=1, and generate from a few prompts. (The RL issue turns this into SFT + RL + evaluation.)
#
#   bash examples/quickstart.sh            # everything under ./outputs/quickstart
#   OUT=/tmp/qs TP=2 bash examples/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/quickstart}
TP=${TP:-1}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-32}
mkdir -p "$OUT"

if [ ! -f "$OUT/hf/config.json" ]; then
  python tools/make_tiny_model.py --preset tiny --out "$OUT/hf"
fi
if [ ! -f "$OUT/ckpt/latest_checkpointed_iteration.txt" ]; then
  python tools/checkpoint/convert_hf_to_megatron.py --hf-dir "$OUT/hf" --save "$OUT/ckpt" \
    --tensor-model-parallel-size "$TP"
fi
cat > "$OUT/prompts.jsonl" <<'JSONL'
{"id": "q1", "prompt": "What is 2 + 3? ", "task": "math", "answer": "5"}
{"id": "q2", "prompt": "Compute 7 * 6. ", "task": "math", "answer": "42"}
JSONL

if [ "$TP" -gt 1 ]; then
  LAUNCH=(python -m torch.distributed.run --nproc-per-node "$TP")
else
  LAUNCH=(python)
fi
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "${LAUNCH[@]}" -m megatron_k15.generate \
  --load "$OUT/ckpt" --input "$OUT/prompts.jsonl" --output "$OUT/generations.jsonl" \
  --tensor-model-parallel-size "$TP" --max-new-tokens "$MAX_NEW_TOKENS" --temperature 0
python - "$OUT/generations.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"{r['id']}: {len(r['output_ids'])} tokens, stop={r['stop_reason']}, text={r['text']!r}")
PY
echo "quickstart: generations written to $OUT/generations.jsonl"
