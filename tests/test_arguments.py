"""Every invalid flag combination fails before any work, naming the flag."""

import os
import re
import subprocess
import sys

import pytest

from megatron_k15.arguments import ArgumentError, build_parser, parse_args, validate_args


def _validate(argv, world_size=1):
    args = build_parser(groups=("model", "parallel", "precision", "training", "checkpoint", "inference")).parse_args(argv)
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
    (["--num-experts", "4", "--moe-shared-expert-gate"], 1, "--moe-shared-expert-gate gates the shared expert"),
    (["--model-preset", "gemma2-2b", "--context-parallel-size", "2", "--seq-length", "64"], 2,
     "--context-parallel-size 2: ring attention does not soft-cap scores"),
    (["--num-attention-heads", "5"], 1, "--num-attention-heads 5 is not divisible by --num-query-groups 2"),
    (["--lr", "1e-5", "--min-lr", "1e-4"], 1, "--min-lr"),
    (["--save-interval", "10"], 1, "--save-interval needs --save"),
    (["--tensorboard-log-interval", "0"], 1, "--tensorboard-log-interval must be >= 1, got 0"),
    (["--log-interval", "-1"], 1, "--log-interval must be >= 1, got -1"),
    (["--load", "/nonexistent/ckpt"], 1, "--load /nonexistent/ckpt"),
    (["--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "2"], 2, "--decoder-first"),
    (["--attention-dropout", "0.1"], 1, "--attention-dropout 0.1 is not supported"),
    (["--main-grads-dtype", "bf16"], 1, "--main-grads-dtype bf16 is not supported"),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"], 2,
     "--num-layers-per-virtual-pipeline-stage is not supported"),
    (["--hidden-dropout", "0.1"], 1, "--hidden-dropout 0.1"),
    (["--rotary-percent", "0.3"], 1, "--rotary-percent 0.3 must be in (0, 1]"),
    (["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "4"], 1,
     "--recompute-num-layers 4"),
    (["--recompute-method", "uniform"], 1, "--recompute-method applies to --recompute-granularity full"),
    (["--recompute-granularity", "full", "--recompute-method", "block"], 1, "--recompute-method block needs"),
    (["--moe-aux-loss-coeff", "0.001"], 1, "--moe-aux-loss-coeff 0.001 applies to mixture-of-experts models"),
    (["--num-experts", "4", "--moe-router-topk", "5"], 1, "--moe-router-topk 5 must be between 1 and --num-experts 4"),
    (["--num-experts", "4", "--moe-ffn-hidden-size", "33", "--tensor-model-parallel-size", "2"], 2,
     "does not divide --moe-ffn-hidden-size 33"),
    (["--num-experts", "4", "--expert-model-parallel-size", "3"], 3, "--expert-model-parallel-size 3 must divide --num-experts 4"),
    (["--num-experts", "4", "--expert-model-parallel-size", "4"], 2, "must divide the data x context parallel size 2"),
    (["--expert-model-parallel-size", "2"], 2, "--expert-model-parallel-size 2 applies to mixture-of-experts models"),
    (["--num-experts", "4", "--expert-model-parallel-size", "0"], 2, "--expert-model-parallel-size must be >= 1"),
    (["--num-experts", "4", "--expert-model-parallel-size", "2", "--inference-engine", "recompute"], 2,
     "--inference-engine recompute does not run expert parallelism"),
    (["--moe-router-topk", "2"], 1, "--moe-router-topk applies to mixture-of-experts models"),
    (["--moe-grouped-gemm"], 1, "--moe-grouped-gemm applies to mixture-of-experts models"),
    (["--lr-warmup-fraction", "1.5"], 1, "--lr-warmup-fraction must be in [0, 1]"),
    (["--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "5"], 1, "--lr-warmup-fraction and --lr-warmup-iters"),
    (["--lr-decay-iters", "0"], 1, "--lr-decay-iters must be >= 1"),
])
def test_invalid_combinations_name_the_flag(argv, world, flag):
    with pytest.raises(ArgumentError) as e:
        _validate(argv, world)
    assert flag in str(e.value)


@pytest.mark.parametrize("argv,world,flag", [
    (["--context-parallel-size", "2"], 2, "--context-parallel-size 2"),
    (["--attention-backend", "triton"], 1, "--attention-backend triton"),
])
def test_triton_attention_on_a_cpu_machine_needs_the_interpreter(monkeypatch, argv, world, flag):
    """Without a GPU, cp > 1 and the Triton backend fail at the flags, not in the first forward."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ArgumentError) as e:
        _validate(argv, world)
    assert flag in str(e.value) and "TRITON_INTERPRET=1" in str(e.value) and "sdpa" in str(e.value)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _validate(argv, world)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _validate(argv, world)


def test_lr_schedule_follows_megatron_flags():
    """Warm-up over a fraction of --lr-decay-iters, decay to --min-lr over --lr-decay-iters
    (not --train-iters), then --min-lr; by hand for lr 1, min 0.1."""
    from megatron_k15.parallel.data import lr_schedule

    def schedule(*flags):
        return lr_schedule(parse_args(["--num-layers", "2", "--lr", "1", "--min-lr", "0.1", "--train-iters", "100",
                                       *flags], world_size=1))

    linear = schedule("--lr-decay-iters", "50", "--lr-warmup-fraction", "0.1", "--lr-decay-style", "linear")
    assert [linear(i) for i in (0, 4, 5)] == [pytest.approx(0.2), 1.0, 1.0]  # 5 warm-up iterations
    assert linear(20) == pytest.approx(0.1 + 0.9 * (1 - 15 / 45))
    assert linear(50) == linear(99) == pytest.approx(0.1)
    warm = schedule("--lr-warmup-iters", "4", "--lr-warmup-init", "0.2", "--lr-decay-style", "constant")
    assert [warm(i) for i in (0, 1, 3, 4)] == [pytest.approx(0.4), pytest.approx(0.6), 1.0, 1.0]  # 0.2 + 0.8 (i+1)/4
    cosine = schedule("--lr-warmup-iters", "10")  # decays over --train-iters by default
    assert cosine(55) == pytest.approx(0.1 + 0.9 * 0.5)
    assert cosine(99) > 0.1 and cosine(100) == pytest.approx(0.1)


def test_sample_based_flags_by_hand():
    """Megatron-LM's --train-samples / --lr-*-samples with a global batch of 4: 1000 samples are
    250 iterations; a warm-up of 10 samples ends within iteration 2 (the lr at 4, 8 samples,
    then decaying, never above --lr); the decay runs over --lr-decay-samples (default: all)."""
    from megatron_k15.parallel.data import lr_schedule

    def parsed(*flags, world=1):
        return parse_args(["--num-layers", "2", "--lr", "1", "--min-lr", "0.1", "--global-batch-size", "4",
                           *flags], world_size=world)

    args = parsed("--train-samples", "1002", "--lr-warmup-samples", "10", "--lr-decay-style", "linear")
    assert args.train_iters == 250 and args.lr_decay_iters == pytest.approx(250.5)
    lr = lr_schedule(args)
    assert [lr(0), lr(1)] == [pytest.approx(0.4), pytest.approx(0.8)]
    assert lr(2) == pytest.approx(1.0) and lr(3) == pytest.approx(1.0 - 0.9 * 0.5 / 248)  # 10 samples -> 2.5 its
    assert lr(250) == pytest.approx(0.1 + 0.9 * 0.5 / 248)
    decays = lr_schedule(parsed("--train-samples", "1000", "--lr-decay-samples", "400", "--lr-decay-style", "linear"))
    assert decays(50) == pytest.approx(0.55) and decays(100) == decays(249) == pytest.approx(0.1)
    wsd = lr_schedule(parsed("--train-samples", "400", "--lr-decay-style", "WSD", "--lr-wsd-decay-samples", "80",
                             "--lr-wsd-decay-style", "linear"))
    assert wsd(80) == 1.0 and wsd(90) == pytest.approx(0.55)
    for flags, message in ((["--train-samples", "40", "--train-iters", "5"], "both set the length"),
                           (["--train-samples", "3"], "less than one global batch"),
                           (["--train-iters", "5", "--lr-warmup-samples", "8"], "--lr-warmup-samples needs --train-samples"),
                           (["--train-samples", "40", "--lr-warmup-iters", "2"], "--lr-warmup-iters counts "
                                                                                  "iterations; with --train-samples"),
                           (["--train-samples", "40", "--lr-decay-iters", "5"], "give --lr-decay-samples"),
                           (["--train-samples", "40", "--lr-warmup-samples", "8", "--lr-warmup-fraction", "0.1"],
                            "--lr-warmup-fraction and --lr-warmup-samples both"),
                           (["--train-samples", "400", "--lr-decay-style", "WSD", "--lr-wsd-decay-samples", "2"],
                            "--lr-wsd-decay-samples 2 is less than one global batch"),
                           (["--train-iters", "5", "--rampup-batch-size", "2", "2", "100"], "--rampup-batch-size is not")):
        with pytest.raises(ArgumentError, match=message):
            _validate(["--lr", "1", "--global-batch-size", "4", *flags], 1)


def test_wsd_and_inverse_square_root_schedules_by_hand():
    """Megatron-LM's WSD (constant, then the last --lr-wsd-decay-iters decay in the chosen
    shape) and inverse-square-root; lr 1, min 0.1, 100 iterations, by hand."""
    from megatron_k15.parallel.data import lr_schedule

    def schedule(*flags):
        return lr_schedule(parse_args(["--num-layers", "2", "--lr", "1", "--min-lr", "0.1", "--train-iters", "100",
                                       *flags], world_size=1))

    wsd = schedule("--lr-warmup-iters", "10", "--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "20")
    assert [wsd(i) for i in (9, 50, 80)] == [1.0, 1.0, 1.0]  # stable until iteration 100 - 20
    assert wsd(90) == pytest.approx(0.1 + 0.9 * (2 * 0.5 ** 0.5 - 1))  # exponential by default
    assert wsd(100) == wsd(150) == pytest.approx(0.1)
    for style, at, expected in (("linear", 90, 0.55), ("cosine", 90, 0.55), ("cosine", 85, 0.1 + 0.9 * 0.8535534),
                                ("minus_sqrt", 95, 0.1 + 0.9 * (1 - 0.75 ** 0.5))):
        shaped = schedule("--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "20", "--lr-wsd-decay-style", style)
        assert shaped(at) == pytest.approx(expected, abs=1e-6), style
    isr = schedule("--lr-warmup-iters", "4", "--lr-decay-style", "inverse-square-root")
    assert [isr(i) for i in (0, 3, 4)] == [0.25, 1.0, 1.0]
    assert isr(16) == pytest.approx(0.5) and isr(400) == isr(10_000) == pytest.approx(0.1)
    for flags, message in ((["--lr-decay-style", "WSD"], "needs --lr-wsd-decay-iters"),
                           (["--lr-decay-style", "WSD", "--lr-warmup-iters", "20", "--lr-wsd-decay-iters", "81"],
                            "use at most 80"),
                           (["--lr-wsd-decay-iters", "5"], "--lr-wsd-decay-iters applies to --lr-decay-style WSD"),
                           (["--lr-wsd-decay-style", "linear"], "--lr-wsd-decay-style applies to")):
        with pytest.raises(ArgumentError, match=message):
            _validate(["--lr", "1", "--train-iters", "100", *flags], 1)


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


def test_no_rope_freq_sets_the_nope_layers(capsys):
    cfg = _validate(["--num-layers", "8", "--no-rope-freq", "4"]).model_config
    assert cfg.nope_layers == [3, 7] and [cfg.uses_rope(i) for i in range(4)] == [True, True, True, False]
    with pytest.raises(SystemExit):
        parse_args(["--no-rope-freq", "0"], world_size=1)
    assert "--no-rope-freq must be >= 1, got 0" in capsys.readouterr().err


def test_rotary_percent_sets_the_rotated_channels():
    cfg = _validate(["--model-preset", "qwen2.5-7b", "--num-layers", "2", "--rotary-percent", "0.5"]).model_config
    assert (cfg.rotary_percent, cfg.rotary_dim, cfg.head_dim) == (0.5, 64, 128)


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
    # Megatron-LM's --use-checkpoint-args: the checkpoint wins over the flag, with a warning
    assert _validate(["--load", str(tmp_path), "--num-layers", "5", "--use-checkpoint-args"]).model_config.num_layers == 3


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


# the model flags of a Megatron-LM launch script for Qwen2.5-7B (as in its examples / Pai-Megatron)
MEGATRON_LM_QWEN25_7B = """
    --num-layers 28 --hidden-size 3584 --ffn-hidden-size 18944 --num-attention-heads 28
    --group-query-attention --num-query-groups 4 --max-position-embeddings 32768
    --position-embedding-type rope --use-rotary-position-embeddings --rotary-base 1000000
    --rotary-percent 1.0 --normalization RMSNorm --norm-epsilon 1e-6 --swiglu
    --disable-bias-linear --add-qkv-bias --untie-embeddings-and-output-weights
    --attention-dropout 0.0 --hidden-dropout 0.0 --use-flash-attn --no-masked-softmax-fusion
    --no-bias-swiglu-fusion --no-rope-fusion --vocab-size 152064 --make-vocab-size-divisible-by 128
    --transformer-impl local --seq-length 4096 --bf16 --tensor-model-parallel-size 4
    --sequence-parallel --use-distributed-optimizer --overlap-grad-reduce
    --no-gradient-accumulation-fusion --recompute-granularity full --recompute-method uniform
    --recompute-num-layers 1 --check-for-nan-in-loss-and-grad --cross-entropy-loss-fusion
    --log-memory-to-tensorboard --manual-gc --manual-gc-interval 10 --ckpt-format torch_dist
    --overlap-param-gather --num-workers 8 --data-cache-path /tmp/cache --tensorboard-log-interval 1
    --optimizer adam --lr-warmup-init 0.0 --calculate-per-token-loss --no-mmap-bin-files
    --dataloader-type cyclic --tensorboard-queue-size 1 --timing-log-level 2 --log-world-size-to-tensorboard
    --empty-unused-memory-level 0 --main-grads-dtype fp32 --no-async-tensor-model-parallel-allreduce
""".split()


def test_megatron_lm_launch_flags_give_the_same_model():
    from megatron_k15.models.config import preset

    args = _validate(MEGATRON_LM_QWEN25_7B, world_size=8)
    want = preset("qwen2.5-7b")
    for field in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                  "num_query_groups", "head_dim", "vocab_size", "max_position_embeddings",
                  "rotary_base", "norm_epsilon", "add_qkv_bias", "qk_layernorm", "tie_word_embeddings"):
        assert getattr(args.model_config, field) == getattr(want, field), field
    assert args.sequence_parallel and args.recompute_granularity == "full"
    for megatron_name, ours in (("flash", "triton"), ("fused", "sdpa"), ("unfused", "sdpa"),
                                ("local", "sdpa"), ("sdpa", "sdpa"), ("auto", "auto")):
        assert _validate(["--attention-backend", megatron_name]).attention_backend == ours
    with pytest.raises(SystemExit):  # the two spellings of sequence parallelism exclude each other
        build_parser().parse_args(["--sequence-parallel", "--no-sequence-parallel"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--normalization", "LayerNorm"])


LLAMA3_8B_FLAGS = """
    --num-layers 32 --hidden-size 4096 --ffn-hidden-size 14336 --num-attention-heads 32
    --group-query-attention --num-query-groups 8 --max-position-embeddings 8192 --rotary-base 500000
    --normalization RMSNorm --norm-epsilon 1e-5 --swiglu --disable-bias-linear
    --untie-embeddings-and-output-weights --vocab-size 128256 --use-mcore-models
    --attention-softmax-in-fp32 --no-position-embedding
""".split()


@pytest.mark.parametrize("extra,architecture", [([], "llama"), (["--qk-layernorm", "--kv-channels", "128"], "qwen3")])
def test_megatron_lm_flags_without_a_preset_build_an_exportable_model(extra, architecture):
    """No preset: the tiny base's QKV bias and byte-vocabulary BOS/EOS ids must not leak into
    a Llama-3 (or Qwen3-like) model built from flags, and the model exports to its HF class."""
    from megatron_k15.models.hf_mapping import hf_config_from_gpt

    cfg = _validate(LLAMA3_8B_FLAGS + extra).model_config
    assert not cfg.add_qkv_bias and cfg.qk_layernorm == (architecture == "qwen3")
    assert cfg.bos_token_id is None and cfg.eos_ids() == []
    assert cfg.architecture == architecture and cfg.head_dim == 128
    hf = hf_config_from_gpt(cfg)
    assert hf["architectures"] == [{"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}[architecture]]


def test_moe_from_megatron_lm_flags_renormalises_unless_pre_softmax():
    flags = ["--model-preset", "qwen3-0.6b", "--num-experts", "8", "--moe-router-topk", "2",
             "--moe-ffn-hidden-size", "256"]
    cfg = _validate(flags).model_config
    assert cfg.is_moe and cfg.moe_norm_topk_prob and cfg.architecture == "qwen3_moe"
    assert not _validate(flags + ["--moe-router-pre-softmax"]).model_config.moe_norm_topk_prob
    assert not _validate(["--model-preset", "qwen3-30b-a3b", "--moe-router-pre-softmax"]).model_config.moe_norm_topk_prob
    assert _validate(["--model-preset", "qwen3-30b-a3b"]).model_config.moe_norm_topk_prob


def test_restating_a_preset_keeps_its_head_size():
    cfg = _validate(["--model-preset", "qwen3-0.6b", "--num-attention-heads", "16", "--hidden-size", "1024"]).model_config
    assert cfg.head_dim == 128  # the preset's decoupled head size, not 1024 / 16
    cfg = _validate(["--model-preset", "qwen2.5-0.5b", "--hidden-size", "1792"]).model_config
    assert cfg.head_dim == 1792 // 14  # coupled: follows the hidden size


@pytest.mark.parametrize("flags, message", [
    (["--distributed-timeout-minutes", "0"], "--distributed-timeout-minutes must be > 0"),
    (["--tokenizer-type", "GPT2BPETokenizer"], "--tokenizer-type GPT2BPETokenizer is not supported"),
    (["--tokenizer-type", "HuggingFaceTokenizer"], "needs --tokenizer-model PATH"),
    (["--tokenizer-model", "a", "--tokenizer", "b"], "--tokenizer-model a and --tokenizer b disagree"),
])
def test_megatron_distributed_and_tokenizer_flags_refused(flags, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--num-layers", "2", *flags], world_size=1)
    assert message in capsys.readouterr().err


def test_megatron_logging_switches_and_tokenizer_model_accepted():
    args = parse_args(["--num-layers", "2", "--log-throughput", "--log-timers-to-tensorboard", "--use-checkpoint-args",
                       "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "/tok", "--distributed-backend",
                       "gloo"], world_size=1)
    assert args.tokenizer == "/tok" and args.distributed_backend == "gloo"


def test_distributed_timeout_reaches_every_process_group():
    """--distributed-timeout-minutes sets the default group's and megatron-core's groups' timeout."""
    probe = """
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron_k15.arguments import parse_args
from megatron_k15.initialize import initialize_parallel_from_args
args = parse_args(["--num-layers", "2", "--distributed-timeout-minutes", "77"], world_size=1)
initialize_parallel_from_args(args)
for g in (dist.group.WORLD, parallel_state.get_tensor_model_parallel_group(), parallel_state.get_data_parallel_group()):
    print(g._get_backend(torch.device("cpu")).options._timeout.total_seconds())
"""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == ["4620.0"] * 3, out


def test_window_flags_build_sliding_layers_like_megatron_lm():
    """--window-size LEFT,0 is Hugging Face's sliding_window LEFT + 1; --window-attn-skip-freq N
    makes every N-th layer (1-based, Megatron-LM's rule) a full-attention layer."""
    cfg = _validate(["--num-layers", "8", "--window-size", "4095,0", "--window-attn-skip-freq", "4"]).model_config
    assert cfg.sliding_window == 4096
    assert [cfg.window_left(i) for i in range(8)] == [4095, 4095, 4095, -1] * 2
    every = _validate(["--window-size", "(127, 0)"]).model_config
    assert every.layer_types is None and every.window_left(0) == every.window_left(1) == 127
    assert _validate([]).model_config.sliding_window is None


@pytest.mark.parametrize("argv,world,message", [
    (["--window-size", "16,4"], 1, "RIGHT must be 0"),
    (["--window-size", "a,0"], 1, "LEFT,RIGHT integers"),
    (["--window-attn-skip-freq", "4"], 1, "needs --window-size"),
])
def test_window_flag_errors_name_the_flag(argv, world, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv, world_size=world)
    assert message in capsys.readouterr().err


def test_sliding_window_context_parallel_trains_with_either_comm_type():
    for comm in ("ring", "allgather"):  # the ring: the neighbours' chunks
        args = _validate(["--window-size", "16,0", "--context-parallel-size", "2", "--cp-comm-type", comm],
                         world_size=2)
        assert args.model_config.sliding_window == 17


def test_olmo_preset_keeps_its_architecture_with_megatron_switches():
    cfg = _validate(["--model-preset", "olmo3-7b", "--qk-layernorm", "--disable-bias-linear"]).model_config
    assert cfg.architecture == "olmo3" and cfg.qk_layernorm_scope == "all" and cfg.norm_placement == "post"
    assert sum(cfg.is_sliding_layer(i) for i in range(cfg.num_layers)) == 24


def dataclasses_replace(cfg, **changes):
    import dataclasses

    return dataclasses.replace(cfg, **changes)


def test_deepseek_v3_from_megatron_lm_flags():
    """Megatron-LM's MLA and DeepSeek-MoE flags build the model DeepseekV3ForCausalLM exports."""
    flags = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--ffn-hidden-size", "128",
             "--multi-latent-attention", "--q-lora-rank", "32", "--kv-lora-rank", "16", "--qk-head-dim", "16",
             "--qk-pos-emb-head-dim", "8", "--v-head-dim", "16", "--num-experts", "8", "--moe-router-topk", "2",
             "--moe-ffn-hidden-size", "32", "--moe-router-score-function", "sigmoid",
             "--moe-router-enable-expert-bias", "--moe-router-num-groups", "4", "--moe-router-group-topk", "2",
             "--moe-router-topk-scaling-factor", "2.5", "--moe-shared-expert-intermediate-size", "32",
             "--moe-layer-freq", "[0]*1+[1]*3", "--disable-bias-linear", "--moe-router-dtype", "fp32"]
    cfg = _validate(flags).model_config
    assert cfg.moe_router_dtype == "fp32"
    assert (cfg.architecture, cfg.head_dim, cfg.num_query_groups, cfg.rotary_dim) == ("deepseek_v3", 24, 4, 8)
    assert cfg.moe_layer_freq == [0, 1, 1, 1] and cfg.num_moe_layers == 3
    assert (cfg.moe_router_num_groups, cfg.moe_router_group_topk, cfg.moe_router_topk_scaling_factor) == (4, 2, 2.5)
    from megatron_k15.models.hf_mapping import gpt_config_from_hf, hf_config_from_gpt

    back = gpt_config_from_hf(hf_config_from_gpt(cfg))
    assert (back.moe_layer_freq, back.q_lora_rank, back.moe_shared_expert_intermediate_size) == ([0, 1, 1, 1], 32, 32)
    glm = _validate(["--num-experts", "8", "--moe-router-score-function", "sigmoid",
                     "--moe-router-enable-expert-bias", "--moe-layer-freq", "2"]).model_config
    assert glm.architecture == "glm4_moe" and [glm.is_moe_layer(i) for i in range(2)] == [True, False]
    assert glm.moe_router_dtype == "fp32"  # the class's router, unless --moe-router-dtype says otherwise
    # MLA with softmax routing and no bias: DeepSeek-V2, which exports without groups too
    v2_flags = [f for f in flags if f not in ("--moe-router-enable-expert-bias",)]
    v2_flags[v2_flags.index("sigmoid")] = "softmax"
    for drop in ("--moe-router-num-groups", "--moe-router-group-topk"):
        i = v2_flags.index(drop)
        del v2_flags[i:i + 2]
    v2 = _validate(v2_flags).model_config
    assert (v2.architecture, v2.moe_router_group_score_topk, v2.moe_router_num_groups) == ("deepseek_v2", 1, None)
    back = gpt_config_from_hf(hf_config_from_gpt(dataclasses_replace(v2, moe_norm_topk_prob=False)))
    assert (back.architecture, back.moe_router_score_function, back.moe_router_dtype) == ("deepseek_v2", "softmax", "fp32")
    # a gated shared expert next to softmax-routed experts: Qwen2-MoE, exported as its class
    qwen2_moe = _validate(["--num-experts", "4", "--moe-router-topk", "2", "--moe-shared-expert-intermediate-size", "64",
                           "--moe-shared-expert-gate", "--moe-router-pre-softmax", "--add-qkv-bias"]).model_config
    assert (qwen2_moe.architecture, qwen2_moe.moe_router_dtype, qwen2_moe.moe_norm_topk_prob) == ("qwen2_moe", None, False)
    back = gpt_config_from_hf(hf_config_from_gpt(qwen2_moe))
    assert (back.architecture, back.moe_shared_expert_intermediate_size, back.moe_shared_expert_gate) == (
        "qwen2_moe", 64, True)


