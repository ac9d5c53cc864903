"""Data blends (--train-data A B / --train-data 0.7 A 0.3 B): parsing and its errors, the
per-epoch counts, each dataset's passes covering every sample, the streams over real
preprocessed datasets (SFT and DPO), and train_sft running on one and resuming it."""

import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from megatron_k15.data.blend import (Blend, BlendError, ConcatSequences, blend_counts, blended_epoch,
                                     check_compatible, open_packed_stream, parse_blend)
from megatron_k15.data.indexed import load_sft_dataset
from megatron_k15.data.sft import PackedSFTStream
from megatron_k15.data.tokenizer import ByteTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_rl_trainer  # noqa: E402
from test_rl_trainer import _env, _parse, _preprocess_prompts, _rl_argv  # noqa: E402

cli_inputs = test_rl_trainer.cli_inputs  # the module's fixture: a checkpoint and prompt sets


def test_parse_blend():
    assert parse_blend(["a"], "--x") == Blend(["a"], None)
    assert parse_blend(["a", "b"], "--x") == Blend(["a", "b"], None)
    assert parse_blend(["3", "a", "1", "b"], "--x") == Blend(["a", "b"], [0.75, 0.25])
    assert parse_blend(["1e-1", "a", "3e-1", "b"], "--x").weights == pytest.approx([0.25, 0.75])


@pytest.mark.parametrize("values, message", [
    (["1", "a", "b"], "3 values; weights and prefixes come in pairs"),
    (["a", "0.5", "b"], "'0.5' looks like a weight but the first value is a prefix"),
    (["1", "a", "x", "b"], "'x' before b is not a weight"),
    (["-1", "a", "2", "b"], "the weight of a must be a finite number > 0"),
    (["0", "a", "1", "b"], "the weight of a must be a finite number > 0"),
    (["nan", "a", "1", "b"], "the weight of a must be a finite number > 0"),
    (["1", "a", "1", "a"], "a is given twice"),
    (["1", "2", "3", "4"], "'2' after weight 1 is a number"),
])
def test_bad_blends_name_the_flag(values, message):
    with pytest.raises(BlendError, match="--train-data") as e:
        parse_blend(values, "--train-data")
    assert message in str(e.value)


def test_weights_refused_where_every_sample_counts():
    with pytest.raises(BlendError, match="--valid-data takes dataset prefixes only"):
        parse_blend(["1", "a"], "--valid-data", allow_weights=False)


def test_blend_counts_round_by_largest_remainders():
    assert blend_counts([10, 30], [0.5, 0.5]) == [20, 20]
    assert blend_counts([3, 4], [1 / 3, 2 / 3]) == [2, 5]  # 2.33 and 4.67: the larger remainder gets it
    assert blend_counts([5, 5, 5], [1 / 3] * 3) == [5, 5, 5]
    assert sum(blend_counts([7, 11, 13], [0.2, 0.3, 0.5])) == 31


def test_blended_epochs_cycle_through_each_dataset():
    sizes, weights = [6, 30], [0.5, 0.5]  # 18 units each per epoch: A repeated 3x, B a 3/5 subsample
    epochs = [blended_epoch(sizes, weights, seed=7, epoch=e) for e in range(5)]
    for units in epochs:
        assert len(units) == 36 and (units < 6).sum() == 18
        a = Counter(units[units < 6].tolist())
        assert sorted(a.values()) == [3] * 6  # three whole passes over A
    b = Counter(u for units in epochs for u in units.tolist() if u >= 6)
    assert sorted(b) == list(range(6, 36)) and set(b.values()) == {3}  # 5 epochs x 18 = 3 passes over B
    assert np.array_equal(epochs[2], blended_epoch(sizes, weights, seed=7, epoch=2))  # a function of the seed
    assert not np.array_equal(epochs[2], blended_epoch(sizes, weights, seed=8, epoch=2))


def test_check_compatible_names_the_mismatch():
    a = {"mode": "sft", "tokenizer_name": "byte", "vocab_size": 260, "eos_id": 257}
    check_compatible([a, dict(a)], ["A", "B"], "--train-data")
    with pytest.raises(BlendError, match="--train-data: B has tokenizer_name 'qwen' but A has 'byte'"):
        check_compatible([a, dict(a, tokenizer_name="qwen")], ["A", "B"], "--train-data")


def _preprocess(tmp_path, name, rows, mode="sft"):
    src = tmp_path / f"{name}.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--mode", mode, "--input",
                    str(src), "--output-prefix", str(tmp_path / name), "--tokenizer", "byte", "--no-progress"],
                   check=True, capture_output=True)
    return str(tmp_path / name)


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("blend")
    a = _preprocess(tmp, "a", [{"prompt": f"a{i}", "response": "A" * (1 + i % 3)} for i in range(8)])
    b = _preprocess(tmp, "b", [{"prompt": f"b{i}", "response": "B" * (1 + i % 5)} for i in range(24)])
    return tmp, a, b


