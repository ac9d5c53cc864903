"""Checkpoint I/O that holds a piece of the model at a time: resharding cuts a rank's part out of
the saved shards, the HF converter writes a pipeline stage as soon as its layers are read, and
the exporter writes safetensors files as it goes. Each is checked against the in-memory path
(``split_tensor`` / ``split_for_rank`` of the merged state dict), which the rest of the suite
checks against transformers."""

import json
import os

import pytest
import torch

from megatron_k15.checkpointing import (
    read_full_state_dict, reshard_for_rank, write_full_state_dict, write_state_dict_units,
)
from megatron_k15.models import sharding
from megatron_k15.models.hf_mapping import (
    HFShardWriter, gpt_config_from_hf, hf_to_megatron, hf_to_megatron_units, read_hf_state_dict,
)
from megatron_k15.models.lazy_state_dict import LazyStateDict, load_torch_file
from megatron_k15.models.sharding import (
    merge_shards, pad_vocab, pipeline_layer_ranges, reshard_tensor, split_for_rank, split_tensor,
)
from megatron_k15.testing import hf_config_dict, save_tiny_hf_checkpoint, tiny_hf_model

# one name per sharding rule of models/sharding.py, with the shape of its full tensor
RULE_CASES = {
    "layers.0.self_attention.linear_qkv.weight": (24, 5),           # rows
    "layers.0.mlp.linear_fc1.weight": (24, 5),                      # [gate; up] rows
    "layers.0.self_attention.linear_proj.weight": (5, 24),          # columns
    "layers.0.mlp.experts.linear_fc1.weight": (3, 24, 5),           # per expert [gate; up]
    "layers.0.mlp.experts.linear_fc1.bias": (3, 24),
    "layers.0.mlp.experts.linear_fc2.weight": (3, 5, 24),           # per expert columns
    "layers.0.input_layernorm.weight": (5,),                        # replicated
}


@pytest.mark.parametrize("saved_tp,tp", [(1, 2), (2, 1), (2, 4), (4, 2), (2, 3), (3, 2), (4, 6), (6, 4), (3, 3)])
@pytest.mark.parametrize("name", sorted(RULE_CASES))
def test_reshard_tensor_equals_splitting_the_merged_tensor(name, saved_tp, tp):
    full = torch.randn(RULE_CASES[name])
    saved = [split_tensor(full, name, saved_tp, r) for r in range(saved_tp)]
    for rank in range(tp):
        got = reshard_tensor(saved, name, tp, rank, vocab_size=0, padded_vocab_size=0)
        assert torch.equal(got, split_tensor(full, name, tp, rank)), (name, saved_tp, tp, rank)


