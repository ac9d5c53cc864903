"""Weights & Biases logging (--wandb-*): the flags are checked before any work; train_sft logs
the metrics.jsonl scalars against an ``iteration`` axis; a resumed job continues the same run.

CI has no wandb package: a stand-in module on PYTHONPATH records the calls (the API used —
``init(project, entity, name, dir, id, resume, config)``, ``run.define_metric``, ``run.log``,
``run.finish`` — was checked against wandb 0.31 in offline mode, see the session notes)."""

import argparse
import json
import os
import subprocess
import sys
import textwrap

import pytest

from megatron_k15.wandb_logging import RUN_ID_FILE, check_wandb_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAKE_WANDB = textwrap.dedent('''
    """Stand-in for wandb: appends every call to $FAKE_WANDB_LOG as a JSON line."""
    import json, os

    def _record(call, **kw):
        with open(os.environ["FAKE_WANDB_LOG"], "a") as f:
            f.write(json.dumps({"call": call, **kw}) + "\\n")

    class _Run:
        def define_metric(self, name, step_metric=None):
            _record("define_metric", name=name, step_metric=step_metric)

        def log(self, data):
            _record("log", data=data)

        def finish(self):
            _record("finish")

    def init(**kw):
        _record("init", **kw)
        return _Run()
''')


def _namespace(**kw):
    base = dict(wandb_project=None, wandb_exp_name=None, wandb_entity=None, wandb_save_dir=None)
    return argparse.Namespace(**{**base, **kw})


def test_flags_are_checked(monkeypatch):
    assert check_wandb_args(_namespace()) is None
    assert "--wandb-exp-name needs --wandb-project" in check_wandb_args(_namespace(wandb_exp_name="x"))
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    assert "pip install wandb" in check_wandb_args(_namespace(wandb_project="p"))


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    (d / "sft.jsonl").write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "response": str(2 * i)}) + "\n"
                                         for i in range(40)))
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--mode", "sft",
                    "--input", str(d / "sft.jsonl"), "--output-prefix", str(d / "sft"), "--tokenizer",
                    "byte", "--no-progress"], check=True, capture_output=True)
    return str(d / "sft")


def _train(tmp_path, data, save, iters, *extra):
    fake = tmp_path / "fake"
    (fake / "wandb").mkdir(parents=True, exist_ok=True)
    (fake / "wandb" / "__init__.py").write_text(FAKE_WANDB)
    log = tmp_path / "wandb_calls.jsonl"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake), ROOT]), FAKE_WANDB_LOG=str(log))
    cmd = [sys.executable, "-m", "megatron_k15.train_sft", "--train-data", data, "--seq-length", "64",
           "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", str(iters),
           "--lr", "1e-3", "--num-layers", "2", "--save", str(save), "--save-interval", "3",
           "--tensorboard-dir", str(tmp_path / "tb"), "--wandb-project", "k15", "--wandb-exp-name", "sft",
           *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    log.unlink()
    return calls


def test_train_sft_logs_and_a_resumed_job_continues_the_run(tmp_path, sft_data):
    save = tmp_path / "ck"
    first = _train(tmp_path, sft_data, save, 3)
    init = first[0]
    assert init["call"] == "init" and init["project"] == "k15" and init["name"] == "sft"
    assert init["dir"] == str(save) and init["resume"] == "allow"
    assert init["config"]["lr"] == 1e-3 and init["config"]["model_config"]["num_layers"] == 2
    assert {"call": "define_metric", "name": "*", "step_metric": "iteration"} in first
    logged = [c["data"] for c in first if c["call"] == "log"]
    metrics = [json.loads(line) for line in open(tmp_path / "tb" / "metrics.jsonl")]
    assert [d["iteration"] for d in logged] == [1, 2, 3]
    for d, m in zip(logged, metrics):
        assert d["loss"] == m["loss"] and d["lr"] == m["lr"] and "tokens_per_s" in d
    assert first[-1]["call"] == "finish"
    run_id = (save / RUN_ID_FILE).read_text().strip()
    assert init["id"] == run_id

    resumed = _train(tmp_path, sft_data, save, 5, "--load", str(save))
    assert resumed[0]["id"] == run_id  # the same W&B run
    assert [c["data"]["iteration"] for c in resumed if c["call"] == "log"] == [4, 5]

    fresh = _train(tmp_path, sft_data, tmp_path / "other", 1)
    assert fresh[0]["id"] != run_id  # a new training run opens a new W&B run
