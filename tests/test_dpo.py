"""DPO (long2short): the loss against its formula, preference data (preprocess --mode dpo, pair
packing), and ``train_sft --loss dpo`` steps: tp=2, pp=2, cp=2 and dp=2 equal one rank, a few
steps on a tiny model increase the chosen-minus-rejected margin, and the CLI resumes exactly."""

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_k15.data.indexed import SFTSample
from megatron_k15.data.preference import load_preference_dataset, preference_dataset_files
from megatron_k15.data.sft import PackedPairStream
from megatron_k15.data.tokenizer import ByteTokenizer
from megatron_k15.models.config import preset
from megatron_k15.models.sharding import merge_shards
from megatron_k15.rl.dpo import dpo_loss, dpo_rewards, sequence_logps
from megatron_k15.testing import run_distributed

REPO = Path(__file__).resolve().parents[1]


# -- the loss ---------------------------------------------------------------------------------
def test_dpo_loss_value_and_gradient_match_the_formula():
    g = torch.Generator().manual_seed(0)
    sc, sr, rc, rr = (torch.randn(5, generator=g, dtype=torch.float64) * 3 for _ in range(4))
    beta = 0.3
    sc.requires_grad_(True)
    sr.requires_grad_(True)
    loss = dpo_loss(sc, sr, rc, rr, beta)
    loss.backward()
    # by hand: z = beta((sc - rc) - (sr - rr)); L = mean log(1 + e^-z); dL/dsc = -beta/(1 + e^z)/P
    want, gc, gr = 0.0, [], []
    for i in range(5):
        z = beta * ((sc[i].item() - rc[i].item()) - (sr[i].item() - rr[i].item()))
        want += math.log1p(math.exp(-z)) / 5
        gc.append(-beta / (1.0 + math.exp(z)) / 5)
        gr.append(beta / (1.0 + math.exp(z)) / 5)
    assert abs(loss.item() - want) < 1e-12
    assert torch.allclose(sc.grad, torch.tensor(gc, dtype=torch.float64), atol=1e-14)
    assert torch.allclose(sr.grad, torch.tensor(gr, dtype=torch.float64), atol=1e-14)
    total = dpo_loss(sc, sr, rc, rr, beta, reduction="sum")
    assert abs(total.item() - 5 * want) < 1e-12
    assert dpo_loss(sc, sr, rc, rr, beta, reduction="none").shape == (5,)
    r_c, r_r = dpo_rewards(sc, sr, rc, rr, beta)
    assert torch.allclose(r_c, beta * (sc - rc)) and torch.allclose(r_r, beta * (sr - rr))
    # equal log-ratios: the loss is log 2; a huge margin: ~0 with no overflow
    assert abs(dpo_loss(rc, rr, rc, rr, beta).item() - math.log(2)) < 1e-12
    assert dpo_loss(rc + 1e4, rr, rc, rr, beta).item() < 1e-12
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(sc, sr, rc, rr, 0.0)


def test_sequence_logps_sums_masked_tokens_per_sequence():
    logp = torch.tensor([[-1.0, -2.0, -3.0, -4.0, -5.0, -6.0]], requires_grad=True)
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0, 0.0]])
    seq = torch.tensor([[0, 0, 1, 1, -1, -1]])
    s = sequence_logps(logp, mask, seq, 2)
    assert s.tolist() == [-2.0, -7.0]
    s.sum().backward()
    assert logp.grad.tolist() == [mask[0].tolist()]


