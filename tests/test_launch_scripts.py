"""Launch scripts: examples/train_rl_128k.sh and examples/slurm/train_rl_128k.sbatch.

Dry runs check the command lines each script would run (single node, and a fake 4-node Slurm
job with a fake ``scontrol`` on PATH); the slow test runs every stage for real on a tiny
model (stopped by the batch script's USR1: exit code 75, nothing exported; the rerun
resumes) and checks the exported HF model against the one it started from (LR=0, so RL
must hand back exactly the same weights), then that a further run skips every stage.
"""

import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train_rl_128k.sh")
SBATCH = os.path.join(ROOT, "examples", "slurm", "train_rl_128k.sbatch")
# variables the scripts read: never inherited from the developer's shell
SCRIPT_VARS = {
    "DRY_RUN", "STAGES", "HF_MODEL", "PROMPTS", "EVAL_PROMPTS", "OUT", "TOKENIZER", "TP", "PP", "CP", "EP",
    "NPROC_PER_NODE", "SEQ_LENGTH", "PROMPT_MAX_TOKENS", "ROLLOUT_MAX_TOKENS", "ROLLOUT_SEGMENT_TOKENS",
    "ROLLOUT_BATCH_SIZE", "RL_LOSS", "RL_TAU", "KL_COEF", "REWARD_WORKERS", "SAMPLES_PER_PROMPT", "PROMPTS_PER_ITER", "UPDATES_PER_ITER",
    "TRAIN_ITERS", "LR", "MICRO_BATCH_SIZE", "MAX_TOKENS_PER_GPU", "TEMPERATURE", "SAMPLING", "LENGTH_PENALTY_WEIGHT",
    "LENGTH_PENALTY_START_ITER", "SAVE_INTERVAL", "SAVE_RETAIN_INTERVAL", "ASYNC_SAVE", "SEED", "BF16", "RECOMPUTE", "EXTRA_RL_ARGS", "NNODES",
    "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "RDZV_BACKEND", "RDZV_ID", "LOG_DIR", "REPO", "PYTHON",
}
HOSTS = ["node-a7", "node-b2", "node-c9", "node-d4"]  # what the fake scontrol expands the list to


def clean_env(**overrides) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in SCRIPT_VARS}
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def fake_slurm(tmp_path, node: int = 0, **overrides) -> dict:
    """A 4-node job as srun's task on ``node`` sees it, with a fake scontrol first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text("#!/bin/sh\n"
                        "# fake: 'show hostnames LIST' prints one host per line; anything else fails\n"
                        'if [ "$1 $2" = "show hostnames" ]; then\n'
                        f"  printf '%s\\n' {' '.join(HOSTS)}\n"
                        "  exit 0\nfi\nexit 3\n")
    scontrol.chmod(0o755)
    # SLURM_NODELIST deliberately differs from the fake hosts: the endpoint must come from scontrol
    slurm = dict(SLURM_JOB_ID=4242, SLURM_JOB_NODELIST="gpu[001-004]", SLURM_NODELIST="gpu[001-004]",
                 SLURM_NNODES=4, SLURM_NODEID=node, SLURM_PROCID=node, SLURM_LOCALID=0, SLURM_GPUS_ON_NODE=8,
                 SLURM_CPUS_ON_NODE=96, SLURM_SUBMIT_DIR=ROOT)
    return clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", **{**slurm, **overrides})


def run(script, env, cwd, timeout=120):
    res = subprocess.run(["bash", script], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{script} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res.stdout


def commands(stdout: str) -> list[list[str]]:
    """The '+ cmd' lines of a dry run, split like the shell would."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def value(argv: list[str], flag: str) -> str:
    assert argv.count(flag) == 1, f"{flag} appears {argv.count(flag)} times in {argv}"
    return argv[argv.index(flag) + 1]


def torchruns(cmds):
    return [c for c in cmds if c[1:3] == ["-m", "torch.distributed.run"]]


def with_script(cmds, name):
    return [c for c in cmds if any(a.endswith(name) for a in c)]


def test_scripts_parse():
    for path in (SCRIPT, SBATCH):
        res = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr


