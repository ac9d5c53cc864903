"""Every invalid flag combination fails before any work, naming the flag."""

import os
import subprocess
import sys

import pytest

from megatron_k15.arguments import ArgumentError, build_parser, parse_args, validate_args


def _validate(argv, world_size=1):
    args = build_parser().parse_args(argv)
    validate_args(args, world_size=world_size)
    return args


@pytest.mark.parametrize("argv,world,flag", [
    (["--tensor-model-parallel-size", "3"], 3, "--tensor-model-parallel-size 3 does not divide --num-attention-heads"),
    (["--tensor-model-parallel-size", "4", "--num-attention-heads", "8", "--num-query-groups", "2",
      "--hidden-size", "128"], 4, "--num-query-groups 2"),
    (["--tensor-model-parallel-size", "2"], 3, "world size 3"),
    (["--pipeline-model-parallel-size", "3"], 3, "--pipeline-model-parallel-size 3 exceeds --num-layers 2"),
    (["--bf16", "--fp16"], 1, "--bf16 and --fp16"),
    (["--seq-length", "4096"], 1, "--seq-length 4096 exceeds --max-position-embeddings 2048"),
    (["--seq-length", "30", "--context-parallel-size", "2"], 2, "--context-parallel-size"),
    (["--seq-length", "31", "--tensor-model-parallel-size", "2"], 2, "--seq-length 31 must be a multiple of --tensor-model-parallel-size 2"),
    (["--global-batch-size", "6", "--micro-batch-size", "4"], 1, "--global-batch-size 6"),
    (["--global-batch-size", "4", "--micro-batch-size", "1"], 8, "--global-batch-size 4"),
    (["--finetune"], 1, "--finetune needs --load"),
    (["--num-attention-heads", "5"], 1, "--num-attention-heads 5 is not divisible by --num-query-groups 2"),
    (["--lr", "1e-5", "--min-lr", "1e-4"], 1, "--min-lr"),
    (["--save-interval", "10"], 1, "--save-interval needs --save"),
    (["--load", "/nonexistent/ckpt"], 1, "--load /nonexistent/ckpt"),
    (["--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "2"], 2, "--decoder-first"),
])
def test_invalid_combinations_name_the_flag(argv, world, flag):
    with pytest.raises(ArgumentError) as e:
        _validate(argv, world)
    assert flag in str(e.value)


def test_valid_layout_and_derived_values():
    args = _validate(["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "1",
                      "--seq-length", "64", "--global-batch-size", "8", "--micro-batch-size", "2",
                      "--hidden-size", "128", "--num-attention-heads", "8", "--num-query-groups", "4"], 8)
    assert args.data_parallel_size == 4
    cfg = args.model_config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.kv_channels) == (128, 8, 16)


def test_model_preset_and_overrides():
    args = _validate(["--model-preset", "qwen2.5-7b", "--num-layers", "4"])
    cfg = args.model_config
    assert cfg.num_layers == 4 and cfg.hidden_size == 3584 and cfg.num_query_groups == 4
    assert cfg.add_qkv_bias and cfg.rotary_base == 1e6


def test_load_uses_checkpoint_config_and_rejects_contradictions(tmp_path):
    from megatron_k15.checkpointing import write_full_state_dict
    from megatron_k15.models.config import preset

    cfg = preset("tiny", num_layers=3)
    (tmp_path / "release").mkdir()
    write_full_state_dict(str(tmp_path / "release"), {}, cfg, 1, 1)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("release")
    assert _validate(["--load", str(tmp_path)]).model_config.num_layers == 3
    with pytest.raises(ArgumentError, match="--num-layers 5 contradicts the checkpoint"):
        _validate(["--load", str(tmp_path), "--num-layers", "5"])


def _error_line(stderr: str) -> str:
    """argparse prints the usage (which lists every flag) and then ``prog: error: ...``."""
    return [line for line in stderr.splitlines() if "error:" in line][-1]


def test_cli_exits_nonzero_with_message(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--bf16", "--fp16"], world_size=1)
    assert e.value.code == 2
    assert "--bf16 and --fp16" in _error_line(capsys.readouterr().err)


def test_generate_rejects_a_layout_the_world_size_cannot_hold_before_work(tmp_path):
    from megatron_k15.checkpointing import write_full_state_dict
    from megatron_k15.models.config import preset

    (tmp_path / "release").mkdir()
    write_full_state_dict(str(tmp_path / "release"), {}, preset("tiny"), 1, 1)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("release")
    (tmp_path / "in.jsonl").write_text('{"prompt_ids": [1]}\n')
    proc = subprocess.run([sys.executable, "-m", "megatron_k15.generate", "--load", str(tmp_path),
                           "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o"),
                           "--context-parallel-size", "3"],
                          capture_output=True, text=True, env={**os.environ, "WORLD_SIZE": "2"})
    assert proc.returncode == 2
    assert "--context-parallel-size 3" in _error_line(proc.stderr)
    assert not (tmp_path / "o").exists()