# -- data -------------------------------------------------------------------------------------
def _tool(name):
    spec = importlib.util.spec_from_file_location(f"{name}_tool", REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


PAIRS = [{"id": "a", "prompt": "1+1=", "chosen": "2", "rejected": "3, or maybe 4"},
         {"prompt": "", "chosen": "héllo", "rejected": "bye"}]


def test_preprocess_dpo_interleaves_pairs_with_response_masks(tmp_path, capsys):
    tool = _tool("preprocess_data")
    prefix = str(tmp_path / "out" / "dpo")
    rows = PAIRS + [{"prompt": "x", "chosen": "y" * 30, "rejected": "z"}]  # over-long pair: dropped
    assert tool.main(["--mode", "dpo", "--input", _write(tmp_path / "p.jsonl", rows), "--output-prefix", prefix,
                      "--tokenizer", "byte", "--append-eos", "--seq-length", "30", "--no-progress"]) == 0
    assert "2 pairs" in capsys.readouterr().err
    assert all(os.path.exists(f) for f in preference_dataset_files(prefix))
    ds = load_preference_dataset(prefix)
    tok = ByteTokenizer()
    assert len(ds) == 2 and ds.summary["dropped_overlong"] == 1 and ds.summary["num_sequences"] == 4
    for row, pair in zip(PAIRS, ds):
        p = tok.encode(row["prompt"])
        for text, sample in ((row["chosen"], pair.chosen), (row["rejected"], pair.rejected)):
            r = tok.encode(text) + [tok.eos_id]
            assert sample.tokens.tolist() == p + r
            assert sample.loss_mask.tolist() == [0] * len(p) + [1] * len(r)
    assert ds.sequences[3].tokens.tolist() == ds[1].rejected.tokens.tolist()  # sequence 2p + 1


def test_preprocess_dpo_bad_line_and_options(tmp_path, capsys):
    tool = _tool("preprocess_data")
    inp = _write(tmp_path / "p.jsonl", [PAIRS[0], {"prompt": "q", "chosen": "a"}])
    assert tool.main(["--mode", "dpo", "--input", inp, "--output-prefix", str(tmp_path / "d"),
                      "--tokenizer", "byte"]) == 1
    err = capsys.readouterr().err
    assert "p.jsonl:2: field 'rejected': missing" in err
    assert [p for p in os.listdir(tmp_path) if p != "p.jsonl"] == []
    with pytest.raises(SystemExit):
        tool.main(["--mode", "dpo", "--input", inp, "--output-prefix", str(tmp_path / "d"),
                   "--tokenizer", "byte", "--seq-length", "8", "--overlong", "truncate"])
    assert "--overlong truncate applies to --mode sft only" in capsys.readouterr().err


def _pair_samples(n_pairs, seed=0, vocab=256):
    """Pairs sharing a prompt: chosen responses use low token ids, rejected ones high ids (a
    preference a tiny model can learn and generalise)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_pairs):
        prompt = rng.integers(0, vocab, int(rng.integers(3, 7)))
        for lo, hi in ((0, vocab // 2), (vocab // 2, vocab)):
            resp = rng.integers(lo, hi, int(rng.integers(2, 6)))
            tokens = np.concatenate([prompt, resp])
            out.append(SFTSample(tokens, (np.arange(len(tokens)) >= len(prompt)).astype(np.uint8)))
    return out


def test_pair_stream_keeps_pairs_whole():
    seqs = _pair_samples(10)
    seqs[2] = SFTSample(np.arange(40), np.ones(40, dtype=np.uint8))  # pair 1 cannot fit in 24
    stream = PackedPairStream(seqs, 24, seed=1)
    assert stream.dropped == 1 and stream.num_pairs == 10
    rows = stream.rows(0, 12)
    for row in rows:
        assert len(row) % 2 == 0 and all(row[k] % 2 == 0 and row[k + 1] == row[k] + 1 for k in range(0, len(row), 2))
        assert 1 not in {i // 2 for i in row}
        assert sum(len(seqs[i].tokens) - 1 for i in row) <= 24
    epoch0 = [i // 2 for k, r in enumerate(rows) if stream.epoch_of(k) == 0 for i in r[0::2]]
    assert sorted(epoch0) == [p for p in range(10) if p != 1]
    mb = stream.microbatch(rows[:2])
    n = mb["input_ids"].shape[1]
    assert n == 48 and mb["seq_ids"].shape == (1, n)
    assert mb["pair_index"].tolist() == [i // 2 for r in rows[:2] for i in r[0::2]]
    for k, p in enumerate(mb["pair_index"].tolist()):  # sequence 2k is pair p's chosen
        for j, sample in ((2 * k, seqs[2 * p]), (2 * k + 1, seqs[2 * p + 1])):
            where = mb["seq_ids"][0] == j
            assert mb["labels"][0][where].tolist() == sample.tokens[1:].tolist()
            assert mb["loss_mask"][0][where].tolist() == sample.loss_mask[1:].tolist()
    assert (mb["loss_mask"][mb["seq_ids"] < 0] == 0).all()
    assert sorted(sum(stream.reference_rows(), [])) == [i for i in range(20) if i // 2 != 1]


def test_train_sft_rejects_mismatched_data_and_beta(tmp_path):
    from megatron_k15.train_sft import _validate, add_sft_args
    from megatron_k15.arguments import ArgumentError, build_parser, validate_args

    tool = _tool("preprocess_data")
    tool.main(["--mode", "dpo", "--input", _write(tmp_path / "p.jsonl", PAIRS), "--output-prefix",
               str(tmp_path / "dpo"), "--tokenizer", "byte", "--no-progress"])

    def check(*argv):
        args = build_parser("t", add_sft_args).parse_args(
            ["--train-data", str(tmp_path / "dpo"), "--seq-length", "32", "--train-iters", "1", "--lr", "1e-3", *argv])
        validate_args(args, world_size=1)
        _validate(args)

    check("--loss", "dpo")
    with pytest.raises(ArgumentError, match="--mode dpo data but --loss is sft; pass --loss dpo"):
        check()
    with pytest.raises(ArgumentError, match="--dpo-beta must be > 0"):
        check("--loss", "dpo", "--dpo-beta", "0")
    with pytest.raises(ArgumentError, match="missing .*preprocess_data.py --mode dpo"):
        check("--loss", "dpo", "--train-data", str(tmp_path / "nope"))


# -- training steps in every layout -----------------------------------------------------------
SEQ, GBS, MBS, ITERS, BETA = 32, 4, 1, 4, 0.5


def _args():
    return argparse.Namespace(lr=3e-3, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-4,
                              clip_grad=1.0, attention_backend="sdpa", params_dtype=torch.float32,
                              sequence_parallel=True, recompute_granularity=None, grad_bucket_numel=5000,
                              cp_comm_type="allgather")


def _cfg():
    return preset("tiny", num_layers=2, init_method_std=0.05)


COMPARE_AT = 2  # iterations the multi-rank layouts run
LAYOUTS = [(2, 1, 1), (1, 2, 1), (1, 1, 2), (1, 1, 1)]  # (tp, pp, cp) on 2 ranks; the last is dp=2


def dpo_worker(rank, world_size, tp, pp, cp, iters):
    from megatron_k15.initialize import initialize_model_parallel
    from megatron_k15.train_sft import dpo_reference_logps, dpo_train_step
    from megatron_k15.training import build_train_context

    if cp > 1:
        # what is tested here is DPO's cp glue (sequence sums all-reduced over cp, seq_ids split,
        # the reference pass); cp attention itself equals one rank in test_model_cp.py. Its
        # all-gather variant runs its blocks through flash_attn_func, replaced by the PyTorch
        # reference (same semantics) so this test does not wait for the Triton interpreter.
        from megatron_k15.kernels import flash_attention

        flash_attention.flash_attn_func = flash_attention.attention_reference
    initialize_model_parallel(tp, pp, cp)
    ctx = build_train_context(_args(), _cfg(), seed=11)
    assert (ctx.pc.tp_size, ctx.pc.pp_size, ctx.pc.cp_size) == (tp, pp, cp)
    stream = PackedPairStream(_pair_samples(10), SEQ, seed=3)
    cpu = torch.device("cpu")
    out = {"ref": dpo_reference_logps(ctx, stream, MBS, cpu), "metrics": [], "tp_rank": ctx.pc.tp_rank,
           "pp_rank": ctx.pc.pp_rank, "dp_rank": ctx.pc.dp_rank, "cp_rank": ctx.pc.cp_rank}
    for it in range(iters):
        m, norm = dpo_train_step(ctx, stream, out["ref"], it * GBS, GBS, MBS, BETA, 3e-3, cpu)
        out["metrics"].append({**m, "grad_norm": norm})
        if it + 1 in (COMPARE_AT, iters):  # S of every pair and the weights after this step
            out[f"after_{it + 1}"] = dpo_reference_logps(ctx, stream, MBS, cpu)
            out[f"state_{it + 1}"] = {k: v.detach().clone() for k, v in ctx.model.checkpoint_state_dict().items()}
    return out


@pytest.fixture(scope="module")
def one_rank():
    return run_distributed(dpo_worker, 1, 1, 1, 1, ITERS)[0]


@pytest.mark.slow
def test_dpo_steps_increase_the_margin(one_rank):
    ms = one_rank["metrics"]
    assert abs(ms[0]["loss"] - math.log(2)) < 1e-6 and abs(ms[0]["dpo_reward_margin"]) < 1e-6  # policy == reference
    margins = [m["dpo_reward_margin"] for m in ms]
    assert all(b > a for a, b in zip(margins, margins[1:])), margins
    assert ms[-1]["loss"] < ms[0]["loss"] and ms[-1]["dpo_accuracy"] > 0.5
    # over the whole set, with the final weights: beta * ((S_c - S_c_ref) - (S_r - S_r_ref)) > 0
    ref, after = one_rank["ref"], one_rank[f"after_{ITERS}"]
    d = BETA * ((after[:, 0] - ref[:, 0]) - (after[:, 1] - ref[:, 1]))
    assert d.mean() > margins[-1] > 0


def _full_weights(results, key):
    shards = {(r["tp_rank"], r["pp_rank"]): r[key] for r in results if r["dp_rank"] == 0 and r["cp_rank"] == 0}
    return merge_shards(shards, _cfg().vocab_size)


def layouts_worker(rank, world_size, layouts, iters):
    """Several (tp, pp, cp) layouts one after the other in the same processes (one spawn)."""
    return {layout: dpo_worker(rank, world_size, *layout, iters) for layout in layouts}


@pytest.fixture(scope="module")
def two_ranks():
    per_rank = run_distributed(layouts_worker, 2, LAYOUTS, COMPARE_AT)
    return {layout: [r[layout] for r in per_rank] for layout in per_rank[0]}


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda t: "tp{}-pp{}-cp{}".format(*t))
def test_dpo_layout_equals_one_rank(one_rank, two_ranks, layout):
    results = two_ranks[layout]
    key = f"after_{COMPARE_AT}"
    for r in results:
        assert torch.allclose(r["ref"], one_rank["ref"], rtol=1e-5, atol=1e-5)
        for got, want in zip(r["metrics"], one_rank["metrics"][:COMPARE_AT]):
            for name in ("loss", "dpo_reward_margin", "dpo_accuracy", "dpo_pairs", "grad_norm"):
                assert abs(got[name] - want[name]) <= 1e-5 * max(1.0, abs(want[name])), name
        assert torch.allclose(r[key], one_rank[key], rtol=1e-5, atol=1e-4)
    got_w = _full_weights(results, f"state_{COMPARE_AT}")
    want_w = _full_weights([one_rank], f"state_{COMPARE_AT}")
    assert sorted(got_w) == sorted(want_w)
    for name, w in want_w.items():
        assert (got_w[name] - w).abs().max().item() <= 1e-5 * max(1e-3, w.abs().max().item()), name


@pytest.mark.slow
def test_train_sft_dpo_cli_resumes_with_the_saved_reference(tmp_path):
    """``--loss dpo`` end to end; a run resumed at iteration 2 uses the reference saved with the
    checkpoint (not the iteration-2 weights), so iterations 3-4 equal the straight run's."""
    import shutil

    rows = [{"id": str(i), "prompt": f"{i}+{i}=", "chosen": str(2 * i), "rejected": f"{2 * i + 1}, I think"}
            for i in range(12)]
    prefix = str(tmp_path / "dpo")
    assert _tool("preprocess_data").main(["--mode", "dpo", "--input", _write(tmp_path / "p.jsonl", rows),
                                          "--output-prefix", prefix, "--tokenizer", "byte", "--append-eos",
                                          "--no-progress"]) == 0
    env = dict(os.environ, PYTHONPATH=str(REPO))

    def train(save, tb, *extra):
        cmd = [sys.executable, "-m", "megatron_k15.train_sft", "--loss", "dpo", "--dpo-beta", "0.5",
               "--train-data", prefix, "--seq-length", "48", "--micro-batch-size", "1", "--global-batch-size", "2",
               "--train-iters", "4", "--lr", "2e-3", "--num-layers", "2", "--save", str(save),
               "--save-interval", "2", "--tensorboard-dir", str(tb), *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return {r["iteration"]: r for r in map(json.loads, open(tb / "metrics.jsonl"))}

    straight = train(tmp_path / "a", tmp_path / "tb_a")
    assert sorted(straight) == [1, 2, 3, 4]
    assert abs(straight[1]["loss"] - math.log(2)) < 1e-6 and straight[4]["dpo_reward_margin"] > 0
    for key in ("dpo_accuracy", "dpo_chosen_reward", "dpo_rejected_reward", "dpo_pairs"):
        assert key in straight[4]
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    (tmp_path / "b" / "latest_checkpointed_iteration.txt").write_text("2")
    resumed = train(tmp_path / "b", tmp_path / "tb_b", "--load", str(tmp_path / "b"))
    for it in (3, 4):
        for key in ("loss", "dpo_reward_margin", "grad_norm"):
            assert resumed[it][key] == straight[it][key], (it, key)
