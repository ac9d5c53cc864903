#!/usr/bin/env bash
# Kimi k1.5 long-context RL at 128K from a Hugging Face checkpoint, in four stages, each
# skipped when its output already exists (so re-running after a crash or a Slurm requeue
# picks up where it stopped):
#
#   1 prep     prompts JSONL -> indexed dataset           (tools/preprocess_data.py --mode prompts)
#   2 convert  HF checkpoint -> ours at TP x PP           (tools/checkpoint/convert_hf_to_megatron.py)
#   3 rl       online-mirror-descent RL, 128K context     (torchrun -m megatron_k15.train_rl)
#   4 export   latest RL checkpoint -> HF directory       (tools/checkpoint/convert_megatron_to_hf.py)
#
#   HF_MODEL=/data/Qwen2.5-7B PROMPTS=/data/math_code.jsonl OUT=/shared/runs/rl128k \
#       bash examples/train_rl_128k.sh                   # one node, 8 GPUs
#   DRY_RUN=1 bash examples/train_rl_128k.sh             # print the commands, run nothing
#   STAGES=rl bash examples/train_rl_128k.sh             # only some stages (comma-separated)
#
# Multi-node: run one copy per node (examples/slurm/train_rl_128k.sbatch does this with srun).
# Under Slurm the rendezvous comes from SLURM_* (MASTER_ADDR = first host of SLURM_NODELIST,
# NNODES = SLURM_NNODES, NODE_RANK = SLURM_NODEID); OUT must be on a filesystem all nodes
# share. Node 0 does prep/convert/export; the other nodes wait for its outputs.
# Relative paths are taken from the directory you launch in, not from the repository.
# See docs/launching.md for every variable and for how to pick TP/PP/CP.
# Exit code 75: RL stopped early on a checkpoint (SIGTERM/SIGUSR1, or --exit-duration-in-mins /
# --exit-interval in EXTRA_RL_ARGS), so nothing was exported; running the script again resumes.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"   # run from a checkout without installing
PYTHON=${PYTHON:-python}
DRY_RUN=${DRY_RUN:-0}
STAGES=${STAGES:-prep,convert,rl,export}

# ---- inputs and outputs -------------------------------------------------------------------
HF_MODEL=${HF_MODEL:-Qwen2.5-7B}          # local HF directory (huggingface-cli download Qwen/Qwen2.5-7B --local-dir Qwen2.5-7B)
PROMPTS=${PROMPTS:-prompts.jsonl}         # RL prompt JSONL (DESIGN.md section 5)
EVAL_PROMPTS=${EVAL_PROMPTS:-}            # optional held-out prompt JSONL, evaluated before/after
OUT=${OUT:-outputs/rl_128k}
TOKENIZER=${TOKENIZER:-}                  # default: the HF model's tokenizer (carried by the checkpoints)

# ---- parallel layout: 7B on 8x80GB -------------------------------------------------------
# The memory planner's first choice for Qwen2.5-7B at 128K tokens on 8x80GB: tp=2, dp=4
# (61 GiB training peak with full recompute and fused log-probs); CP=2 (45 GiB) or TP=4
# (38 GiB) leave more headroom, e.g. for a larger --rollout-batch-size:
# layout: tools/plan_memory.py --suggest --model-preset qwen2.5-7b --seq-length 131072 --micro-batch-size 1 --bf16 --recompute-granularity full --logprob-impl fused --world-size 8
TP=${TP:-2}
PP=${PP:-1}
CP=${CP:-1}
# mixture-of-experts models only: experts split over EP of the dp x cp ranks (all-to-all);
# e.g. Qwen3-30B-A3B (128 experts) on 8 GPUs: TP=1 EP=8
EP=${EP:-1}
NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}

# ---- sequence lengths: one trajectory (prompt + response) fits SEQ_LENGTH ---------------------
SEQ_LENGTH=${SEQ_LENGTH:-131072}                    # 128K context window (needs max_position_embeddings >= it)
PROMPT_MAX_TOKENS=${PROMPT_MAX_TOKENS:-4096}        # longer prompts are dropped at preprocessing
ROLLOUT_MAX_TOKENS=${ROLLOUT_MAX_TOKENS:-$((SEQ_LENGTH - PROMPT_MAX_TOKENS))}
ROLLOUT_SEGMENT_TOKENS=${ROLLOUT_SEGMENT_TOKENS:-16384}  # partial rollouts: new tokens per trajectory per iteration
ROLLOUT_BATCH_SIZE=${ROLLOUT_BATCH_SIZE:-16}        # requests decoded together per data-parallel rank

