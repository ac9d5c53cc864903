#!/usr/bin/env bash
# Long2short (Kimi k1.5, DESIGN.md section 3): make a long-CoT RL model answer with shorter
# responses. Sample n responses per prompt from the RL checkpoint -> shortest-rejection SFT
# data (the shortest correct response per prompt) or DPO pairs (shortest correct vs longer
# wrong / much longer correct) -> preprocess -> SFT or DPO from the checkpoint -> optionally
# merge with the original -> mean response length and pass@1 before and after.
#
#   CKPT=ckpt/rl PROMPTS=data/math.jsonl bash examples/long2short.sh
#   CKPT=ckpt/rl PROMPTS=train.jsonl EVAL_PROMPTS=eval.jsonl L2S_LOSS=dpo MERGE_WEIGHT=0.5 \
#     TP=4 NPROC=8 N_SAMPLES=8 MAX_NEW_TOKENS=8192 SEQ_LENGTH=16384 bash examples/long2short.sh
#
# Every size is an environment variable; every stage is skipped when its output exists (delete
# it, or pick another OUT, to redo it). The defaults are small enough for a tiny model on CPU.
#
# Alternative, long2short RL: continue RL from the long-CoT checkpoint with a stronger length
# penalty and a smaller response budget (section 3), instead of stages 2-4 below:
#   launch -m megatron_k15.train_rl --load "$CKPT" --finetune --prompt-data data/prompts \
#     --length-penalty-weight 1.0 --length-penalty-start-iter 0 --rollout-max-tokens 2048 \
#     --samples-per-prompt 8 --prompts-per-iter 64 --rl-loss omd --train-iters 100 --lr 1e-6 \
#     --save "$OUT/rl_short" --tensorboard-dir "$OUT/rl_short/tb"
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
CKPT=${CKPT:?set CKPT to the long-CoT (RL) checkpoint directory}
PROMPTS=${PROMPTS:?set PROMPTS to a prompt JSONL (id, prompt, task, answer|tests)}
OUT=${OUT:-outputs/long2short}
L2S_LOSS=${L2S_LOSS:-sft}                  # sft (shortest rejection sampling) | dpo
TOKENIZER=${TOKENIZER:-}                   # default: the checkpoint's tokenizer/, else byte
# 1: the tokenizer may run its own code (Moonlight's and Kimi K2's tiktoken tokenizers)
TRUST=()
if [ "${TRUST_REMOTE_CODE:-0}" = 1 ]; then TRUST=(--trust-remote-code); fi
TP=${TP:-1}; NPROC=${NPROC:-1}
# sampling (data) and evaluation (before / after)
N_SAMPLES=${N_SAMPLES:-8}; TEMPERATURE=${TEMPERATURE:-1.0}; MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-64}
EVAL_PROMPTS=${EVAL_PROMPTS:-$PROMPTS}; EVAL_SAMPLES=${EVAL_SAMPLES:-$N_SAMPLES}
EVAL_BATCH=${EVAL_BATCH:-64}; SEED=${SEED:-1234}
# data rules
LENGTH_RATIO=${LENGTH_RATIO:-1.5}; MAX_PAIRS=${MAX_PAIRS:-4}
# fine-tuning
SEQ_LENGTH=${SEQ_LENGTH:-256}; MICRO_BATCH=${MICRO_BATCH:-1}; GLOBAL_BATCH=${GLOBAL_BATCH:-4}
TRAIN_ITERS=${TRAIN_ITERS:-20}; LR=${LR:-1e-5}; MIN_LR=${MIN_LR:-1e-6}; WARMUP=${WARMUP:-0}
DPO_BETA=${DPO_BETA:-0.1}
MERGE_WEIGHT=${MERGE_WEIGHT:-}             # set (e.g. 0.5): final = w * CKPT + (1 - w) * tuned
MASTER_PORT=${MASTER_PORT:-29527}

if [ -z "$TOKENIZER" ]; then
  if [ -d "$CKPT/tokenizer" ]; then TOKENIZER="$CKPT/tokenizer"; else TOKENIZER=byte; fi
fi
case "$L2S_LOSS" in sft|dpo) ;; *) echo "L2S_LOSS must be sft or dpo, got '$L2S_LOSS'" >&2; exit 2;; esac
mkdir -p "$OUT/data"
launch() {
  if [ "$NPROC" = 1 ]; then python "$@"
  else python -m torch.distributed.run --nproc-per-node "$NPROC" --master-port "$MASTER_PORT" "$@"; fi
}
evaluate() {  # evaluate CKPT PROMPTS N OUTPUT
  launch tools/evaluate.py --load "$1" --tokenizer "$TOKENIZER" --input "$2" --output "$4" \
    --n-samples "$3" --temperature "$TEMPERATURE" --max-new-tokens "$MAX_NEW_TOKENS" \
    --batch-size "$EVAL_BATCH" --seed "$SEED" --tensor-model-parallel-size "$TP" "${TRUST[@]}"
}