@pytest.mark.parametrize("argv,message", [
    (["--moe-layer-freq", "[0]*2+[2]"], "0 \\(dense\\) and 1 \\(MoE\\)"),
    (["--moe-layer-freq", "__import__('os')"], "expected N or a 0/1 list"),
    (["--num-experts", "8", "--moe-layer-freq", "[0, 1, 1]"], "one 0/1 per layer \\(2\\)"),
    (["--num-experts", "8", "--moe-router-num-groups", "3", "--moe-router-group-topk", "1"],
     "--moe-router-num-groups 3 must divide --num-experts 8"),
    (["--num-experts", "8", "--moe-router-num-groups", "4"], "go together"),
    (["--num-experts", "8", "--moe-router-num-groups", "4", "--moe-router-group-topk", "1",
      "--moe-router-topk", "3"], "hold at least --moe-router-topk 3"),
    (["--moe-router-score-function", "sigmoid"], "applies to mixture-of-experts models"),
    (["--num-experts", "8", "--moe-router-bias-update-rate", "0.001"], "needs a router with an expert bias"),
    (["--num-experts", "8", "--moe-router-enable-expert-bias"], "needs --moe-router-score-function sigmoid"),
    (["--multi-latent-attention", "--disable-bias-linear", "--window-size", "8,0"], "sliding windows"),
    (["--kv-lora-rank", "16"], "add --multi-latent-attention"),
    (["--multi-latent-attention", "--add-qkv-bias"], "does not take --add-qkv-bias"),
    (["--num-experts", "8", "--moe-shared-expert-intermediate-size", "33", "--tensor-model-parallel-size", "2"],
     "divisible by --tensor-model-parallel-size 2"),
])
def test_deepseek_flag_errors_name_the_flag(argv, message, capsys):
    world = 2 if "--tensor-model-parallel-size" in argv else 1
    with pytest.raises((ArgumentError, SystemExit)) as e:
        _validate(argv, world_size=world)
    text = capsys.readouterr().err if e.type is SystemExit else str(e.value)  # argparse's own errors
    assert re.search(message, text), text


