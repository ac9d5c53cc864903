#!/usr/bin/env python
"""Evaluate a checkpoint on a prompt JSONL with verifiable rewards: pass@1, pass@k and maj@k.

    python tools/evaluate.py --load ckpt/rl --input eval.jsonl --output results.jsonl \
        --n-samples 8 --temperature 1.0 --max-new-tokens 1024
    torchrun --nproc-per-node 4 tools/evaluate.py --tensor-model-parallel-size 2 ...
    torchrun --nproc-per-node 4 tools/evaluate.py --pipeline-model-parallel-size 2 --context-parallel-size 2 ...

Prompt records follow DESIGN.md section 5 (``task`` picks the reward; ``answer`` for math,
``tests`` for code). Every problem gets ``--n-samples`` responses; pass@k is the unbiased
estimator 1 - C(n-c, k)/C(n, k); math sets also get maj@n (self-consistency: the most common
final answer, equal answers pooled by the verifier, is right). Per-problem results (responses, correctness, lengths) go to
``--output``; the summary (pass@k, mean response length) is printed and written next to it.

Long evaluations survive preemption: problems go through the engine ``--chunk-size`` at a time
and each finished chunk is appended to ``OUTPUT.partial``; ``--resume`` skips the problems
already there (a rerun without it refuses to overwrite them). Every sample is seeded by its
problem's place in the file, so a resumed or chunked run gives the samples one pass gives.

``--tool python``: responses run sandboxed Python while they reason, as RL rollouts with ``--tool``
do (``megatron_k15/rl/tools.py``); each sample records its ``tool_calls``.

``--reward-model-load DIR``: a generative reward model (``megatron_k15/rewards/judge.py``)
regrades what the rule-based verifier rejects (or every answer: ``--reward-model-mode
replace``); judged samples carry the verdict and the judge's text, the summary its counts.

Layouts: tp x cp x pp ranks form one model replica (each rank builds its pipeline stage and
loads that stage's weights, resharding the checkpoint when it was saved under another layout);
the replica decodes together (pp stages pass hidden states on, cp ranks shard the KV cache) and
every rank of it gets the same generated tokens. Problems are split over the data-parallel
replicas (a model with sliding-window layers or attention sinks: over its cp ranks too, which
then decode apart with whole KV caches); global rank 0 writes the files.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bootstrap  # noqa: F401,E402

from megatron_k15.arguments import (  # noqa: E402
    ArgumentError, add_grading_args, check_grading_args, parse_args,
)
from megatron_k15.data.tokenizer import add_chat_template_args  # noqa: E402
from megatron_k15.partial_results import resume_problem  # noqa: E402
from megatron_k15.rewards.judge import add_judge_args, check_judge_args, judge_from_args  # noqa: E402
from megatron_k15.rl.tools import add_tool_args, check_tool_args  # noqa: E402


def add_eval_args(p) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--input", required=True, help="prompt JSONL (id, prompt, task, answer|tests)")
    g.add_argument("--output", required=True, help="per-problem results JSONL")
    g.add_argument("--n-samples", type=int, default=1)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (use > 0 with --n-samples > 1)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--max-new-tokens", type=int, default=512)
    g.add_argument("--batch-size", type=int, default=32, help="most requests decoded together")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--stop", nargs="+", default=None, metavar="STRING",
                   help="end a response once its text contains one of these (few-shot prompts of a base "
                        "model: e.g. '\\n\\nQuestion:'); the response is graded up to it")
    add_tool_args(g)
    g.add_argument("--chunk-size", type=int, default=256,
                   help="problems per pass of the engine; each finished pass is kept in OUTPUT.partial")
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted run: skip the problems already in OUTPUT.partial")
    add_grading_args(g)
    add_chat_template_args(g)
    add_judge_args(p.add_argument_group("generative reward model (judge)"))


def _validate(args) -> None:
    if not args.load:
        raise ArgumentError("--load CKPT is required")
    if not os.path.isfile(args.input):
        raise ArgumentError(f"--input {args.input}: file not found")
    check_grading_args(args)
    problem = check_judge_args(args) or check_tool_args(args, stop_flag="--stop")
    if problem:
        raise ArgumentError(problem)
    if args.n_samples < 1:
        raise ArgumentError("--n-samples must be >= 1")
    if args.chunk_size < 1:
        raise ArgumentError(f"--chunk-size must be >= 1, got {args.chunk_size}")
    problem = resume_problem(args.output, args.resume)
    if problem:
        raise ArgumentError(problem)
    if args.n_samples > 1 and args.temperature == 0:
        raise ArgumentError("--n-samples > 1 needs --temperature > 0 (greedy samples are identical)")
    if args.inference_engine == "recompute" and (args.pipeline_model_parallel_size > 1
                                                 or args.context_parallel_size > 1):
        raise ArgumentError("--inference-engine recompute supports tensor parallelism only; use "
                            "--inference-engine paged with --pipeline-model-parallel-size > 1 or "
                            "--context-parallel-size > 1")


def partial_mismatch(records: list[dict], n_samples: int):
    """How a kept result differs from the input's problem at its index (``partial_results``)."""
    def mismatch(i: int, r: dict):
        if records[i]["id"] != r.get("id"):
            return "id", f"problem {i} is {r.get('id')!r} there, {records[i]['id']!r} in --input: the input " \
                         "changed since; delete the file to start over"
        if not isinstance(r.get("samples"), list) or len(r["samples"]) != n_samples:
            return "samples", f"not {n_samples} samples: the run had another --n-samples; resume with it, or " \
                              "delete the file to start over"
        return None
    return mismatch