@pytest.mark.parametrize("saved_tp,tp", [(1, 2), (2, 1), (2, 4), (4, 3)])
def test_reshard_tensor_repads_the_vocabulary(saved_tp, tp):
    """The embedding's padding depends on the tp size (a multiple of 8 x tp here)."""
    vocab, hidden = 37, 4
    full = torch.randn(vocab, hidden)
    saved_padded = pad_vocab(full, -(-vocab // (8 * saved_tp)) * 8 * saved_tp)
    padded = -(-vocab // (8 * tp)) * 8 * tp
    saved = [split_tensor(saved_padded, "embedding.weight", saved_tp, r) for r in range(saved_tp)]
    for rank in range(tp):
        got = reshard_tensor(saved, "embedding.weight", tp, rank, vocab, padded)
        assert torch.equal(got, split_tensor(pad_vocab(full, padded), "embedding.weight", tp, rank))


def _full_state(kind):
    hf = tiny_hf_model(kind)
    cfg = gpt_config_from_hf(hf_config_dict(hf))
    return {k: v.clone() for k, v in hf_to_megatron(hf.state_dict(), cfg).items()}, cfg


@pytest.mark.parametrize("kind", ["qwen2", "llama", "qwen3_moe", "deepseek_v3", "gpt_oss", "phi3"])
@pytest.mark.parametrize("saved,target", [((2, 2), (1, 1)), ((1, 1), (2, 2)), ((2, 1), (1, 2)), ((1, 2), (2, 2))])
def test_reshard_for_rank_equals_split_of_the_merged_model(kind, saved, target, monkeypatch):
    """Every rank of the target layout gets exactly what splitting the merged full model gives,
    and only the vocabulary tensors are ever merged whole."""
    full, cfg = _full_state(kind)
    (stp, spp), (tp, pp) = saved, target
    saved_shards = {(t, p): split_for_rank(full, stp, t, spp, p, cfg.num_layers, cfg.tie_word_embeddings,
                                           cfg.padded_vocab_size(stp)) for t in range(stp) for p in range(spp)}
    merged = []
    real_merge = sharding.merge_tensor
    monkeypatch.setattr(sharding, "merge_tensor", lambda shards, name: merged.append(name) or real_merge(shards, name))
    ranges = pipeline_layer_ranges(cfg.num_layers, pp)
    for p in range(pp):
        for t in range(tp):
            got = reshard_for_rank(saved_shards, cfg, tp, t, pp, p, ranges[p], cfg.padded_vocab_size(tp))
            want = split_for_rank(full, tp, t, pp, p, cfg.num_layers, cfg.tie_word_embeddings,
                                  cfg.padded_vocab_size(tp), ranges)
            assert sorted(got) == sorted(want)
            for name in want:
                assert torch.equal(got[name], want[name]), name
    assert set(merged) <= set(sharding.VOCAB_PARAMS)


@pytest.mark.parametrize("kind,tp,pp,first", [("qwen2", 2, 2, None), ("llama", 1, 2, 1), ("llama", 2, 3, None),
                                             ("qwen3_moe", 2, 2, 2), ("deepseek_v3", 2, 2, None)])
def test_streamed_conversion_writes_each_stage_before_reading_the_next(tmp_path, kind, tp, pp, first):
    """Every shard the streamed converter writes equals the rank's split of the whole converted
    model (uneven stages, tied embeddings on both ends), every HF tensor is read once, and a
    stage's files are on disk before any tensor of a later stage is read."""
    hf_dir = tmp_path / "hf"
    hf = save_tiny_hf_checkpoint(str(hf_dir), kind, max_shard_size="100KB", num_hidden_layers=3)
    cfg = gpt_config_from_hf(json.load(open(hf_dir / "config.json")))
    source = read_hf_state_dict(str(hf_dir))
    events = []

    def logged(name):
        events.append(("read", name))
        return source[name]

    lazy = LazyStateDict({name: (lambda n=name: logged(n)) for name in source})
    ranges = pipeline_layer_ranges(cfg.num_layers, pp, first)
    os.makedirs(tmp_path / "streamed")
    write_state_dict_units(str(tmp_path / "streamed"), hf_to_megatron_units(lazy, cfg), cfg, tp, pp, ranges,
                           progress=lambda t, p: events.append(("wrote", p)))

    full = hf_to_megatron(hf.state_dict(), cfg)
    for t in range(tp):
        for p in range(pp):
            got = torch.load(tmp_path / "streamed" / f"mp_rank_{t:02d}_{p:03d}" / "model.pt", weights_only=True)["model"]
            want = split_for_rank(full, tp, t, pp, p, cfg.num_layers, cfg.tie_word_embeddings,
                                  cfg.padded_vocab_size(tp), ranges)
            assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want), (t, p)
    reads = [name for kind_, name in events if kind_ == "read"]
    assert len(reads) == len(set(reads))
    for p in range(pp - 1):
        last_write = max(i for i, e in enumerate(events) if e == ("wrote", p))
        later = [i for i, (kind_, name) in enumerate(events) if kind_ == "read" and name.startswith("model.layers.")
                 and int(name.split(".")[2]) >= ranges[p + 1].start]
        assert last_write < min(later), f"stage {p} was written after stage {p + 1}'s tensors were read"


def test_a_piece_after_its_stage_was_written_is_refused(tmp_path):
    full, cfg = _full_state("llama")
    units = [{k: v for k, v in full.items() if k.startswith("layers.1.")},
             {k: v for k, v in full.items() if k.startswith("layers.0.")}]
    with pytest.raises(ValueError, match="layers.0.* came after its pipeline stage was written"):
        write_state_dict_units(str(tmp_path), units, cfg, 1, 2)


def test_hf_shard_writer_keeps_each_file_under_the_size(tmp_path):
    torch.manual_seed(0)
    tensors = {f"t{i}": torch.randn(100 + 37 * i) for i in range(12)}
    tensors["big"] = torch.randn(3000)  # larger than a shard: a file of its own
    writer = HFShardWriter(str(tmp_path), max_shard_bytes=2000)
    for name, t in tensors.items():
        writer.add(name, t)
    assert writer.close() == len(tensors)
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    files = sorted(set(index["weight_map"].values()))
    assert files == sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors")) and len(files) > 2
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in tensors.values())
    back = read_hf_state_dict(str(tmp_path))
    assert all(torch.equal(back[k], t) for k, t in tensors.items())
    for f in files:
        names = [k for k, v in index["weight_map"].items() if v == f]
        assert sum(tensors[k].numel() * 4 for k in names) <= 2000 or len(names) == 1


def test_a_single_shard_is_model_safetensors(tmp_path):
    writer = HFShardWriter(str(tmp_path))
    writer.add("a", torch.ones(3))
    assert writer.close() == 1
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]