def test_single_node_dry_run_defaults(tmp_path):
    out = run(SCRIPT, clean_env(DRY_RUN=1, OUT=tmp_path / "o", HF_MODEL="/m/Qwen2.5-7B", PROMPTS="/d/p.jsonl"),
              tmp_path)
    cmds = commands(out)
    assert len(cmds) == 4, out  # prep, convert, rl, export, each once
    assert not (tmp_path / "o").exists()  # a dry run writes nothing
    prep, convert, rl, export = cmds
    assert prep[1].endswith("tools/preprocess_data.py") and value(prep, "--mode") == "prompts"
    assert value(prep, "--input") == "/d/p.jsonl" and value(prep, "--tokenizer") == "/m/Qwen2.5-7B"
    assert convert[1].endswith("convert_hf_to_megatron.py") and value(convert, "--hf-dir") == "/m/Qwen2.5-7B"
    assert value(convert, "--tensor-model-parallel-size") == "2"  # the planner's 7B/128K layout
    assert value(convert, "--pipeline-model-parallel-size") == "1"
    assert torchruns([rl]) == [rl]
    assert "--standalone" in rl and value(rl, "--nnodes") == "1" and value(rl, "--nproc-per-node") == "8"
    assert "--rdzv-endpoint" not in rl and "--node-rank" not in rl
    assert rl[rl.index("-m", 3) + 1] == "megatron_k15.train_rl"
    assert value(rl, "--tensor-model-parallel-size") == "2"
    assert value(rl, "--pipeline-model-parallel-size") == "1"
    assert value(rl, "--context-parallel-size") == "1"
    assert value(rl, "--expert-model-parallel-size") == "1"
    assert value(rl, "--seq-length") == "131072"
    assert "--exit-signal-handler" in rl  # a requeue checkpoints first
    # rollouts fill the 128K window minus the prompt budget the preprocessing enforces
    assert int(value(rl, "--rollout-max-tokens")) + int(value(prep, "--seq-length")) == 131072
    assert value(rl, "--load") == value(convert, "--save") and "--finetune" in rl
    assert value(rl, "--prompt-data") == value(prep, "--output-prefix")
    assert "--kl-coef" not in rl and "--ref-load" not in rl  # OMD: its KL is to the iteration's start
    assert value(rl, "--reward-workers") == "4"
    assert value(rl, "--save-interval") == "5" and value(rl, "--save-retain-interval") == "50"
    assert "--async-save" not in rl
    assert "--trust-remote-code" not in rl + prep  # only when asked
    assert export[1].endswith("convert_megatron_to_hf.py") and value(export, "--load") == value(rl, "--save")


def test_single_node_dry_run_overrides(tmp_path):
    env = clean_env(DRY_RUN=1, OUT=tmp_path / "o", TP=2, PP=1, CP=1, NPROC_PER_NODE=4, SEQ_LENGTH=32768,
                    PROMPT_MAX_TOKENS=1024, ROLLOUT_MAX_TOKENS=30000, ROLLOUT_SEGMENT_TOKENS=4096,
                    SAMPLES_PER_PROMPT=4, PROMPTS_PER_ITER=16, TRAIN_ITERS=7, LR="3e-7", RL_TAU=0.5,
                    TOKENIZER="byte", EVAL_PROMPTS="/d/eval.jsonl", EXTRA_RL_ARGS="--top-p 0.95 --exact-logz",
                    SAVE_RETAIN_INTERVAL="", ASYNC_SAVE=1, TRUST_REMOTE_CODE=1)
    cmds = commands(run(SCRIPT, env, tmp_path))
    (rl,) = torchruns(cmds)
    assert "--save-retain-interval" not in rl  # empty: every checkpoint stays
    assert "--async-save" in rl
    expect = {"--nproc-per-node": "4", "--tensor-model-parallel-size": "2", "--context-parallel-size": "1",
              "--seq-length": "32768", "--rollout-max-tokens": "30000", "--rollout-segment-tokens": "4096",
              "--samples-per-prompt": "4", "--prompts-per-iter": "16", "--train-iters": "7", "--lr": "3e-7",
              "--rl-tau": "0.5", "--tokenizer": "byte", "--top-p": "0.95"}
    for flag, v in expect.items():
        assert value(rl, flag) == v, flag
    assert rl[-3:] == ["--top-p", "0.95", "--exact-logz"]  # passthrough goes last, so it wins
    prep, prep_eval = with_script(cmds, "preprocess_data.py")
    assert value(prep, "--tokenizer") == "byte" and value(prep, "--seq-length") == "1024"
    assert all("--trust-remote-code" in c for c in (rl, prep, prep_eval))  # TRUST_REMOTE_CODE=1
    assert value(prep_eval, "--input") == "/d/eval.jsonl"
    assert value(rl, "--eval-data") == value(prep_eval, "--output-prefix")


