#!/usr/bin/env python
"""Export one of our checkpoints (any tp/pp layout) to a Hugging Face model directory.

    python tools/checkpoint/convert_megatron_to_hf.py --load OUT --save HF_DIR

Writes config.json (the original HF config when the model came from HF), safetensors
(sharded with an index above --max-shard-size) and the tokenizer files. A model converted
from HF comes back bit-exact. Written under a temporary name and renamed at the end.

Tensors are merged from the (memory-mapped) shards one layer at a time and written out as
they come: the host memory needed is about one --max-shard-size file. ``--fp8-blocks`` stores the
linear weights in float8 with block scales (DeepSeek-V3's / Kimi K2's hub format).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _bootstrap  # noqa: F401,E402

import torch  # noqa: E402

from megatron_k15.checkpointing import CheckpointError, lazy_full_state_dict  # noqa: E402
from megatron_k15.files import atomic_directory  # noqa: E402
from megatron_k15.models.config import ConfigError  # noqa: E402
from megatron_k15.models.hf_mapping import (  # noqa: E402
    HFShardWriter, cast_state_dict, fp8_quantization_config, hf_config_from_gpt, megatron_to_hf_units,
    quantize_fp8_state_dict,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_size(text: str) -> int:
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}
    t = text.strip().upper()
    for unit, mult in units.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(t)


def _block_size(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--fp8-blocks {text}: give the block as ROWS,COLS (e.g. 128,128)") from None
    if rows < 1 or cols < 1:
        raise ValueError(f"--fp8-blocks {text}: block sizes must be >= 1")
    return rows, cols


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="our checkpoint directory (root or one iteration)")
    p.add_argument("--save", required=True, help="HF output directory (must not exist)")
    p.add_argument("--target-dtype", choices=sorted(DTYPES), default=None)
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--fp8-blocks", nargs="?", const="128,128", default=None, metavar="ROWS,COLS",
                   help="store every linear projection's weight in float8 e4m3 with one fp32 scale per block "
                        "(DeepSeek-V3's and Kimi K2's hub format, transformers' fine-grained FP8; default block "
                        "128,128): half the bytes of bf16; the other tensors in --target-dtype")
    args = p.parse_args(argv)
    try:
        block = _block_size(args.fp8_blocks) if args.fp8_blocks else None
        if os.path.exists(args.save) and os.listdir(args.save) and not args.overwrite:
            raise FileExistsError(f"--save {args.save} exists and is not empty; pass --overwrite to replace it")
        full, cfg = lazy_full_state_dict(args.load)
        root = args.load
        with atomic_directory(args.save) as tmp:
            writer = HFShardWriter(tmp, parse_size(args.max_shard_size))
            for unit in megatron_to_hf_units(full, cfg):
                if args.target_dtype:
                    unit = cast_state_dict(unit, DTYPES[args.target_dtype])
                if block:
                    unit = quantize_fp8_state_dict(unit, block)
                for name, tensor in unit.items():
                    writer.add(name, tensor)
            n_tensors = writer.close()
            hf_config = hf_config_from_gpt(cfg)
            if block:
                hf_config["quantization_config"] = fp8_quantization_config(cfg, block)
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(hf_config, f, indent=2, sort_keys=True)
            for sub in ("tokenizer", "hf_files"):
                src = os.path.join(root, sub)
                if os.path.isdir(src):
                    for name in os.listdir(src):
                        shutil.copy2(os.path.join(src, name), os.path.join(tmp, name))
        print(f"[export] wrote {n_tensors} tensors to {args.save}"
              + (f" (linear weights in FP8 blocks of {block[0]}x{block[1]})" if block else ""), flush=True)
        source_quant = cfg.extra.get("hf_config", {}).get("quantization_config") or {}
        if source_quant.get("quant_method") == "fp8" and not block:
            print(f"[export] note: the source checkpoint stored its weights in FP8 blocks "
                  f"{source_quant.get('weight_block_size', [128, 128])}; these are dequantized "
                  "(--fp8-blocks writes that format again)", flush=True)
    except (CheckpointError, ConfigError, FileExistsError, KeyError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
