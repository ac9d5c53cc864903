#!/usr/bin/env bash
# The whole GPU check in one command, sized for one lent H100/H200 (< 10 minutes):
#
#     bash bench/run_all_gpu.sh                 # results under $OUT (default ./gpu_results)
#     LOG_DIR=/tmp/gpu_logs bash bench/run_all_gpu.sh   # keep $OUT to 2 files (device tool)
#     SMOKE=1 bash bench/run_all_gpu.sh         # CPU: every stage in a tiny mode or skipped
#     DRY_RUN=1 bash bench/run_all_gpu.sh       # print "stage<TAB>limit<TAB>command" and exit
#     GPU_KIT_STAGES="pytest_gpu train_step" bash bench/run_all_gpu.sh   # only these stages
#
# Other knobs: GPU_KIT_BUDGET_S (540), GPU_KIT_MIN_STAGE_S (20: a stage with less time left is
# skipped), GPU_KIT_MAXFAIL (pytest --maxfail, 10),
# GPU_KIT_TEST_TIMEOUT (pytest-timeout per test where installed, 180), PYTHON (python3).
#
# Stages, in order of importance, each under `timeout` and inside a global budget
# (GPU_KIT_BUDGET_S, default 540 s; a stage gets min(its limit, what is left) and is skipped
# when under GPU_KIT_MIN_STAGE_S, 20 s, are left): env (versions), triton_warmup
# (tests/gpu/warm_triton_cache.py: compiles the kernel variants of all later stages in
# parallel processes into Triton's disk cache), pytest_gpu (tests/gpu: every Triton kernel, the model, the engine, one RL iteration,
# at real sizes), train_step (bench/train_step.py at 32K/64K/128K), attention, fused_logprobs,
# decode_attention, ring_attention, generation, moe_experts, checkpoint_save (bench/*.py), pytest_gpu_legacy (the other
# gpu-marked tests in tests/, with what time is left). A failing or timed-out stage is recorded
# and the next one runs.
#
# Output: $LOG_DIR/<stage>.log (default $OUT/logs), $OUT/all_logs.txt (every stage's log, appended
# as it ends) and $OUT/summary.md (date, GPU, versions, per-stage status/time/command, the
# benchmark tables, the measured test errors next to their bounds), rewritten after every stage
# so a run cut short still leaves one. Paste summary.md into docs/benchmarks.md.
# Wheels: if .whl/*.whl exist (megatron-core etc., see DEVELOPERS.md) they are installed with
# pip --no-index --no-deps --target /tmp/site and put on PYTHONPATH first.
# Exit status: 0 when every stage is ok or skipped, 1 otherwise.

# The body is one brace group: bash parses it whole before running it, so editing this file
# during a run cannot break that run.
{
set -u -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
OUT=${OUT:-$ROOT/gpu_results}
LOG_DIR=${LOG_DIR:-$OUT/logs}
SMOKE=${SMOKE:-0}
DRY_RUN=${DRY_RUN:-0}
BUDGET=${GPU_KIT_BUDGET_S:-540}
MAXFAIL=${GPU_KIT_MAXFAIL:-10}
TEST_TIMEOUT=${GPU_KIT_TEST_TIMEOUT:-180}
PY=${PYTHON:-python3}
START=$(date +%s)
RESERVE=15   # seconds kept for the summary
MIN_STAGE=${GPU_KIT_MIN_STAGE_S:-20}   # a stage with less time left than this is skipped

export PYTHONUNBUFFERED=1
export PYTHONDONTWRITEBYTECODE=1
unset TRITON_INTERPRET   # compiled kernels; the scripts that want the interpreter set it
export TRITON_CACHE_AUTOTUNING=1   # later stages reuse the autotuning of earlier ones

# -- stages --------------------------------------------------------------------------------
# STAGES in order; LIMIT[stage] seconds; GPU_CMD[stage]; SMOKE_CMD[stage] where SMOKE=1 runs
# something else (a tiny mode), otherwise the GPU command (which then exits 0 without CUDA)
ENV_PY='
import json, os, platform, sys
info = {"python": sys.version.split()[0], "host": platform.node()}
try:
    import torch
    info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_mib=p.total_memory // 2**20, capability=f"{p.major}.{p.minor}",
                    sms=p.multi_processor_count)