def test_longrope_factors_follow_the_runs_longest_sequence(tmp_path):
    """A LongRoPE model (--load of an HF Phi-3 directory, pretrained context 32) builds with the
    short factors for --seq-length 32, the long ones for 64 or without a length (its whole
    context), and as --longrope-factors says; the flag on a model without LongRoPE is refused."""
    import torch
    from test_model_hf import LONGROPE

    from megatron_k15.initialize import initialize_model_parallel
    from megatron_k15.models.rope import rope_inv_freq, with_longrope_choice
    from megatron_k15.testing import save_tiny_hf_checkpoint
    from megatron_k15.training import ParallelContext, build_stage_model

    save_tiny_hf_checkpoint(str(tmp_path), "phi3", **LONGROPE)
    initialize_model_parallel(1)
    pc = ParallelContext.from_parallel_state()
    want = {}
    for argv, factors in ((["--seq-length", "32"], "short"), (["--seq-length", "64"], "long"), ([], "long"),
                          (["--seq-length", "64", "--longrope-factors", "short"], "short")):
        args = _validate(["--load", str(tmp_path), "--finetune", *argv])
        cfg = args.model_config
        want[factors] = rope_inv_freq(cfg.rotary_dim, cfg.rotary_base, with_longrope_choice(cfg.rope_scaling, factors))
        model = build_stage_model(args, cfg, pc, [range(cfg.num_layers)])
        assert torch.equal(model.rotary.inv_freq, want[factors]), (argv, factors)
    assert not torch.equal(want["short"], want["long"])
    with pytest.raises(ArgumentError, match="--longrope-factors long applies to models with LongRoPE"):
        _validate(["--longrope-factors", "long"])


def test_a_llama_base_with_qkv_bias_becomes_qwen2_and_exports():
    """Llama's attention_bias would bias o_proj too: a Llama preset given --add-qkv-bias is
    Qwen2's class (bias on q, k, v only) and exports as Qwen2ForCausalLM."""
    from megatron_k15.models.hf_mapping import hf_config_from_gpt

    cfg = _validate(["--model-preset", "llama3-8b", "--num-layers", "2", "--add-qkv-bias"]).model_config
    assert cfg.architecture == "qwen2" and cfg.add_qkv_bias and not cfg.add_attention_output_bias
    hf = hf_config_from_gpt(cfg)
    assert hf["architectures"] == ["Qwen2ForCausalLM"]
    assert _validate(["--model-preset", "llama3-8b", "--num-layers", "2"]).model_config.architecture == "llama"