# ---- RL hyper-parameters (Kimi k1.5 section 2.3) ----------------------------------------------
RL_LOSS=${RL_LOSS:-omd}
RL_TAU=${RL_TAU:-0.1}
KL_COEF=${KL_COEF:-0}                               # RL_LOSS=grpo: k3 KL weight to the converted model (frozen copy)
REWARD_WORKERS=${REWARD_WORKERS:-4}                 # threads per rank grading responses (code tests in parallel)
SAMPLES_PER_PROMPT=${SAMPLES_PER_PROMPT:-8}
PROMPTS_PER_ITER=${PROMPTS_PER_ITER:-32}
UPDATES_PER_ITER=${UPDATES_PER_ITER:-2}
TRAIN_ITERS=${TRAIN_ITERS:-200}
LR=${LR:-1e-6}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-1}             # one 128K trajectory per microbatch
# trajectories packed into microbatches of this many tokens per GPU (x CP per microbatch): a 128K
# one alone, short ones together, no padding; empty = MICRO_BATCH_SIZE padded trajectories
MAX_TOKENS_PER_GPU=${MAX_TOKENS_PER_GPU-$((SEQ_LENGTH / CP))}
TEMPERATURE=${TEMPERATURE:-1.0}
SAMPLING=${SAMPLING:-prioritized}
LENGTH_PENALTY_WEIGHT=${LENGTH_PENALTY_WEIGHT:-0.0}
LENGTH_PENALTY_START_ITER=${LENGTH_PENALTY_START_ITER:-0}
SAVE_INTERVAL=${SAVE_INTERVAL:-5}                   # also bounds the work lost to a preemption
# keep the newest checkpoint and those at multiples of this (7B: ~42 GB each); empty = keep all
SAVE_RETAIN_INTERVAL=${SAVE_RETAIN_INTERVAL-$((SAVE_INTERVAL * 10))}
ASYNC_SAVE=${ASYNC_SAVE:-0}                         # 1: checkpoints written while training goes on
SEED=${SEED:-1234}
BF16=${BF16:-1}                                     # 0 on CPU
RECOMPUTE=${RECOMPUTE:-full}                        # activation recompute at 128K; empty = off
# a collective waits this long for the slowest rank (ranks done with their rollouts wait for the
# others'; a 16K-token segment after a 100K prefix can take many minutes) before the job aborts
DIST_TIMEOUT_MINUTES=${DIST_TIMEOUT_MINUTES:-120}
# every N-th iteration's rollouts (prompt, response, reward, advantage) to rl/rollouts/*.jsonl; empty = off
ROLLOUT_LOG_INTERVAL=${ROLLOUT_LOG_INTERVAL-10}
EXTRA_RL_ARGS=${EXTRA_RL_ARGS:-}                    # appended verbatim (split on spaces)
# 1: the tokenizer may run its own code (Moonlight's and Kimi K2's tiktoken tokenizers): --trust-remote-code
TRUST_REMOTE_CODE=${TRUST_REMOTE_CODE:-0}

# ---- where the stages write -------------------------------------------------------------------
DATA_DIR="$OUT/data"
CONVERTED="$OUT/converted_tp${TP}_pp${PP}"          # loads at any layout; this one loads fastest
RL_DIR="$OUT/rl"                                    # RL checkpoints; TensorBoard + metrics.jsonl in rl/tb
HF_OUT="$OUT/hf"
HF_STAMP="$OUT/hf_exported_iteration.txt"           # which RL iteration $HF_OUT holds

# ---- launch topology: single node (standalone) or Slurm multi-node ---------------------------
NNODES=${NNODES:-${SLURM_NNODES:-1}}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-${SLURM_PROCID:-0}}}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_BACKEND=${RDZV_BACKEND:-c10d}
RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-k15-rl-128k}}