def test_grpo_dry_run_keeps_the_converted_model_as_kl_reference(tmp_path):
    env = clean_env(DRY_RUN=1, OUT=tmp_path / "o", RL_LOSS="grpo", KL_COEF="0.001")
    cmds = commands(run(SCRIPT, env, tmp_path))
    (rl,) = torchruns(cmds)
    (convert,) = with_script(cmds, "convert_hf_to_megatron.py")
    assert value(rl, "--rl-loss") == "grpo" and value(rl, "--kl-coef") == "0.001"
    assert value(rl, "--ref-load") == value(convert, "--save") == value(rl, "--load")
    (rl,) = torchruns(commands(run(SCRIPT, clean_env(DRY_RUN=1, OUT=tmp_path / "o", RL_LOSS="grpo", KL_COEF="0.0"),
                                   tmp_path)))
    assert "--kl-coef" not in rl and "--ref-load" not in rl  # 0.0 is zero


def test_resume_and_skips_dry_run(tmp_path):
    out_dir = tmp_path / "o"
    (out_dir / "rl").mkdir(parents=True)
    (out_dir / "data").mkdir()
    (out_dir / "data" / "prompts.json").write_text("{}")
    (out_dir / "rl" / "latest_checkpointed_iteration.txt").write_text("3\n")
    env = clean_env(DRY_RUN=1, OUT=out_dir, TRAIN_ITERS=10)
    out = run(SCRIPT, env, tmp_path)
    cmds = commands(out)
    (rl,) = torchruns(cmds)
    assert value(rl, "--load") == str(out_dir / "rl") and "--finetune" not in rl  # resume, not restart
    assert not with_script(cmds, "preprocess_data.py") and not with_script(cmds, "convert_hf_to_megatron.py")
    assert "resume from" in out
    # once RL has reached TRAIN_ITERS only the export is left
    (out_dir / "rl" / "latest_checkpointed_iteration.txt").write_text("10\n")
    cmds = commands(run(SCRIPT, env, tmp_path))
    assert len(cmds) == 1 and cmds[0][1].endswith("convert_megatron_to_hf.py")


