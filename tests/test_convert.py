"""HF <-> Megatron checkpoint conversion: bit-exact round trip, resharding, clear failures."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from megatron_k15.checkpointing import copy_hf_side_files, load_model_checkpoint, read_layout, resolve_checkpoint_dir
from megatron_k15.initialize import initialize_model_parallel
from megatron_k15.models.gpt import GPTModel
from megatron_k15.models.hf_mapping import read_hf_state_dict
from megatron_k15.testing import save_tiny_hf_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TO_MEGATRON = os.path.join(ROOT, "tools", "checkpoint", "convert_hf_to_megatron.py")
TO_HF = os.path.join(ROOT, "tools", "checkpoint", "convert_megatron_to_hf.py")


def _load_tool(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


to_megatron = _load_tool(TO_MEGATRON)
to_hf = _load_tool(TO_HF)


@pytest.mark.parametrize("kind,dtype,shard,tp,pp", [
    ("qwen2", torch.bfloat16, "200KB", 2, 2),   # sharded safetensors, bf16, tp=2 pp=2
    ("llama", torch.float32, None, 1, 1),       # single file, fp32, tied embeddings
    ("llama", torch.float16, None, 2, 1),
    ("qwen3", torch.bfloat16, None, 2, 1),      # QK-norm weights (replicated over tp)
    ("qwen3_moe", torch.bfloat16, None, 2, 2),  # per-expert tensors, experts split over tp
    ("mistral", torch.bfloat16, None, 2, 1),    # head_dim != hidden / heads
    ("phi3", torch.bfloat16, "100KB", 2, 2),    # fused qkv_proj / gate_up_proj, split over tp
    ("olmo3", torch.bfloat16, None, 2, 2),      # post-norms; q/k norms over all heads, split over tp
    ("gpt_oss", torch.bfloat16, None, 2, 2),    # sinks, interleaved gate/up with biases, experts over tp
    ("gemma3", torch.bfloat16, None, 2, 2),     # four norms per layer, tied, a RoPE per layer type
    ("gemma2", torch.bfloat16, None, 2, 2),     # Gemma's block with soft caps (kept in the exported config)
    ("glm4", torch.bfloat16, None, 2, 2),       # interleaved partial RoPE rows reordered and back, four norms
    ("glm", torch.float32, None, 2, 1),         # the same RoPE, QKV bias, fused gate_up_proj
    ("smollm3", torch.bfloat16, None, 2, 2),    # a layer without RoPE, tied embeddings
    ("exaone4", torch.bfloat16, None, 2, 2),    # post-norms, per-head q/k norms, sliding + NoPE global layers
    ("qwen2_moe", torch.bfloat16, None, 2, 2),  # shared_expert (singular) and its gate, a dense layer
    ("glm4_moe", torch.bfloat16, None, 2, 2),   # dense + MoE layers, router bias, shared expert over tp
    ("deepseek_v3", torch.bfloat16, None, 2, 2),  # MLA: interleaved RoPE rows reordered and back, heads over tp
    ("deepseek_v2", torch.bfloat16, None, 2, 2),  # V2's MLA (no q latent) and softmax-routed experts
])
def test_round_trip_is_bit_exact(tmp_path, kind, dtype, shard, tp, pp):
    hf_dir, ck, back = tmp_path / "hf", tmp_path / "ck", tmp_path / "back"
    save_tiny_hf_checkpoint(str(hf_dir), kind, dtype=dtype, max_shard_size=shard)
    assert to_megatron.main(["--hf-dir", str(hf_dir), "--save", str(ck),
                             "--tensor-model-parallel-size", str(tp),
                             "--pipeline-model-parallel-size", str(pp)]) == 0
    layout = read_layout(resolve_checkpoint_dir(str(ck)))
    assert layout["tensor_model_parallel_size"] == tp and layout["pipeline_model_parallel_size"] == pp
    assert len([d for d in os.listdir(ck / "release") if d.startswith("mp_rank_")]) == tp * pp
    assert to_hf.main(["--load", str(ck), "--save", str(back), "--max-shard-size", "150KB"]) == 0

    original, exported = read_hf_state_dict(str(hf_dir)), read_hf_state_dict(str(back))
    assert sorted(original) == sorted(exported)
    for name, t in original.items():
        assert exported[name].dtype == t.dtype, name
        assert torch.equal(exported[name], t), name
    assert json.load(open(hf_dir / "config.json")) == json.load(open(back / "config.json"))
    assert os.path.isfile(back / "generation_config.json")
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


@pytest.mark.parametrize("kind", ["qwen2", "qwen3_moe", "glm4_moe", "deepseek_v3"])
def test_checkpoint_loads_under_another_tp_layout(tmp_path, kind):
    """Saved at tp=2/pp=2, loaded by a tp=1 model: logits still equal transformers' (for MoE
    through the hub's per-expert tensors on disk)."""
    hf_dir, ck = tmp_path / "hf", tmp_path / "ck"
    hf = save_tiny_hf_checkpoint(str(hf_dir), kind)
    assert to_megatron.main(["--hf-dir", str(hf_dir), "--save", str(ck),
                             "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]) == 0
    initialize_model_parallel(1)
    from megatron_k15.checkpointing import load_config

    model = GPTModel(load_config(str(ck)))
    load_model_checkpoint(model, str(ck))
    ids = torch.randint(0, 300, (2, 19))
    with torch.no_grad():
        assert (model.gather_logits(model(ids)) - hf(ids).logits).abs().max() <= 1e-5


def _corrupt_config(hf_dir, **changes):
    cfg = json.load(open(hf_dir / "config.json"))
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    json.dump(cfg, open(hf_dir / "config.json", "w"))


@pytest.mark.parametrize("changes,tp,expected", [
    ({"architectures": ["GPT2LMHeadModel"]}, 1, "GPT2LMHeadModel"),
    ({"hidden_size": None}, 1, "hidden_size"),
    ({}, 4, "--tensor-model-parallel-size 4 does not divide --num-attention-heads 6"),
    ({}, 3, "--tensor-model-parallel-size 3 does not divide --num-query-groups 2"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}}, 1, "yarn"),
    ({"use_sliding_window": True, "sliding_window": 0, "max_window_layers": 0, "layer_types": None}, 1,
     "sliding_window=0 must be a positive"),
    ({"layer_types": ["sliding_attention", "full_attention"]}, 1, "no sliding_window is set"),
    ({"partial_rotary_factor": 0.3}, 1, "--rotary-percent 0.3 must be in (0, 1]"),  # 4.8 of 16 channels
    ({"architectures": ["Phi3ForCausalLM"], "partial_rotary_factor": 0.75, "rope_parameters": None,  # Phi-4-mini's
      "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 5, "long_factor": [2.0] * 6}}, 1,
     "rope_scaling.short_factor must list 6 positive numbers"),  # 12 of 16 channels rotate: 6 pairs
])
def test_bad_inputs_fail_cleanly(tmp_path, capsys, changes, tp, expected):
    hf_dir, ck = tmp_path / "hf", tmp_path / "ck"
    save_tiny_hf_checkpoint(str(hf_dir), "qwen2")
    _corrupt_config(hf_dir, **changes)
    code = to_megatron.main(["--hf-dir", str(hf_dir), "--save", str(ck),
                             "--tensor-model-parallel-size", str(tp)])
    assert code != 0
    assert expected in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # nothing half-written


def test_missing_tensor_leaves_no_output(tmp_path, capsys):
    hf_dir, ck = tmp_path / "hf", tmp_path / "ck"
    save_tiny_hf_checkpoint(str(hf_dir), "llama")
    sd = load_file(hf_dir / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    from safetensors.torch import save_file

    save_file(sd, hf_dir / "model.safetensors", metadata={"format": "pt"})
    assert to_megatron.main(["--hf-dir", str(hf_dir), "--save", str(ck)]) != 0
    assert "model.layers.1.mlp.up_proj.weight" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["hf"]


@pytest.mark.parametrize("change", ["missing", "shape"])
def test_a_bad_last_layer_fails_before_any_tensor_is_read(tmp_path, capsys, monkeypatch, change):
    """The converter streams layer by layer, so it first runs the whole conversion on the
    files' headers (meta tensors): a tensor missing or misshapen in the last layer stops it
    before any weight is read or shard written."""
    hf_dir, ck = tmp_path / "hf", tmp_path / "ck"
    save_tiny_hf_checkpoint(str(hf_dir), "qwen2")
    sd = load_file(hf_dir / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    if change == "missing":
        del sd[name]
    else:
        sd[name] = sd[name][:, :-1].contiguous()
    from safetensors.torch import save_file

    save_file(sd, hf_dir / "model.safetensors", metadata={"format": "pt"})
    from safetensors import safe_open

    handle = safe_open(str(hf_dir / "model.safetensors"), framework="pt")
    monkeypatch.setattr(type(handle), "get_tensor", lambda *a: pytest.fail("a tensor was read"), raising=False)
    assert to_megatron.main(["--hf-dir", str(hf_dir), "--save", str(ck)]) != 0
    err = capsys.readouterr().err
    assert name in err or "layers.1.mlp.linear_fc2.weight" in err
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_cli_exit_code_and_existing_output(tmp_path):
    hf_dir = tmp_path / "hf"
    save_tiny_hf_checkpoint(str(hf_dir), "qwen2")
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "keep.txt").write_text("x")
    proc = subprocess.run([sys.executable, TO_MEGATRON, "--hf-dir", str(hf_dir), "--save", str(tmp_path / "ck")],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "--overwrite" in proc.stderr
    assert os.listdir(tmp_path / "ck") == ["keep.txt"]


def test_image_text_gemma3_converts_its_language_model(tmp_path):
    """Gemma 3 4B-27B ship as Gemma3ForConditionalGeneration: the language model converts (its
    text_config, tensors under model.language_model.*), the vision tower is left out, and the
    export is the text-only Gemma3ForCausalLM. Logits on text equal the image-text model's."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(0)
    text = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, sliding_window=8, query_pre_attn_scalar=24,
                max_position_embeddings=512, rope_scaling={"rope_type": "linear", "factor": 8.0})
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    hf = Gemma3ForConditionalGeneration(Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=299,
        boi_token_index=297, eoi_token_index=298)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name and "language_model" in name:
                p.uniform_(-0.5, 0.5)
    hf_dir, ck, back = tmp_path / "hf", tmp_path / "ck", tmp_path / "back"
    hf.save_pretrained(str(hf_dir))
    assert to_megatron.main(["--hf-dir", str(hf_dir), "--save", str(ck), "--tensor-model-parallel-size", "2"]) == 0
    initialize_model_parallel(1)
    from megatron_k15.checkpointing import load_config

    cfg = load_config(str(ck))
    assert cfg.architecture == "gemma3" and cfg.num_layers == 6 and cfg.tie_word_embeddings
    model = GPTModel(cfg)
    load_model_checkpoint(model, str(ck))
    ids = torch.randint(0, 290, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (model.gather_logits(model(ids)) - hf(input_ids=ids).logits).abs().max() <= 1e-4
    assert to_hf.main(["--load", str(ck), "--save", str(back)]) == 0
    exported = json.load(open(back / "config.json"))
    assert exported["architectures"] == ["Gemma3ForCausalLM"] and exported["model_type"] == "gemma3_text"
    assert not [k for k in read_hf_state_dict(str(back)) if "vision" in k or "language_model" in k]


def test_target_dtype_keeps_the_router_bias_in_fp32():
    """--target-dtype casts the weights, not DeepSeek's expert bias (it chooses experts by small
    differences; transformers keeps it fp32 too)."""
    from megatron_k15.models.hf_mapping import cast_state_dict

    sd = {"layers.1.mlp.router.expert_bias": torch.tensor([1e-3, 1.0001]),
          "model.layers.1.mlp.gate.e_score_correction_bias": torch.tensor([1e-3, 1.0001]),
          "layers.1.mlp.router.weight": torch.ones(2, 2)}
    out = cast_state_dict(sd, torch.bfloat16)
    assert [out[k].dtype for k in sd] == [torch.float32, torch.float32, torch.bfloat16]
    assert torch.equal(out["layers.1.mlp.router.expert_bias"], sd["layers.1.mlp.router.expert_bias"])


def test_converter_puts_a_tokenizers_own_code_in_the_checkpoints_tokenizer(tmp_path):
    """Moonlight's tokenizer is tokenizer_config.json + tiktoken.model + tokenization_moonshot.py:
    all three go to the checkpoint's tokenizer/ (loading it runs that code), the rest to hf_files/."""
    src, out = tmp_path / "hf", tmp_path / "ck"
    src.mkdir()
    for name in ("tokenizer_config.json", "tiktoken.model", "tokenization_moonshot.py", "configuration_deepseek.py",
                 "generation_config.json", "config.json", "model.safetensors"):
        (src / name).write_text("x")
    copy_hf_side_files(str(src), str(out))
    assert sorted(os.listdir(out / "tokenizer")) == ["tiktoken.model", "tokenization_moonshot.py",
                                                     "tokenizer_config.json"]
    assert sorted(os.listdir(out / "hf_files")) == ["configuration_deepseek.py", "generation_config.json"]


def test_tensors_the_model_does_not_use_are_refused_unless_known(tmp_path, capsys):
    """A weight the architecture here lacks (a bias on one MLP) would be dropped silently: the
    converter refuses it by name and writes nothing, and so do --load of the directory and the
    pre-flight check; --ignore-unused-tensors converts with a warning. What the model knowingly
    leaves out passes: rotary inv_freq buffers, a tied model's lm_head, DeepSeek-V3's
    multi-token-prediction layer after the last (num_nextn_predict_layers) and a block-FP8
    checkpoint's static activation scales; a layer past num_hidden_layers of another model is
    a config that does not describe the weights."""
    from safetensors.torch import save_file

    from megatron_k15.checkpointing import CheckpointError, load_config
    from megatron_k15.models.hf_mapping import unread_hf_tensors

    hf_dir = tmp_path / "hf"
    save_tiny_hf_checkpoint(str(hf_dir), "llama")  # tied
    sd = load_file(hf_dir / "model.safetensors")
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    cfg = load_config(str(hf_dir))
    assert unread_hf_tensors(sd, cfg) == []
    extra = {"model.layers.2.input_layernorm.weight": torch.ones(64)}
    assert unread_hf_tensors({**sd, **extra}, cfg) == list(extra)
    sd["model.layers.1.mlp.down_proj.bias"] = torch.zeros(64)
    save_file(sd, hf_dir / "model.safetensors", metadata={"format": "pt"})
    ck = tmp_path / "ck"
    assert to_megatron.main(["--hf-dir", str(hf_dir), "--save", str(ck)]) != 0
    assert "1 tensor(s) the LlamaForCausalLM model does not use: model.layers.1.mlp.down_proj.bias" in \
        capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["hf"]
    with pytest.raises(CheckpointError, match="down_proj.bias.*--ignore-unused-tensors and load the conversion"):
        load_config(str(hf_dir))
    inspect = _load_tool(os.path.join(ROOT, "tools", "checkpoint", "inspect_checkpoint.py"))
    assert inspect.main(["--load", str(hf_dir)]) == 1
    assert "FAILS" in capsys.readouterr().out
    assert to_megatron.main(["--hf-dir", str(hf_dir), "--save", str(ck), "--ignore-unused-tensors"]) == 0
    assert "left out 1 tensor(s) the model does not use: model.layers.1.mlp.down_proj.bias" in capsys.readouterr().out
    # DeepSeek-V3 (3 layers) with its MTP layer 3 and FP8 activation scales; a layer 4 is refused
    from megatron_k15.models.hf_mapping import gpt_config_from_hf
    from megatron_k15.testing import hf_config_dict, tiny_hf_model

    hf = tiny_hf_model("deepseek_v3")
    sd = dict(hf.state_dict())
    base = {**hf_config_dict(hf), "quantization_config": {"quant_method": "fp8", "weight_block_size": [16, 16]}}
    mtp = {"model.layers.3.eh_proj.weight": torch.zeros(64, 128), "model.layers.3.enorm.weight": torch.ones(64),
           "model.layers.0.self_attn.o_proj.activation_scale": torch.ones(())}
    assert unread_hf_tensors({**sd, **mtp}, gpt_config_from_hf({**base, "num_nextn_predict_layers": 1})) == []
    assert unread_hf_tensors({**sd, **mtp}, gpt_config_from_hf({**base, "num_nextn_predict_layers": 0})) == \
        ["model.layers.3.eh_proj.weight", "model.layers.3.enorm.weight"]


def test_quantize_fp8_blocks_rounds_each_value_to_the_nearest_e4m3_step():
    """Per 16 x 16 tile (edges cut) s = amax / 448, so the tile's largest value becomes +-448; every
    w / s is rounded to float8 e4m3 (3 mantissa bits: within half a step, 2^-4 of its binade, or
    2^-10 among the subnormals); an all-zero tile gets s = 1; dequantization gives w back within that."""
    from megatron_k15.models.hf_mapping import dequantize_fp8_blocks, quantize_fp8_blocks

    w = torch.randn(40, 37, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 1, 37)
    w[16:32, 16:32] = 0.0
    q, s = quantize_fp8_blocks(w, (16, 16))
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == (3, 3)
    assert s[1, 1] == 1.0 and (q[16:32, 16:32].float() == 0).all()
    full = s.repeat_interleave(16, 0)[:40].repeat_interleave(16, 1)[:, :37]
    x = w / full
    assert ((x - q.float()).abs() <= torch.maximum(x.abs() * 2**-4, torch.full_like(x, 2**-10))).all()
    for i in range(3):
        for j in range(3):
            tile = q[16 * i:16 * (i + 1), 16 * j:16 * (j + 1)].float().abs()
            assert tile.max() == (0.0 if (i, j) == (1, 1) else 448.0)
    back = dequantize_fp8_blocks(q, s, (16, 16), torch.float32)
    assert ((back - w).abs() <= torch.maximum(w.abs() * 2**-4, full * 2**-10) * 1.0001).all()


@pytest.mark.parametrize("kind", ["deepseek_v3", "qwen3_moe"])
def test_export_fp8_blocks_reads_back_in_transformers_and_ours(tmp_path, kind):
    """--fp8-blocks writes every linear projection's weight in float8 with block scales and a
    quantization_config (DeepSeek-V3 keeps its own): transformers loads the directory (it
    dequantizes on CPU) and our converter reads it back, and the two models' logits agree; the
    routers, norms, embeddings and output layer stay as they were, and the file is about half."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    hf_dir, ck, out, back = (tmp_path / n for n in ("hf", "ck", "out", "back"))
    hf = save_tiny_hf_checkpoint(str(hf_dir), kind)
    assert to_megatron.main(["--hf-dir", str(hf_dir), "--save", str(ck)]) == 0
    # 8 x 8 blocks divide every tiny matrix: transformers' CPU dequantization takes the block size
    # as rows / scale rows, wrong for edge-cut tiles (ours: the quantize test above)
    assert to_hf.main(["--load", str(ck), "--save", str(out), "--fp8-blocks", "8,8"]) == 0
    quant = json.load(open(out / "config.json"))["quantization_config"]
    assert quant == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [8, 8]}
    sd, orig = load_file(out / "model.safetensors"), load_file(hf_dir / "model.safetensors")
    fp8 = {k for k, v in sd.items() if v.dtype == torch.float8_e4m3fn}
    assert fp8 == {k for k in orig if k.endswith("_proj.weight") or k.endswith("_proj_with_mqa.weight")}
    assert {k for k in sd if k.endswith("_scale_inv")} == {k + "_scale_inv" for k in fp8}
    assert all(torch.equal(sd[k], v) for k, v in orig.items() if k not in fp8)  # routers, norms, embeddings
    assert os.path.getsize(out / "model.safetensors") < 0.75 * os.path.getsize(hf_dir / "model.safetensors")
    theirs = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).float().eval()
    # ours: converted back (dequantized), exported unquantized; transformers' weights equal them
    # (up to bf16 rounding)
    assert to_megatron.main(["--hf-dir", str(out), "--save", str(back)]) == 0
    assert to_hf.main(["--load", str(back), "--save", str(tmp_path / "plain")]) == 0
    plain = load_file(tmp_path / "plain" / "model.safetensors")
    theirs_sd = theirs.state_dict()
    assert set(plain) == set(orig)
    def hf_side(name):  # transformers 5 holds a layer's experts stacked: [gate; up] and down
        if ".experts." not in name:
            return theirs_sd[name]
        prefix, rest = name.split(".experts.")
        e, proj = int(rest.split(".")[0]), rest.split(".")[1]
        fused = theirs_sd[f"{prefix}.experts.{'down_proj' if proj == 'down_proj' else 'gate_up_proj'}"][e]
        half = fused.shape[0] // 2
        return {"gate_proj": fused[:half], "up_proj": fused[half:], "down_proj": fused}[proj]

    for name in fp8:  # (ours dequantize into bf16; transformers keeps fp32 for the experts)
        torch.testing.assert_close(hf_side(name), plain[name].float(), rtol=2**-8, atol=0, msg=name)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # FP8 rounding moves the logits a little: the same model
        assert 1e-4 < (hf.eval()(ids).logits - theirs(ids).logits).abs().max() < 0.2


def test_fp8_export_keeps_the_source_quantization_config():
    """A model converted from an FP8 checkpoint (DeepSeek-V3, Kimi K2) exports its own
    quantization_config when the block is the same; another block gets transformers' default."""
    import dataclasses

    from megatron_k15.models.config import preset
    from megatron_k15.models.hf_mapping import fp8_quantization_config

    source = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
              "modules_to_not_convert": ["lm_head"]}
    cfg = dataclasses.replace(preset("tiny"), extra={"hf_config": {"quantization_config": source}})
    assert fp8_quantization_config(cfg, (128, 128)) == source
    assert fp8_quantization_config(cfg, (64, 64))["weight_block_size"] == [64, 64]
    assert "modules_to_not_convert" not in fp8_quantization_config(preset("tiny"), (128, 128))