first_slurm_host() {
  local nodelist=${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}} hosts
  [ -n "$nodelist" ] || return 1
  if command -v scontrol >/dev/null 2>&1; then
    hosts=$(scontrol show hostnames "$nodelist")   # expands "gpu[01-04]"; no head: pipefail + SIGPIPE
    echo "${hosts%%$'\n'*}"
  elif [[ $nodelist =~ ^([^,\[]+)(\[([^],-]+))? ]]; then
    echo "${BASH_REMATCH[1]}${BASH_REMATCH[3]}"    # "gpu[01-04],x" -> "gpu01" without scontrol
  else
    return 1
  fi
}
if [ "$NNODES" -gt 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
  MASTER_ADDR=$(first_slurm_host) || { echo "error: NNODES=$NNODES needs MASTER_ADDR (or SLURM_NODELIST)" >&2; exit 1; }
fi

WORLD=$((NNODES * NPROC_PER_NODE))
if (( WORLD % (TP * PP * CP) )); then
  echo "error: $NNODES node(s) x NPROC_PER_NODE=$NPROC_PER_NODE = $WORLD ranks is not divisible by" \
       "TP=$TP x PP=$PP x CP=$CP; change the sizes" >&2
  exit 1
fi
if (( (WORLD / (TP * PP)) % EP )); then
  echo "error: EP=$EP does not divide the $((WORLD / (TP * PP))) data x context parallel ranks" \
       "(WORLD=$WORLD / (TP=$TP x PP=$PP)); change EP or the sizes" >&2
  exit 1
fi
if (( PROMPT_MAX_TOKENS + ROLLOUT_MAX_TOKENS > SEQ_LENGTH )); then
  echo "error: PROMPT_MAX_TOKENS=$PROMPT_MAX_TOKENS + ROLLOUT_MAX_TOKENS=$ROLLOUT_MAX_TOKENS exceeds" \
       "SEQ_LENGTH=$SEQ_LENGTH; a trajectory must fit the context window" >&2
  exit 1
fi

# ---- helpers ----------------------------------------------------------------------------------
# run CMD...: execute, or under DRY_RUN=1 print it as "+ cmd args" (shell-quoted, one line).
run() {
  if [ "$DRY_RUN" = 1 ]; then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}
want() { [[ ",$STAGES," == *",$1,"* ]]; }
# Nodes other than 0 never write shared outputs; they wait for node 0's (multi-node only).
wait_for() {
  local file=$1 waited=0 limit=${WAIT_TIMEOUT:-7200}
  if [ "$DRY_RUN" = 1 ]; then echo "# node $NODE_RANK waits for $file"; return 0; fi
  until [ -f "$file" ]; do
    (( waited >= limit )) && { echo "error: node $NODE_RANK: $file did not appear in ${limit}s" >&2; exit 1; }
    sleep 10; waited=$((waited + 10))
  done
}
latest_iteration() {  # the RL checkpoint's iteration, or empty
  local f="$RL_DIR/latest_checkpointed_iteration.txt"
  [ -f "$f" ] && tr -d '[:space:]' < "$f"
  return 0
}
need() {  # an input a stage reads must exist (not checked in DRY_RUN)
  if [ "$DRY_RUN" != 1 ] && [ ! -e "$1" ]; then echo "error: $2 $1 does not exist" >&2; exit 1; fi
}

echo "train_rl_128k: stages=$STAGES nodes=$NNODES node_rank=$NODE_RANK nproc_per_node=$NPROC_PER_NODE" \
     "tp=$TP pp=$PP cp=$CP ep=$EP dp=$((WORLD / (TP * PP * CP))) seq=$SEQ_LENGTH rollout=$ROLLOUT_MAX_TOKENS out=$OUT"
[ "$DRY_RUN" = 1 ] || mkdir -p "$OUT"

# ---- 1/4 preprocess prompts -------------------------------------------------------------------
echo "== 1/4 prep: prompts -> $DATA_DIR"
prep_one() {  # JSONL, PREFIX
  if [ -f "$2.json" ]; then  # PREFIX.json is written last: it exists only for a complete dataset
    echo "skip: $2.json exists"
  elif [ "$NODE_RANK" != 0 ]; then
    wait_for "$2.json"
  else
    need "$1" "prompts file"
    TRUST=()
    [ "$TRUST_REMOTE_CODE" = 1 ] && TRUST=(--trust-remote-code)
    run "$PYTHON" "$REPO/tools/preprocess_data.py" --mode prompts --input "$1" --output-prefix "$2" \
      --tokenizer "${TOKENIZER:-$HF_MODEL}" --seq-length "$PROMPT_MAX_TOKENS" --no-progress "${TRUST[@]}"
  fi
}
if want prep; then
  prep_one "$PROMPTS" "$DATA_DIR/prompts"
  [ -z "$EVAL_PROMPTS" ] || prep_one "$EVAL_PROMPTS" "$DATA_DIR/eval_prompts"
else
  echo "skip: not in STAGES"
fi

# ---- 2/4 convert the HF checkpoint ---------------------------------------------------------------
echo "== 2/4 convert: $HF_MODEL -> $CONVERTED (tp=$TP pp=$PP)"
if ! want convert; then
  echo "skip: not in STAGES"
elif [ -f "$RL_DIR/latest_checkpointed_iteration.txt" ]; then
  echo "skip: RL already has a checkpoint in $RL_DIR (it resumes from there)"
elif [ -f "$CONVERTED/latest_checkpointed_iteration.txt" ]; then  # the converter renames a complete dir
  echo "skip: $CONVERTED exists"
elif [ "$NODE_RANK" != 0 ]; then
  wait_for "$CONVERTED/latest_checkpointed_iteration.txt"
else
  need "$HF_MODEL/config.json" "HF model (config.json)"
  run "$PYTHON" "$REPO/tools/checkpoint/convert_hf_to_megatron.py" --hf-dir "$HF_MODEL" --save "$CONVERTED" \
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
fi

# ---- 3/4 RL -----------------------------------------------------------------------------------
echo "== 3/4 rl: $TRAIN_ITERS iterations, $RL_LOSS, rollouts up to $ROLLOUT_MAX_TOKENS tokens -> $RL_DIR"
done_iters=$(latest_iteration)
if ! want rl; then
  echo "skip: not in STAGES"
elif [[ $done_iters =~ ^[0-9]+$ ]] && (( done_iters >= TRAIN_ITERS )); then
  echo "skip: $RL_DIR is at iteration $done_iters >= TRAIN_ITERS=$TRAIN_ITERS"
else
  if [ -n "$done_iters" ]; then
    LOAD_ARGS=(--load "$RL_DIR")                  # resume: weights, optimizer, sampler, replay buffer
    echo "resume from $RL_DIR at iteration $done_iters"
  else
    LOAD_ARGS=(--load "$CONVERTED" --finetune)    # first start: weights only, iteration 0
  fi
  if [ "$NNODES" -gt 1 ]; then
    # c10d rendezvous on the first node; --node-rank is informative there (c10d assigns ranks)
    # and used as is with RDZV_BACKEND=static.
    LAUNCH=(--nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" --node-rank "$NODE_RANK"
            --rdzv-backend "$RDZV_BACKEND" --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID")
  else
    LAUNCH=(--standalone --nnodes 1 --nproc-per-node "$NPROC_PER_NODE")  # free port, no clash with other jobs
  fi
  OPT_ARGS=()
  [ -n "$TOKENIZER" ] && OPT_ARGS+=(--tokenizer "$TOKENIZER")
  [ "$TRUST_REMOTE_CODE" = 1 ] && OPT_ARGS+=(--trust-remote-code)
  [ -n "$EVAL_PROMPTS" ] && OPT_ARGS+=(--eval-data "$DATA_DIR/eval_prompts")
  [ "$BF16" = 1 ] && OPT_ARGS+=(--bf16)
  [ -n "$RECOMPUTE" ] && OPT_ARGS+=(--recompute-granularity "$RECOMPUTE")
  [ -n "$SAVE_RETAIN_INTERVAL" ] && OPT_ARGS+=(--save-retain-interval "$SAVE_RETAIN_INTERVAL")
  [ "$ASYNC_SAVE" = 1 ] && OPT_ARGS+=(--async-save)
  (( ROLLOUT_SEGMENT_TOKENS > 0 )) && OPT_ARGS+=(--rollout-segment-tokens "$ROLLOUT_SEGMENT_TOKENS")
  [ -n "$MAX_TOKENS_PER_GPU" ] && OPT_ARGS+=(--use-dynamic-batch-size --max-tokens-per-gpu "$MAX_TOKENS_PER_GPU")
  [ -n "$ROLLOUT_LOG_INTERVAL" ] && OPT_ARGS+=(--rollout-log-dir "$RL_DIR/rollouts" --rollout-log-interval "$ROLLOUT_LOG_INTERVAL")
  # GRPO's KL reference: the model RL started from (frozen; also when resuming)
  awk -v k="$KL_COEF" 'BEGIN { exit !(k + 0 != 0) }' && OPT_ARGS+=(--kl-coef "$KL_COEF" --ref-load "$CONVERTED")
  read -r -a EXTRA <<< "$EXTRA_RL_ARGS"
  if [ "$NODE_RANK" != 0 ]; then  # node 0 may still be converting
    wait_for "$DATA_DIR/prompts.json"
    [ -n "$done_iters" ] || wait_for "$CONVERTED/latest_checkpointed_iteration.txt"
  fi
  # CUDA_DEVICE_MAX_CONNECTIONS=1 keeps tp/sp communication kernels in issue order with compute.
  export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
  # Rollouts and trajectories vary in length up to 128K: avoid allocator fragmentation.
  export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
  # USR1 (the batch script's `pkill -USR1 -f megatron_k15.train_rl`, which matches torchrun's
  # command line too) is for the ranks' --exit-signal-handler: torchrun and this shell ignore it
  # instead of dying from it (the ranks install their own handler)
  trap '' USR1
  run "$PYTHON" -m torch.distributed.run "${LAUNCH[@]}" -m megatron_k15.train_rl \
    "${LOAD_ARGS[@]}" --prompt-data "$DATA_DIR/prompts" \
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" --context-parallel-size "$CP" \
    --expert-model-parallel-size "$EP" \
    --seq-length "$SEQ_LENGTH" --micro-batch-size "$MICRO_BATCH_SIZE" \
    --rl-loss "$RL_LOSS" --rl-tau "$RL_TAU" --samples-per-prompt "$SAMPLES_PER_PROMPT" \
    --prompts-per-iter "$PROMPTS_PER_ITER" --updates-per-iter "$UPDATES_PER_ITER" \
    --rollout-max-tokens "$ROLLOUT_MAX_TOKENS" --rollout-batch-size "$ROLLOUT_BATCH_SIZE" \
    --temperature "$TEMPERATURE" --sampling "$SAMPLING" --reward-workers "$REWARD_WORKERS" \
    --length-penalty-weight "$LENGTH_PENALTY_WEIGHT" --length-penalty-start-iter "$LENGTH_PENALTY_START_ITER" \
    --train-iters "$TRAIN_ITERS" --lr "$LR" --lr-decay-style constant --clip-grad 1.0 --seed "$SEED" \
    --save "$RL_DIR" --save-interval "$SAVE_INTERVAL" --exit-signal-handler \
    --distributed-timeout-minutes "$DIST_TIMEOUT_MINUTES" \
    --tensorboard-dir "$RL_DIR/tb" --log-interval 1 \
    "${OPT_ARGS[@]}" "${EXTRA[@]}"
  trap - USR1
  if [ "$DRY_RUN" != 1 ] && [ "$(latest_iteration)" = "$done_iters" ]; then
    # an exit 0 without a new checkpoint would make the batch script requeue forever
    echo "error: RL ended without a new checkpoint (still at iteration ${done_iters:-none} of TRAIN_ITERS=$TRAIN_ITERS);" \
         "does EXTRA_RL_ARGS lower --train-iters?" >&2
    exit 1
  fi
fi

# ---- 4/4 export to HF ---------------------------------------------------------------------------
echo "== 4/4 export: $RL_DIR -> $HF_OUT"
done_iters=$(latest_iteration)
if ! want export; then
  echo "skip: not in STAGES"
elif [ "$NODE_RANK" != 0 ]; then
  echo "skip: node 0 exports"
elif [ "$DRY_RUN" != 1 ] && ! { [[ $done_iters =~ ^[0-9]+$ ]] && (( done_iters >= TRAIN_ITERS )); }; then
  # a signal, --exit-duration-in-mins or --exit-interval ended RL early on a checkpoint: the
  # batch script requeues on this code; a rerun resumes (export an earlier iteration with
  # tools/checkpoint/convert_megatron_to_hf.py)
  echo "train_rl_128k: RL stopped at iteration ${done_iters:-0} of TRAIN_ITERS=$TRAIN_ITERS; nothing exported," \
       "run again to resume" >&2
  exit 75
elif [ -f "$HF_OUT/config.json" ] && [ -n "$done_iters" ] && [ "$(cat "$HF_STAMP" 2>/dev/null)" = "$done_iters" ]; then
  echo "skip: $HF_OUT holds iteration $done_iters"
else
  OVERWRITE=()
  [ -e "$HF_OUT" ] && OVERWRITE=(--overwrite)    # an export of an older iteration
  run "$PYTHON" "$REPO/tools/checkpoint/convert_megatron_to_hf.py" --load "$RL_DIR" --save "$HF_OUT" "${OVERWRITE[@]}"
  if [ "$DRY_RUN" != 1 ]; then
    latest_iteration > "$HF_STAMP"
    echo "train_rl_128k: HF model of iteration $(cat "$HF_STAMP") in $HF_OUT; metrics in $RL_DIR/tb/metrics.jsonl"
  fi
fi
