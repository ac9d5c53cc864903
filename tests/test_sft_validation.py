"""train_sft --valid-data: the held-out loss before training, every --eval-interval iterations
and at the end; on the training rows themselves, before any update, it is the first
iteration's training loss (the same forward on the same rows). --split: the same as training on
the first share and validating on the next, preprocessed as datasets of their own."""

import json
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_checkpointing import ROOT, _make_sft_data, _sft_cmd  # noqa: E402


@pytest.mark.slow
def test_validation_loss_is_logged_and_matches_the_training_forward(tmp_path):
    data = _make_sft_data(tmp_path)
    tb = tmp_path / "tb"
    # --eval-iters 1: one global batch (4 rows) of the held-out set, here the training set: the
    # rows of iteration 1
    res = subprocess.run(_sft_cmd(data, str(tmp_path / "ck"), str(tb),
                                  ["--train-iters", "4", "--valid-data", data, "--eval-interval", "2",
                                   "--eval-iters", "1"]),
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert res.returncode == 0, res.stdout + res.stderr
    records = [json.loads(line) for line in open(tb / "metrics.jsonl")]
    valid = {r["iteration"]: r["valid_loss"] for r in records if "valid_loss" in r}
    train = {r["iteration"]: r["loss"] for r in records if "loss" in r}
    assert sorted(valid) == [0, 2, 4]
    assert valid[0] == pytest.approx(train[1], rel=1e-6)
    assert valid[4] < valid[0]  # it trained on exactly those rows
    assert "[train_sft] validation at iteration 2: loss" in res.stdout
    # --skip-train on the saved weights: the same held-out loss, logged at the loaded iteration
    tb_only = tmp_path / "tb_only"
    only = subprocess.run([sys.executable, "-m", "megatron_k15.train_sft", "--train-data", data, "--seq-length", "64",
                           "--micro-batch-size", "2", "--global-batch-size", "4", "--load", str(tmp_path / "ck"),
                           "--skip-train", "--valid-data", data, "--eval-iters", "1", "--tensorboard-dir", str(tb_only)],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert only.returncode == 0, only.stdout + only.stderr
    logged = [json.loads(line) for line in open(tb_only / "metrics.jsonl")]
    assert [(r["iteration"], r["valid_loss"]) for r in logged] == [(4, valid[4])]


def test_valid_data_flags_are_checked(tmp_path, capsys):
    from megatron_k15.arguments import parse_args
    from megatron_k15.train_sft import _validate, add_sft_args

    data = _make_sft_data(tmp_path)
    base = ["--train-data", data, "--seq-length", "64", "--train-iters", "2", "--lr", "1e-3", "--num-layers", "2"]
    for extra, message in ((["--eval-interval", "2"], "--eval-interval / --eval-iters need held-out data"),
                           (["--split", "100,0,0", "--eval-interval", "2"], "need held-out data"),
                           (["--split", "98,2", "--valid-data", data], "--split and --valid-data both"),
                           (["--skip-train"], "--skip-train only evaluates"),
                           (["--split", "0,1"], "the train share must be > 0"),
                           (["--split", "9,1,x"], "give up to three non-negative shares"),
                           (["--split", "999,1"], "no dataset of --train-data (60 samples) has a sample in the "
                                                 "validation share"),
                           (["--split", "1,999"], "keeps no training sample of its 60"),
                           (["--valid-data", str(tmp_path / "nope")], "--valid-data"),
                           (["--valid-data", data, "--eval-iters", "0"], "--eval-iters >= 1")):
        with pytest.raises(SystemExit):
            parse_args(base + extra, "test", add_sft_args, _validate, world_size=1)
        assert message in capsys.readouterr().err
    # Megatron-LM's names for the same flags
    args = parse_args(["--data-path", "1", data, "--valid-data-path", data] + base[2:], "test", add_sft_args,
                      _validate, world_size=1)
    assert args.train_data == ["1", data] and args.valid_data == [data]
    assert parse_args(["--train-data-path", data] + base[2:], "test", add_sft_args, _validate,
                      world_size=1).train_data == [data]


@pytest.mark.slow
def test_log_interval_logs_the_interval_as_one(tmp_path):
    """--log-interval 3 over 4 iterations logs iterations 3 and 4: the loss over all response
    tokens of iterations 1-3 (the per-iteration losses weighted by their tokens), then iteration
    4's own; the lr is the logged iteration's. Validation at 2 is logged on its own."""
    data = _make_sft_data(tmp_path)
    runs, console = {}, {}
    for name, flags in (("1", ["--log-interval", "1"]),
                        ("3", ["--log-interval", "3", "--valid-data", data, "--eval-interval", "2", "--eval-iters", "1"]),
                        ("3tb1", ["--log-interval", "3", "--tensorboard-log-interval", "1"])):
        tb = tmp_path / f"tb{name}"
        res = subprocess.run(_sft_cmd(data, str(tmp_path / f"ck{name}"), str(tb), ["--train-iters", "4", *flags]),
                             capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
        assert res.returncode == 0, res.stdout + res.stderr
        runs[name] = {r["iteration"]: r for r in map(json.loads, open(tb / "metrics.jsonl"))}
        console[name] = [line for line in res.stdout.splitlines() if line.startswith("[train_sft] iteration")]
    each, merged = runs["1"], runs["3"]
    # --tensorboard-log-interval 1: every iteration recorded as with --log-interval 1, while the
    # console prints at 3 and 4 (iterations 1-3 merged there)
    assert sorted(runs["3tb1"]) == [1, 2, 3, 4]
    assert all(runs["3tb1"][i]["loss"] == each[i]["loss"] for i in (1, 2, 3, 4))
    assert [line.split(" | ")[0] for line in console["3tb1"]] == ["[train_sft] iteration 3/4",
                                                                  "[train_sft] iteration 4/4"]
    assert f"loss {merged[3]['loss']:.6f}" in console["3tb1"][0]
    # the held-out loss at 2 is logged alone, without cutting the training window 1-3
    assert sorted(merged) == [0, 2, 3, 4] and "loss" not in merged[2] and "valid_loss" in merged[2]
    tokens = sum(each[i]["loss_tokens"] for i in (1, 2, 3))
    assert merged[3]["loss_tokens"] == tokens
    assert merged[3]["loss"] == pytest.approx(sum(each[i]["loss"] * each[i]["loss_tokens"] for i in (1, 2, 3)) / tokens,
                                              rel=1e-12)
    assert merged[4]["loss"] == each[4]["loss"] and merged[3]["lr"] == each[3]["lr"]


def test_split_shares_and_ranges():
    from megatron_k15.data.blend import parse_split, split_range

    assert parse_split("98,2,0") == pytest.approx((0.98, 0.02, 0.0))
    assert parse_split("969/30/1") == pytest.approx((0.969, 0.030, 0.001))
    assert parse_split("1") == (1.0, 0.0, 0.0)
    parts = [split_range(10, parse_split("7,2,1"), p) for p in ("train", "valid", "test")]
    assert parts == [range(0, 7), range(7, 9), range(9, 10)]
    assert [len(split_range(60, parse_split("90,10"), p)) for p in ("train", "valid", "test")] == [54, 6, 0]
    # Megatron-LM's rule: shares rounded one by one (4.5 -> 4, 4.5 -> 4, 1), then shifted to end at n
    assert [split_range(10, parse_split("45,45,10"), p) for p in ("train", "valid", "test")] == [
        range(0, 5), range(5, 9), range(9, 10)]


@pytest.mark.slow
def test_split_equals_separately_preprocessed_train_and_valid_sets(tmp_path):
    """--split 90,10 of 60 samples trains and validates exactly as --train-data of the first 54
    lines with --valid-data of the last 6, each preprocessed on its own: every logged loss and
    held-out loss bitwise equal."""
    full = _make_sft_data(tmp_path)
    lines = open(tmp_path / "sft.jsonl").read().splitlines()
    prefixes = {}
    for name, part in (("head", lines[:54]), ("tail", lines[54:])):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(part) + "\n")
        subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--mode", "sft",
                        "--input", str(tmp_path / f"{name}.jsonl"), "--output-prefix", str(tmp_path / name),
                        "--tokenizer", "byte", "--no-progress"], check=True, capture_output=True)
        prefixes[name] = str(tmp_path / name)
    held_out = ["--eval-interval", "2", "--train-iters", "4"]
    runs, out = {}, {}
    for key, data, extra in (("split", full, ["--split", "90,10,0"]),
                             ("files", prefixes["head"], ["--valid-data", prefixes["tail"]])):
        tb = tmp_path / f"tb_{key}"
        res = subprocess.run(_sft_cmd(data, str(tmp_path / f"ck_{key}"), str(tb), [*extra, *held_out]),
                             capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
        assert res.returncode == 0, res.stdout + res.stderr
        out[key] = res.stdout
        runs[key] = [(r["iteration"], r.get("loss"), r.get("valid_loss"))
                     for r in map(json.loads, open(tb / "metrics.jsonl"))]
    assert runs["split"] == runs["files"] and len(runs["split"]) >= 5
    assert "--split 90,10,0: 6 samples held out for validation" in out["split"]
