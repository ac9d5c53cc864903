"""train_sft --valid-data: the held-out loss before training, every --eval-interval iterations
and at the end; on the training rows themselves, before any update, it is the first
iteration's training loss (the same forward on the same rows)."""

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


def test_valid_data_flags_are_checked(tmp_path, capsys):
    from megatron_k15.arguments import parse_args
    from megatron_k15.train_sft import _validate, add_sft_args

    data = _make_sft_data(tmp_path)
    base = ["--train-data", data, "--seq-length", "64", "--train-iters", "2", "--lr", "1e-3", "--num-layers", "2"]
    for extra, message in ((["--eval-interval", "2"], "--eval-interval / --eval-iters need --valid-data"),
                           (["--valid-data", str(tmp_path / "nope")], "--valid-data"),
                           (["--valid-data", data, "--eval-iters", "0"], "--eval-iters >= 1")):
        with pytest.raises(SystemExit):
            parse_args(base + extra, "test", add_sft_args, _validate, world_size=1)
        assert message in capsys.readouterr().err


@pytest.mark.slow
def test_log_interval_logs_the_interval_as_one(tmp_path):
    """--log-interval 3 over 4 iterations logs iterations 3 and 4: the loss over all response
    tokens of iterations 1-3 (the per-iteration losses weighted by their tokens), then iteration
    4's own; the lr is the logged iteration's. Validation at 2 is logged on its own."""
    data = _make_sft_data(tmp_path)
    runs = {}
    for interval in ("1", "3"):
        tb = tmp_path / f"tb{interval}"
        valid = ["--valid-data", data, "--eval-interval", "2", "--eval-iters", "1"] if interval == "3" else []
        res = subprocess.run(_sft_cmd(data, str(tmp_path / f"ck{interval}"), str(tb),
                                      ["--train-iters", "4", "--log-interval", interval, *valid]),
                             capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
        assert res.returncode == 0, res.stdout + res.stderr
        runs[interval] = {r["iteration"]: r for r in map(json.loads, open(tb / "metrics.jsonl"))}
    each, merged = runs["1"], runs["3"]
    # the held-out loss at 2 is logged alone, without cutting the training window 1-3
    assert sorted(merged) == [0, 2, 3, 4] and "loss" not in merged[2] and "valid_loss" in merged[2]
    tokens = sum(each[i]["loss_tokens"] for i in (1, 2, 3))
    assert merged[3]["loss_tokens"] == tokens
    assert merged[3]["loss"] == pytest.approx(sum(each[i]["loss"] * each[i]["loss_tokens"] for i in (1, 2, 3)) / tokens,
                                              rel=1e-12)
    assert merged[4]["loss"] == each[4]["loss"] and merged[3]["lr"] == each[3]["lr"]