def _samples_of_rows(stream, rows):
    tok = ByteTokenizer()
    return [tok.decode(stream.samples[i].tokens.tolist()) for row in rows for i in row]


def test_one_prefix_is_the_plain_stream(two_sets):
    _, a, _ = two_sets
    stream, sizes = open_packed_stream(parse_blend([a], "--train-data"), 16, seed=3)
    ds = load_sft_dataset(a)
    plain = PackedSFTStream(ds, 16, seed=3, lengths=ds.lengths)
    assert sizes == [8] and stream.rows(0, 12) == plain.rows(0, 12)


def test_sft_streams_concatenate_and_blend(two_sets):
    _, a, b = two_sets
    concat, sizes = open_packed_stream(parse_blend([a, b], "--train-data"), 16, seed=3)
    assert sizes == [8, 24]
    texts = _samples_of_rows(concat, concat.rows(0, concat.rows_in_epoch(0)))
    assert sorted(texts) == sorted([f"a{i}" + "A" * (1 + i % 3) for i in range(8)]
                                   + [f"b{i}" + "B" * (1 + i % 5) for i in range(24)])
    blend, _ = open_packed_stream(parse_blend(["3", a, "1", b], "--train-data"), 16, seed=3)
    texts = _samples_of_rows(blend, blend.rows(0, blend.rows_in_epoch(0)))
    assert len(texts) == 32 and sum(t.startswith("a") for t in texts) == 24  # 3/4 of 32: A three times
    assert Counter(t for t in texts if t.startswith("a")) == {f"a{i}" + "A" * (1 + i % 3): 3 for i in range(8)}


def test_dpo_blend_keeps_pairs_together(tmp_path):
    rows = lambda tag, n: [{"prompt": f"{tag}{i}", "chosen": "yes", "rejected": "no"} for i in range(n)]  # noqa: E731
    a = _preprocess(tmp_path, "pa", rows("p", 4), mode="dpo")
    b = _preprocess(tmp_path, "pb", rows("q", 12), mode="dpo")
    stream, sizes = open_packed_stream(parse_blend(["1", a, "1", b], "--train-data"), 24, seed=1, pairs=True)
    assert sizes == [4, 12] and stream.num_pairs == 16
    chosen, tok = [], ByteTokenizer()
    for row in stream.rows(0, stream.rows_in_epoch(0)):
        mb = stream.microbatch([row])
        for p in mb["pair_index"].tolist():
            c, r = stream.samples[2 * p], stream.samples[2 * p + 1]
            assert tok.decode(c.tokens.tolist()).endswith("yes") and tok.decode(r.tokens.tolist()).endswith("no")
            assert tok.decode(c.tokens.tolist())[:-3] == tok.decode(r.tokens.tolist())[:-2]  # one prompt
            chosen.append(tok.decode(c.tokens.tolist())[0])
    assert Counter(chosen) == {"p": 8, "q": 8}  # equal weights: 16 pairs, half from each set


def test_concat_sequences_index_into_the_parts(two_sets):
    _, a, b = two_sets
    da, db = load_sft_dataset(a), load_sft_dataset(b)
    both = ConcatSequences([da, db])
    assert len(both) == 32 and both.lengths.tolist() == da.lengths.tolist() + db.lengths.tolist()
    assert both[8].tokens.tolist() == db[0].tokens.tolist() and both[7].tokens.tolist() == da[7].tokens.tolist()
    with pytest.raises(IndexError):
        both[32]


def _sft(two_sets, out, extra):
    tmp, a, b = two_sets
    cmd = [sys.executable, "-m", "megatron_k15.train_sft", "--train-data", "0.25", a, "0.75", b, "--seq-length", "32",
           "--micro-batch-size", "2", "--global-batch-size", "2", "--lr", "1e-3", "--num-layers", "2",
           "--lr-decay-iters", "4", "--save", str(out), "--tensorboard-dir", str(out / "tb"), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT)


@pytest.mark.slow
def test_train_sft_on_a_blend_resumes_exactly(two_sets, tmp_path):
    straight = _sft(two_sets, tmp_path / "s", ["--train-iters", "4"])
    assert straight.returncode == 0, straight.stdout + straight.stderr
    assert "25.0% " in straight.stdout and "75.0% " in straight.stdout
    first = _sft(two_sets, tmp_path / "r", ["--train-iters", "2"])
    assert first.returncode == 0, first.stdout + first.stderr
    second = _sft(two_sets, tmp_path / "r", ["--train-iters", "4", "--load", str(tmp_path / "r")])
    assert second.returncode == 0, second.stdout + second.stderr
    assert "warning" not in second.stdout

    def losses(d):
        return {m["iteration"]: m["loss"] for m in map(json.loads, open(d / "tb" / "metrics.jsonl"))}

    assert losses(tmp_path / "r")[3] == losses(tmp_path / "s")[3] and losses(tmp_path / "r")[4] == losses(tmp_path / "s")[4]
    tmp, a, b = two_sets
    changed = subprocess.run([sys.executable, "-m", "megatron_k15.train_sft", "--train-data", a, b, "--seq-length", "32",
                              "--micro-batch-size", "2", "--global-batch-size", "2", "--lr", "1e-3", "--train-iters",
                              "5", "--load", str(tmp_path / "r")],
                             capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT)
    assert changed.returncode == 0, changed.stdout + changed.stderr
    assert "warning: --train-data differs from the checkpoint's" in changed.stdout


