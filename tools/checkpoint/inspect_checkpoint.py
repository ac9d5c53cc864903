#!/usr/bin/env python
"""What a checkpoint holds, without loading its weights.

    python tools/checkpoint/inspect_checkpoint.py --load ckpt/rl            # the latest iteration
    python tools/checkpoint/inspect_checkpoint.py --load ckpt/rl/iter_0000040 --json

Prints the model (architecture and shape, parameters), the layout it was saved at (tp, pp, cp,
dp, ep, world size), the other iterations in the directory, and per part whether it is there:
every tp x pp weight shard, the optimizer state (fp32 master weights, Adam's moments, step;
left out by --no-save-optim, moments by RL runs without --keep-optimizer-state), one RNG
file per rank (left out by --no-save-rng; without them a resume is not bit-identical), the
trainer state (data position, data blend, prompt sampler, replay buffer, DPO reference) and
the tokenizer. Shards are opened memory-mapped, so inspecting a 70B checkpoint reads
kilobytes. Exit code 1 with the reason when the directory is not a complete checkpoint.

A Hugging Face model directory (which ``--load`` also takes, with ``--finetune``) gets a
pre-flight check instead: the model it becomes, its tensors' dtypes and bytes, the tokenizer,
and a conversion run on the files' headers only, which names any tensor that is missing,
misshapen or left unused (exit code 1) without reading a weight.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _bootstrap  # noqa: F401,E402

import torch  # noqa: E402

from megatron_k15.checkpointing import (  # noqa: E402
    HF_DIR_UNUSED_HINT, LATEST_FILE, CheckpointError, is_hf_model_dir, read_layout, resolve_checkpoint_dir,
    saved_iterations, shard_dir_name, tokenizer_dir,
)
from megatron_k15.models.config import GPTConfig  # noqa: E402


def _size(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def _trainer_state(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    out = {}
    if "consumed_rows" in state:
        out["consumed_rows"] = int(state["consumed_rows"])
    if state.get("data_blend") is not None:
        out["data_blend"] = state["data_blend"]
    if isinstance(state.get("dpo_reference"), torch.Tensor):
        out["dpo_reference_pairs"] = int(state["dpo_reference"].shape[0])
    sampler = state.get("sampler")
    if isinstance(sampler, dict):
        out["sampler"] = {"name": sampler.get("name"), "num_prompts": sampler.get("num_prompts")}
        if "weights" in sampler:  # weighted prompt sets: their sizes, shares and prompts drawn so far
            out["sampler"].update(sizes=sampler["sizes"], weights=sampler["weights"], drawn=sampler["drawn"])
    buffer = state.get("replay_buffer")
    if isinstance(buffer, dict):
        out["replay_buffer_trajectories"] = len(buffer.get("trajectories", []))
    if state.get("ref_load"):
        out["ref_load"] = state["ref_load"]
    out["keys"] = sorted(state)
    return out


def _model_summary(cfg: GPTConfig) -> dict:
    return {"architecture": cfg.architecture, "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
            "ffn_hidden_size": cfg.ffn_hidden_size, "num_attention_heads": cfg.num_attention_heads,
            "num_query_groups": cfg.num_query_groups, "vocab_size": cfg.vocab_size,
            "max_position_embeddings": cfg.max_position_embeddings, "num_experts": cfg.num_moe_experts,
            "parameters": cfg.num_parameters()}


def inspect_hf(load: str) -> dict:
    """A Hugging Face model directory as ``--load`` would take it: the model, its tensors by
    dtype (from the files' headers), the tokenizer, and whether every tensor the conversion
    needs is there with its shape and none is left unused (a conversion of meta tensors:
    nothing is read)."""
    from megatron_k15.models.hf_mapping import (HF_CONFIG_FILE, HFCheckpointError, check_every_hf_tensor_read,
                                                gpt_config_from_hf, read_hf_config, read_hf_state_dict)
    from megatron_k15.models.lazy_state_dict import meta_state_dict

    cfg = gpt_config_from_hf(read_hf_config(load), os.path.join(load, HF_CONFIG_FILE))  # (tensors: below)
    meta = meta_state_dict(read_hf_state_dict(load))
    dtypes: dict[str, int] = {}
    for name in meta:
        dtype = str(meta[name].dtype).replace("torch.", "")
        dtypes[dtype] = dtypes.get(dtype, 0) + 1
    try:
        check_every_hf_tensor_read(meta, cfg, where=load, hint=HF_DIR_UNUSED_HINT)
        problem = None
    except (HFCheckpointError, ValueError) as e:
        problem = str(e)
    return {"path": os.path.abspath(load), "hugging_face": True, "model": _model_summary(cfg),
            "tensors": {"count": len(meta), "dtypes": dtypes}, "conversion_problem": problem,
            "tokenizer": os.path.isdir(tokenizer_dir(load)), "bytes": _size(load)}


def _hf_text(info: dict) -> str:
    m = info["model"]
    return "\n".join([
        f"hugging face {info['path']}: --load takes it as it is (with --finetune), each rank converting its part",
        f"model        {m['architecture']}, {m['parameters'] / 1e6:.1f}M parameters: {m['num_layers']} layers, "
        f"hidden {m['hidden_size']}, {m['num_attention_heads']} heads / {m['num_query_groups']} kv, vocab "
        f"{m['vocab_size']}" + (f", {m['num_experts']} experts" if m["num_experts"] else ""),
        f"tensors      {info['tensors']['count']} ({', '.join(f'{n} {d}' for d, n in sorted(info['tensors']['dtypes'].items()))})",
        "conversion   " + ("every tensor present with its shape, none unused" if info["conversion_problem"] is None
                           else f"FAILS: {info['conversion_problem']}"),
        f"tokenizer    {'in the directory' if info['tokenizer'] else 'none (pass --tokenizer)'}",
        f"size         {info['bytes'] / 2**30:.2f} GiB"])


def inspect(load: str) -> dict:
    """The description of the checkpoint ``load`` names (a run directory or one iteration)."""
    if is_hf_model_dir(load):
        return inspect_hf(load)
    ckpt = resolve_checkpoint_dir(load)
    layout = read_layout(ckpt)
    cfg = GPTConfig.from_dict(layout["model"])
    tp, pp = layout["tensor_model_parallel_size"], layout["pipeline_model_parallel_size"]
    root = os.path.dirname(os.path.abspath(ckpt))
    latest = os.path.join(root, LATEST_FILE)
    iterations = saved_iterations(root)
    shards, missing, optimizer = [], [], None
    for t in range(tp):
        for p in range(pp):
            path = os.path.join(ckpt, shard_dir_name(t, p), "model.pt")
            if not os.path.isfile(path):
                missing.append(shard_dir_name(t, p))
                continue
            shards.append(shard_dir_name(t, p))
            if optimizer is None:  # the first shard stands for all: every rank saves the same parts
                payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                opt = payload.get("optimizer")
                optimizer = {"saved": opt is not None}
                if opt is not None:
                    optimizer.update(master="master" in opt, moments=all(k in opt for k in ("exp_avg", "exp_avg_sq")),
                                     step=int(opt.get("step", 0)))
                    if "loss_scaler" in opt:  # --fp16: where the dynamic loss scale resumes
                        optimizer["loss_scale"] = float(opt["loss_scaler"]["scale"])
    rng_dir = os.path.join(ckpt, "rng")
    rng_files = len([f for f in os.listdir(rng_dir) if f.endswith(".pt")]) if os.path.isdir(rng_dir) else 0
    world = layout.get("world_size")
    return {
        "path": ckpt,
        "iteration": layout.get("iteration"),
        "latest": open(latest).read().strip() if os.path.isfile(latest) else None,
        "iterations_in_directory": iterations,
        "model": _model_summary(cfg),
        "layout": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
                   "context_parallel_size": layout.get("cp_size"), "data_parallel_size": layout.get("dp_size"),
                   "expert_model_parallel_size": layout.get("ep_size"), "world_size": world,
                   "layer_ranges": layout["layer_ranges"]},
        "shards": {"present": len(shards), "expected": tp * pp, "missing": missing},
        "optimizer": optimizer or {"saved": False},
        "rng": {"files": rng_files, "ranks": world, "complete": world is not None and rng_files == world},
        "trainer_state": _trainer_state(os.path.join(ckpt, "trainer_state.pt")),
        "tokenizer": os.path.isdir(os.path.join(root, "tokenizer")) or os.path.isdir(os.path.join(ckpt, "tokenizer")),
        "bytes": _size(ckpt),
    }


def _text(info: dict) -> str:
    m, lay, opt, rng = info["model"], info["layout"], info["optimizer"], info["rng"]
    release = info["iteration"] is None  # converted from HF or merged: weights only
    lines = [f"checkpoint   {info['path']} (iteration {info['iteration']}; latest: {info['latest']}; "
             f"{len(info['iterations_in_directory'])} iteration(s) in the directory)",
             f"model        {m['architecture']}, {m['parameters'] / 1e6:.1f}M parameters: {m['num_layers']} layers, "
             f"hidden {m['hidden_size']}, ffn {m['ffn_hidden_size']}, {m['num_attention_heads']} heads / "
             f"{m['num_query_groups']} kv, vocab {m['vocab_size']}, {m['max_position_embeddings']} positions"
             + (f", {m['num_experts']} experts" if m["num_experts"] else ""),
             f"saved at     tp={lay['tensor_model_parallel_size']} pp={lay['pipeline_model_parallel_size']}"
             + ("" if lay["world_size"] is None else
                f" cp={lay['context_parallel_size']} dp={lay['data_parallel_size']} "
                f"ep={lay['expert_model_parallel_size']} ({lay['world_size']} ranks)") + "; loads at any tp/pp",
             f"shards       {info['shards']['present']}/{info['shards']['expected']}"
             + (f" (missing {', '.join(info['shards']['missing'])})" if info["shards"]["missing"] else ""),
             "optimizer    " + ("none: a release checkpoint (converted or merged weights); train from it with "
                                "--finetune" if release and not opt["saved"] else
                                "not saved (--no-save-optim: resume with --no-load-optim or --finetune)"
                                if not opt["saved"] else
                                f"step {opt['step']}, fp32 master weights {'yes' if opt['master'] else 'no'}, "
                                f"Adam moments {'yes' if opt['moments'] else 'no (an RL run that resets them)'}"
                                + (f", fp16 loss scale {opt['loss_scale']:g}" if "loss_scale" in opt else "")),
             ("rng          none (release checkpoint)" if release and not rng["files"] else
              f"rng          {rng['files']} of {rng['ranks']} ranks"
              + ("" if rng["complete"] else " (a resume is not bit-identical; --no-save-rng)")),
             f"trainer      {json.dumps({k: v for k, v in info['trainer_state'].items() if k != 'keys'})}",
             f"tokenizer    {'saved' if info['tokenizer'] else 'none (pass --tokenizer)'}",
             f"size         {info['bytes'] / 2**30:.2f} GiB"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="a checkpoint directory (its latest iteration), one iteration, "
                                                 "or a Hugging Face model directory (a pre-flight check)")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    args = p.parse_args(argv)
    try:
        info = inspect(args.load)
    except (CheckpointError, OSError, KeyError, ValueError) as e:
        print(f"inspect_checkpoint.py: error: {e}", file=sys.stderr)
        return 1
    if info.get("hugging_face"):
        print(json.dumps(info, indent=2) if args.json else _hf_text(info))
        return 1 if info["conversion_problem"] else 0
    print(json.dumps(info, indent=2) if args.json else _text(info))
    return 1 if info["shards"]["missing"] else 0


if __name__ == "__main__":
    sys.exit(main())