echo "== 1/6 sample $N_SAMPLES responses per prompt from $CKPT"
SAMPLES="$OUT/samples.jsonl"
[ -f "$SAMPLES" ] || evaluate "$CKPT" "$PROMPTS" "$N_SAMPLES" "$SAMPLES"

echo "== 2/6 build $L2S_LOSS data (shortest correct response per prompt)"
DATA="$OUT/data/l2s_$L2S_LOSS"
if [ ! -f "$DATA.jsonl" ]; then
  python tools/build_long2short_data.py --mode "$L2S_LOSS" --results "$SAMPLES" --prompts "$PROMPTS" \
    --output "$DATA.jsonl" --length-ratio "$LENGTH_RATIO" --max-pairs-per-problem "$MAX_PAIRS"
fi

echo "== 3/6 preprocess"
if [ ! -f "$DATA.json" ]; then
  python tools/preprocess_data.py --mode "$L2S_LOSS" --input "$DATA.jsonl" --output-prefix "$DATA" \
    --tokenizer "$TOKENIZER" --append-eos --seq-length "$SEQ_LENGTH" --no-progress "${TRUST[@]}"
fi

echo "== 4/6 $L2S_LOSS from $CKPT"
TUNED="$OUT/$L2S_LOSS"
if [ ! -f "$TUNED/latest_checkpointed_iteration.txt" ]; then
  launch -m megatron_k15.train_sft --load "$CKPT" --finetune --loss "$L2S_LOSS" --dpo-beta "$DPO_BETA" "${TRUST[@]}" \
    --train-data "$DATA" --seed "$SEED" \
    --tensor-model-parallel-size "$TP" --seq-length "$SEQ_LENGTH" --micro-batch-size "$MICRO_BATCH" \
    --global-batch-size "$GLOBAL_BATCH" --train-iters "$TRAIN_ITERS" --lr "$LR" --min-lr "$MIN_LR" \
    --lr-warmup-iters "$WARMUP" --clip-grad 1.0 --save "$TUNED" --tensorboard-dir "$TUNED/tb" \
    --log-interval 1
  if [ -d "$CKPT/tokenizer" ] && [ ! -e "$TUNED/tokenizer" ]; then cp -r "$CKPT/tokenizer" "$TUNED/tokenizer"; fi
fi

FINAL="$TUNED"
if [ -n "$MERGE_WEIGHT" ]; then
  echo "== 5/6 merge: $MERGE_WEIGHT x $CKPT + (1 - $MERGE_WEIGHT) x $TUNED"
  FINAL="$OUT/merged_$L2S_LOSS"
  [ -f "$FINAL/latest_checkpointed_iteration.txt" ] || python tools/merge_models.py --load-a "$CKPT" \
    --load-b "$TUNED" --weight-a "$MERGE_WEIGHT" --save "$FINAL" --tensor-model-parallel-size "$TP"
else
  echo "== 5/6 merge: skipped (set MERGE_WEIGHT to average with the original)"
fi

echo "== 6/6 evaluate before and after"
BEFORE="$OUT/eval_before.jsonl"
if [ "$EVAL_PROMPTS" = "$PROMPTS" ] && [ "$EVAL_SAMPLES" = "$N_SAMPLES" ]; then
  BEFORE="$SAMPLES"  # the same prompts and settings: stage 1 already measured it
fi
[ -f "$BEFORE" ] || evaluate "$CKPT" "$EVAL_PROMPTS" "$EVAL_SAMPLES" "$BEFORE"
AFTER="$OUT/eval_after_$(basename "$FINAL").jsonl"
[ -f "$AFTER" ] || evaluate "$FINAL" "$EVAL_PROMPTS" "$EVAL_SAMPLES" "$AFTER"
python - "${BEFORE%.jsonl}.summary.json" "${AFTER%.jsonl}.summary.json" "$FINAL" <<'PY'
import json, sys
before, after = (json.load(open(p)) for p in sys.argv[1:3])
for name, s in (("before", before), (f"after ({sys.argv[3]})", after)):
    print(f"long2short {name}: mean response length {s['response_length_mean']:.1f} tokens, "
          f"pass@1 {s['pass@1']:.3f}")
PY