except Exception as e:
    info["torch_error"] = repr(e)
from importlib import metadata
for name in ("triton", "megatron-core", "transformers", "numpy", "pytest", "pytest-timeout"):
    try:
        info[name] = metadata.version(name)
    except Exception:
        info[name] = None
import importlib.util
def found(name):
    try:
        return importlib.util.find_spec(name) is not None
    except Exception:
        return False
missing = [m for m in ("megatron.core", "megatron_k15", "transformers", "triton") if not found(m)]
info["missing_modules"] = ", ".join(missing) or "none"
for k, v in info.items():
    print(f"{k}: {v}")
with open(os.path.join(os.environ["LOG_DIR"], "env.json"), "w") as f:
    json.dump(info, f, indent=1)
'
PYTEST_OPTS="-q -rA --durations=25 -p no:cacheprovider --maxfail=$MAXFAIL"
if [ "$DRY_RUN" = 0 ] && "$PY" -c "import pytest_timeout" >/dev/null 2>&1; then
    PYTEST_OPTS="$PYTEST_OPTS --timeout=$TEST_TIMEOUT"
fi
LEGACY_TESTS=$(grep -l "^@pytest.mark.gpu" tests/test_*.py 2>/dev/null | tr '\n' ' ')

STAGES=(env triton_warmup pytest_gpu train_step attention fused_logprobs decode_attention
        ring_attention generation moe_experts checkpoint_save pytest_gpu_legacy)
declare -A LIMIT=([env]=60 [triton_warmup]=150 [pytest_gpu]=240 [train_step]=150 [attention]=90
                  [fused_logprobs]=75 [decode_attention]=60 [ring_attention]=75 [generation]=120
                  [moe_experts]=60 [checkpoint_save]=60 [pytest_gpu_legacy]=150)
