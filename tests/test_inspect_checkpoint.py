"""tools/checkpoint/inspect_checkpoint.py: what a checkpoint holds (layout, optimizer parts, RNG
files, trainer state), the parts left out by --no-save-optim / --no-save-rng, and a missing
shard."""

import importlib.util
import json
import os
import shutil
import sys


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_training_parallel import _args  # noqa: E402

from megatron_k15.checkpointing import save_checkpoint, shard_dir_name  # noqa: E402
from megatron_k15.generation.replay_buffer import ReplayBuffer, Trajectory  # noqa: E402
from megatron_k15.initialize import initialize_model_parallel  # noqa: E402
from megatron_k15.models.config import preset  # noqa: E402
from megatron_k15.rl.sampling import build_sampler  # noqa: E402
from megatron_k15.training import build_train_context  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("inspect_checkpoint",
                                               os.path.join(ROOT, "tools", "checkpoint", "inspect_checkpoint.py"))
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)


def _inspect(capsys, *argv):
    rc = tool.main([*argv, "--json"])
    out = capsys.readouterr()
    return rc, (json.loads(out.out) if out.out else None), out.err


def test_inspect_reports_every_part(tmp_path, capsys):
    initialize_model_parallel(1)
    cfg = preset("tiny", num_layers=2)
    ctx = build_train_context(_args(), cfg, seed=1)
    buffer = ReplayBuffer()
    buffer.add(Trajectory(prompt_id="p", prompt_ids=[1, 2], response_ids=[3], segment_ids=[0], logprobs=[-0.5]))
    sampler = build_sampler("uniform", 10, sizes=[6, 4], weights=[0.7, 0.3])
    sampler.sample(5)  # dealt 4 / 1 (the tie at the fifth goes to the first set)
    save_checkpoint(str(tmp_path), 3, ctx, {"consumed_rows": 12, "replay_buffer": buffer.state_dict(),
                                            "sampler": sampler.state_dict()})
    save_checkpoint(str(tmp_path), 6, ctx, {"consumed_rows": 24}, save_optimizer=False, save_rng=False)

    rc, info, _ = _inspect(capsys, "--load", str(tmp_path))
    assert rc == 0 and info["iteration"] == 6 and info["latest"] == "6" and info["iterations_in_directory"] == [3, 6]
    assert info["model"]["num_layers"] == 2 and info["model"]["parameters"] == cfg.num_parameters()
    assert info["layout"]["tensor_model_parallel_size"] == 1 and info["layout"]["world_size"] == 1
    assert info["optimizer"] == {"saved": False} and info["rng"] == {"files": 0, "ranks": 1, "complete": False}
    assert info["trainer_state"]["consumed_rows"] == 24

    rc, info, _ = _inspect(capsys, "--load", str(tmp_path / "iter_0000003"))
    assert rc == 0 and info["iteration"] == 3
    assert info["optimizer"] == {"saved": True, "master": True, "moments": True, "step": 0}
    assert info["rng"]["complete"] and info["trainer_state"]["replay_buffer_trajectories"] == 1
    assert info["trainer_state"]["sampler"] == {"name": "mixture", "num_prompts": 10, "sizes": [6, 4],
                                                "weights": [0.7, 0.3], "drawn": [4, 1]}

    assert tool.main(["--load", str(tmp_path)]) == 0  # the text form
    text = capsys.readouterr().out
    assert "optimizer    not saved (--no-save-optim" in text and "rng          0 of 1 ranks" in text

    shutil.rmtree(tmp_path / "iter_0000006" / shard_dir_name(0, 0))
    rc, info, _ = _inspect(capsys, "--load", str(tmp_path))
    assert rc == 1 and info["shards"]["missing"] == [shard_dir_name(0, 0)]


def test_not_a_checkpoint(tmp_path, capsys):
    rc, info, err = _inspect(capsys, "--load", str(tmp_path))
    assert rc == 1 and info is None and "no latest_checkpointed_iteration.txt" in err


def test_release_checkpoint_is_weights_only(tmp_path, capsys):
    """A converted / merged checkpoint (``release``, no training state): the tool and --load
    both point to --finetune."""
    import pytest

    from megatron_k15.checkpointing import CheckpointError, load_checkpoint, read_full_state_dict, write_full_state_dict

    initialize_model_parallel(1)
    cfg = preset("tiny", num_layers=2)
    ctx = build_train_context(_args(), cfg, seed=1)
    save_checkpoint(str(tmp_path / "a"), 1, ctx)
    full, _ = read_full_state_dict(str(tmp_path / "a"))
    write_full_state_dict(str(tmp_path / "release"), full, cfg, 1, 1)  # as the HF converter writes it
    root = tmp_path / "conv"
    root.mkdir()
    (tmp_path / "release").rename(root / "release")
    (root / "latest_checkpointed_iteration.txt").write_text("release")
    assert tool.main(["--load", str(root)]) == 0
    text = capsys.readouterr().out
    assert "optimizer    none: a release checkpoint" in text and "rng          none (release checkpoint)" in text
    with pytest.raises(CheckpointError, match="a release checkpoint .* with --finetune"):
        load_checkpoint(str(root), build_train_context(_args(), cfg, seed=2))


def test_inspect_checks_a_hugging_face_directory_before_a_run(tmp_path, capsys):
    """An HF directory gets the pre-flight check of ``--load HF_DIR``: the model it becomes,
    its tensors by dtype, and a header-only conversion that names a missing tensor."""
    import torch
    from safetensors.torch import load_file, save_file

    from megatron_k15.testing import save_tiny_hf_checkpoint

    hf = tmp_path / "hf"
    model = save_tiny_hf_checkpoint(str(hf), "qwen2", dtype=torch.bfloat16)
    rc, info, _ = _inspect(capsys, "--load", str(hf))
    assert rc == 0 and info["hugging_face"] and info["conversion_problem"] is None
    assert info["model"]["architecture"] == "qwen2" and info["model"]["num_layers"] == 2
    assert info["tensors"] == {"count": len(model.state_dict()), "dtypes": {"bfloat16": len(model.state_dict())}}
    sd = load_file(hf / "model.safetensors")
    del sd["model.layers.1.self_attn.k_proj.weight"]
    save_file(sd, hf / "model.safetensors", metadata={"format": "pt"})
    rc = tool.main(["--load", str(hf)])
    out = capsys.readouterr().out
    assert rc == 1 and "FAILS" in out and "model.layers.1.self_attn.k_proj.weight" in out