def test_legacy_torch_files_still_load(tmp_path):
    """``load_torch_file`` memory-maps torch's zip format and reads the legacy one fully."""
    x = {"w": torch.arange(6.0)}
    torch.save(x, tmp_path / "new.pt")
    torch.save(x, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    for name in ("new.pt", "old.pt"):
        assert torch.equal(load_torch_file(str(tmp_path / name))["w"], x["w"])


def test_full_state_dict_reads_back_what_was_written(tmp_path):
    full, cfg = _full_state("qwen3_moe")
    os.makedirs(tmp_path / "release")
    write_full_state_dict(str(tmp_path / "release"), full, cfg, 2, 2)
    back, _ = read_full_state_dict(str(tmp_path / "release"))
    assert sorted(back) == sorted(full) and all(torch.equal(back[k], full[k]) for k in full)
    shards = {(t, p): torch.load(tmp_path / "release" / f"mp_rank_{t:02d}_{p:03d}" / "model.pt",
                                 weights_only=True)["model"] for t in range(2) for p in range(2)}
    merged = merge_shards(shards, cfg.vocab_size)
    assert all(torch.equal(merged[k], full[k]) for k in full)


def test_reshard_for_rank_copies_only_an_expert_parallel_ranks_experts():
    """With ``select`` (a model's ``own_experts``) each saved piece is narrowed to the rank's
    experts before the tp cut: the result equals slicing the resharded tensors afterwards."""
    from megatron_k15.parallel.expert import own_experts

    full, cfg = _full_state("qwen3_moe")
    saved = {(t, 0): split_for_rank(full, 2, t, 1, 0, cfg.num_layers, cfg.tie_word_embeddings,
                                    cfg.padded_vocab_size(2)) for t in range(2)}
    ep, local = 2, cfg.num_moe_experts // 2
    for ep_rank in range(ep):
        def select(name, t):
            return own_experts(name, t, local, ep, ep_rank)

        got = reshard_for_rank(saved, cfg, 1, 0, 1, 0, range(cfg.num_layers), cfg.padded_vocab_size(1), select)
        want = reshard_for_rank(saved, cfg, 1, 0, 1, 0, range(cfg.num_layers), cfg.padded_vocab_size(1))
        experts = [n for n in want if ".experts." in n]
        assert experts and all(got[n].shape[0] == local for n in experts)
        assert all(torch.equal(got[n], select(n, want[n])) for n in want)


# -- a Hugging Face model directory as --load ----------------------------------------------------
@pytest.mark.parametrize("kind,tp,pp,ep", [("qwen2", 2, 2, 1), ("llama", 2, 2, 1), ("qwen3_moe", 2, 2, 2),
                                           ("deepseek_v3", 2, 1, 2), ("gpt_oss", 1, 2, 2)])
def test_each_rank_converts_its_own_part_of_an_hf_directory(tmp_path, kind, tp, pp, ep):
    """``hf_state_for_rank`` (what ``--load HF_DIR`` loads into a rank) equals the rank's split
    of the whole converted model, experts narrowed to the rank's, tied embeddings on both ends."""
    from types import SimpleNamespace

    from megatron_k15.checkpointing import hf_state_for_rank, is_hf_model_dir
    from megatron_k15.parallel.expert import own_experts

    hf_dir = tmp_path / "hf"
    hf = save_tiny_hf_checkpoint(str(hf_dir), kind, max_shard_size="100KB")
    assert is_hf_model_dir(str(hf_dir))
    cfg = gpt_config_from_hf(json.load(open(hf_dir / "config.json")))
    full = hf_to_megatron(hf.state_dict(), cfg)
    ranges = pipeline_layer_ranges(cfg.num_layers, pp)
    local = (cfg.num_moe_experts or 0) // ep
    for p in range(pp):
        for t in range(tp):
            for e in range(ep if cfg.num_moe_experts else 1):
                model = SimpleNamespace(config=cfg, layer_range=ranges[p], padded_vocab_size=cfg.padded_vocab_size(tp),
                                        tp_size=tp, tp_rank=t,
                                        own_experts=lambda name, x, e=e: own_experts(name, x, local, ep, e))
                got = hf_state_for_rank(str(hf_dir), model, p, pp)
                want = split_for_rank(full, tp, t, pp, p, cfg.num_layers, cfg.tie_word_embeddings,
                                      cfg.padded_vocab_size(tp), ranges)
                assert sorted(got) == sorted(want)
                for name in want:
                    assert torch.equal(got[name], model.own_experts(name, want[name])), name
                    assert got[name].untyped_storage().nbytes() == got[name].numel() * got[name].element_size()


def test_sft_from_an_hf_directory_equals_sft_from_its_conversion(tmp_path):
    """``--load HF_DIR --finetune`` trains exactly as ``--load`` of the converted checkpoint;
    without --finetune, or with --ckpt-step, it is refused before any work, naming the flag."""
    import subprocess
    import sys

    from test_checkpointing import ROOT, _losses, _make_sft_data

    hf_dir, ck = tmp_path / "hf", tmp_path / "ck"
    save_tiny_hf_checkpoint(str(hf_dir), "qwen2")
    env = dict(os.environ, PYTHONPATH=ROOT)
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "checkpoint", "convert_hf_to_megatron.py"),
                    "--hf-dir", str(hf_dir), "--save", str(ck)], check=True, capture_output=True, env=env)
    data = _make_sft_data(tmp_path)

    def sft(load, *extra):
        tb = tmp_path / f"tb_{os.path.basename(load)}"
        return subprocess.run(
            [sys.executable, "-m", "megatron_k15.train_sft", "--train-data", data, "--seq-length", "64",
             "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "2", "--lr", "1e-3",
             "--load", load, "--tensorboard-dir", str(tb), "--attention-backend", "sdpa", *extra],
            capture_output=True, text=True, env=env), tb

    (a, tb_a), (b, tb_b) = sft(str(hf_dir), "--finetune"), sft(str(ck), "--finetune")
    assert a.returncode == 0 and b.returncode == 0, a.stderr[-2000:] + b.stderr[-2000:]
    assert _losses(tb_a) == _losses(tb_b) and len(_losses(tb_a)) == 2
    refused, _ = sft(str(hf_dir))
    assert refused.returncode != 0 and "--finetune" in refused.stderr
    refused, _ = sft(str(hf_dir), "--finetune", "--ckpt-step", "3")
    assert refused.returncode != 0 and "--ckpt-step 3" in refused.stderr