declare -A GPU_CMD SMOKE_CMD
GPU_CMD[env]="(nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || echo 'nvidia-smi: not available'); \"$PY\" -c \"\$ENV_PY\""
GPU_CMD[triton_warmup]="\"$PY\" tests/gpu/warm_triton_cache.py --jobs 10 --timeout 140"
GPU_CMD[pytest_gpu]="\"$PY\" -m pytest -m gpu tests/gpu $PYTEST_OPTS"
GPU_CMD[train_step]="\"$PY\" bench/train_step.py --seq-lengths 32k 64k 128k --steps 1 --warmup 1 --profile-ops 25 --json \"$LOG_DIR/train_step.json\""
GPU_CMD[attention]="\"$PY\" bench/attention.py --seqlens 1k 4k 16k 64k --head-dims 128 --causal on --modes fwd fwd_bwd --check && \"$PY\" bench/attention.py --seqlens 16k 64k --head-dims 128 --causal on --modes fwd fwd_bwd --backends ours --window 4096 && for cap in 0 50; do \"$PY\" bench/attention.py --seqlens 8k --head-dims 128 256 --causal on --modes fwd fwd_bwd --backends ours --window 4096 --softcap \$cap || exit 1; done"
GPU_CMD[fused_logprobs]="\"$PY\" bench/fused_logprobs.py --sizes 8192x151936x3584 32768x151936x3584 --repeat 3"
GPU_CMD[decode_attention]="\"$PY\" bench/decode_attention.py --batch 1 64 256 --contexts 4k 32k 128k --heads 28 --kv-heads 4 --check"
GPU_CMD[generation]="\"$PY\" bench/generation.py --batch 1 64 256 --prompt 2048 --new-tokens 256 --hidden 896 --layers 24 --heads 14 --kv-heads 2 --ffn 4864 --vocab 151936 --workload uniform rl --max-hf-seconds 30 --profile-ops 25 && \"$PY\" bench/window_cache.py --pattern gpt-oss --window 128 --prompts 4 --samples-per-prompt 8 --prompt 2048 --new-tokens 512 --hidden 1024 --layers 24 --heads 16 --kv-heads 8 --ffn 2816 --vocab 32000 --kv-mib 1024 && \"$PY\" bench/mla_cache.py --prompts 4 --samples-per-prompt 8 --prompt 2048 --new-tokens 512 --hidden 2048 --layers 8 --heads 16 --kv-lora-rank 512 --qk-head-dim 128 --rope-dim 64 --v-head-dim 128 --ffn 4096 --vocab 32000 --kv-mib 1024"
GPU_CMD[ring_attention]="\"$PY\" bench/ring_attention.py --seqlen 128k --cp 2 4 8 --iters 2 --warmup 1"
GPU_CMD[moe_experts]="\"$PY\" bench/moe_experts.py --tokens 64 1024 4096 16384 --iters 5 --warmup 2"
GPU_CMD[checkpoint_save]="\"$PY\" bench/checkpoint_save.py --num-layers 0 --dtype bf16 --seq-length 4096 --steps 3"
GPU_CMD[pytest_gpu_legacy]="\"$PY\" -m pytest -m gpu $LEGACY_TESTS $PYTEST_OPTS"
SMOKE_CMD[train_step]="\"$PY\" bench/train_step.py --smoke --profile-ops 10 --json \"$LOG_DIR/train_step.json\""
SMOKE_CMD[fused_logprobs]="\"$PY\" bench/fused_logprobs.py --sizes 256x4096x64 --repeat 1"
SMOKE_CMD[generation]="\"$PY\" bench/generation.py --batch 1 2 --prompt 8 --new-tokens 4 --hidden 64 --layers 1 --heads 4 --kv-heads 2 --ffn 128 --vocab 512 --workload uniform --threads 1 --profile-ops 5 && \"$PY\" bench/window_cache.py --pattern gpt-oss --window 8 --prompts 1 --samples-per-prompt 2 --prompt 16 --new-tokens 24 --layers 2 --hidden 32 --heads 2 --kv-heads 1 --ffn 64 --vocab 64 --kv-mib 0.02 --threads 1 && \"$PY\" bench/mla_cache.py --prompts 1 --samples-per-prompt 2 --prompt 16 --new-tokens 24 --layers 2 --hidden 32 --heads 2 --kv-lora-rank 16 --qk-head-dim 8 --rope-dim 8 --v-head-dim 8 --ffn 64 --vocab 64 --kv-mib 0.05 --threads 1"
SMOKE_CMD[ring_attention]="${GPU_CMD[ring_attention]} --smoke --no-steps"
SMOKE_CMD[moe_experts]="\"$PY\" bench/moe_experts.py --smoke"
SMOKE_CMD[checkpoint_save]="\"$PY\" bench/checkpoint_save.py --smoke"
SMOKE_CMD[pytest_gpu_legacy]="echo 'SMOKE: skipped (these tests skip without CUDA; pytest_gpu shows the same mechanism)'"
# attention, decode_attention: the GPU flags are parsed, then the scripts exit 0 without CUDA

command_for() {
    if [ "$SMOKE" != 0 ] && [ -n "${SMOKE_CMD[$1]:-}" ]; then echo "${SMOKE_CMD[$1]}"; else echo "${GPU_CMD[$1]}"; fi
}

if [ "$DRY_RUN" != 0 ]; then
    for s in "${STAGES[@]}"; do printf '%s\t%s\t%s\n' "$s" "${LIMIT[$s]}" "$(command_for "$s")"; done
    exit 0
fi

mkdir -p "$OUT" "$LOG_DIR"
STATUS_TSV="$LOG_DIR/stages.tsv"
: > "$STATUS_TSV"
: > "$OUT/all_logs.txt"
rm -f "$LOG_DIR/tolerances.jsonl" "$LOG_DIR/train_step.json" "$LOG_DIR/env.json"
export LOG_DIR ENV_PY
export GPU_KIT_RECORD="$LOG_DIR/tolerances.jsonl"
HAVE_TIMEOUT=1
command -v timeout >/dev/null 2>&1 || HAVE_TIMEOUT=0

