#!/usr/bin/env python
"""Long2short model merging: weighted average of two checkpoints of the same architecture.

    python tools/merge_models.py --load-a ckpt/long --load-b ckpt/short --weight-a 0.5 \
        --save ckpt/merged --tensor-model-parallel-size 2

theta = w * theta_a + (1 - w) * theta_b for every parameter (Kimi k1.5's long2short merge).
Inputs may have any tp/pp layouts, or be Hugging Face model directories (a released long-CoT
model and a short one merge without converting either); the output is one of our checkpoints
at the requested layout, written atomically, with the tokenizer (and, from a Hugging Face
directory, the other non-weight files) of the first input. Both inputs are read (memory-mapped) one layer at a
time and each pipeline stage of the output is written when complete: memory holds about one
output stage.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bootstrap  # noqa: F401,E402

import torch  # noqa: E402

from megatron_k15.checkpointing import (  # noqa: E402
    LATEST_FILE, CheckpointError, copy_hf_side_files, full_state_units, is_hf_model_dir, iteration_tag,
    write_state_dict_units,
)
from megatron_k15.files import atomic_directory  # noqa: E402


def weighted_average(ta: torch.Tensor, tb: torch.Tensor, w: float, chunk_elems: int = 2 ** 24) -> torch.Tensor:
    """w * ta + (1 - w) * tb computed in fp32, in row blocks of about ``chunk_elems`` values
    (the fp32 temporaries of a 152K-row head would otherwise be several times its size)."""
    if ta.dim() == 0 or ta.shape[0] == 0:
        return (w * ta.float() + (1.0 - w) * tb.float()).to(ta.dtype)
    out = torch.empty_like(ta)
    rows = max(1, chunk_elems // max(1, ta[0].numel()))
    for i in range(0, ta.shape[0], rows):
        out[i:i + rows] = (w * ta[i:i + rows].float() + (1.0 - w) * tb[i:i + rows].float()).to(ta.dtype)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load-a", required=True)
    p.add_argument("--load-b", required=True)
    p.add_argument("--weight-a", type=float, default=0.5, help="w in w*a + (1-w)*b")
    p.add_argument("--save", required=True)
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    args = p.parse_args(argv)
    if not 0.0 <= args.weight_a <= 1.0:
        p.error(f"--weight-a must be in [0, 1], got {args.weight_a}")
    try:
        if os.path.exists(args.save) and os.listdir(args.save):
            raise FileExistsError(f"--save {args.save} exists and is not empty")
        shapes = []
        for load in (args.load_a, args.load_b):
            units, _ = full_state_units(load, meta=True)
            shapes.append({k: tuple(v.shape) for unit in units for k, v in unit.items()})
        if shapes[0] != shapes[1]:
            diff = sorted(set(shapes[0].items()) ^ set(shapes[1].items()))[:3]
            raise ValueError(f"--load-a and --load-b have different architectures (e.g. {diff})")
        (units_a, cfg_a), (units_b, _) = full_state_units(args.load_a), full_state_units(args.load_b)
        w = args.weight_a

        def merged():
            for a, b in zip(units_a, units_b):
                if sorted(a) != sorted(b):
                    raise ValueError(f"--load-a and --load-b hold different tensors ({sorted(set(a) ^ set(b))[:3]})")
                yield {k: weighted_average(a[k], b[k], w) for k in a}

        cfg_a.validate(args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
        with atomic_directory(args.save) as tmp:
            ckpt = os.path.join(tmp, iteration_tag(None))
            os.makedirs(ckpt)
            write_state_dict_units(ckpt, merged(), cfg_a, args.tensor_model_parallel_size,
                                   args.pipeline_model_parallel_size, iteration=None,
                                   merged_from=[os.path.abspath(args.load_a), os.path.abspath(args.load_b)],
                                   weight_a=w)
            with open(os.path.join(tmp, LATEST_FILE), "w") as f:
                f.write("release")
            if is_hf_model_dir(args.load_a):
                copy_hf_side_files(args.load_a, tmp)
            elif os.path.isdir(os.path.join(args.load_a, "tokenizer")):
                shutil.copytree(os.path.join(args.load_a, "tokenizer"), os.path.join(tmp, "tokenizer"))
    except (CheckpointError, FileExistsError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"[merge_models] {len(shapes[0])} tensors, w={w} -> {args.save}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
