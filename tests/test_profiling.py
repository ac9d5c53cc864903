"""--profile: which iterations a window covers (fresh, resumed inside it, cut short by the end
of the run), which ranks write, the trainers' phase ranges in the traces, and the flag checks."""

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_k15.arguments import parse_args
from megatron_k15.profiling import StepProfiler, phase

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_checkpointing import ROOT, _make_sft_data, _sft_cmd  # noqa: E402
import test_rl_trainer  # noqa: E402
from test_rl_trainer import _rl_argv  # noqa: E402

cli_inputs = test_rl_trainer.cli_inputs  # the module's fixture: a checkpoint and prompt sets


def _args(tmp_path, start, end, ranks=(0,)):
    return argparse.Namespace(profile=True, use_pytorch_profiler=True, profile_step_start=start,
                              profile_step_end=end, profile_ranks=list(ranks), profile_dir=str(tmp_path),
                              tensorboard_dir=None, pytorch_profiler_collect_shapes=False,
                              pytorch_profiler_collect_callstack=False, record_memory_history=False,
                              memory_snapshot_path=None)


def _run(profiler, first, last):
    """Iterations first+1 .. last, each with a named phase and an op."""
    x = torch.ones(8, 8)
    for done in range(first, last):
        with profiler.iteration(done):
            with phase(f"work {done + 1}"):
                x = x @ x / 8
    profiler.close()


def _names(path):
    with open(path) as f:
        return {e.get("name") for e in json.load(f)["traceEvents"]}


def _traces(d):
    return sorted(f for f in os.listdir(d) if f.endswith(".pt.trace.json"))


@pytest.mark.parametrize("first, last, start, end, expect", [
    (0, 6, 2, 4, (3, 4)),    # the window: iterations start+1 .. end as logged
    (3, 6, 2, 4, (4, 4)),    # resumed inside the window: what is left of it
    (0, 3, 1, 10, (2, 3)),   # the run ends first: close() writes what was recorded
    (0, 3, 0, 1, (1, 1)),    # from the first iteration
])
def test_window_covers_the_logged_iterations(tmp_path, first, last, start, end, expect):
    profiler = StepProfiler(_args(tmp_path, start, end), rank=0)
    _run(profiler, first, last)
    a, b = expect
    assert _traces(tmp_path) == [f"rank0.iterations{a}-{b}.pt.trace.json"]
    names = _names(tmp_path / f"rank0.iterations{a}-{b}.pt.trace.json")
    inside = set(range(a, b + 1))
    for n in range(1, last + 1):
        assert (f"iteration {n}" in names) == (n in inside), n
        assert (f"work {n}" in names) == (n in inside), n
    assert "aten::mm" in names
    summary = (tmp_path / f"rank0.iterations{a}-{b}.summary.txt").read_text()
    assert summary.startswith(f"rank 0, iterations {a}-{b}") and "aten::mm" in summary
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]  # written atomically, nothing left over


def test_a_run_past_the_window_or_another_rank_writes_nothing(tmp_path):
    _run(StepProfiler(_args(tmp_path, 2, 4), rank=0), 5, 8)      # resumed after the window
    _run(StepProfiler(_args(tmp_path, 0, 2, ranks=(1,)), rank=0), 0, 3)
    assert os.listdir(tmp_path) == []
    assert not torch.autograd._profiler_enabled()


def test_an_exception_in_the_window_still_writes_the_trace(tmp_path):
    profiler = StepProfiler(_args(tmp_path, 1, 5), rank=0)
    with pytest.raises(RuntimeError, match="out of memory"):
        for done in range(0, 5):
            with profiler.iteration(done):
                torch.ones(4, 4).sum()
                if done == 2:
                    raise RuntimeError("CUDA out of memory (simulated)")
    assert _traces(tmp_path) == ["rank0.iterations2-3.pt.trace.json"]
    assert not torch.autograd._profiler_enabled()


def _namespace(**kw):
    base = dict(profile=False, use_pytorch_profiler=False, profile_step_start=None, profile_step_end=None,
                profile_ranks=None, profile_dir=None, tensorboard_dir=None, pytorch_profiler_collect_shapes=False,
                pytorch_profiler_collect_callstack=False, record_memory_history=False, memory_snapshot_path=None,
                train_iters=20)
    return argparse.Namespace(**{**base, **kw})


def test_memory_history_takes_the_window_flags(monkeypatch):
    from megatron_k15.profiling import check_profile_args

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the checks of a GPU machine
    ok = _namespace(record_memory_history=True, profile_ranks=[0, 1], memory_snapshot_path="s.rank{rank}.pickle")
    assert check_profile_args(ok, 2) is None and (ok.profile_step_start, ok.profile_step_end) == (10, 12)
    assert check_profile_args(_namespace(record_memory_history=True, profile_step_start=1, profile_step_end=3,
                                         profile_dir="d"), 2) is None
    assert "put {rank} in the path" in check_profile_args(
        _namespace(record_memory_history=True, profile_step_start=0, profile_ranks=[0, 1],
                   memory_snapshot_path="s.pickle"), 2)
    assert "give --memory-snapshot-path FILE" in check_profile_args(_namespace(record_memory_history=True), 1)
    assert "--profile-step-start applies to --profile" in check_profile_args(_namespace(profile_step_start=0), 1)