# -- wheels ----------------------------------------------------------------------------------
WHEELS="none"
if [ "$SMOKE" = 0 ] && compgen -G ".whl/*.whl" >/dev/null; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl > "$LOG_DIR/wheels.log" 2>&1; then
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
        WHEELS="installed: $(cd .whl && ls *.whl | tr '\n' ' ')"
    else
        WHEELS="FAILED to install (see wheels.log): $(cd .whl && ls *.whl | tr '\n' ' ')"
    fi
elif [ "$SMOKE" != 0 ]; then
    WHEELS="not installed (SMOKE)"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export GPU_KIT_WHEELS="$WHEELS"

# -- summary ---------------------------------------------------------------------------------
write_summary() {
    GPU_KIT_START="$START" GPU_KIT_BUDGET="$BUDGET" GPU_KIT_SMOKE="$SMOKE" OUT="$OUT" \
        "$PY" - "$STATUS_TSV" <<'PYEOF' || echo "run_all_gpu.sh: could not write the summary" >&2
import datetime, json, os, re, sys, time

tsv, out, log_dir = sys.argv[1], os.environ["OUT"], os.environ["LOG_DIR"]
rows = [l.rstrip("\n").split("\t") for l in open(tsv) if l.strip()]
env = {}
try:
    env = json.load(open(os.path.join(log_dir, "env.json")))
except Exception:
    pass
now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
total = int(time.time()) - int(os.environ["GPU_KIT_START"])
smoke = os.environ.get("GPU_KIT_SMOKE", "0") != "0"
gpu = env.get("gpu") or "no CUDA GPU"
if env.get("gpu"):
    gpu += f" ({env.get('gpu_memory_mib')} MiB, sm {env.get('capability')}, {env.get('sms')} SMs)"
vers = ", ".join(f"{k} {env.get(k)}" for k in ("python", "torch", "triton", "megatron-core", "transformers")
                 if env.get(k))
L = [f"# GPU check: `bash bench/run_all_gpu.sh`{' (SMOKE=1, CPU)' if smoke else ''}", "",
     f"- date: {now}", f"- machine: {gpu}; CUDA {env.get('cuda')}", f"- versions: {vers}",
     f"- wheels: {os.environ.get('GPU_KIT_WHEELS', 'none')}",
     f"- budget {os.environ['GPU_KIT_BUDGET']} s, elapsed {total} s, stages run: {len(rows)}", "",
     "| stage | status | seconds | command |", "|---|---|---|---|"]
for name, status, secs, rc, cmd in rows:
    shown = cmd.replace("|", "\\|")
    L.append(f"| {name} | {status} | {secs} | `{shown}` |")

NOISE = re.compile(r"UserWarning|warnings\.warn|FutureWarning|DeprecationWarning")


def log_lines(name):
    try:
        return [l.rstrip("\n") for l in open(os.path.join(log_dir, name + ".log"), errors="replace")]
    except OSError:
        return []


def tail_block(lines, n):
    keep = [l for l in lines if not NOISE.search(l)][-n:]
    return ["```"] + keep + ["```"] if keep else []


for name, status, secs, rc, cmd in rows:
    lines = log_lines(name)
    L += ["", f"## {name}: {status} ({secs} s)", ""]
    if name.startswith("pytest"):
        summ = [l for l in lines if re.search(r"\d+ (passed|failed|skipped|error|xfailed|deselected)", l)
                and (l.startswith("=") or re.match(r"^\d+ ", l))]
        L += [f"`{s.strip('= ')}`" for s in summ[-1:]]
        bad = [l for l in lines if re.match(r"^(FAILED|ERROR|XFAIL|XPASS) ", l)]
        if bad:
            L += ["", "```"] + bad[:60] + ["```"]
        slow = []
        grab = False
        for l in lines:
            if "slowest" in l and "durations" in l:
                grab = True
                continue
            if grab:
                if not l.strip() or l.startswith("="):
                    break
                slow.append(l)
        if slow:
            L += ["", "slowest:", "```"] + slow[:12] + ["```"]
        if status.startswith(("failed", "timeout")) and not bad:
            L += [""] + tail_block(lines, 40)
        continue
    if name == "env":
        L += tail_block(lines, 30)
        continue
    if any(l.startswith("|") for l in lines) and not status.startswith(("failed", "timeout")):
        # a markdown table: its "# " header lines as a list above it
        notes = [l[2:] for l in lines if l.startswith("# ") and not NOISE.search(l)]
        L += [f"- {n}" for n in notes] + ([""] if notes else [])
        L += [l for l in lines if l.startswith("|")]
    else:
        L += tail_block(lines, 60 if status == "ok" else 40)

rec = os.path.join(log_dir, "tolerances.jsonl")
if os.path.exists(rec):
    recs = [json.loads(l) for l in open(rec) if l.strip()]
    L += ["", "## Measured errors of the GPU tests (tests/gpu) against their bounds", "",
          f"{sum(r['ok'] for r in recs)} of {len(recs)} within bounds.", "",
          "| test | quantity | error | bound | ok |", "|---|---|---|---|---|"]
    for r in recs:
        test = r["test"].split("::", 1)[-1]
        L.append(f"| {test} | {r['quantity']} | {r['error']:.3g} | {r['bound']:.3g} | "
                 f"{'yes' if r['ok'] else '**NO**'} |")
with open(os.path.join(out, "summary.md"), "w") as f:
    f.write("\n".join(L) + "\n")
PYEOF
}

