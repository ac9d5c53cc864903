"""Kimi k1.5 reinforcement learning: online mirror descent with verifiable rewards.

    torchrun --nproc-per-node 8 -m megatron_k15.train_rl --load ckpt/sft --finetune \
        --prompt-data data/prompts --eval-data data/eval --tensor-model-parallel-size 2 \
        --rl-loss omd --rl-tau 0.1 --samples-per-prompt 8 --prompts-per-iter 64 \
        --rollout-max-tokens 8192 --rollout-segment-tokens 2048 --temperature 1.0 \
        --length-penalty-weight 0.1 --length-penalty-start-iter 20 --sampling prioritized \
        --updates-per-iter 2 --train-iters 500 --lr 1e-6 --save ckpt/rl --save-interval 10 \
        --tensorboard-dir runs/rl

Each iteration: sample prompts (uniform / curriculum / prioritised), roll out k responses per
prompt with the current policy (at most --rollout-segment-tokens new tokens per trajectory and
iteration; unfinished ones wait in the replay buffer), score finished ones with the reward of
their ``task`` plus the length penalty, and take --updates-per-iter optimizer steps of the
surrogate (DESIGN.md section 3). The reference policy is the iteration's starting policy, so
no reference model is kept (GRPO's optional KL may use a frozen one instead: ``--ref-load``).
``--load`` resumes exactly (weights, optimizer, RNG, sampler, replay buffer); start from an
SFT/converted checkpoint with ``--load DIR --finetune``.

Any tp x pp x cp x dp layout takes the same update as one rank (``rl/trainer.py``): the dp x cp
ranks generate whole groups (tp ranks decode together, pp stages pass hidden states), the
trajectories are all-gathered, and training zigzag-splits every sequence over the cp group
(ring attention; the path to 128K-token trajectories) and runs 1F1B over the pipeline.

Every trajectory (prompt + at most --rollout-max-tokens response tokens) must fit the model's
max_position_embeddings and, when given, --seq-length: the prompt lengths are checked while the
arguments are validated (before any work), and a prompt set that does not fit is an error
naming the flags (drop long prompts with ``tools/preprocess_data.py --mode prompts
--seq-length N``).

``--rl-loss grpo|ppo|gspo|cispo`` are the baselines (``rl/losses.py``), with ``--clip-eps`` /
``--clip-eps-high`` (DAPO's clip-higher; CISPO's weight truncation). ``--rollout-is-cap`` corrects for the difference
between the engine's and the training forward's log-probs (truncated importance sampling;
the difference is logged as ``rollout_logp_abs_diff`` / ``rollout_kl`` either way), and
``--skip-zero-advantage`` does not train on groups whose samples all got the same reward.
``--use-dynamic-batch-size --max-tokens-per-gpu N`` packs trajectories into microbatches of at
most N tokens per rank instead of padding --micro-batch-size of them to the longest.

``--reward-model-load DIR``: a generative reward model (Kimi's chain-of-thought RM; any
checkpoint of this codebase, e.g. a converted instruct model) regrades math answers the
rule-based verifier rejects (``--reward-model-mode fallback``) or every answer of its tasks
(``replace``); it runs greedily on the same engine and layout as the policy
(``rewards/judge.py``), and its call counts are logged as ``judge_*``.

``--exit-signal-handler`` (SIGTERM / SIGUSR1), ``--exit-duration-in-mins`` and
``--exit-interval`` (``exit_conditions.py``): the run finishes its current iteration, saves a
checkpoint (with --save) and exits 0, so a requeued job (Slurm) resumes from ``latest``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from megatron_k15.arguments import (ArgumentError, _flag, add_grading_args, check_grading_args,
                                    parse_args)
from megatron_k15.data.blend import Blend, BlendError, open_prompt_data, parse_blend
from megatron_k15.rewards.judge import add_judge_args, check_judge_args, judge_from_args
from megatron_k15.rl.losses import ADVANTAGE_ESTIMATORS, LOSS_AGG_MODES, LOSSES
from megatron_k15.rl.rollout_log import add_rollout_log_args, check_rollout_log_args
from megatron_k15.rl.tools import add_tool_args, check_tool_args


def add_rl_args(p) -> None:
    # --fp16: Megatron-LM's 2^32 start costs about two skipped updates per halving (hysteresis 2)
    # on the way down to a usable scale; SFT takes hundreds of updates, RL makes a few per
    # iteration of costly rollouts. Start where torch's GradScaler does.
    p.set_defaults(initial_loss_scale=2.0 ** 16)
    g = p.add_argument_group("reinforcement learning")
    g.add_argument("--prompt-data", required=True, nargs="+", metavar="PREFIX",
                   help="prefix(es) from preprocess_data.py --mode prompts (several are concatenated; prompt "
                        "ids unique across them), or WEIGHT PREFIX pairs: each set then gets that share of "
                        "every iteration's prompts, with its own --sampling state")
    g.add_argument("--eval-data", default=None, nargs="+", metavar="PREFIX",
                   help="held-out prompt prefix(es), evaluated greedily")
    g.add_argument("--eval-interval", type=int, default=0, help="also evaluate every N iterations")
    g.add_argument("--eval-max-tokens", type=int, default=None, help="default: --rollout-max-tokens")
    g.add_argument("--eval-temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--eval-samples", type=int, default=1, help="samples per problem (mean pass@1, pass@k)")
    g.add_argument("--rl-loss", choices=list(LOSSES), default="omd",
                   help="omd: Kimi k1.5's online mirror descent; baselines: grpo, ppo (advantage r - mean, "
                        "Dr. GRPO's), gspo (sequence-level ratio), cispo (MiniMax-M1's: every token's gradient "
                        "kept, its importance weight clipped)")
    g.add_argument("--rl-tau", type=float, default=0.1, help="KL weight tau of the OMD surrogate")
    g.add_argument("--exact-logz", action="store_true", help="baseline tau*log mean exp(r/tau) instead of mean r")
    g.add_argument("--clip-eps", type=float, default=None,
                   help="ratio clip of grpo/ppo/gspo: [1 - eps, 1 + eps] (default 0.2; gspo 3e-4); cispo: the lower "
                        "bound 1 - eps of its weight alone (default 1: none)")
    g.add_argument("--clip-eps-high", type=float, default=None,
                   help="upper clip 1 + eps_high (DAPO's clip-higher, e.g. 0.28; default --clip-eps; gspo 4e-4; "
                        "cispo 0.28)")
    g.add_argument("--loss-agg-mode", choices=LOSS_AGG_MODES, default="token-mean",
                   help="grpo/ppo/cispo: how token terms are averaged; token-mean: over all response tokens of the update "
                        "(DAPO's; long responses weigh more); seq-mean-token-mean: each response's token mean, then "
                        "the mean over responses (the GRPO paper's; with partial rollouts a response's tokens are "
                        "those trained on in this iteration, its last segment unless --include-old-segments); "
                        "seq-mean-token-sum-norm: each response's token sum over --rollout-max-tokens, then the mean "
                        "over responses (Dr. GRPO's: no length bias)")
    g.add_argument("--advantage-estimator", choices=("auto",) + ADVANTAGE_ESTIMATORS, default="auto",
                   help="grpo/ppo/gspo/cispo: advantages from the samples of a prompt; group-norm: (r - mean) / std "
                        "(GRPO's); group-mean: r - mean (Dr. GRPO's, with --loss-agg-mode seq-mean-token-sum-norm); "
                        "rloo: r minus the mean of the others (REINFORCE leave-one-out); auto: group-norm for grpo, "
                        "gspo and cispo, group-mean for ppo")
    g.add_argument("--kl-coef", type=float, default=0.0,
                   help="GRPO's per-token k3 KL weight (e.g. 0.04 in DeepSeekMath, 0.001 in verl's examples); "
                        "the KL is to --ref-load's model, or to the iteration's starting policy without it")
    g.add_argument("--ref-load", default=None, metavar="DIR",
                   help="GRPO's fixed KL reference: a checkpoint (usually the SFT model --load started from; any "
                        "tp/pp layout) kept frozen next to the policy (one more copy of the weights); give it again "
                        "when resuming. Logs ref_kl, the k3 estimate of KL(pi_i || pi_ref)")
    g.add_argument("--samples-per-prompt", type=int, default=8)
    g.add_argument("--prompts-per-iter", type=int, default=16)
    g.add_argument("--rollout-max-tokens", type=int, default=256)
    g.add_argument("--rollout-segment-tokens", type=int, default=0, help="0: no partial rollouts")
    g.add_argument("--rollout-batch-size", type=int, default=64)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--length-penalty-weight", type=float, default=0.0)
    g.add_argument("--length-penalty-start-iter", type=int, default=0)
    g.add_argument("--repeat-penalty", type=float, default=0.0)
    add_grading_args(g)
    add_rollout_log_args(g)
    g.add_argument("--overlap-grading", action=argparse.BooleanOptionalAction, default=True,
                   help="grade each response (with --reward-workers threads) as soon as it is complete, "
                        "while the engine still decodes the others; --no-overlap-grading grades them all "
                        "after the rollout (the grades are the same)")
    g.add_argument("--no-repeat-detection", action="store_true")
    g.add_argument("--stop-strings", nargs="+", default=None, metavar="STRING",
                   help="end a rollout once its text contains one of these (R1-Zero-style templates from a "
                        "base model: '</answer>'); it is finished (stop reason 'stop'), trained on with the "
                        "tokens that spelt it, and graded on the text before it")
    add_tool_args(g)
    g.add_argument("--sampling", choices=["uniform", "curriculum", "prioritized"], default="uniform")
    g.add_argument("--curriculum-switch-iter", type=int, default=0)
    g.add_argument("--curriculum-threshold", type=float, default=None)
    g.add_argument("--prioritized-floor", type=float, default=0.05)
    g.add_argument("--updates-per-iter", type=int, default=1)
    g.add_argument("--use-dynamic-batch-size", action="store_true",
                   help="pack trajectories into training microbatches of at most --max-tokens-per-gpu tokens "
                        "per rank (no padding; replaces --micro-batch-size for the RL step)")
    g.add_argument("--max-tokens-per-gpu", type=int, default=None,
                   help="token budget of a packed microbatch per rank (x --context-parallel-size per "
                        "microbatch); a longer trajectory gets a microbatch of its own. Memory: "
                        "tools/plan_memory.py --max-tokens-per-gpu N")
    g.add_argument("--overlong-buffer-tokens", type=int, default=0,
                   help="DAPO's soft overlong punishment: responses in the last N tokens of "
                        "--rollout-max-tokens lose up to --overlong-penalty-factor, linearly (0: off)")
    g.add_argument("--overlong-penalty-factor", type=float, default=1.0)
    g.add_argument("--overlong-filter", action="store_true",
                   help="DAPO's overlong filtering: do not train on responses cut off by --rollout-max-tokens")
    g.add_argument("--dynamic-sampling", action="store_true",
                   help="DAPO's dynamic sampling: groups whose samples all got the same reward are dropped, and "
                        "further rounds of --prompts-per-iter fresh prompts are rolled out until --prompts-per-iter "
                        "groups with differing rewards are in hand (at most --dynamic-sampling-max-rounds rounds); "
                        "the update trains on exactly those")
    g.add_argument("--dynamic-sampling-max-rounds", type=int, default=None,
                   help="with --dynamic-sampling: rollout rounds per iteration at most (default 4); when they run "
                        "out the update trains on the groups it has (logged: sampling_rounds, kept_groups)")
    g.add_argument("--skip-zero-advantage", action="store_true",
                   help="do not train on groups whose samples all got the same reward (no gradient at the "
                        "first update: the same update, cheaper; with --updates-per-iter > 1 their KL term "
                        "in later updates is dropped)")
    g.add_argument("--rollout-is-cap", type=float, default=None,
                   help="truncated importance sampling: weight each token's policy gradient by "
                        "min(pi_train / pi_rollout, CAP) (rollout/training numerics mismatch; e.g. 2)")
    g.add_argument("--keep-optimizer-state", action="store_true", help="do not reset Adam each iteration")
    g.add_argument("--include-old-segments", action="store_true",
                   help="train on tokens that earlier iterations generated too")
    g.add_argument("--replay-buffer-size", type=int, default=0)
    g.add_argument("--replay-max-age", type=int, default=0)
    add_judge_args(p.add_argument_group("generative reward model (judge)"))


def _validate(args) -> None:
    if args.stop_strings is not None and any(not s for s in args.stop_strings):
        raise ArgumentError("--stop-strings: every stop string must be non-empty")
    if args.train_samples is not None:
        raise ArgumentError("--train-samples: RL iterations are rollout batches (--prompts-per-iter x "
                            "--samples-per-prompt); give --train-iters")
    if args.train_iters is None or args.train_iters < 1:
        raise ArgumentError("--train-iters (the number of RL iterations) must be >= 1")
    if args.lr is None:
        raise ArgumentError("--lr is required")
    if not args.load:
        where = f" (--load {args.load_missing} holds no checkpoint yet)" if getattr(args, "load_missing", None) else ""
        raise ArgumentError(f"--load is required{where}: RL starts from a converted or SFT checkpoint "
                            "(add --finetune the first time)")
    problem = check_rollout_log_args(args) or check_tool_args(args)
    if problem:
        raise ArgumentError(problem)
    pp, cp = args.pipeline_model_parallel_size, args.context_parallel_size
    # (no check_decode_layout: the cp ranks generate their own requests, each with a whole KV
    # cache, so sliding windows and sinks decode under any cp size)
    if getattr(args, "inference_engine", "paged") == "recompute" and (pp > 1 or cp > 1):
        raise ArgumentError("--inference-engine recompute runs without pipeline or context parallelism; "
                            "use --inference-engine paged")
    for flag in ("samples_per_prompt", "prompts_per_iter", "rollout_max_tokens", "updates_per_iter",
                 "rollout_batch_size"):
        if getattr(args, flag) < 1:
            raise ArgumentError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.rollout_segment_tokens < 0:
        raise ArgumentError("--rollout-segment-tokens must be >= 0")
    if args.temperature <= 0:
        raise ArgumentError("--temperature must be > 0 for RL rollouts (exploration)")
    if args.rl_tau <= 0 and args.rl_loss == "omd":
        raise ArgumentError("--rl-tau must be > 0")
    for flag in ("clip_eps", "clip_eps_high"):
        value = getattr(args, flag)
        if value is None:
            continue
        name = "--" + flag.replace("_", "-")
        if args.rl_loss == "omd":
            raise ArgumentError(f"{name}: --rl-loss omd has no ratio clipping (its KL term keeps the update "
                                "close to the rollout policy); drop the flag or pick --rl-loss grpo|ppo|gspo|cispo")
        if flag == "clip_eps_high":
            if value < 0:
                raise ArgumentError(f"{name} must be >= 0")
        elif args.rl_loss == "cispo":  # a weight's lower bound 1 - eps: 1 leaves none
            if not 0 <= value <= 1:
                raise ArgumentError(f"{name} must be in [0, 1] for --rl-loss cispo (1: no lower bound)")
        elif not 0 <= value < 1:
            raise ArgumentError(f"{name} must be in [0, 1)")
    if args.dynamic_sampling_max_rounds is not None:
        if not args.dynamic_sampling:
            raise ArgumentError("--dynamic-sampling-max-rounds only applies with --dynamic-sampling; add it")
        if args.dynamic_sampling_max_rounds < 1:
            raise ArgumentError(f"--dynamic-sampling-max-rounds must be >= 1, got {args.dynamic_sampling_max_rounds}")
    elif args.dynamic_sampling:
        args.dynamic_sampling_max_rounds = 4
    if args.dynamic_sampling and args.rollout_segment_tokens:
        raise ArgumentError("--dynamic-sampling keeps whole groups scored in one iteration; with partial rollouts "
                            "(--rollout-segment-tokens) a group's samples finish in different iterations: "
                            "drop one of the two flags")
    if args.loss_agg_mode != "token-mean" and args.rl_loss not in ("grpo", "ppo", "cispo"):
        raise ArgumentError(f"--loss-agg-mode applies to the token-level losses (grpo, ppo, cispo); --rl-loss "
                            f"{args.rl_loss} averages over responses already: drop the flag")
    if args.advantage_estimator != "auto" and args.rl_loss == "omd":
        raise ArgumentError(f"--advantage-estimator {args.advantage_estimator} applies to grpo/ppo/gspo/cispo; OMD's "
                            "baseline is the group mean (or --exact-logz): drop the flag")
    if args.exact_logz and args.rl_loss != "omd":
        raise ArgumentError(f"--exact-logz sets OMD's baseline (tau log mean exp(r / tau)); --rl-loss {args.rl_loss} "
                            "uses the group mean: drop the flag")
    if args.skip_zero_advantage and args.ref_load is not None:
        raise ArgumentError("--skip-zero-advantage skips groups that have no gradient, but with --ref-load the KL to "
                            "the fixed reference pulls on every group: drop one of the two flags")
    if args.kl_coef < 0:
        raise ArgumentError(f"--kl-coef must be >= 0, got {args.kl_coef}")
    if args.kl_coef and args.rl_loss != "grpo":
        raise ArgumentError(f"--kl-coef is GRPO's KL term; --rl-loss {args.rl_loss} has none"
                            + (" (OMD's --rl-tau weighs its KL to the iteration's starting policy)"
                               if args.rl_loss == "omd" else "") + ": drop the flag or use --rl-loss grpo")
    if args.ref_load is not None:
        if not args.kl_coef:
            raise ArgumentError("--ref-load is the reference of GRPO's KL term: add --kl-coef > 0 (with "
                                "--rl-loss grpo), or drop --ref-load")
        from megatron_k15.checkpointing import CheckpointError, is_hf_model_dir, load_config, resolve_checkpoint_dir

        hf = is_hf_model_dir(args.ref_load)
        try:
            if hf:  # its config and tensors, before any work
                load_config(args.ref_load)
            else:
                resolve_checkpoint_dir(args.ref_load, "--ref-load")
        except CheckpointError as e:
            raise ArgumentError(f"--ref-load: {e}" if hf else str(e)) from None
    if not 0 <= args.overlong_buffer_tokens <= args.rollout_max_tokens:
        raise ArgumentError(f"--overlong-buffer-tokens must be in [0, --rollout-max-tokens "
                            f"{args.rollout_max_tokens}], got {args.overlong_buffer_tokens}")
    if args.use_dynamic_batch_size and args.max_tokens_per_gpu is None:
        raise ArgumentError("--use-dynamic-batch-size needs --max-tokens-per-gpu N (the token budget of a "
                            "packed microbatch per rank)")
    if args.max_tokens_per_gpu is not None:
        if not args.use_dynamic_batch_size:
            raise ArgumentError("--max-tokens-per-gpu only applies with --use-dynamic-batch-size; add it")
        if args.max_tokens_per_gpu < 1:
            raise ArgumentError(f"--max-tokens-per-gpu must be >= 1, got {args.max_tokens_per_gpu}")
    if args.rollout_is_cap is not None and args.rollout_is_cap < 1:
        raise ArgumentError(f"--rollout-is-cap must be >= 1 (a weight cap; 1 would truncate every token "
                            f"the trainer finds likelier than the engine did), got {args.rollout_is_cap}")
    check_grading_args(args)
    problem = check_judge_args(args)
    if problem:
        raise ArgumentError(problem)
    args.prompt_weights = None
    for flag in ("prompt_data", "eval_data"):
        values = getattr(args, flag)
        if values is None:
            continue
        try:
            blend = parse_blend(values, _flag(flag), allow_weights=flag == "prompt_data")
        except BlendError as e:
            why = " (evaluation covers every prompt once)" if flag == "eval_data" else ""
            raise ArgumentError(f"{e}{why}") from None
        setattr(args, flag, blend.prefixes)  # WEIGHT PREFIX pairs: the weights go to the sampler
        if flag == "prompt_data" and blend.weights is not None and len(blend.prefixes) > 1:
            args.prompt_weights = blend.weights
        prefixes = blend.prefixes
        for prefix in prefixes:
            if not os.path.exists(prefix + ".json"):
                raise ArgumentError(f"{_flag(flag)} {prefix}: no {prefix}.json "
                                    "(run tools/preprocess_data.py --mode prompts)")
    gen_ranks = args.data_parallel_size * cp
    if args.prompts_per_iter < gen_ranks:
        raise ArgumentError(
            f"--prompts-per-iter {args.prompts_per_iter} is smaller than the {gen_ranks} generation-parallel "
            f"ranks (data parallel {args.data_parallel_size} x --context-parallel-size {cp}), each of which "
            f"rolls out whole prompts; use --prompts-per-iter >= {gen_ranks}")
    _check_prompt_lengths(args, gen_ranks)


def _check_prompt_lengths(args, gen_ranks: int) -> None:
    """Prompt + --rollout-max-tokens must fit max_position_embeddings and --seq-length (when
    given); eval prompts + their budget must fit max_position_embeddings. The prompt lengths
    come from the datasets' index (no token data is read). Sets ``args.longest_sequence``."""
    max_pos = args.model_config.max_position_embeddings
    checks = [("prompt_data", args.rollout_max_tokens, "--rollout-max-tokens", True)]
    args.longest_sequence = 0  # the longest trained prompt + budget (LongRoPE's choice of factors)
    if args.eval_data:
        checks.append(("eval_data", args.eval_max_tokens or args.rollout_max_tokens,
                       "--eval-max-tokens" if args.eval_max_tokens else "--rollout-max-tokens", False))
    for flag, budget, budget_flag, trained in checks:
        prefix = " ".join(getattr(args, flag))
        try:
            data = open_prompt_data(getattr(args, flag), _flag(flag))
        except (OSError, ValueError) as e:
            raise ArgumentError(f"--{flag.replace('_', '-')} {prefix}: {e}") from None
        if len(data) == 0:
            raise ArgumentError(f"--{flag.replace('_', '-')} {prefix} holds no prompts")
        if flag == "eval_data" and len(data) < gen_ranks:
            raise ArgumentError(f"--eval-data {prefix} holds {len(data)} prompts, fewer than the {gen_ranks} "
                                "generation-parallel ranks (data parallel x --context-parallel-size); "
                                "give it more prompts")
        limits = [(max_pos, f"the model's max_position_embeddings {max_pos}")]
        if trained and args.seq_length is not None:
            limits.append((args.seq_length, f"--seq-length {args.seq_length}"))
        limit, what = min(limits)
        lengths = [int(n) for n in data.lengths]
        if trained:  # (evaluation runs on the same model: its budget does not choose)
            args.longest_sequence = max(args.longest_sequence, max(lengths) + budget)
        too_long = [i for i, n in enumerate(lengths) if n + budget > limit]
        if too_long:
            i = max(too_long, key=lambda j: lengths[j])
            rid = data.records[i].get("id", i)
            raise ArgumentError(
                f"--{flag.replace('_', '-')} {prefix}: {len(too_long)} of {len(lengths)} prompts do not fit: "
                f"prompt + {budget_flag} {budget} must be <= {what}; the longest (id {rid!r}) has "
                f"{lengths[i]} tokens. Lower {budget_flag} to {max(0, limit - lengths[i])}"
                + (", raise --seq-length" if trained and args.seq_length is not None and limit == args.seq_length
                   else "")
                + f", or drop long prompts (tools/preprocess_data.py --mode prompts --seq-length "
                  f"{max(1, limit - budget)})")


