#!/usr/bin/env bash
# CPU quickstart of the whole Kimi k1.5 recipe, from nothing but this repository (< 10 min on
# 2 cores): synthetic arithmetic data -> SFT warm-up of a small model from scratch -> RL with
# online mirror descent and verifiable rewards -> accuracy on the RL prompts (the rollouts' own)
# and on held-out prompts, before and after RL -> reward / accuracy / length curves in a PNG.
#
#   bash examples/quickstart.sh                      # everything under ./outputs/quickstart
#   OUT=/tmp/qs RL_LOSS=grpo bash examples/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-outputs/quickstart}
NPROC=${NPROC:-2}                       # data-parallel CPU processes
SEED=${SEED:-1234}
MODEL_ARGS=(--num-layers "${NUM_LAYERS:-4}" --hidden-size "${HIDDEN:-128}" --ffn-hidden-size "${FFN:-352}"
            --num-attention-heads 4 --num-query-groups 2 --max-position-embeddings 256
            --untie-embeddings-and-output-weights)
SFT_ITERS=${SFT_ITERS:-500}
RL_ITERS=${RL_ITERS:-60}
RL_LOSS=${RL_LOSS:-omd}
mkdir -p "$OUT"
launch() { python -m torch.distributed.run --nproc-per-node "$NPROC" --master-port "${MASTER_PORT:-29517}" "$@"; }

echo "== 1/5 synthetic data"
if [ ! -f "$OUT/data/sft.jsonl" ]; then
  python tools/make_synthetic_data.py --out-dir "$OUT/data" --seed "$SEED" --levels 1,2 \
    --num-sft 3000 --num-rl 4000 --num-eval 200 --max-operand 99 --template minimal --quiet
fi
for split in sft rl_prompts eval_prompts; do
  mode=prompts; [ "$split" = sft ] && mode=sft
  if [ ! -f "$OUT/data/$split.json" ]; then
    extra=(); [ "$mode" = sft ] && extra=(--append-eos)
    python tools/preprocess_data.py --mode "$mode" --input "$OUT/data/$split.jsonl" \
      --output-prefix "$OUT/data/$split" --tokenizer byte --no-progress "${extra[@]}"
  fi
done

echo "== 2/5 SFT warm-up from scratch"
if [ ! -f "$OUT/sft/latest_checkpointed_iteration.txt" ]; then
  launch -m megatron_k15.train_sft --train-data "$OUT/data/sft" "${MODEL_ARGS[@]}" --seed "$SEED" \
    --seq-length 128 --micro-batch-size 4 --global-batch-size 16 --train-iters "$SFT_ITERS" \
    --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 10 --clip-grad 1.0 --weight-decay 0.01 \
    --save "$OUT/sft" --tensorboard-dir "$OUT/sft/tb" --log-interval 25
fi

echo "== 3/5 RL ($RL_LOSS) with held-out evaluation before and after"
RL_DIR="$OUT/rl_$RL_LOSS"
if [ ! -f "$RL_DIR/latest_checkpointed_iteration.txt" ]; then
  launch -m megatron_k15.train_rl --load "$OUT/sft" --finetune --tokenizer byte --seed "$SEED" \
    --prompt-data "$OUT/data/rl_prompts" --eval-data "$OUT/data/eval_prompts" \
    --eval-temperature 1.0 --eval-samples 8 \
    --rl-loss "$RL_LOSS" --rl-tau 1.0 --samples-per-prompt 8 --prompts-per-iter 128 \
    --rollout-max-tokens 8 --temperature 1.0 --sampling uniform --updates-per-iter 2 \
    --micro-batch-size 128 --train-iters "$RL_ITERS" --lr 1e-4 --lr-warmup-iters 5 --clip-grad 1.0 --lr-decay-style constant \
    --keep-optimizer-state \
    --save "$RL_DIR" --tensorboard-dir "$RL_DIR/tb" --log-interval 1
fi

echo "== 4/5 curves"
python tools/plot_metrics.py --metrics "$RL_DIR/tb/metrics.jsonl" --out "$RL_DIR/curves.png" \
  --keys reward_mean,accuracy,response_length_mean,eval_accuracy,loss,kl_proxy --title "quickstart RL ($RL_LOSS)"

echo "== 5/5 result"
python - "$RL_DIR/tb/metrics.jsonl" <<'PY'
import json, sys
rows = list(map(json.loads, open(sys.argv[1])))
evals = [r for r in rows if "eval_accuracy" in r]
acc = [r["accuracy"] for r in rows if "accuracy" in r]
k = max(1, min(10, len(acc) // 2))
print(f"quickstart: held-out accuracy (temperature 1, 8 samples per prompt) before={evals[0]['eval_accuracy']:.3f} "
      f"after={evals[-1]['eval_accuracy']:.3f}; rollout accuracy on the RL prompts, first {k} iterations "
      f"{sum(acc[:k]) / k:.3f}, last {k} {sum(acc[-k:]) / k:.3f}")
PY