@pytest.fixture(scope="module")
def more_prompts(tmp_path_factory):
    rows = [{"id": f"m{i}", "prompt": f"{i}+{i}=", "task": "math", "answer": str(2 * i)} for i in range(2)]
    return _preprocess_prompts(tmp_path_factory.mktemp("more_prompts"), "more", rows)


def test_prompt_sets_concatenate(cli_inputs, more_prompts, capsys):
    from megatron_k15.data.blend import open_prompt_data
    from megatron_k15.data.indexed import load_prompt_dataset

    both = open_prompt_data([cli_inputs["prompts"], more_prompts], "--prompt-data")
    a, b = load_prompt_dataset(cli_inputs["prompts"]), load_prompt_dataset(more_prompts)
    assert [r["id"] for r in both.records] == [r["id"] for r in a.records] + ["m0", "m1"]
    assert both[len(a)].prompt_ids.tolist() == b[0].prompt_ids.tolist()
    base = _rl_argv(cli_inputs, "--train-iters", "1", "--finetune")
    args = _parse(base + ["--prompt-data", cli_inputs["prompts"], more_prompts], 1)
    assert args.prompt_data == [cli_inputs["prompts"], more_prompts] and args.prompt_weights is None
    args = _parse(base + ["--prompt-data", "3", cli_inputs["prompts"], "1", more_prompts], 1)
    assert args.prompt_data == [cli_inputs["prompts"], more_prompts] and args.prompt_weights == [0.75, 0.25]
    for extra, message in ((["--prompt-data", cli_inputs["prompts"], cli_inputs["eval"]],
                            "prompt id 'q0' is in"),
                           (["--eval-data", "1", cli_inputs["eval"]],
                            "takes dataset prefixes only, no weights (evaluation covers every prompt once)"),
                           (["--prompt-data", "1", cli_inputs["prompts"], more_prompts], "come in pairs"),
                           (["--eval-data", cli_inputs["eval"], str(more_prompts) + "_nope"], "_nope.json")):
        with pytest.raises(SystemExit):
            _parse(base + extra, 1)
        assert message in capsys.readouterr().err, extra


@pytest.mark.slow
def test_train_rl_draws_from_every_prompt_set(cli_inputs, more_prompts, tmp_path):
    argv = _rl_argv(cli_inputs, "--finetune", "--train-iters", "1", "--prompts-per-iter", "6",
                    "--rollout-log-dir", str(tmp_path / "log"))
    argv[argv.index("--prompt-data") + 1:argv.index("--prompt-data") + 2] = [cli_inputs["prompts"], more_prompts]
    res = subprocess.run([sys.executable, "-m", "megatron_k15.train_rl", *argv], capture_output=True, text=True,
                         env=_env(), cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "6 prompts" in res.stdout
    rows = [json.loads(line) for line in open(tmp_path / "log" / "iter_0000001.jsonl")]
    assert sorted({r["prompt_id"] for r in rows}) == ["m0", "m1", "q0", "q1", "q2", "q3"]


@pytest.mark.slow
def test_train_rl_gives_weighted_prompt_sets_their_share(cli_inputs, more_prompts, tmp_path):
    """Sets of 4 and 2 prompts weighted 1:1, 6 prompts an iteration: 3 from each (the small
    set's own epochs wrap), where unweighted concatenation draws them 4:2."""
    argv = _rl_argv(cli_inputs, "--finetune", "--train-iters", "1", "--prompts-per-iter", "6",
                    "--rollout-log-dir", str(tmp_path / "log"))
    at = argv.index("--prompt-data") + 1
    argv[at:at + 1] = ["1", cli_inputs["prompts"], "1", more_prompts]
    res = subprocess.run([sys.executable, "-m", "megatron_k15.train_rl", *argv], capture_output=True, text=True,
                         env=_env(), cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "6 prompts (50.0% " in res.stdout
    rows = [json.loads(line) for line in open(tmp_path / "log" / "iter_0000001.jsonl")]
    per_set = Counter(r["prompt_id"][0] for r in rows)
    assert per_set["q"] == per_set["m"] > 0, per_set


def test_an_epoch_without_trainable_units_fails_instead_of_hanging():
    from megatron_k15.data.indexed import SFTSample

    samples = [SFTSample(np.arange(1), np.ones(1, np.uint8)), SFTSample(np.arange(5), np.ones(5, np.uint8))]
    stream = PackedSFTStream(samples, 8, seed=0, epoch_order=lambda epoch: np.array([0, 0]))  # only the 1-token one
    with pytest.raises(ValueError, match="epoch 0 packs no rows"):
        stream.rows(0, 1)