# -- run -------------------------------------------------------------------------------------
FAILED=0
run_stage() {
    local name=$1 cmd left limit t0 rc secs status log
    cmd=$(command_for "$name")
    log="$LOG_DIR/$name.log"
    left=$(( BUDGET - ($(date +%s) - START) - RESERVE ))
    limit=${LIMIT[$name]}
    [ "$name" = pytest_gpu_legacy ] && limit=$left   # the last stage takes what is left
    [ "$left" -lt "$limit" ] && limit=$left
    echo "=== [$name] $(date -u +%H:%M:%S) limit ${limit}s: $cmd"
    if [ "$limit" -lt "$MIN_STAGE" ]; then
        echo "skipped: time budget spent (${left}s left)" > "$log"
        status="skipped (time budget spent)"; rc=-1; secs=0
    else
        t0=$(date +%s)
        if [ "$HAVE_TIMEOUT" = 1 ]; then
            timeout -k 15 "$limit" bash -c "$cmd" > "$log" 2>&1 < /dev/null
        else
            bash -c "$cmd" > "$log" 2>&1 < /dev/null
        fi
        rc=$?
        secs=$(( $(date +%s) - t0 ))
        if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
            status="timeout (${limit}s)"
        elif [ "$rc" = 0 ]; then
            status=ok
            if grep -q "^SMOKE: skipped" "$log"; then
                status="skipped (SMOKE)"
            elif grep -qiE "no CUDA|nothing to benchmark|needs a CUDA GPU \(none found\)" "$log"; then
                status="skipped (no GPU; flags parsed)"
            elif [[ "$name" == pytest* ]] && ! grep -qE "[0-9]+ passed" "$log"; then
                status="skipped (no GPU)"
            fi
        elif [[ "$name" == pytest* ]] && [ "$rc" = 5 ]; then
            status="skipped (no tests collected)"
        else
            status="failed (rc $rc)"
        fi
    fi
    case "$status" in ok|skipped*) ;; *) FAILED=1 ;; esac
    echo "    -> $status (${secs}s)"
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$secs" "$rc" "$cmd" >> "$STATUS_TSV"
    { echo "===== $name: $status (${secs}s)"; echo "\$ $cmd"; cat "$log"; echo; } >> "$OUT/all_logs.txt"
    write_summary
}

echo "run_all_gpu.sh: OUT=$OUT LOG_DIR=$LOG_DIR SMOKE=$SMOKE budget ${BUDGET}s; wheels: $WHEELS"
for s in "${STAGES[@]}"; do
    if [ -n "${GPU_KIT_STAGES:-}" ] && [[ " $GPU_KIT_STAGES " != *" $s "* ]]; then
        continue
    fi
    run_stage "$s"
done
write_summary
echo "run_all_gpu.sh: done in $(( $(date +%s) - START ))s; summary: $OUT/summary.md"
cat "$STATUS_TSV" | cut -f1-3 | column -t -s $'\t' 2>/dev/null || cut -f1-3 "$STATUS_TSV"
exit $FAILED
}