def test_phase_is_free_without_a_profiler():
    assert type(phase("x")).__name__ == "nullcontext"


@pytest.mark.parametrize("flags, message", [
    (["--use-pytorch-profiler"], "--use-pytorch-profiler applies to --profile"),
    (["--profile-step-start", "3"], "--profile-step-start applies to --profile"),
    (["--profile", "--use-pytorch-profiler", "--profile-dir", "D", "--profile-step-start", "4",
      "--profile-step-end", "4"], "--profile-step-end 4 must be larger than --profile-step-start 4"),
    (["--profile", "--use-pytorch-profiler", "--profile-dir", "D", "--profile-step-start", "5"],
     "--profile-step-start 5 is not below --train-iters 5"),
    (["--profile", "--use-pytorch-profiler", "--profile-dir", "D", "--profile-step-start", "1",
      "--profile-ranks", "0", "2"], "--profile-ranks 2: not ranks of this run (world size 2)"),
    (["--profile", "--use-pytorch-profiler", "--profile-step-start", "1"], "give --profile-dir DIR"),
    (["--profile", "--profile-dir", "D", "--profile-step-start", "1"], "add --use-pytorch-profiler"),
    (["--record-memory-history"], "--record-memory-history records the CUDA allocator"),
    (["--memory-snapshot-path", "m.pickle"], "--memory-snapshot-path applies to --record-memory-history"),
])
def test_bad_profile_flags_are_refused(flags, message, capsys):
    if torch.cuda.is_available() and ("add --use-pytorch-profiler" in message or "CUDA allocator" in message):
        pytest.skip("a GPU makes these valid")
    with pytest.raises(SystemExit) as e:
        parse_args(["--num-layers", "2", "--train-iters", "5", *flags], world_size=2)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_profile_defaults_follow_megatron():
    args = parse_args(["--num-layers", "2", "--profile", "--use-pytorch-profiler", "--tensorboard-dir", "tb"],
                      world_size=1)
    assert (args.profile_step_start, args.profile_step_end, args.profile_ranks) == (10, 12, [0])
    assert StepProfiler(args, 0).dir == os.path.join("tb", "profile")


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = ROOT
    return env


@pytest.mark.slow
def test_sft_on_two_ranks_profiles_the_window_on_the_chosen_rank(tmp_path):
    """torchrun, dp=2, 4 iterations, window 2..3 on rank 1: one trace, of iteration 3 alone,
    holding the microbatches' forward and backward and the optimizer; the losses are those
    of a run without profiling."""
    data = _make_sft_data(tmp_path)
    losses = {}
    for name, extra in (("plain", []), ("profiled", ["--profile", "--use-pytorch-profiler", "--profile-step-start",
                                                     "2", "--profile-step-end", "3", "--profile-ranks", "1"])):
        tb = tmp_path / name
        cmd = _sft_cmd(data, str(tmp_path / f"ck_{name}"), str(tb), ["--train-iters", "4", *extra])
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *cmd[1:]]
        res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600)
        assert res.returncode == 0, res.stdout + res.stderr
        losses[name] = [json.loads(line)["loss"] for line in open(tb / "metrics.jsonl")]
    assert losses["profiled"] == losses["plain"] and len(losses["plain"]) == 4
    d = tmp_path / "profiled" / "profile"
    assert _traces(d) == ["rank1.iterations3-3.pt.trace.json"]
    names = _names(d / "rank1.iterations3-3.pt.trace.json")
    assert "iteration 3" in names and "iteration 2" not in names and "iteration 4" not in names
    assert {"forward microbatch 0", "backward microbatch 0", "grad sync", "optimizer"} <= names


@pytest.mark.slow
def test_rl_trace_has_the_iteration_phases(cli_inputs, tmp_path):
    argv = _rl_argv(cli_inputs, "--finetune", "--train-iters", "2", "--profile", "--use-pytorch-profiler",
                    "--profile-step-start", "1", "--profile-step-end", "2", "--tensorboard-dir", str(tmp_path / "tb"))
    res = subprocess.run([sys.executable, "-m", "megatron_k15.train_rl", *argv], capture_output=True, text=True,
                         env=_env(), cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    d = tmp_path / "tb" / "profile"
    assert _traces(d) == ["rank0.iterations2-2.pt.trace.json"]
    names = _names(d / "rank0.iterations2-2.pt.trace.json")
    assert {"iteration 2", "rollout", "prefill", "decode", "score", "logprobs", "train", "optimizer"} <= names
    assert "iteration 1" not in names
