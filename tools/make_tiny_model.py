#!/usr/bin/env python
"""Write a randomly initialised Hugging Face model of one of our preset shapes (offline).

    python tools/make_tiny_model.py --preset tiny --out /tmp/tiny-hf

The ``tiny`` preset uses the built-in byte tokenizer (written next to the weights), so the
model can be converted, trained and sampled with nothing downloaded. Other presets give
real model shapes with random weights (for benchmarks and memory planning).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bootstrap  # noqa: F401,E402

import torch  # noqa: E402

from megatron_k15.files import atomic_directory  # noqa: E402
from megatron_k15.models.config import PRESETS, preset  # noqa: E402
from megatron_k15.models.hf_mapping import hf_config_from_gpt  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-std", type=float, default=0.02)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = p.parse_args(argv)
    if os.path.exists(args.out) and os.listdir(args.out):
        print(f"error: --out {args.out} exists and is not empty", file=sys.stderr)
        return 1
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = preset(args.preset)
    hf_cfg = dict(hf_config_from_gpt(cfg))
    hf_cfg["initializer_range"] = args.init_std
    model_type = hf_cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **hf_cfg)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config)
    if args.dtype == "bf16":
        model = model.to(torch.bfloat16)
    with atomic_directory(args.out) as tmp:
        model.save_pretrained(tmp)
        if args.preset == "tiny":
            from megatron_k15.data.tokenizer import ByteTokenizer, save_tokenizer

            save_tokenizer(ByteTokenizer(), tmp)
    n = sum(t.numel() for t in model.parameters())
    print(f"[make_tiny_model] {args.preset}: {n / 1e6:.2f}M parameters -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
