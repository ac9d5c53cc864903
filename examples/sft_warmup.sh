#!/usr/bin/env bash
# Long-CoT SFT warm-up (Kimi k1.5 stage before RL): preprocess -> train_sft on torchrun.
#
#   SFT_DATA=my_sft.jsonl VALID_DATA=my_valid.jsonl LOAD=ckpt/qwen7b-tp4 TP=4 PP=1 NPROC=8 \
#       bash examples/sft_warmup.sh
#
# Every size is an environment variable; the defaults run a tiny model on 2 CPU processes.
# SIGTERM / SIGUSR1 (preemption, a time limit) make it save and exit 0; rerunning resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/sft_warmup}
SFT_DATA=${SFT_DATA:-}
VALID_DATA=${VALID_DATA:-}                 # held-out SFT JSONL: valid_loss every EVAL_INTERVAL iterations
EVAL_INTERVAL=${EVAL_INTERVAL:-10}
TOKENIZER=${TOKENIZER:-byte}
LOAD=${LOAD:-}
TP=${TP:-1}; PP=${PP:-1}; NPROC=${NPROC:-2}
SEQ_LENGTH=${SEQ_LENGTH:-128}
MICRO_BATCH=${MICRO_BATCH:-2}; GLOBAL_BATCH=${GLOBAL_BATCH:-8}
TRAIN_ITERS=${TRAIN_ITERS:-20}; LR=${LR:-1e-3}; MIN_LR=${MIN_LR:-1e-4}; WARMUP=${WARMUP:-2}
SAVE_INTERVAL=${SAVE_INTERVAL:-10}
# 1: the tokenizer may run its own code (Moonlight's and Kimi K2's tiktoken tokenizers)
TRUST=()
if [ "${TRUST_REMOTE_CODE:-0}" = 1 ]; then TRUST=(--trust-remote-code); fi
mkdir -p "$OUT"

if [ -z "$SFT_DATA" ]; then  # a small synthetic set (and a held-out one) so the script runs anywhere
  SFT_DATA="$OUT/sft.jsonl"
  VALID_DATA=${VALID_DATA:-$OUT/sft_valid.jsonl}
  python - "$SFT_DATA" "$VALID_DATA" <<'PY'
import json, random, sys
rng = random.Random(0)
for path, n in ((sys.argv[1], 400), (sys.argv[2], 40)):
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            f.write(json.dumps({"prompt": f"{a}+{b}=", "response": f"{a + b}"}) + "\n")
PY
fi
preprocess() {  # JSONL, PREFIX (skipped when PREFIX.json, written last, exists)
  if [ ! -f "$2.json" ]; then
    python tools/preprocess_data.py --mode sft --input "$1" --output-prefix "$2" --tokenizer "$TOKENIZER" --append-eos "${TRUST[@]}"
  fi
}
preprocess "$SFT_DATA" "$OUT/data/sft"
VALID_ARGS=()
if [ -n "$VALID_DATA" ]; then
  preprocess "$VALID_DATA" "$OUT/data/sft_valid"
  VALID_ARGS=(--valid-data "$OUT/data/sft_valid" --eval-interval "$EVAL_INTERVAL")
fi

LOAD_ARGS=()
if [ -n "$LOAD" ]; then LOAD_ARGS=(--load "$LOAD" --finetune); fi
if [ -f "$OUT/ckpt/latest_checkpointed_iteration.txt" ]; then LOAD_ARGS=(--load "$OUT/ckpt"); fi  # resume

PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" python -m torch.distributed.run --nproc-per-node "$NPROC" \
  -m megatron_k15.train_sft --train-data "$OUT/data/sft" "${LOAD_ARGS[@]}" "${VALID_ARGS[@]}" "${TRUST[@]}" \
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
  --seq-length "$SEQ_LENGTH" --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" \
  --train-iters "$TRAIN_ITERS" --lr "$LR" --min-lr "$MIN_LR" --lr-warmup-iters "$WARMUP" --clip-grad 1.0 \
  --save "$OUT/ckpt" --save-interval "$SAVE_INTERVAL" --exit-signal-handler \
  --tensorboard-dir "$OUT/tb" --log-interval 1
echo "sft_warmup: checkpoint in $OUT/ckpt, metrics in $OUT/tb/metrics.jsonl"
