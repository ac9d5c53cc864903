"""--async-save: the checkpoint is the state at the save call, whatever training does while it
is written; it becomes current only when every rank has written its part; a failed write
leaves the previous checkpoint current. Reference: a synchronous save of the same state."""

import os
import sys
import threading
import time

import numpy as np
import pytest
import torch

from megatron_k15.testing import run_distributed

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_training_parallel import GBS, MBS, SEQ, _args, _samples  # noqa: E402


def _same_tree(a, b, where=""):
    """Every tensor bitwise equal, everything else equal; returns the first difference or None."""
    if isinstance(a, torch.Tensor):
        return None if isinstance(b, torch.Tensor) and torch.equal(a, b) else where
    if isinstance(a, dict):
        if not isinstance(b, dict) or set(a) != set(b):
            return where
        return next((d for k in a if (d := _same_tree(a[k], b[k], f"{where}/{k}")) is not None), None)
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return where
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := _same_tree(x, y, f"{where}/{i}"))), None)
    if isinstance(a, np.ndarray):
        return None if np.array_equal(a, b) else where
    return None if a == b else where


def _checkpoint_files(ckpt_dir):
    return sorted(os.path.relpath(os.path.join(d, f), ckpt_dir) for d, _, fs in os.walk(ckpt_dir) for f in fs)


def _same_checkpoint(a_dir, b_dir):
    """None if the two checkpoint directories hold the same files with the same contents."""
    if _checkpoint_files(a_dir) != _checkpoint_files(b_dir):
        return f"files: {_checkpoint_files(a_dir)} vs {_checkpoint_files(b_dir)}"
    for rel in _checkpoint_files(a_dir):
        if rel.endswith(".json"):
            if open(os.path.join(a_dir, rel)).read() != open(os.path.join(b_dir, rel)).read():
                return rel
            continue
        load = (lambda p: torch.load(p, weights_only=False))
        diff = _same_tree(load(os.path.join(a_dir, rel)), load(os.path.join(b_dir, rel)), rel)
        if diff is not None:
            return diff
    return None


def _train_one_step(ctx, seed):
    """One SFT update (dp = 1) on rows chosen by ``seed``: weights and Adam's moments change."""
    from megatron_k15.data.sft import PackedSFTStream
    from megatron_k15.train_sft import sft_forward_step
    from megatron_k15.training import train_step

    stream = PackedSFTStream(_samples(), SEQ, seed=seed)
    rows = stream.rows(0, GBS)
    mbs = [stream.microbatch(rows[k:k + MBS]) for k in range(0, GBS, MBS)]
    train_step(ctx, mbs, sft_forward_step(ctx.model, sum(stream.loss_tokens(r) for r in rows)), 1e-2)


@pytest.fixture
def ctx():
    from megatron_k15.initialize import initialize_model_parallel
    from megatron_k15.models.config import preset
    from megatron_k15.training import build_train_context

    initialize_model_parallel(1)
    c = build_train_context(_args(), preset("tiny"), seed=1)
    _train_one_step(c, 0)  # Adam's moments non-zero
    return c


