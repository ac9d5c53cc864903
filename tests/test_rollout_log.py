"""train_rl --rollout-log-dir: the logged rollouts are the iteration's finished trajectories,
with the rewards and lengths the metrics average and OMD's advantages (reward minus the
group's mean reward)."""

import json
import os
import subprocess
import sys
from collections import defaultdict

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_rl_trainer  # noqa: E402
from test_rl_trainer import ROOT, _env, _parse, _records, _rl_argv  # noqa: E402

cli_inputs = test_rl_trainer.cli_inputs  # the module's fixture: a checkpoint and prompt sets


@pytest.mark.slow
def test_rollout_log_holds_the_iterations_rollouts(cli_inputs, tmp_path):
    logs, tb = tmp_path / "rollouts", tmp_path / "tb"
    argv = _rl_argv(cli_inputs, "--finetune", "--train-iters", "2", "--rollout-log-dir", str(logs),
                    "--rollout-log-interval", "2", "--tensorboard-dir", str(tb))
    res = subprocess.run([sys.executable, "-m", "megatron_k15.train_rl", *argv], capture_output=True, text=True,
                         env=_env(), cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert sorted(os.listdir(logs)) == ["iter_0000002.jsonl"]  # every 2nd iteration only
    rows = [json.loads(line) for line in open(logs / "iter_0000002.jsonl")]
    metrics = {m["iteration"]: m for m in map(json.loads, open(tb / "metrics.jsonl"))}[2]
    assert len(rows) == metrics["num_finished"] == 4  # 2 prompts x 2 samples
    n = len(rows)
    assert sum(r["reward"] for r in rows) / n == pytest.approx(metrics["reward_mean"], abs=1e-12)
    assert sum(r["correct"] for r in rows) / n == pytest.approx(metrics["accuracy"], abs=1e-12)
    assert sum(r["response_tokens"] for r in rows) / n == pytest.approx(metrics["response_length_mean"])
    groups = defaultdict(list)
    for r in rows:
        groups[r["group_id"]].append(r["reward"])
    prompts = {rec["id"]: rec["prompt"] for rec in _records()}
    for r in rows:
        assert r["iteration"] == 2 and r["segments"] == [2] and r["trained"]
        assert r["advantage"] == pytest.approx(r["reward"] - sum(groups[r["group_id"]]) / 2, abs=1e-6)
        assert r["prompt"].endswith(prompts[r["prompt_id"]]) and r["task"] == "math"
        assert r["stop_reason"] in ("eos", "length", "repeat") and r["logprob_mean"] <= 0
        assert len(r["response"].encode()) >= r["response_tokens"] - 1  # bytes (an EOS decodes to nothing)


def test_rollout_log_flags_are_checked(cli_inputs, tmp_path, capsys):
    base = _rl_argv(cli_inputs, "--train-iters", "1", "--finetune")
    with pytest.raises(SystemExit):
        _parse(base + ["--rollout-log-interval", "0"], 1)
    assert "--rollout-log-interval must be >= 1" in capsys.readouterr().err
    (tmp_path / "f").write_text("")
    with pytest.raises(SystemExit):
        _parse(base + ["--rollout-log-dir", str(tmp_path / "f")], 1)
    assert "is a file; give a directory" in capsys.readouterr().err