def test_tools_that_need_our_format_say_how_to_get_it(tmp_path):
    from megatron_k15.checkpointing import CheckpointError, resolve_checkpoint_dir

    save_tiny_hf_checkpoint(str(tmp_path / "hf"), "qwen2")
    with pytest.raises(CheckpointError, match="Hugging Face model directory.*convert_hf_to_megatron"):
        resolve_checkpoint_dir(str(tmp_path / "hf"))


def test_tokenizer_dir_of_checkpoints_and_hf_directories(tmp_path):
    from megatron_k15.checkpointing import tokenizer_dir

    save_tiny_hf_checkpoint(str(tmp_path / "hf"), "qwen2")  # weights only
    assert tokenizer_dir(str(tmp_path / "hf")) == str(tmp_path / "hf" / "tokenizer")  # missing: callers say so
    (tmp_path / "hf" / "tokenizer.json").write_text("{}")
    assert tokenizer_dir(str(tmp_path / "hf")) == str(tmp_path / "hf")
    assert tokenizer_dir(str(tmp_path / "ck")) == str(tmp_path / "ck" / "tokenizer")


@pytest.mark.parametrize("shape", [(), (1,), (7,), (5, 3), (4, 3, 2), (0, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_models_weighted_average_in_row_blocks_equals_the_formula(shape, dtype):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "merge_models", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools",
                                     "merge_models.py"))
    merge = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(merge)
    torch.manual_seed(0)
    a, b = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    want = (0.3 * a.float() + 0.7 * b.float()).to(dtype)
    for chunk in (1, 2, 5, 2 ** 24):
        got = merge.weighted_average(a, b, 0.3, chunk_elems=chunk)
        assert got.dtype == dtype and torch.equal(got, want), chunk