def _gated_torch_save(monkeypatch, release: threading.Event, fail: bool = False):
    """torch.save of model shards waits for ``release`` (and then fails, with ``fail``)."""
    real = torch.save

    def save(obj, path, *a, **k):
        if str(getattr(path, "name", path)).endswith("model.pt"):
            assert release.wait(60)
            if fail:
                raise OSError("disk full (simulated)")
        return real(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", save)


def test_async_checkpoint_is_the_state_at_the_save_call(tmp_path, ctx, monkeypatch):
    from megatron_k15.async_save import AsyncCheckpointSaver
    from megatron_k15.checkpointing import LATEST_FILE, load_checkpoint, save_checkpoint

    sync_dir, async_dir = tmp_path / "sync", tmp_path / "async"
    save_checkpoint(str(sync_dir), 7, ctx, {"consumed_rows": 28})
    save_checkpoint(str(async_dir), 6, ctx, {"consumed_rows": 24})  # the previous checkpoint
    release = threading.Event()
    _gated_torch_save(monkeypatch, release)
    saver = AsyncCheckpointSaver()
    save_checkpoint(str(async_dir), 7, ctx, {"consumed_rows": 28}, async_saver=saver)
    # training goes on while the shard is being written: weights and moments change in place
    _train_one_step(ctx, 1)
    assert not saver.maybe_finalize()  # not written yet: nothing becomes current
    assert (async_dir / LATEST_FILE).read_text() == "6"
    assert not (async_dir / "iter_0000007").exists() and (async_dir / ".tmp-iter_0000007").exists()
    release.set()
    assert saver.maybe_finalize(blocking=True) and not saver.pending
    assert (async_dir / LATEST_FILE).read_text() == "7"
    assert _same_checkpoint(str(sync_dir / "iter_0000007"), str(async_dir / "iter_0000007")) is None
    # and it loads as the state of the save call (the sync save's), not the trained-on one
    from megatron_k15.models.config import preset
    from megatron_k15.training import build_train_context

    fresh = build_train_context(_args(), preset("tiny"), seed=2)
    assert load_checkpoint(str(async_dir), fresh) == (7, {"consumed_rows": 28})
    ref = build_train_context(_args(), preset("tiny"), seed=3)
    load_checkpoint(str(sync_dir), ref)
    for (n, p), (_, q), (_, r) in zip(fresh.model.named_parameters(), ref.model.named_parameters(),
                                      ctx.model.named_parameters()):
        assert torch.equal(p, q) and not torch.equal(p, r), n


def test_a_failed_background_write_keeps_the_previous_checkpoint(tmp_path, ctx, monkeypatch):
    from megatron_k15.async_save import AsyncCheckpointSaver
    from megatron_k15.checkpointing import LATEST_FILE, CheckpointError, save_checkpoint

    save_checkpoint(str(tmp_path), 1, ctx, {})
    release = threading.Event()
    _gated_torch_save(monkeypatch, release, fail=True)
    saver = AsyncCheckpointSaver()
    save_checkpoint(str(tmp_path), 2, ctx, {}, async_saver=saver)
    release.set()
    with pytest.raises(CheckpointError, match=r"iter_0000002 failed: OSError\('disk full \(simulated\)'\)"):
        saver.maybe_finalize(blocking=True)
    assert (tmp_path / LATEST_FILE).read_text() == "1" and not (tmp_path / "iter_0000002").exists()
    monkeypatch.undo()
    save_checkpoint(str(tmp_path), 3, ctx, {}, async_saver=saver)  # the saver is usable again
    assert saver.maybe_finalize(blocking=True) and (tmp_path / LATEST_FILE).read_text() == "3"


def test_a_failed_rename_is_raised_and_keeps_the_previous_checkpoint(tmp_path, ctx, monkeypatch):
    from megatron_k15.async_save import AsyncCheckpointSaver
    from megatron_k15.checkpointing import LATEST_FILE, CheckpointError, save_checkpoint

    save_checkpoint(str(tmp_path), 1, ctx, {})
    saver = AsyncCheckpointSaver()
    save_checkpoint(str(tmp_path), 2, ctx, {}, async_saver=saver)
    real = os.replace

    def replace(src, dst):
        if str(src).endswith(".tmp-iter_0000002"):
            raise OSError("read-only file system (simulated)")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(CheckpointError, match=r"making checkpoint iter_0000002 current failed: OSError"):
        saver.maybe_finalize(blocking=True)
    assert (tmp_path / LATEST_FILE).read_text() == "1" and not saver.pending


def test_a_new_save_first_finishes_the_one_in_flight(tmp_path, ctx):
    from megatron_k15.async_save import AsyncCheckpointSaver
    from megatron_k15.checkpointing import LATEST_FILE, save_checkpoint

    saver = AsyncCheckpointSaver()
    save_checkpoint(str(tmp_path), 1, ctx, {}, async_saver=saver)
    save_checkpoint(str(tmp_path), 2, ctx, {}, async_saver=saver)
    assert (tmp_path / "iter_0000001" / "config.json").exists()  # finalised by the second save
    assert saver.pending and saver.maybe_finalize(blocking=True)
    assert (tmp_path / LATEST_FILE).read_text() == "2"


def async_tp2_worker(rank, world_size, out_dir):
    """tp=2: rank 1 writes slowly; until it is done neither rank may see the checkpoint as current."""
    from megatron_k15.async_save import AsyncCheckpointSaver
    from megatron_k15.checkpointing import LATEST_FILE, save_checkpoint
    from megatron_k15.initialize import initialize_model_parallel
    from megatron_k15.models.config import preset
    from megatron_k15.training import build_train_context

    initialize_model_parallel(2)
    ctx = build_train_context(_args(), preset("tiny"), seed=1)
    _train_one_step(ctx, rank)
    save_checkpoint(os.path.join(out_dir, "sync"), 4, ctx, {"consumed_rows": 16})
    if rank == 1:
        real = torch.save

        def slow(obj, path, *a, **k):
            if str(getattr(path, "name", path)).endswith("model.pt"):
                time.sleep(1.5)
            return real(obj, path, *a, **k)

        torch.save = slow
    saver = AsyncCheckpointSaver()
    save_checkpoint(os.path.join(out_dir, "async"), 4, ctx, {"consumed_rows": 16}, async_saver=saver)
    _train_one_step(ctx, 10 + rank)
    early = saver.maybe_finalize()
    latest_early = os.path.exists(os.path.join(out_dir, "async", LATEST_FILE))
    done = saver.maybe_finalize(blocking=True)
    latest = open(os.path.join(out_dir, "async", LATEST_FILE)).read()
    return early, latest_early, done, latest


def test_async_save_on_two_ranks_waits_for_the_slowest_rank(tmp_path):
    results = run_distributed(async_tp2_worker, 2, str(tmp_path))
    assert results == [(False, False, True, "4")] * 2
    assert _same_checkpoint(str(tmp_path / "sync" / "iter_0000004"), str(tmp_path / "async" / "iter_0000004")) is None
    assert sorted(os.listdir(tmp_path / "async" / "iter_0000004")) == [
        "config.json", "mp_rank_00_000", "mp_rank_01_000", "rng", "trainer_state.pt"]


def test_async_save_needs_save(capsys):
    from megatron_k15.arguments import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--num-layers", "2", "--async-save"], world_size=1)
    assert "--async-save needs --save DIR" in capsys.readouterr().err


# Run by the test below in a fresh interpreter: train_sft with the model shard's background
# write held back until a second, unrecoverable step (a non-finite gradient) has stopped the run.
_FATAL_WHILE_WRITING = r'''
import sys, threading
import torch
from megatron_k15.parallel import data as pdata

release, real_save, real_step, calls = threading.Event(), torch.save, pdata.DistributedOptimizer.step, [0]

def save(obj, f, *a, **k):
    if str(getattr(f, "name", f)).endswith("model.pt"):
        assert release.wait(60)
    return real_save(obj, f, *a, **k)

def step(self, *a, **k):
    norm = real_step(self, *a, **k)
    calls[0] += 1
    if calls[0] == 2:  # as a non-finite gradient leaves it; the write is let go a second later
        self.unrecoverable_overflow = self.last_step_skipped = True
        threading.Timer(1.0, release.set).start()
    return norm

torch.save, pdata.DistributedOptimizer.step = save, step
from megatron_k15.train_sft import main
try:
    main(sys.argv[1:])
except FloatingPointError as e:
    print("stopped:", e)
'''


def test_train_sft_stopping_on_a_bad_step_first_makes_the_pending_save_current(tmp_path):
    """train_sft stops at an update it cannot make; a checkpoint still being written in the
    background then is finished and made current before the error, so the run resumes from it."""
    import subprocess

    from megatron_k15.checkpointing import LATEST_FILE
    from test_checkpointing import ROOT, _make_sft_data, _sft_cmd

    data, save = _make_sft_data(tmp_path), str(tmp_path / "ckpt")
    cmd = _sft_cmd(data, save, str(tmp_path / "tb"), ["--num-layers", "2", "--save-interval", "1", "--async-save"])
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-c", _FATAL_WHILE_WRITING, *cmd[3:]], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=300)
    assert "stopped: iteration 2: grad norm" in res.stdout, res.stdout + res.stderr
    assert open(os.path.join(save, LATEST_FILE)).read() == "1"
    assert os.path.isfile(os.path.join(save, "iter_0000001", "mp_rank_00_000", "model.pt"))
