"""Checkpoints: resharding across tp/pp (weights and optimizer), exact resume after kill -9 and
after an early exit (--exit-interval), and a save that fails half-way leaves the previous
checkpoint current."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from megatron_k15.testing import run_distributed

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_training_parallel import GBS, MBS, SEQ, _args, _samples  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = torch.randint(0, 256, (1, SEQ), generator=torch.Generator().manual_seed(9))


def ckpt_worker(rank, world_size, tp, pp, phases, ep=1, moe=False):
    """For each (load_dir, save_dir, iters) of ``phases``, with a newly built model and
    optimizer: optionally load, train ``iters`` iterations, optionally save; the losses and the
    probe's full-vocab logits (from the last stage) of each phase. ``moe``: a mixture-of-experts
    model, its experts split over ``ep`` ranks."""
    from megatron_k15.initialize import initialize_model_parallel

    initialize_model_parallel(tp, pp, ep=ep)
    return [_ckpt_phase(*phase, moe=moe) for phase in phases]


def _ckpt_phase(load_dir, save_dir, iters, moe=False):
    from megatron_k15.checkpointing import load_checkpoint, save_checkpoint
    from megatron_k15.data.sft import PackedSFTStream
    from megatron_k15.models.config import preset
    from megatron_k15.train_sft import sft_forward_step
    from megatron_k15.training import build_train_context, forward_only, reduce_sums, train_step

    from test_training_parallel import MOE

    cfg = preset("tiny", num_layers=4, init_method_std=0.05, **(MOE if moe else {}))
    ctx = build_train_context(_args(), cfg, seed=11)
    start, extra = load_checkpoint(load_dir, ctx) if load_dir else (0, {})
    consumed = extra.get("consumed_rows", 0)
    stream = PackedSFTStream(_samples(), SEQ, seed=3)
    per = GBS // ctx.pc.dp_size
    losses = []
    for it in range(start, start + iters):
        rows = stream.rows(consumed, GBS)
        total = sum(stream.loss_tokens(r) for r in rows)
        mine = rows[ctx.pc.dp_rank * per:(ctx.pc.dp_rank + 1) * per]
        mbs = [stream.microbatch(mine[k:k + MBS]) for k in range(0, per, MBS)]
        results, _ = train_step(ctx, mbs, sft_forward_step(ctx.model, total), 1e-3)
        s, n = reduce_sums([sum(r[0] for r in results), sum(r[1] for r in results)], ctx)
        losses.append(s / n)
        consumed += GBS
    if save_dir:
        save_checkpoint(save_dir, start + iters, ctx, {"consumed_rows": consumed})
    model = ctx.model

    def probe_step(mb, hidden):
        out = model(input_ids=mb["input_ids"] if model.pre_process else None, hidden=hidden)
        return (None, model.gather_logits(out)) if model.post_process else out

    model.eval()
    logits = forward_only(ctx, [{"input_ids": PROBE}], probe_step)
    return {"losses": losses, "logits": logits[0] if logits else None}


def _last_stage(results, phase):
    return [r[phase] for r in results if r[phase]["logits"] is not None][0]


@pytest.mark.slow
def test_reshard_weights_and_optimizer_both_ways(tmp_path):
    a, b = str(tmp_path / "tp2pp2"), str(tmp_path / "tp1pp1")
    # tp=2 pp=2: train 1 iteration and save; then a new model loads it and trains one more
    same = _last_stage(run_distributed(ckpt_worker, 4, 2, 2, [(None, a, 1), (a, None, 1)]), 1)
    # tp=1 pp=1: load the tp=2 pp=2 checkpoint, train the same iteration, save; reload that
    single = run_distributed(ckpt_worker, 1, 1, 1, [(a, b, 1), (b, None, 0)])
    other, reload = _last_stage(single, 0), _last_stage(single, 1)
    # the optimizer state resharded too: the next iteration is the same step in both layouts
    assert abs(same["losses"][0] - other["losses"][0]) <= 1e-5 * abs(same["losses"][0])
    assert (same["logits"] - other["logits"]).abs().max() <= 1e-4
    # and back: tp=1 pp=1 checkpoint loaded at tp=2 pp=2 gives the probe logits it saved with
    back = _last_stage(run_distributed(ckpt_worker, 4, 2, 2, [(b, None, 0)]), 0)
    assert (back["logits"] - other["logits"]).abs().max() <= 1e-5
    assert torch.equal(reload["logits"], other["logits"])  # same layout: bit-identical


def test_expert_parallel_checkpoints_load_at_any_ep(tmp_path):
    """Saved at ep=2 (dp=2), a shard holds all experts: one rank without expert parallelism
    loads it and takes the same next step (optimizer state too); its checkpoint loads back at
    ep=2 with the logits it saved with."""
    a, b = str(tmp_path / "ep2"), str(tmp_path / "ep1")
    same = _last_stage(run_distributed(ckpt_worker, 2, 1, 1, [(None, a, 1), (a, None, 1)], 2, True), 1)
    single = run_distributed(ckpt_worker, 1, 1, 1, [(a, b, 1), (b, None, 0)], 1, True)
    other = _last_stage(single, 0)
    assert abs(same["losses"][0] - other["losses"][0]) <= 1e-5 * abs(same["losses"][0])
    assert (same["logits"] - other["logits"]).abs().max() <= 1e-4
    back = _last_stage(run_distributed(ckpt_worker, 2, 1, 1, [(b, None, 0)], 2, True), 0)
    assert (back["logits"] - other["logits"]).abs().max() <= 1e-5
    shard = torch.load(os.path.join(a, "iter_0000001", "mp_rank_00_000", "model.pt"), weights_only=True)
    assert shard["model"]["layers.0.mlp.experts.linear_fc1.weight"].shape[0] == 4
    assert shard["optimizer"]["exp_avg"]["layers.0.mlp.experts.linear_fc2.weight"].shape[0] == 4


def _make_sft_data(tmp_path):
    lines = [json.dumps({"prompt": f"{i}+{i}=", "response": str(2 * i)}) for i in range(60)]
    (tmp_path / "sft.jsonl").write_text("\n".join(lines) + "\n")
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--mode", "sft",
                    "--input", str(tmp_path / "sft.jsonl"), "--output-prefix", str(tmp_path / "sft"),
                    "--tokenizer", "byte", "--no-progress"], check=True, capture_output=True)
    return str(tmp_path / "sft")


def _sft_cmd(data, save, tb, extra=()):
    return [sys.executable, "-m", "megatron_k15.train_sft", "--train-data", data, "--seq-length", "64",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "6", "--lr", "2e-3",
            "--lr-warmup-iters", "2", "--save", save, "--tensorboard-dir", tb, "--num-layers", "4",
            *extra]


def _losses(tb):
    return {r["iteration"]: r["loss"] for r in map(json.loads, open(os.path.join(tb, "metrics.jsonl")))}


@pytest.fixture(scope="module")
def sft_straight(tmp_path_factory):
    """(data prefix, per-iteration losses of 6 uninterrupted SFT iterations)."""
    tmp = tmp_path_factory.mktemp("sft_straight")
    data = _make_sft_data(tmp)
    subprocess.run(_sft_cmd(data, str(tmp / "a"), str(tmp / "tb_a")), check=True, capture_output=True,
                   env=dict(os.environ, PYTHONPATH=ROOT))
    straight = _losses(tmp / "tb_a")
    assert sorted(straight) == [1, 2, 3, 4, 5, 6]
    return data, straight


@pytest.mark.slow
@pytest.mark.parametrize("saving", [[], ["--async-save"]], ids=["sync", "async"])
def test_kill9_and_resume_is_bitwise_identical(tmp_path, sft_straight, saving):
    """--async-save: iteration 3's checkpoint is written while iteration 4 trains and becomes
    current after it; the kill may land before that, never on a half-written one."""
    data, straight = sft_straight
    env = dict(os.environ, PYTHONPATH=ROOT)
    ck, tb = str(tmp_path / "b"), str(tmp_path / "tb_b")
    proc = subprocess.Popen(_sft_cmd(data, ck, tb, ["--save-interval", "3", *saving]), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = os.path.join(ck, "latest_checkpointed_iteration.txt")
    deadline = time.time() + 300
    while time.time() < deadline and not (os.path.exists(latest) and open(latest).read() == "3"):
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert open(latest).read() == "3", "the run finished before it could be killed"
    subprocess.run(_sft_cmd(data, ck, tb, ["--load", ck, "--save-interval", "3", *saving]), check=True,
                   capture_output=True, env=env)
    resumed = _losses(tb)
    for it in (4, 5, 6):
        assert resumed[it] == straight[it], it  # bitwise: same float in the JSON
    assert open(latest).read() == "6" and not [d for d in os.listdir(ck) if d.startswith(".tmp")]


@pytest.mark.slow
def test_exit_interval_saves_and_the_resumed_run_is_bitwise_identical(tmp_path, sft_straight):
    """``--exit-interval 2`` without --save-interval: the run stops after iteration 2 with exit
    code 0 and a checkpoint of it; resuming finishes as if never stopped."""
    data, straight = sft_straight
    env = dict(os.environ, PYTHONPATH=ROOT)
    ck, tb = str(tmp_path / "c"), str(tmp_path / "tb_c")
    retain = ["--save-interval", "1", "--save-retain-interval", "2"]  # and keep only even iterations
    # and Python's garbage collector by hand: it changes no number
    manual_gc = ["--manual-gc", "--manual-gc-interval", "1"]
    first = subprocess.run(_sft_cmd(data, ck, tb, ["--exit-interval", "2", *retain, *manual_gc]), capture_output=True,
                           text=True, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"[train_sft] --exit-interval 2: stopping after iteration 2, checkpoint in {ck}" in first.stdout
    assert sorted(_losses(tb)) == [1, 2]
    assert open(os.path.join(ck, "latest_checkpointed_iteration.txt")).read() == "2"
    assert sorted(d for d in os.listdir(ck) if d.startswith("iter_")) == ["iter_0000002"]
    subprocess.run(_sft_cmd(data, ck, tb, ["--load", ck, *retain]), check=True, capture_output=True, env=env)
    resumed = _losses(tb)
    for it in range(1, 7):
        assert resumed[it] == straight[it], it
    assert sorted(os.listdir(ck)) == ["iter_0000002", "iter_0000004", "iter_0000006",
                                      "latest_checkpointed_iteration.txt"]


@pytest.mark.slow
def test_ckpt_step_rolls_back_to_an_earlier_iteration(tmp_path, sft_straight):
    """--ckpt-step 2 of a directory whose latest is 4: iterations 3-4 repeat the uninterrupted
    run bit for bit (same lr schedule through --lr-decay-iters 6); a missing step names those
    there are."""
    data, straight = sft_straight
    env = dict(os.environ, PYTHONPATH=ROOT)
    ck = str(tmp_path / "e")
    four = ["--train-iters", "4", "--lr-decay-iters", "6"]
    subprocess.run(_sft_cmd(data, ck, str(tmp_path / "tb_a"), [*four, "--save-interval", "2"]), check=True,
                   capture_output=True, env=env)
    assert open(os.path.join(ck, "latest_checkpointed_iteration.txt")).read() == "4"
    tb = str(tmp_path / "tb_b")
    subprocess.run(_sft_cmd(data, ck, tb, [*four, "--load", ck, "--ckpt-step", "2"]), check=True,
                   capture_output=True, env=env)
    rolled = _losses(tb)
    assert sorted(rolled) == [3, 4] and all(rolled[it] == straight[it] for it in (3, 4)), rolled
    bad = subprocess.run(_sft_cmd(data, ck, tb, ["--load", ck, "--ckpt-step", "3"]), capture_output=True,
                         text=True, env=env)
    assert bad.returncode != 0 and "--ckpt-step 3: no complete checkpoint of iteration 3; complete ones: [2, 4]" \
        in bad.stderr, bad.stderr


@pytest.mark.parametrize("layout", [
    {".metadata": "", "__0_0.distcp": "", "common.pt": ""},      # Megatron-LM torch_dist
    {"mp_rank_00/model_optim_rng.pt": ""},                        # Megatron-LM legacy torch
    {"mp_rank_00_000/model.pt": ""},                              # ours, half written
])
def test_loading_a_megatron_lm_checkpoint_says_how_to_convert_it(tmp_path, layout):
    from megatron_k15.checkpointing import CheckpointError, resolve_checkpoint_dir

    (tmp_path / "latest_checkpointed_iteration.txt").write_text("1000")
    for rel, text in layout.items():
        (tmp_path / "iter_0001000" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "iter_0001000" / rel).write_text(text)
    ours = "mp_rank_00_000/model.pt" in layout
    with pytest.raises(CheckpointError, match="which is incomplete" if ours else
                       "iter_0001000 is a Megatron-LM checkpoint.*convert_hf_to_megatron.py"):
        resolve_checkpoint_dir(str(tmp_path))


def test_load_equal_to_save_starts_fresh_only_while_nothing_is_saved(tmp_path, capsys):
    """Megatron-LM's resume idiom (--load DIR --save DIR): no checkpoint yet means a fresh start;
    never with --finetune or --exit-on-missing-checkpoint, nor for a --load that is not --save."""
    from megatron_k15.arguments import parse_args

    d = str(tmp_path / "run")
    args = parse_args(["--num-layers", "2", "--load", d, "--save", d], world_size=1)
    assert args.load is None and args.load_missing == d
    for extra, message in ((["--save", d + "_other"], "directory does not exist"),
                           (["--save", d, "--exit-on-missing-checkpoint"], "directory does not exist"),
                           (["--save", d, "--finetune"], "directory does not exist"),
                           (["--save", d, "--ckpt-step", "2"], "directory does not exist")):
        with pytest.raises(SystemExit):
            parse_args(["--num-layers", "2", "--load", d, *extra], world_size=1)
        assert message in capsys.readouterr().err, extra
    os.makedirs(os.path.join(d, "iter_0000002"))
    open(os.path.join(d, "latest_checkpointed_iteration.txt"), "w").write("2")  # saved, but incomplete
    with pytest.raises(SystemExit):
        parse_args(["--num-layers", "2", "--load", d, "--save", d], world_size=1)
    assert "points to iter_0000002, which is incomplete" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_idiom_starts_then_resumes_bit_for_bit(tmp_path, sft_straight):
    data, straight = sft_straight
    env = dict(os.environ, PYTHONPATH=ROOT)
    ck, tb = str(tmp_path / "f"), str(tmp_path / "tb_f")
    same = ["--load", ck, "--lr-decay-iters", "6"]  # _sft_cmd saves to ck too
    first = subprocess.run(_sft_cmd(data, ck, tb, [*same, "--train-iters", "2"]), capture_output=True, text=True,
                           env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"--load {ck}: no checkpoint yet, starting from scratch" in first.stdout
    second = subprocess.run(_sft_cmd(data, ck, tb, [*same, "--train-iters", "4"]), capture_output=True, text=True,
                            env=env)
    assert second.returncode == 0 and "start at iteration 2" in second.stdout, second.stdout + second.stderr
    losses = _losses(tb)
    assert all(losses[it] == straight[it] for it in (1, 2, 3, 4)), losses


def test_prune_keeps_the_newest_and_the_retained(tmp_path):
    from megatron_k15.checkpointing import prune_checkpoints

    for name in ["iter_0000001", "iter_0000002", "iter_0000003", "iter_0000004", "iter_0000005",
                 "iter_0000006", "iter_0000009", ".tmp-iter_0000007", "release", ".deleting-iter_0000001-0a1b2c3d"]:
        os.makedirs(tmp_path / name / "mp_rank_00_000")
    assert prune_checkpoints(str(tmp_path), 5, 2) == [1, 3]
    # 5 is the one just saved, 9 is newer (another run's): neither is touched; a deletion a crash
    # interrupted is finished
    assert sorted(os.listdir(tmp_path)) == [".tmp-iter_0000007", "iter_0000002", "iter_0000004", "iter_0000005",
                                            "iter_0000006", "iter_0000009", "release"]


@pytest.mark.parametrize("flags, message", [
    (["--save-retain-interval", "0", "--save", "x"], "--save-retain-interval must be >= 1"),
    (["--save-retain-interval", "4"], "--save-retain-interval needs --save DIR"),
    (["--save", "x", "--save-interval", "3", "--save-retain-interval", "4"], "use a multiple of 3"),
])
def test_bad_retain_interval_is_refused(flags, message, capsys):
    from megatron_k15.arguments import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--num-layers", "2", *flags], world_size=1)
    assert message in capsys.readouterr().err


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    import megatron_k15.checkpointing as ckpt
    from megatron_k15.initialize import initialize_model_parallel
    from megatron_k15.models.config import preset
    from megatron_k15.training import build_train_context

    initialize_model_parallel(1)
    ctx = build_train_context(_args(), preset("tiny"), seed=1)
    ckpt.save_checkpoint(str(tmp_path), 1, ctx, {"consumed_rows": 8})
    real_save = torch.save

    def failing_save(obj, path, *a, **k):
        if str(path).endswith("trainer_state.pt"):
            raise OSError("disk full (simulated)")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    with torch.no_grad():
        for p in ctx.model.parameters():
            p.add_(1.0)
    with pytest.raises(OSError, match="simulated"):
        ckpt.save_checkpoint(str(tmp_path), 2, ctx, {"consumed_rows": 16})
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "1"
    assert not (tmp_path / "iter_0000002").exists()
    fresh = build_train_context(_args(), preset("tiny"), seed=2)
    iteration, extra = ckpt.load_checkpoint(str(tmp_path), fresh)
    assert iteration == 1 and extra == {"consumed_rows": 8}
    for (n, p), (_, q) in zip(fresh.model.named_parameters(), ctx.model.named_parameters()):
        assert torch.allclose(p, q - 1.0, atol=1e-6) and not torch.allclose(p, q), n


def test_checkpoint_without_optimizer_or_rng(tmp_path):
    """--no-save-optim / --no-save-rng leave them out; loading one needs --no-load-optim, which
    continues from the weights and iteration with a fresh optimizer whose fp32 master weights
    are the loaded ones (a step with lr 0 leaves the weights as loaded)."""
    import megatron_k15.checkpointing as ckpt
    from megatron_k15.initialize import initialize_model_parallel
    from megatron_k15.models.config import preset
    from megatron_k15.training import build_train_context

    initialize_model_parallel(1)
    ctx = build_train_context(_args(), preset("tiny"), seed=1)
    ckpt.save_checkpoint(str(tmp_path), 5, ctx, {"consumed_rows": 20}, save_optimizer=False, save_rng=False)
    d = tmp_path / "iter_0000005"
    assert "optimizer" not in torch.load(d / ckpt.shard_dir_name(0, 0) / "model.pt", weights_only=True)
    assert os.listdir(d / "rng") == []
    fresh = build_train_context(_args(), preset("tiny"), seed=2)
    with pytest.raises(ckpt.CheckpointError, match="add --no-load-optim"):
        ckpt.load_checkpoint(str(tmp_path), fresh)
    assert ckpt.load_checkpoint(str(tmp_path), fresh, load_optimizer=False) == (5, {"consumed_rows": 20})
    for p in fresh.model.parameters():
        p.grad = torch.ones_like(p)
    fresh.optimizer.step(0.0)
    for (n, p), (_, q) in zip(fresh.model.named_parameters(), ctx.model.named_parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("flag", ["--no-load-optim", "--no-load-rng", "--ckpt-step"])
def test_load_switches_need_load(flag, capsys):
    from megatron_k15.arguments import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--num-layers", "2", flag, *(["5"] if flag == "--ckpt-step" else [])], world_size=1)
    assert f"{flag} applies to --load DIR" in capsys.readouterr().err


@pytest.mark.slow
def test_sft_resumes_weights_only_checkpoint_with_a_fresh_optimizer(tmp_path, sft_straight):
    """Saved with --no-save-optim at iteration 2, resumed with --no-load-optim: iteration 3's
    loss (the weights after 2, the data position) is the uninterrupted run's; iteration 4's is
    not (Adam restarted)."""
    data, straight = sft_straight
    env = dict(os.environ, PYTHONPATH=ROOT)
    ck, tb = str(tmp_path / "d"), str(tmp_path / "tb_d")
    subprocess.run(_sft_cmd(data, ck, tb, ["--exit-interval", "2", "--no-save-optim"]), check=True,
                   capture_output=True, env=env)
    refused = subprocess.run(_sft_cmd(data, ck, tb, ["--load", ck]), capture_output=True, text=True, env=env)
    assert refused.returncode != 0 and "add --no-load-optim" in refused.stderr
    subprocess.run(_sft_cmd(data, ck, tb, ["--load", ck, "--no-load-optim", "--train-iters", "4"]), check=True,
                   capture_output=True, env=env)
    resumed = _losses(tb)
    assert resumed[3] == straight[3] and resumed[4] != straight[4]
