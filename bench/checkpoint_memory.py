"""Host memory of the checkpoint tools: HF -> ours, ours -> HF, and loading one rank under another layout.

A random Qwen2-shaped model is saved with transformers (safetensors, 1 GB files), then each step
runs in a child process while this one samples the child's ``/proc/PID/status``:

    convert tpT ppP   tools/checkpoint/convert_hf_to_megatron.py at that layout
    export            tools/checkpoint/convert_megatron_to_hf.py of the tp2 pp2 checkpoint, in files of
                      1/8 of the model (as 5 GB files of a 40 GB model)
    merge             tools/merge_models.py (long2short) of the tp1 pp1 and tp2 pp2 checkpoints, to pp4
    reshard           one rank's state (tp1 pp1, the whole model) cut out of the tp2 pp2 checkpoint,
                      as ``load_model_checkpoint`` builds it before copying into the model
    rank ...          rank (0, 0) of tp2 pp2 from our shards at that layout, and from the HF
                      directory (``--load HF_DIR``: ``hf_state_for_rank``)

Columns: the largest anonymous resident memory seen (sampled every 10 ms: what the process
itself allocated; the figure a memory limit has to cover), the same less that of a child that
only imports the tools' modules (the interpreter, torch), as a multiple of the model's bytes,
the peak resident set (``VmHWM``: also counts pages of memory-mapped files, which the kernel can
drop), and time.

    python bench/checkpoint_memory.py                                  # 0.43B parameters, bf16
    python bench/checkpoint_memory.py --hidden 512 --layers 4 --vocab 8000   # seconds
    python bench/checkpoint_memory.py --repo /tmp/old_checkout         # another checkout's tools

``--repo`` runs the tools of another checkout of this project (an older commit, for a before /
after table); its reshard step uses what that checkout has.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2 ** 30

# run in the child for the reshard step: argv = repo, checkpoint
_RESHARD_CHILD = """
import sys
sys.path.insert(0, sys.argv[1])
from megatron_k15 import checkpointing as ck
from megatron_k15.models.sharding import split_for_rank
ckpt = ck.resolve_checkpoint_dir(sys.argv[2])
layout = ck.read_layout(ckpt)
cfg = ck.GPTConfig.from_dict(layout["model"])
if hasattr(ck, "reshard_for_rank"):
    saved = {k: v["model"] for k, v in ck._saved_payloads(ckpt, layout).items()}
    state = ck.reshard_for_rank(saved, cfg, 1, 0, 1, 0, range(cfg.num_layers), cfg.padded_vocab_size(1))
else:  # a checkout from before: the merged full model, then split
    full, _ = ck.read_full_state_dict(ckpt)
    state = split_for_rank(full, 1, 0, 1, 0, cfg.num_layers, cfg.tie_word_embeddings, cfg.padded_vocab_size(1))
print(sum(t.numel() for t in state.values()))
"""

# run in the child for the HF-directory step: argv = repo, HF directory; rank (0, 0) of tp2 pp2
_HF_RANK_CHILD = """
import sys
from types import SimpleNamespace
sys.path.insert(0, sys.argv[1])
from megatron_k15 import checkpointing as ck
from megatron_k15.models.sharding import pipeline_layer_ranges
cfg = ck.load_config(sys.argv[2])
model = SimpleNamespace(config=cfg, layer_range=pipeline_layer_ranges(cfg.num_layers, 2)[0], tp_size=2, tp_rank=0,
                        padded_vocab_size=cfg.padded_vocab_size(2), own_experts=lambda name, t: t)
state = ck.hf_state_for_rank(sys.argv[2], model, 0, 2)
print(sum(t.numel() for t in state.values()))
"""

# the same rank's shard of our tp2 pp2 checkpoint, copied out of the mapping as a model load does
_OUR_RANK_CHILD = """
import sys
sys.path.insert(0, sys.argv[1])
from megatron_k15 import checkpointing as ck
state = {k: v.clone() for k, v in ck.read_shard(ck.resolve_checkpoint_dir(sys.argv[2]), 0, 0).items()}
print(sum(t.numel() for t in state.values()))
"""

_IMPORTS_CHILD = """
import sys, time
sys.path.insert(0, sys.argv[1])
import megatron_k15.checkpointing, megatron_k15.models.hf_mapping, safetensors.torch
time.sleep(0.5)
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--ffn", type=int, default=4096)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--repo", default=_ROOT, help="checkout whose tools run (default: this one)")
    p.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temporary directory)")
    return p.parse_args(argv)


