"""Generate continuations for a JSONL file of prompts with a Megatron checkpoint.

    python -m megatron_k15.generate --load CKPT --input in.jsonl --output out.jsonl \
        --max-new-tokens 64 --temperature 0
    torchrun --nproc-per-node 2 -m megatron_k15.generate --tensor-model-parallel-size 2 ...

Input lines are ``{"prompt": str}`` or ``{"prompt_ids": [int, ...]}``; other keys are carried
through. Each output line adds ``output_ids`` (prompt excluded), ``output_logprobs`` (fp32
log-prob of each generated token before temperature), ``stop_reason`` (``eos`` | ``length`` |
``stop``: a ``--stop`` string appeared) and ``text`` when a tokenizer is known (``--tokenizer``
or the checkpoint's ``tokenizer/``; it ends before the stop string, the ids keep its tokens).
Requests are spread over data-parallel ranks; rank 0 writes the output file atomically. A long
run survives preemption: requests go through the engine ``--chunk-size`` at a time, each finished
chunk is appended to ``OUTPUT.partial`` and ``--resume`` skips what is there
(``megatron_k15/partial_results.py``); every request is seeded by its line, so the result is the
same as one pass.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch.distributed as dist

from megatron_k15.arguments import ArgumentError, parse_args
from megatron_k15.data.tokenizer import add_chat_template_args, encode_prompt


def add_generate_args(p) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--input", required=True, help="JSONL with 'prompt' or 'prompt_ids' per line")
    g.add_argument("--output", required=True, help="JSONL to write")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--batch-size", type=int, default=64, help="most requests decoded together")
    g.add_argument("--add-bos", action="store_true", help="prepend the tokenizer's BOS to text prompts")
    g.add_argument("--chunk-size", type=int, default=1024,
                   help="requests per pass of the engine; each finished pass is kept in OUTPUT.partial")
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted run: skip the requests already in OUTPUT.partial")
    g.add_argument("--stop", nargs="+", default=None, metavar="STRING",
                   help="end a generation once its text contains one of these (e.g. '\\n\\nQuestion:' after "
                        "few-shot prompts); needs a tokenizer")
    add_chat_template_args(g)


def _validate(args) -> None:
    from megatron_k15.generation.sampling import SamplingParams

    if not args.load:
        raise ArgumentError("--load CKPT is required (a converted checkpoint)")
    if not os.path.isfile(args.input):
        raise ArgumentError(f"--input {args.input}: file not found")
    if args.max_new_tokens < 0:
        raise ArgumentError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.batch_size < 1:
        raise ArgumentError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.chunk_size < 1:
        raise ArgumentError(f"--chunk-size must be >= 1, got {args.chunk_size}")
    from megatron_k15.partial_results import resume_problem

    problem = resume_problem(args.output, args.resume)
    if problem:
        raise ArgumentError(problem)
    try:
        SamplingParams(args.temperature, args.top_p, args.top_k).validate()
    except ValueError as e:
        raise ArgumentError(str(e)) from None


def load_requests(args, tokenizer, vocab_size: int) -> list[tuple[dict, list[int]]]:
    """Every input line with its prompt ids; errors name file:line and the field."""
    from megatron_k15.data.prompts import DataError, read_jsonl, validate_generation_record

    requests = []
    for lineno, rec in read_jsonl(args.input, validate=validate_generation_record, with_lineno=True):
        if "prompt_ids" in rec:
            ids = list(rec["prompt_ids"])
            bad = [t for t in ids if t >= vocab_size]
            if bad:
                raise DataError(args.input, lineno, "prompt_ids",
                                f"token id {bad[0]} is outside the model's vocabulary ({vocab_size})")
        else:
            if tokenizer is None:
                raise DataError(args.input, lineno, "prompt",
                                "text prompts need a tokenizer (--tokenizer, or a checkpoint with "
                                "tokenizer/); or give 'prompt_ids'")
            ids = encode_prompt(tokenizer, rec["prompt"], args)
            if args.add_bos and tokenizer.bos_id is not None:
                ids = [tokenizer.bos_id] + ids
            if not ids:
                raise DataError(args.input, lineno, "prompt", "encodes to zero tokens")
        requests.append((rec, ids))
    return requests


def find_tokenizer(args):
    from megatron_k15.data.tokenizer import load_tokenizer

    if args.tokenizer:
        return load_tokenizer(args.tokenizer)
    from megatron_k15.checkpointing import tokenizer_dir

    tok_dir = tokenizer_dir(args.load)
    return load_tokenizer(tok_dir) if os.path.isdir(tok_dir) else None


def main(argv=None) -> int:
    args = parse_args(argv, "Generate with a megatron_k15 checkpoint", add_generate_args, _validate,
                      groups=("model", "parallel", "precision", "checkpoint", "inference"))
    from megatron_k15.data.prompts import DataError
    from megatron_k15.data.tokenizer import TokenizerError, chat_template_problem

    cfg = args.model_config
    try:
        tokenizer = find_tokenizer(args)
        problem = chat_template_problem(args, tokenizer)
        if problem:
            raise TokenizerError(problem)
        if args.stop and tokenizer is None:
            raise TokenizerError("--stop matches text: give --tokenizer (the checkpoint has no tokenizer/)")
        requests = load_requests(args, tokenizer, cfg.vocab_size)
    except (DataError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from megatron_k15.files import atomic_file
    from megatron_k15.generation.loading import load_generation_replica, request_split
    from megatron_k15.generation.stop_strings import StopStrings, cut_at_stop
    from megatron_k15.partial_results import append_lines, finish, resume_from
    from megatron_k15.generation.sampling import SamplingParams, request_generator
    from megatron_k15.initialize import destroy, initialize_parallel_from_args

    initialize_parallel_from_args(args)
    longest = max((len(ids) for _, ids in requests), default=0) + args.max_new_tokens
    model, generator = load_generation_replica(args, cfg, max_batch_size=args.batch_size, max_sequence_length=longest)

    dp_rank, dp_size, _ = request_split(args, cfg)  # replicas (and cp ranks that decode apart)
    params = SamplingParams(args.temperature, args.top_p, args.top_k)
    eos_ids = cfg.eos_ids() or ([tokenizer.eos_id] if tokenizer and tokenizer.eos_id is not None else [])
    stop = StopStrings(tokenizer, args.stop) if args.stop else None
    last_report = [0.0]

    def progress(done, total):
        now = time.time()
        if dist.get_rank() == 0 and (done == total or now - last_report[0] > 5):
            last_report[0] = now
            print(f"[generate] {done}/{total} requests of this pass ({generator.stats.tokens_per_second:.1f} "
                  "tokens/s)", file=sys.stderr, flush=True)

    def mismatch(i: int, line: dict):  # a kept output carries its input line's keys, unchanged
        out = line.get("output")
        if not isinstance(out, dict):
            return "output", "missing"
        key = next((k for k, v in requests[i][0].items() if out.get(k) != v), None)
        return None if key is None else (key, f"differs from line {i + 1} of --input: the input changed since; "
                                              "delete the file to start over")

    try:
        partial, done = resume_from(args.output, len(requests), mismatch, writer=dist.get_rank() == 0)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        destroy()
        return 2
    if done and dist.get_rank() == 0:
        print(f"[generate] resuming: {len(done)} of {len(requests)} requests done in {partial}", file=sys.stderr)
    todo = [i for i in range(len(requests)) if i not in done]
    t0, n_tokens = time.time(), 0
    replica = dist.get_world_size() // dp_size  # ranks holding the same results: count them once
    for start in range(0, len(todo), args.chunk_size):
        mine = [i for i in todo[start:start + args.chunk_size] if i % dp_size == dp_rank]
        results = generator.generate(
            [requests[i][1] for i in mine], args.max_new_tokens, params,
            [request_generator(args.seed, i) for i in mine], eos_ids, repeat_detector=stop, progress=progress)
        outputs: dict[int, dict] = {}
        for i, res in zip(mine, results):
            rec = dict(requests[i][0])
            rec.update(output_ids=res.output_ids, output_logprobs=res.output_logprobs,
                       stop_reason=res.stop_reason)
            if tokenizer is not None:
                # a model's (padded) vocabulary can be larger than its tokenizer's: skip the extras
                rec["text"] = cut_at_stop(tokenizer.decode([t for t in res.output_ids if t < tokenizer.vocab_size]),
                                          args.stop)
            outputs[i] = rec
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (outputs, sum(len(r.output_ids) for r in results)))
        chunk = {i: {"index": i, "output": rec} for part, _ in gathered for i, rec in part.items()}
        n_tokens += sum(n for _, n in gathered) // replica  # each dp rank counted once
        if dist.get_rank() == 0:
            append_lines(partial, [json.dumps(chunk[i], ensure_ascii=False) + "\n" for i in sorted(chunk)])
        done.update(chunk)
    elapsed = time.time() - t0
    if dist.get_rank() == 0:
        with atomic_file(args.output) as f:
            for i in range(len(requests)):
                f.write(json.dumps(done[i]["output"], ensure_ascii=False) + "\n")
        finish(partial)
        print(f"[generate] {len(requests)} requests ({len(todo)} this run), {n_tokens} tokens in {elapsed:.1f}s "
              f"({n_tokens / max(elapsed, 1e-9):.1f} tokens/s) -> {args.output}", file=sys.stderr)
    destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