def main(argv=None) -> int:
    start_time = time.time()
    args = parse_args(argv, "Kimi k1.5 RL with megatron_k15", add_rl_args, _validate,
                      groups=("model", "parallel", "precision", "training", "checkpoint", "inference"))
    import torch.distributed as dist

    from megatron_k15.async_save import AsyncCheckpointSaver
    from megatron_k15.checkpointing import load_checkpoint, load_options, save_checkpoint, save_options, tokenizer_dir
    from megatron_k15.data.tokenizer import load_tokenizer
    from megatron_k15.exit_conditions import ExitConditions
    from megatron_k15.flops import format_throughput
    from megatron_k15.initialize import destroy, initialize_megatron
    from megatron_k15.parallel.data import lr_schedule
    from megatron_k15.manual_gc import ManualGC
    from megatron_k15.profiling import StepProfiler
    from megatron_k15.rl.evaluation import evaluate
    from megatron_k15.rl.sampling import build_sampler
    from megatron_k15.rl.trainer import RLIteration, generation_parallel
    from megatron_k15.training import MetricsLogger, build_train_context

    initialize_megatron(args)
    exits = ExitConditions(args, start_time)  # from here on a signal waits for an iteration's end
    cfg = args.model_config
    ctx = build_train_context(args, cfg, seed=args.seed)
    # Adam's moments are reset every iteration unless --keep-optimizer-state: not saved then
    iteration, extra = load_checkpoint(args.load, ctx, **load_options(args),
                                       need_optimizer_moments=args.keep_optimizer_state)
    rank = dist.get_rank()
    tok_spec = args.tokenizer or tokenizer_dir(args.load)
    tokenizer = load_tokenizer(tok_spec)

    data = open_prompt_data(args.prompt_data, "--prompt-data")
    records = [dict(r) for r in data.records]
    prompt_ids = [list(map(int, data[i].prompt_ids)) for i in range(len(data))]
    sizes = [b - a for a, b in zip(data.offsets, data.offsets[1:])] if hasattr(data, "offsets") else [len(data)]
    sampler = build_sampler(args.sampling, records, seed=args.seed, switch_iter=args.curriculum_switch_iter,
                            threshold=args.curriculum_threshold, floor=args.prioritized_floor,
                            sizes=sizes, weights=args.prompt_weights)
    gen_rank, gen_size, gen_group = generation_parallel(ctx.pc)
    judge = judge_from_args(args, rank=gen_rank, size=gen_size, group=gen_group)
    rl = RLIteration(ctx, args, tokenizer, records, prompt_ids, judge=judge)
    if "sampler" in extra:
        sampler.load_state_dict(extra["sampler"])
    rl.load_state_dict(extra)

    eval_set = None
    if args.eval_data:
        ev = open_prompt_data(args.eval_data, "--eval-data")
        eval_set = ([dict(r) for r in ev.records], [list(map(int, ev[i].prompt_ids)) for i in range(len(ev))])

    collector = ManualGC(args)

    def run_eval() -> dict:
        # prompts split over the generation-parallel (dp x cp) ranks; tp ranks and pp stages
        # decode together through rl.generator (its pp group), so every rank gets the results
        with collector.around_eval():
            return _eval_metrics()

    def _eval_metrics() -> dict:
        res = evaluate(ctx.model, tokenizer, eval_set[0], eval_set[1],
                       max_new_tokens=args.eval_max_tokens or args.rollout_max_tokens, eos_ids=rl.eos_ids,
                       dp_rank=gen_rank, dp_size=gen_size, dp_group=gen_group,
                       n_samples=args.eval_samples, temperature=args.eval_temperature, seed=args.seed,
                       batch_size=args.rollout_batch_size, generator=rl.generator,
                       reasoning_tags=rl.reasoning_tags, judge=judge, reward_workers=args.reward_workers,
                       stop_strings=args.stop_strings, tools=rl.settings.tools)
        rl.generator.release()
        m = {"eval_accuracy": res["accuracy"], "eval_response_length_mean": res["response_length_mean"]}
        m.update({f"eval_{k}": v for k, v in res.items() if k.startswith(("judge_", "pass@", "maj@"))})
        # per task: {task}/eval_accuracy, next to the task's training metrics in TensorBoard
        m.update({k.replace("/", "/eval_", 1): v for k, v in res.items() if "/" in k})
        return m

    logger = MetricsLogger.for_run(args, rank == 0, iteration)
    if rank == 0:
        from megatron_k15.rewards.reasoning import reasoning_tags_warning

        warning = reasoning_tags_warning(tokenizer, rl.reasoning_tags)
        if warning:
            print(f"[train_rl] {warning}", flush=True)
        if any(r.get("task") == "code" for r in records):  # what the code sandbox can hide here
            from megatron_k15.rewards.code import sandbox_report, sandbox_warning

            warning = sandbox_warning(sandbox_report())
            if warning:
                print(f"[train_rl] {warning}", flush=True)
        mix = "" if args.prompt_weights is None else \
            f" ({Blend(args.prompt_data, args.prompt_weights).describe(sizes, 'prompts')})"
        print(f"[train_rl] {cfg.num_parameters() / 1e6:.2f}M parameters, {len(records)} prompts{mix}, "
              f"loss={args.rl_loss}, tp={ctx.pc.tp_size} pp={ctx.pc.pp_size} cp={ctx.pc.cp_size} "
              f"dp={ctx.pc.dp_size}, start at iteration {iteration}"
              + (f", LongRoPE {ctx.model.longrope_factors} factors" if ctx.model.longrope_factors else ""), flush=True)
    if eval_set is not None and iteration == 0:
        m = run_eval()
        logger.log(0, m)
        if rank == 0:
            print(f"[train_rl] eval before RL: accuracy {m['eval_accuracy']:.3f}", flush=True)

    saved_at = iteration
    schedule = lr_schedule(args)

    def save() -> None:
        save_checkpoint(args.save, iteration, ctx, {"sampler": sampler.state_dict(), **rl.state_dict()},
                        save_optimizer_moments=args.keep_optimizer_state, async_saver=saver, **save_options(args))

    saver = AsyncCheckpointSaver() if args.async_save else None

    profiler = StepProfiler(args, rank)
    collector.start()
    while iteration < args.train_iters:
        with profiler.iteration(iteration):
            t0 = time.time()
            lr = schedule(iteration)
            indices = sampler.sample(args.prompts_per_iter, iteration)
            metrics = rl.run(iteration, indices, lr, draw_prompts=(lambda n, it=iteration: sampler.sample(n, it))
                             if args.dynamic_sampling else None)
            ids_by_prompt = {r["id"]: i for i, r in enumerate(records)}
            if rl.last_success:
                pids = [ids_by_prompt[p] for p in rl.last_success]
                sampler.update(pids, [sum(v) / len(v) for v in rl.last_success.values()])
            metrics["iteration_time_s"] = time.time() - t0  # before the profiler writes a finished window
        iteration += 1
        collector.after_iteration(iteration)
        if eval_set is not None and (iteration == args.train_iters or
                                     (args.eval_interval and iteration % args.eval_interval == 0)):
            metrics.update(run_eval())
        last = iteration == args.train_iters or "eval_accuracy" in metrics
        if last or iteration % (args.tensorboard_log_interval or 1) == 0:  # by default every iteration: each
            if args.log_params_norm:  # is a whole rollout batch, too costly to drop
                metrics["params_norm"] = ctx.optimizer.params_norm()
            logger.log(iteration, metrics)
        if last or iteration % args.log_interval == 0:
            if rank == 0:
                line = (f"[train_rl] iteration {iteration}/{args.train_iters} | reward "
                        f"{metrics.get('reward_mean', 0.0):.3f} | accuracy {metrics.get('accuracy', 0.0):.3f} | "
                        f"length {metrics.get('response_length_mean', 0.0):.1f} | loss {metrics['loss']:.4f} | "
                        f"{metrics['rollout_tokens_per_s']:.0f} rollout tokens/s")
                if "train_tflops_per_gpu" in metrics:
                    line += f" | train {format_throughput(metrics, 'train_')}"
                if "eval_accuracy" in metrics:
                    line += f" | eval accuracy {metrics['eval_accuracy']:.3f}"
                if metrics.get("skipped_updates"):
                    why = (f"fp16 overflow, loss scale now {metrics['loss_scale']:g}" if "loss_scale" in metrics
                           else "non-finite gradient")
                    line += f" | {metrics['skipped_updates']} update(s) skipped: {why}"
                print(line, flush=True)
        if saver is not None:
            saver.maybe_finalize()  # a background save becomes current once every rank has written it
        if args.save and args.save_interval and iteration % args.save_interval == 0:
            save()
            saved_at = iteration
        if exits.stop_after(iteration, args.train_iters, args.save, "train_rl"):
            break
    profiler.close()
    collector.close()
    if args.save and saved_at != iteration:
        save()
    if saver is not None:
        saver.maybe_finalize(blocking=True)
    if args.save and rank == 0:
        from megatron_k15.data.tokenizer import save_tokenizer

        save_tokenizer(tokenizer, os.path.join(args.save, "tokenizer"))
    exits.restore()  # only now: a second signal must not interrupt the final save
    logger.close()
    destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
