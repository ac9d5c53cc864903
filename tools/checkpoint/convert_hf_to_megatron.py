#!/usr/bin/env python
"""Convert a Hugging Face Llama/Qwen2/Qwen3/Qwen3-MoE checkpoint to our Megatron format at any tp/pp size.

    python tools/checkpoint/convert_hf_to_megatron.py --hf-dir HF --save OUT \
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 1

OUT gets ``release/`` (one shard per tp x pp rank + config.json with the model config and the
original HF config), ``latest_checkpointed_iteration.txt`` and ``tokenizer/`` (the HF
tokenizer files), so ``--load OUT`` needs nothing else. The whole directory is written under
a temporary name and renamed at the end: an error leaves no OUT behind.

The HF tensors are read layer by layer and a pipeline stage's shards are written as soon as
its layers are converted, so the host memory needed is about one stage's weights (pass a
larger --pipeline-model-parallel-size to convert a model bigger than memory, then load it
under any layout).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _bootstrap  # noqa: F401,E402

import torch  # noqa: E402

from megatron_k15.checkpointing import (  # noqa: E402
    LATEST_FILE, copy_hf_side_files, iteration_tag, write_state_dict_units,
)
from megatron_k15.files import atomic_directory  # noqa: E402
from megatron_k15.models.config import ConfigError  # noqa: E402
from megatron_k15.models.hf_mapping import (  # noqa: E402
    HFCheckpointError, cast_state_dict, check_every_hf_tensor_read, gpt_config_from_hf, hf_to_megatron_units,
    read_hf_config, read_hf_state_dict,
)
from megatron_k15.models.sharding import pipeline_layer_ranges  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="HF model directory (config.json + safetensors)")
    p.add_argument("--save", required=True, help="output checkpoint directory (must not exist)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None)
    p.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None)
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    p.add_argument("--target-dtype", choices=sorted(DTYPES), default=None,
                   help="cast weights (default: keep the HF dtype, which keeps the round trip exact)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --save directory")
    p.add_argument("--ignore-unused-tensors", action="store_true",
                   help="convert a checkpoint holding tensors the model does not use (by default an error: such "
                        "a tensor is usually a weight the architecture here lacks), leaving them out with a warning")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    try:
        cfg = gpt_config_from_hf(read_hf_config(args.hf_dir), os.path.join(args.hf_dir, "config.json"))
        cfg.make_vocab_size_divisible_by = args.make_vocab_size_divisible_by
        cfg.validate(tp, pp)
        ranges = pipeline_layer_ranges(cfg.num_layers, pp, args.decoder_first_pipeline_num_layers,
                                       args.decoder_last_pipeline_num_layers)
        if os.path.exists(args.save) and os.listdir(args.save) and not args.overwrite:
            raise FileExistsError(f"--save {args.save} exists and is not empty; pass --overwrite to replace it")
        t0 = time.time()
        dtype = DTYPES[args.target_dtype] if args.target_dtype else None
        print(f"[convert] {cfg.architecture}: {cfg.num_layers} layers, "
              f"{cfg.num_parameters() / 1e6:.1f}M parameters; writing tp={tp} pp={pp} to {args.save}", flush=True)
        source = read_hf_state_dict(args.hf_dir)
        # every name and shape, and no weight left behind, before any work (a conversion of meta tensors)
        unused = check_every_hf_tensor_read(source, cfg, args.hf_dir, ignore=args.ignore_unused_tensors)
        if unused:
            print(f"[convert] warning: --ignore-unused-tensors: left out {len(unused)} tensor(s) the model does not "
                  f"use: {', '.join(unused[:5])}{' ...' if len(unused) > 5 else ''}", flush=True)
        units = hf_to_megatron_units(source, cfg, where=args.hf_dir)
        if dtype is not None:
            units = (cast_state_dict(unit, dtype) for unit in units)

        def progress(t, p):
            print(f"[convert] wrote shard tp={t} pp={p} ({time.time() - t0:.0f}s)", flush=True)

        with atomic_directory(args.save) as tmp:
            tag = iteration_tag(None)
            ckpt = os.path.join(tmp, tag)
            os.makedirs(ckpt)
            write_state_dict_units(ckpt, units, cfg, tp, pp, ranges, progress=progress, iteration=None,
                                   source=os.path.abspath(args.hf_dir))
            copy_hf_side_files(args.hf_dir, tmp)
            with open(os.path.join(tmp, LATEST_FILE), "w") as f:
                f.write("release")
        print(f"[convert] done in {time.time() - t0:.1f}s", flush=True)
    except (HFCheckpointError, ConfigError, FileExistsError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