def test_bad_layout_fails_before_any_work(tmp_path):
    env = clean_env(DRY_RUN=1, OUT=tmp_path / "o", TP=4, CP=2, NPROC_PER_NODE=4)
    res = subprocess.run(["bash", SCRIPT], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode != 0 and "not divisible" in res.stderr and "+ " not in res.stdout
    # an MoE layout: EP must divide the dp x cp ranks (8 / (TP=2) = 4)
    env = clean_env(DRY_RUN=1, OUT=tmp_path / "o", TP=2, EP=8, NPROC_PER_NODE=8)
    res = subprocess.run(["bash", SCRIPT], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode != 0 and "EP=8 does not divide the 4" in res.stderr and "+ " not in res.stdout
    env = clean_env(DRY_RUN=1, OUT=tmp_path / "o", TP=1, EP=8, NPROC_PER_NODE=8)
    (rl,) = torchruns(commands(run(SCRIPT, env, tmp_path)))
    assert value(rl, "--expert-model-parallel-size") == "8"


@pytest.mark.parametrize("node", [0, 2])
def test_slurm_node_dry_run(tmp_path, node):
    env = fake_slurm(tmp_path, node, DRY_RUN=1, OUT=tmp_path / "o", TP=4, PP=1, CP=2)
    cmds = commands(run(SCRIPT, env, tmp_path))
    (rl,) = torchruns(cmds)
    assert "--standalone" not in rl
    assert value(rl, "--nnodes") == "4" and value(rl, "--nproc-per-node") == "8"
    assert value(rl, "--node-rank") == str(node)
    assert value(rl, "--rdzv-backend") == "c10d" and value(rl, "--rdzv-id") == "4242"
    assert value(rl, "--rdzv-endpoint") == f"{HOSTS[0]}:29500"
    assert (value(rl, "--tensor-model-parallel-size"), value(rl, "--pipeline-model-parallel-size"),
            value(rl, "--context-parallel-size")) == ("4", "1", "2")
    others = [c for c in cmds if c is not rl]
    if node == 0:  # node 0 prepares, converts and exports
        assert len(others) == 3
    else:  # the other nodes only train (they wait for node 0's outputs)
        assert others == []


def test_sbatch_dry_run(tmp_path):
    env = fake_slurm(tmp_path, 0, DRY_RUN=1, OUT=tmp_path / "o", TP=4, PP=1, CP=2, SLURM_GPUS_ON_NODE=4,
                     SAMPLES_PER_PROMPT=16)
    out = run(SBATCH, env, tmp_path)
    cmds = commands(out)
    kinds = []
    for c in cmds:
        kinds.append("srun" if c[0] == "srun" else "torchrun" if c in torchruns([c]) else os.path.basename(c[1]))
    # prep and convert once before srun, one torchrun per node, export once at the end
    assert kinds == ["preprocess_data.py", "convert_hf_to_megatron.py", "srun"] + ["torchrun"] * 4 + \
        ["convert_megatron_to_hf.py"], out
    srun = cmds[2]
    assert value(srun, "--nodes") == "4" and value(srun, "--ntasks-per-node") == "1"
    assert value(srun, "--cpus-per-task") == "96"
    assert value(srun, "--output").startswith("logs/4242/")
    assert srun[-4:] == ["env", "STAGES=rl", "bash", SCRIPT]
    runs = torchruns(cmds)
    assert [value(c, "--node-rank") for c in runs] == ["0", "1", "2", "3"]
    for c in runs:
        assert value(c, "--nnodes") == "4" and value(c, "--nproc-per-node") == "4"  # from SLURM_GPUS_ON_NODE
        assert value(c, "--rdzv-backend") == "c10d" and value(c, "--rdzv-endpoint") == f"{HOSTS[0]}:29500"
        assert value(c, "--rdzv-id") == "4242"
        assert value(c, "--tensor-model-parallel-size") == "4" and value(c, "--context-parallel-size") == "2"
        assert value(c, "--pipeline-model-parallel-size") == "1" and value(c, "--samples-per-prompt") == "16"
    assert not (tmp_path / "logs").exists() and not (tmp_path / "o").exists()  # a dry run writes nothing


def _tool(name):
    path = os.path.join(ROOT, "tools", name)
    spec = importlib.util.spec_from_file_location(f"_launch_test_{name[:-3]}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file executes
    spec.loader.exec_module(mod)
    return mod


def _snapshot(root):
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, files in os.walk(root) for f in files}


@pytest.mark.slow
def test_end_to_end_tiny_model_then_everything_skipped(tmp_path):
    from transformers import AutoModelForCausalLM

    from megatron_k15.models.hf_mapping import read_hf_state_dict

    hf_dir, data_dir, out_dir = tmp_path / "hf", tmp_path / "data", tmp_path / "out"
    # a random tiny Qwen2 HF model with the built-in byte tokenizer written beside it, offline
    assert _tool("make_tiny_model.py").main(["--preset", "tiny", "--out", str(hf_dir), "--seed", "3"]) == 0
    assert _tool("make_synthetic_data.py").main(["--out-dir", str(data_dir), "--num-sft", "1", "--num-rl", "6",
                                                 "--num-eval", "1", "--levels", "1", "--quiet"]) == 0
    env = clean_env(HF_MODEL=hf_dir, PROMPTS=data_dir / "rl_prompts.jsonl", OUT=out_dir,
                    TP=1, PP=1, CP=1, NPROC_PER_NODE=1, BF16=0, SEQ_LENGTH=64, PROMPT_MAX_TOKENS=16,
                    ROLLOUT_MAX_TOKENS=8, ROLLOUT_SEGMENT_TOKENS=4, ROLLOUT_BATCH_SIZE=4,
                    SAMPLES_PER_PROMPT=2, PROMPTS_PER_ITER=2, UPDATES_PER_ITER=1, SAVE_INTERVAL=2,
                    LR=0)  # LR=0: RL must give back exactly the weights it started from
    # RL stopped early on a checkpoint by the batch script's own signal (its `pkill -USR1 -f
    # megatron_k15.train_rl`, which also matches torchrun's command line): exit code 75, nothing
    # exported. The pattern adds this test's OUT, so that nothing else is signalled.
    latest_file = out_dir / "rl" / "latest_checkpointed_iteration.txt"
    proc = subprocess.Popen(["bash", SCRIPT], env={**env, "TRAIN_ITERS": "1000"}, cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("[train_rl] iteration 1/1000"):
                subprocess.run(["pkill", "-USR1", "-f", f"megatron_k15[.]train_rl .*{out_dir}/"], check=True)
                break
        lines.extend(proc.stdout)
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    early = "".join(lines)
    assert rc == 75, early
    assert "SIGUSR1 received: stopping after iteration" in early
    stopped = int(latest_file.read_text())
    assert stopped >= 1 and f"RL stopped at iteration {stopped} of TRAIN_ITERS=1000" in early
    assert not (out_dir / "hf").exists()
    # a train_rl that ends without a new checkpoint (here EXTRA_RL_ARGS lowers --train-iters) is an
    # error, not an early stop: a batch job would otherwise requeue itself forever
    stuck = subprocess.run(["bash", SCRIPT], env={**env, "EXTRA_RL_ARGS": "--train-iters 1"}, cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert stuck.returncode == 1 and "RL ended without a new checkpoint" in stuck.stderr, stuck.stderr
    final = stopped + 1
    env["TRAIN_ITERS"] = str(final)
    t0 = time.time()
    first = run(SCRIPT, env, tmp_path, timeout=300)  # resumes at iteration `stopped`
    print(f"end-to-end run: {time.time() - t0:.1f}s")
    assert "resume from" in first

    assert latest_file.read_text().strip() == str(final)
    metrics = [json.loads(line) for line in open(out_dir / "rl" / "tb" / "metrics.jsonl")]
    assert {m["iteration"] for m in metrics if "loss" in m} == set(range(1, final + 1))
    export = out_dir / "hf"
    assert (export / "config.json").is_file() and list(export.glob("*.safetensors"))
    assert (out_dir / "hf_exported_iteration.txt").read_text().strip() == str(final)

    original = read_hf_state_dict(str(hf_dir))
    exported = read_hf_state_dict(str(export))
    assert sorted(exported) == sorted(original)
    for name, t in original.items():
        assert torch.equal(exported[name], t), name
    model = AutoModelForCausalLM.from_pretrained(str(export)).eval()
    reference = AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    ids = torch.tensor([list(b"12+7=") + [257]])
    with torch.no_grad():
        logits = model(ids).logits
        assert logits.shape == (1, ids.shape[1], reference.config.vocab_size)
        assert torch.isfinite(logits).all()
        torch.testing.assert_close(logits, reference(ids).logits, rtol=0, atol=0)
    assert not commands(first)  # a real run prints no dry-run lines

    # second run: every stage is skipped and nothing under OUT is touched
    before = _snapshot(out_dir)
    second = run(SCRIPT, env, tmp_path, timeout=120)
    assert _snapshot(out_dir) == before
    sections = second.split("\n== ")[1:]
    assert [s.split(":")[0].split()[1] for s in sections] == ["prep", "convert", "rl", "export"], second
    for section in sections:  # every stage says why it is skipped
        assert section.count("\nskip: ") == 1, section
    assert "torch.distributed.run" not in second and "[train_rl]" not in second


@pytest.mark.slow
def test_sft_warmup_example_trains_and_validates(tmp_path):
    """examples/sft_warmup.sh on its synthetic data (and held-out split), 2 CPU processes
    (dp=2): preprocess, train, validate, checkpoint."""
    out = tmp_path / "sft"
    env = clean_env(OUT=out, TRAIN_ITERS=2, SAVE_INTERVAL=2, EVAL_INTERVAL=1, NPROC=2)
    for k in ("SFT_DATA", "VALID_DATA", "LOAD"):  # this script's own inputs: its defaults
        env.pop(k, None)
    run(os.path.join(ROOT, "examples", "sft_warmup.sh"), env, tmp_path, timeout=300)
    records = [json.loads(line) for line in open(out / "tb" / "metrics.jsonl")]
    assert sorted(r["iteration"] for r in records if "valid_loss" in r) == [0, 1, 2]
    assert sorted(r["iteration"] for r in records if "loss" in r) == [1, 2]
    assert (out / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"


@pytest.mark.slow
def test_quickstart_runs_every_stage_then_skips_them(tmp_path):
    """examples/quickstart.sh (README's first command) cut to 2 SFT and 1 RL iterations: data,
    SFT, RL with evaluation before and after, the curves and the result line; a second run
    finds every stage's output and trains nothing."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "qs"
    env = clean_env(OUT=out, SFT_ITERS=2, RL_ITERS=1, NPROC=2, MASTER_PORT=port)
    for k in ("SEED", "RL_LOSS", "NUM_LAYERS", "HIDDEN", "FFN"):  # this script's own knobs: its defaults
        env.pop(k, None)
    first = run(os.path.join(ROOT, "examples", "quickstart.sh"), env, tmp_path, timeout=300)
    assert (out / "sft" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert (out / "rl_omd" / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    rows = [json.loads(line) for line in open(out / "rl_omd" / "tb" / "metrics.jsonl")]
    assert [r["iteration"] for r in rows if "eval_accuracy" in r] == [0, 1]  # before and after RL
    assert [r["iteration"] for r in rows if "accuracy" in r] == [1]
    assert (out / "rl_omd" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = [line for line in first.splitlines() if line.startswith("quickstart: held-out accuracy")]
    assert len(result) == 1, first
    second = run(os.path.join(ROOT, "examples", "quickstart.sh"), env, tmp_path, timeout=120)
    assert "[train_sft]" not in second and "[train_rl]" not in second, second
    assert [line for line in second.splitlines() if line.startswith("quickstart: held-out")] == result