def _status_kib(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "VmHWM"):
                    out[key] = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def measure(cmd: list[str]) -> tuple[float, float, float]:
    """(peak anonymous GiB, peak resident GiB, seconds) of ``cmd`` run to completion."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    anon = hwm = 0
    while proc.poll() is None:
        s = _status_kib(proc.pid)
        anon, hwm = max(anon, s.get("RssAnon", 0)), max(hwm, s.get("VmHWM", 0))
        time.sleep(0.01)
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out}\n{err}")
    return anon * 1024 / GIB, hwm * 1024 / GIB, time.perf_counter() - t0


def save_model(args, hf_dir: str) -> int:
    import torch
    import transformers

    config = transformers.Qwen2Config(
        hidden_size=args.hidden, num_hidden_layers=args.layers, intermediate_size=args.ffn,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
        tie_word_embeddings=False, torch_dtype="bfloat16" if args.dtype == "bf16" else "float32")
    with torch.device("meta"):
        model = transformers.Qwen2ForCausalLM(config)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = model.to_empty(device="cpu").to(dtype)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(hf_dir, max_shard_size="1GB")
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    return nbytes


def main(argv=None) -> None:
    args = parse_args(argv)
    work = args.workdir or tempfile.mkdtemp(prefix="ckpt_mem_")
    tool = os.path.join(args.repo, "tools", "checkpoint")
    hf_dir = os.path.join(work, "hf")
    try:
        nbytes = save_model(args, hf_dir)
        steps = []
        for tp, pp in [(t, p) for t, p in ((1, 1), (1, 4), (2, 2)) if p <= args.layers]:
            steps.append((f"convert tp{tp} pp{pp}", [
                sys.executable, os.path.join(tool, "convert_hf_to_megatron.py"), "--hf-dir", hf_dir,
                "--save", os.path.join(work, f"ck_tp{tp}pp{pp}"), "--tensor-model-parallel-size", str(tp),
                "--pipeline-model-parallel-size", str(pp)]))
        steps.append(("export (from tp2 pp2)", [
            sys.executable, os.path.join(tool, "convert_megatron_to_hf.py"), "--load", os.path.join(work, "ck_tp2pp2"),
            "--save", os.path.join(work, "back"), "--max-shard-size", str(max(nbytes // 8, 1))]))
        if args.layers >= 4:
            steps.append(("merge tp1 pp1 + tp2 pp2 -> tp1 pp4", [
                sys.executable, os.path.join(args.repo, "tools", "merge_models.py"),
                "--load-a", os.path.join(work, "ck_tp1pp1"), "--load-b", os.path.join(work, "ck_tp2pp2"),
                "--save", os.path.join(work, "merged"), "--pipeline-model-parallel-size", "4"]))
        steps.append(("reshard tp2 pp2 -> tp1 pp1", [
            sys.executable, "-c", _RESHARD_CHILD, args.repo, os.path.join(work, "ck_tp2pp2")]))
        if os.path.isfile(os.path.join(args.repo, "megatron_k15", "models", "lazy_state_dict.py")):
            steps.append(("rank tp0 pp0 of tp2 pp2: from our shards", [
                sys.executable, "-c", _OUR_RANK_CHILD, args.repo, os.path.join(work, "ck_tp2pp2")]))
            steps.append(("rank tp0 pp0 of tp2 pp2: from the HF directory", [
                sys.executable, "-c", _HF_RANK_CHILD, args.repo, hf_dir]))
        base, _, _ = measure([sys.executable, "-c", _IMPORTS_CHILD, args.repo])
        print(f"model: {nbytes / GIB:.2f} GiB ({args.dtype}); tools of {args.repo}; imports alone: {base:.2f} GiB")
        print("| step | peak anonymous GiB | above imports, x model | peak resident GiB | seconds |")
        print("|---|---|---|---|---|")
        for name, cmd in steps:
            anon, hwm, secs = measure(cmd)
            print(f"| {name} | {anon:.2f} | {(anon - base) * GIB / nbytes:.2f} | {hwm:.2f} | {secs:.1f} |",
                  flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