def result_line(rec: dict, p: dict) -> str:
    return json.dumps({"id": rec["id"], "index": p["index"], "task": rec.get("task"), "prompt": rec["prompt"],
                       "samples": p["samples"], "num_correct": sum(s["correct"] for s in p["samples"])}) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv, "Evaluate pass@k with verifiable rewards", add_eval_args, _validate,
                      groups=("model", "parallel", "precision", "checkpoint", "inference"))
    from megatron_k15.data.prompts import DataError, read_prompt_records
    from megatron_k15.checkpointing import tokenizer_dir
    from megatron_k15.data.tokenizer import TokenizerError, chat_template_problem, encode_prompt, load_tokenizer

    try:
        records = list(read_prompt_records(args.input))
        tokenizer = load_tokenizer(args.tokenizer or tokenizer_dir(args.load))
        problem = chat_template_problem(args, tokenizer)
        if problem:
            raise TokenizerError(problem)
    except (DataError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import torch.distributed as dist

    from megatron_k15.generation.loading import cp_decodes_together, load_generation_replica, request_split
    from megatron_k15.initialize import destroy, initialize_parallel_from_args, set_seed
    from megatron_k15.rewards.reasoning import parse_reasoning_tags, reasoning_tags_warning
    from megatron_k15.files import atomic_file
    from megatron_k15.partial_results import append_lines, finish, resume_from
    from megatron_k15.rl.evaluation import evaluate, evaluation_metrics
    from megatron_k15.rl.tools import tool_use_from_args
    from megatron_k15.rl.task_metrics import task_of, tasks_of

    initialize_parallel_from_args(args)
    set_seed(args.seed)
    cfg = args.model_config
    prompt_ids = [encode_prompt(tokenizer, r["prompt"], args) for r in records]
    model, generator = load_generation_replica(args, cfg, max_batch_size=args.batch_size,
                                               max_sequence_length=max(map(len, prompt_ids), default=0)
                                               + args.max_new_tokens)
    # the judge decodes as the policy does: cp-sharded when its cp ranks share the requests
    judge = judge_from_args(args, max_batch_size=args.batch_size,
                            shard_kv_over_cp=cp_decodes_together(cfg, args.context_parallel_size))
    eos = cfg.eos_ids() or ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
    tags = parse_reasoning_tags(args.reasoning_tags)
    warning = reasoning_tags_warning(tokenizer, tags)
    if warning and dist.get_rank() == 0:
        print(warning, file=sys.stderr)
    # every rank of a replica gets the sampled tokens; problems are split over the data-parallel
    # replicas (and over their cp ranks when a sliding-window or sinks model decodes them apart)
    split_rank, split_size, split_group = request_split(args, cfg)
    tools = tool_use_from_args(args, tokenizer, split_rank)  # (the ranks of one split_rank decode together)
    try:
        partial, done = resume_from(args.output, len(records), partial_mismatch(records, args.n_samples),
                                    writer=dist.get_rank() == 0)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        destroy()
        return 2
    todo = [i for i in range(len(records)) if i not in done]
    if done and dist.get_rank() == 0:
        print(f"[evaluate] resuming: {len(done)} of {len(records)} problems done in {partial}", flush=True)
    for start in range(0, len(todo), args.chunk_size):
        chunk = todo[start:start + args.chunk_size]
        res = evaluate(model, tokenizer, [records[i] for i in chunk], [prompt_ids[i] for i in chunk],
                       max_new_tokens=args.max_new_tokens, eos_ids=eos,
                       dp_rank=split_rank, dp_size=split_size, dp_group=split_group, n_samples=args.n_samples,
                       temperature=args.temperature, top_p=args.top_p, seed=args.seed, batch_size=args.batch_size,
                       generator=generator, reasoning_tags=tags, judge=judge, reward_workers=args.reward_workers,
                       numbers=chunk, stop_strings=args.stop, tools=tools)
        if dist.get_rank() == 0:
            append_lines(partial, [result_line(records[p["index"]], p) for p in res["results"]])
        for p in res["results"]:
            done[p["index"]] = p
        if dist.get_rank() == 0:
            print(f"[evaluate] {len(done)}/{len(records)} problems", flush=True)
    if dist.get_rank() == 0:
        results = [done[i] for i in range(len(records))]
        with atomic_file(args.output) as f:
            f.writelines(result_line(rec, p) for rec, p in zip(records, results))
        summary = evaluation_metrics([{**p, "task": task_of(rec)} for rec, p in zip(records, results)],
                                     args.n_samples, tasks_of(records), judge is not None)
        summary.update(n_problems=len(records), n_samples=args.n_samples, checkpoint=args.load,
                       generation_tokens_per_s=generator.stats.tokens_per_second)
        with atomic_file(os.path.splitext(args.output)[0] + ".summary.json") as f:
            json.dump(summary, f, indent=2)
        finish(partial)  # after the output: an interruption before this resumes with nothing to do
        print(" | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()))
    destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
