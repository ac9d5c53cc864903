"""One Kimi k1.5 RL iteration: sample prompts, roll out k responses each (partial rollouts
through the replay buffer), score them with verifiable rewards (+ length penalty), take the
log-probs of the iteration's starting policy pi_i, then ``--updates-per-iter`` optimizer steps
of online mirror descent (or GRPO / PPO for comparison).

Work split (any tp x pp x cp x dp layout, the same update as one rank):

- Rollouts: generation runs whole sequences on each rank, so the dp x cp ranks form the
  generation-parallel set: each takes whole groups (all k samples of a prompt), tp ranks decode
  the same requests together and pp stages pass hidden states (``GenerationEngine`` with the pp
  group). Trajectories are then all-gathered over dp x cp and put back in their global order,
  so every rank holds the same trajectories, replay buffer, rewards and metrics.
- Training: each dp rank takes the samples of its groups; under context parallelism every
  right-padded (B, T) microbatch is zigzag-split over the cp group (T padded to a multiple of
  ``cp * lcm(2, tp)``), attention runs as ring attention and RoPE uses the original positions.
  OMD's sequence sums S_j are all-reduced over cp (forward sum, backward identity) before the
  nonlinear (S_j - S_old_j)^2; token-level GRPO/PPO sums are partial per cp rank and their token
  count is summed over dp x cp. Losses use ``reduction="sum"`` and are divided by the global
  count (samples for OMD, response tokens for GRPO/PPO); the optimizer sums gradients over
  dp x cp, and pipeline stages run 1F1B with the loss on the last stage.
"""

from __future__ import annotations

import dataclasses
import math
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megatron_k15 import platform
from megatron_k15.flops import device_peak_tflops, forward_flops, throughput_metrics
from megatron_k15.generation.engine import build_generator
from megatron_k15.generation.replay_buffer import ReplayBuffer, Trajectory, loss_mask
from megatron_k15.generation.repetition import RepeatDetector
from megatron_k15.generation.sampling import SamplingParams, request_generator
from megatron_k15.generation.stop_strings import StopStrings, combine_detectors
from megatron_k15.parallel.context import (pad_to_multiple, split_packed_microbatch, zigzag_position_ids,
                                           zigzag_split)
from megatron_k15.profiling import phase
from megatron_k15.rewards.reasoning import (ReasoningTags, grade_responses, parse_reasoning_tags,
                                            prompt_opens_reasoning, response_text)
from megatron_k15.rewards.judge import judge_metrics
from megatron_k15.rl.length_penalty import apply_length_penalty, overlong_penalty
from megatron_k15.rl.losses import (PER_SAMPLE_AGG_MODES, SEQUENCE_LEVEL_LOSSES, clip_range, get_loss_fn,
                                    group_advantages, group_baseline, k3)
from megatron_k15.rl.rollout_log import rollout_rows, write_rollout_log
from megatron_k15.rl.tools import TOOL_STOP_REASON, ToolUse, tool_use_from_args
from megatron_k15.rl.task_metrics import by_task, task_of, tasks_of
from megatron_k15.training import (TrainContext, build_stage_model, forward_only, group_reduce, reduce_sums,
                                   stage_forward, train_step)


@dataclass
class RolloutSettings:
    samples_per_prompt: int = 4
    max_tokens: int = 64  # total response budget of a trajectory
    segment_tokens: int = 0  # new tokens per iteration (partial rollouts); 0 = max_tokens
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 1234
    repeat_detection: bool = True
    batch_size: int = 64  # requests decoded together
    stop: Optional[Callable[[], object]] = None  # --stop-strings (generation.stop_strings.StopStrings)
    tools: Optional[ToolUse] = None  # --tool: calls inside the rollout (rl.tools)
    # a request's key for its sampling seed (default: its group, sample and iteration)
    request_key: Optional[Callable[[Trajectory, int], int]] = None


def _seed_for(traj: Trajectory, iteration: int) -> int:
    """A request's sampling seed: the same on every rank and in every layout."""
    return zlib.crc32(f"{traj.group_id}/{traj.sample_index}/{iteration}".encode())


def _request_seed(traj: Trajectory, iteration: int, s: RolloutSettings) -> int:
    """The seed of the trajectory's next request: its key, and after n tool calls a key of
    its own for each n (the requests that continue after a tool's output)."""
    key = (s.request_key or _seed_for)(traj, iteration)
    calls = traj.extra.get("tool_calls", 0)
    return zlib.crc32(f"{key}/{calls}".encode()) if calls else key


def _segment_stop(t: Trajectory, output_ids: list[int], reason: str, s: RolloutSettings) -> str:
    """A segment's stop reason for its trajectory: "partial" when the segment budget, not the
    whole response budget, ended it (the trajectory goes on in a later iteration)."""
    if reason == "length" and t.response_len + len(output_ids) < s.max_tokens:
        return "partial"
    return reason


def _primed_detectors(trajs: list[Trajectory], factories: list[Optional[Callable[[], object]]]):
    """The engines' per-request detector factory from one factory per trajectory (None: no
    detector), each detector already fed its window (the most tokens it looks back over) of its
    trajectory's earlier tokens: a loop or a stop string that spans a segment boundary is seen
    where one uninterrupted generation sees it (the engines call the factory once per request,
    in order)."""
    if all(f is None for f in factories):
        return None
    if not any(t.response_ids for t in trajs) and all(f is factories[0] for f in factories):
        return factories[0]
    detectors = []
    for t, f in zip(trajs, factories):
        d = f() if f is not None else None
        for tok in (t.response_ids[-d.window:] if d is not None else ()):  # (their verdicts were given)
            d.push(tok)
        detectors.append(d)
    pending = iter(detectors)
    return lambda: next(pending)


@torch.no_grad()
def rollout(generator, trajs: list[Trajectory], iteration: int, s: RolloutSettings, eos_ids: list[int],
            on_final: Optional[Callable[[int, list[int]], None]] = None) -> None:
    """Extend each trajectory by one segment under the current policy. ``generator``: a
    ``generation.engine.GenerationEngine`` (or ``RecomputeGenerator``) on the policy; it
    batches the requests itself (continuous batching, prompt prefill shared by the k samples).
    ``on_final(i, response_ids)``: called as soon as trajectory i has its whole response
    (not for one that stops partial), while the engine still decodes the others.

    With ``s.tools`` (``rl.tools``) a request that writes the tool trigger stops there; the
    tool starts on its response at once (while the engine decodes the others), its output is
    appended (``Trajectory.append_tool_output``) when the engine's round is over, and the
    trajectories that called go on in another round, until none calls. The
    segment budget counts the tool's tokens too (an output goes in whole: a segment can end
    up to one output past it)."""
    params = SamplingParams(s.temperature, s.top_p, s.top_k)
    base = combine_detectors((lambda: RepeatDetector()) if s.repeat_detection else None, s.stop)
    tools = s.tools
    with_tool = combine_detectors(base, tools.trigger) if tools is not None else base
    made = [0] * len(trajs)  # tokens this call added to each trajectory (the segment budget)
    todo = list(range(len(trajs)))
    while True:
        group = [trajs[i] for i in todo]
        budgets = []
        for i, t in zip(todo, group):
            left = s.max_tokens - t.response_len
            budgets.append(max(0, min(left, s.segment_tokens - made[i] if s.segment_tokens else left)))
        detector = _primed_detectors(group, [with_tool if tools is not None and t.extra.get("tool_calls", 0)
                                             < tools.max_calls else base for t in group])

        started = {}  # a call starts as soon as its request stops, while the engine decodes the others

        def on_finish(j, res):
            ids = group[j].response_ids + list(res.output_ids)
            if res.stop_reason == TOOL_STOP_REASON:
                if len(ids) < s.max_tokens:
                    started[j] = tools.runner.submit(tools.tokenizer.decode(ids))
            elif on_final is not None and _segment_stop(group[j], res.output_ids, res.stop_reason, s) != "partial":
                on_final(todo[j], ids)

        results = generator.generate(
            [t.token_ids for t in group], budgets, params,
            [request_generator(s.seed, _request_seed(t, iteration, s)) for t in group], eos_ids, detector,
            **({"on_finish": on_finish} if on_final is not None or tools is not None else {}))  # (a generator may lack it)
        calls, handles = [], []
        for j, (i, t, res) in enumerate(zip(todo, group, results)):
            made[i] += len(res.output_ids)
            if res.stop_reason == TOOL_STOP_REASON and t.response_len + len(res.output_ids) < s.max_tokens:
                t.append_segment(res.output_ids, res.output_logprobs, iteration)
                calls.append(i)  # (started above, unless the generator never calls on_finish)
                handles.append(started[j] if j in started else tools.runner.submit(tools.tokenizer.decode(t.response_ids)))
            elif res.stop_reason == TOOL_STOP_REASON:  # the trigger took the last of the budget
                t.append_segment(res.output_ids, res.output_logprobs, iteration, "length")
                if on_final is not None:
                    on_final(i, list(t.response_ids))
            else:
                t.append_segment(res.output_ids, res.output_logprobs, iteration,
                                 _segment_stop(t, res.output_ids, res.stop_reason, s))
        todo = []
        if calls:
            todo = _insert_tool_outputs(trajs, calls, tools.runner.collect(handles), made, s, on_final)
        # expert parallelism: the ep group's engines serve each other's experts, so they all
        # go round again while any of them has requests to continue (one with none serves)
        if not (generator.any_rank_busy(bool(todo)) if hasattr(generator, "any_rank_busy") else todo):
            break


def _insert_tool_outputs(trajs: list[Trajectory], calls: list[int], outputs: list[str], made: list[int],
                         s: RolloutSettings, on_final) -> list[int]:
    """Append each output of the tool to its trajectory (``calls``: indices); returns those that
    go on (room left in the response and in the segment)."""
    tools, todo = s.tools, []
    for i, text in zip(calls, outputs):
        t = trajs[i]
        t.extra["tool_calls"] = t.extra.get("tool_calls", 0) + 1
        ids = tools.tokenizer.encode(text)[:s.max_tokens - t.response_len]
        t.append_tool_output(ids)
        made[i] += len(ids)
        if t.response_len >= s.max_tokens:
            t.stop_reason = "length"
            if on_final is not None:
                on_final(i, list(t.response_ids))
        elif s.segment_tokens and made[i] >= s.segment_tokens:
            t.stop_reason = "partial"
        else:
            todo.append(i)
    return todo


def score(trajs: list[Trajectory], records: dict, tokenizer, iteration: int, *, length_penalty_weight=0.0,
          length_penalty_start_iter=0, repeat_penalty=0.0, reasoning_tags: Optional[ReasoningTags] = None,
          prompt_open: Optional[Callable[[str], bool]] = None, judge=None,
          judgements: Optional[list] = None, overlong: Optional[tuple[int, int, float]] = None,
          shard: Optional[tuple[int, int, object]] = None, workers: int = 1,
          grades: Optional[list] = None, stop_strings=None) -> tuple[list[float], list[bool]]:
    """Task reward (0/1 by the prompt's verifier), minus a repeat penalty, plus Kimi's length
    reward within each group (plus DAPO's overlong punishment with ``overlong`` = (response
    budget, buffer tokens, factor)). Returns (rewards, correct). With ``reasoning_tags`` the verifier
    grades the answer after the reasoning block, and a response still inside its reasoning
    scores 0 (``rewards.reasoning``); ``prompt_open(prompt_id)``: the prompt opened the block.
    ``judge``: a ``rewards.judge.GenerativeJudge`` that regrades its tasks' answers (a
    collective call: every rank scores the same trajectories); its ``Judgement``s are appended
    to ``judgements`` when given. ``shard`` = (rank, size, process group): the verifier runs
    on every size-th trajectory only and the grades are all-gathered (a collective), so each
    response is graded once (sandboxed code tests are the slow part of an iteration) and every
    rank holds the same grades. ``workers > 1``: this rank's share is graded by that many
    threads (``rewards.reasoning.grade_responses``). ``grades``: (graded text, verifier
    reward) per trajectory already known (graded while the rollout went on), None where not;
    ``stop_strings``: the verifier grades each response before the first of them (``--stop-strings``);
    only those are graded here (the same on every rank)."""
    rank, size, group = shard or (0, 1, None)
    results = list(grades) if grades is not None else [None] * len(trajs)
    todo = [i for i, g in enumerate(results) if g is None]
    share = todo[rank::size]
    jobs = [(response_text(tokenizer, trajs[i].response_ids, stop_strings, reasoning_tags), records[trajs[i].prompt_id],
             reasoning_tags,
             bool(prompt_open and prompt_open(trajs[i].prompt_id))) for i in share]
    mine = grade_responses(jobs, workers)
    if size > 1 and todo:
        parts = [None] * size
        dist.all_gather_object(parts, mine, group=group)
        for j, i in enumerate(todo):
            results[i] = parts[j % size][j // size]
    else:
        for i, g in zip(todo, mine):
            results[i] = g
    graded = [g for g, _ in results]
    verified = [r for _, r in results]
    if judge is not None:
        verified, calls = judge.regrade([records[t.prompt_id] for t in trajs], graded, verified)
        if judgements is not None:
            judgements.extend(calls)
    correct = [r >= 1.0 for r in verified]
    task = [r - (repeat_penalty if t.stop_reason == "repeat" else 0.0) for r, t in zip(verified, trajs)]
    rewards = apply_length_penalty(task, [t.response_len - t.tool_tokens for t in trajs], correct,
                                   [t.group_id for t in trajs], length_penalty_weight, iteration,
                                   length_penalty_start_iter)
    if overlong is not None:
        rewards = [r + p for r, p in zip(rewards, overlong_penalty([t.response_len for t in trajs], *overlong))]
    return list(rewards), correct


def cp_pad_multiple(cp_size: int, tp_size: int = 1, sequence_parallel: bool = False) -> int:
    """What the width T of a (B, T) microbatch must be a multiple of: 2*cp for the zigzag
    split, and the local length T / cp a multiple of tp under sequence parallelism."""
    tp = tp_size if sequence_parallel else 1
    return cp_size * math.lcm(2, tp) if cp_size > 1 else tp


# the per-token tensors of a microbatch; token_mask is 1 on every real token (0 on padding)
_ROW_KEYS = ("input_ids", "labels", "mask", "rollout_logp", "token_mask")


def split_microbatch_for_cp(mb: dict, cp_size: int, cp_rank: int) -> dict:
    """This cp rank's zigzag shard of a right-padded (B, T) microbatch: its per-token tensors
    split along T (``parallel.context.zigzag_split``), plus the original ``position_ids``
    (B, T / cp) for RoPE. Padding sits at the end of each row, so causal attention never shows
    it to a real token, and its mask is 0. Per-sample entries (rewards, ...) are unchanged."""
    if cp_size == 1:
        return mb
    out = dict(mb)
    b, t = mb["input_ids"].shape
    for key in _ROW_KEYS:
        out[key] = zigzag_split(mb[key], 1, cp_size, cp_rank)
    out["position_ids"] = zigzag_position_ids(t, cp_size, cp_rank, device=mb["input_ids"].device)[None].expand(b, -1)
    return out


def _token_rows(t: Trajectory, iteration: int, include_old_segments: bool):
    """One trajectory as next-token rows of n = len(tokens) - 1: input ids, labels, loss mask
    (response tokens of this iteration's segment, all segments if asked), the engine's
    log-prob of each label (0 on prompt positions) and the token mask (all ones)."""
    tokens = torch.tensor(t.token_ids, dtype=torch.long)
    n, p = len(tokens) - 1, len(t.prompt_ids)
    mask = torch.zeros(n)
    mask[p - 1:] = loss_mask(t, iteration, include_old_segments)
    rollout_logp = torch.zeros(n)
    rollout_logp[p - 1:] = torch.tensor(t.logprobs, dtype=torch.float32)
    return tokens[:-1], tokens[1:], mask, rollout_logp, torch.ones(n)


def build_microbatches(trajs: list[Trajectory], iteration: int, mbs: int, pad_multiple: int,
                       include_old_segments: bool, device, extra: Optional[dict] = None,
                       cp_size: int = 1, cp_rank: int = 0) -> list[dict]:
    """Right-padded (B, T) microbatches of ``mbs`` trajectories: input = tokens[:-1], labels =
    tokens[1:], mask = 1 on labels that are response tokens of this iteration's segment (all
    segments if asked), rollout_logp = each response token's log-prob recorded by the engine
    (0 elsewhere). T is padded to a multiple of ``pad_multiple`` (``cp_pad_multiple``); with
    ``cp_size > 1`` each microbatch is this cp rank's zigzag shard (``split_microbatch_for_cp``).
    ``extra``: per-sample tensors (B,), sliced along."""
    out = []
    for start in range(0, len(trajs), mbs):
        rows = [_token_rows(t, iteration, include_old_segments) for t in trajs[start:start + mbs]]
        width = int(math.ceil(max(len(r[0]) for r in rows) / pad_multiple) * pad_multiple)
        mb = {}
        for k, key in enumerate(_ROW_KEYS):
            dense = rows[0][k].new_zeros(len(rows), width)
            for row, r in enumerate(rows):
                dense[row, :len(r[k])] = r[k]
            mb[key] = dense.to(device)
        for k, v in (extra or {}).items():
            mb[k] = v[start:start + len(rows)].to(device)
        out.append(split_microbatch_for_cp(mb, cp_size, cp_rank))
    return out


def pack_by_tokens(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """First-fit decreasing: indices into bins whose lengths sum to at most ``max_tokens`` (an
    item longer than that gets a bin of its own); each bin's indices in increasing order, bins
    in order of creation. Deterministic (ties broken by index)."""
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        for b, load in enumerate(loads):
            if load + lengths[i] <= max_tokens:
                bins[b].append(i)
                loads[b] += lengths[i]
                break
        else:
            bins.append([i])
            loads.append(lengths[i])
    return [sorted(b) for b in bins]


def build_packed_microbatches(trajs: list[Trajectory], iteration: int, max_tokens: int,
                              include_old_segments: bool, device, extra: Optional[dict] = None,
                              cp_size: int = 1, cp_rank: int = 0, sp_size: int = 1) -> list[dict]:
    """``--use-dynamic-batch-size``: trajectories packed into microbatches of at most
    ``max_tokens`` tokens (``pack_by_tokens``; each counted after its cp padding to a multiple of
    2*cp), one row of n tokens with ``cu_seqlens`` boundaries, so no compute goes to padding
    and short responses share a microbatch. The same keys as ``build_microbatches`` but (1, n),
    plus ``cu_seqlens``, ``max_seqlen`` and ``num_samples`` (the loss unpacks per sample with
    ``packed_to_rows``). Under cp each is this rank's zigzag shard
    (``parallel.context.split_packed_microbatch``); with sequence parallelism over ``sp_size``
    ranks and no cp the row is padded to a multiple of ``sp_size`` by a pad segment."""
    lengths = [len(t.token_ids) - 1 for t in trajs]
    out = []
    for members in pack_by_tokens(pad_to_multiple(lengths, 2 * cp_size if cp_size > 1 else 1), max_tokens):
        rows = [_token_rows(trajs[i], iteration, include_old_segments) for i in members]
        bounds = [0]
        for r in rows:
            bounds.append(bounds[-1] + len(r[0]))
        pad = -bounds[-1] % sp_size if cp_size == 1 else 0
        if pad:  # a pad segment (id 0, mask 0) of its own
            rows.append(tuple(r.new_zeros(pad) for r in rows[0]))
            bounds.append(bounds[-1] + pad)
        cu = torch.tensor(bounds, dtype=torch.int32)
        mb = {key: torch.cat([r[k] for r in rows])[None] for k, key in enumerate(_ROW_KEYS)}
        mb.update(cu_seqlens=cu, max_seqlen=int((cu[1:] - cu[:-1]).max()), num_samples=len(members))
        sel = torch.tensor(members, dtype=torch.long)
        for k, v in (extra or {}).items():
            mb[k] = v[sel]
        mb = split_packed_microbatch(mb, cp_size, cp_rank, sp_size)
        out.append({k: (v.to(device) if torch.is_tensor(v) else v) for k, v in mb.items()})
    return out


def packed_to_rows(xs: list[torch.Tensor], cu_seqlens: torch.Tensor, num_rows: int, width: int) -> list[torch.Tensor]:
    """(1, n) packed per-token tensors -> (num_rows, width) each: row i holds sequence i's
    tokens (in their packed order; the losses only sum over a row), zeros after them;
    sequences past ``num_rows`` (a pad segment) are dropped. Differentiable (a scatter), so the
    RL losses run unchanged on packed microbatches; the scatter index is computed once."""
    n, device = xs[0].shape[1], xs[0].device
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    pos = torch.arange(n, device=device)
    seq = torch.searchsorted(cu, pos, right=True) - 1
    keep = seq < num_rows
    index = (seq[keep], (pos - cu[seq.clamp(max=len(cu) - 2)])[keep])
    return [x.new_zeros(num_rows, width).index_put(index, x[0, keep]) for x in xs]


@torch.no_grad()
def policy_logprobs(ctx: TrainContext, microbatches: list[dict], model=None) -> list[torch.Tensor]:
    """Per-token log-probs (B, T), or (1, n) for packed microbatches, under the current
    weights (``model``: another model stage of the same layout, e.g. the frozen reference),
    one tensor per microbatch."""
    model = ctx.model if model is None else model

    def step(mb, hidden):
        out = stage_forward(model, mb, hidden)
        return (None, out.float()) if model.post_process else out

    was_training = model.training
    model.eval()
    res = forward_only(ctx, microbatches, step, model)
    model.train(was_training)
    return res


# config fields a reference model may differ in from the policy (token ids, init, metadata); it
# runs with the policy's config, so every other field (shapes, RoPE, norms, routing) must match
_REFERENCE_FREE_FIELDS = ("bos_token_id", "eos_token_id", "init_method_std", "max_position_embeddings", "extra")


def load_reference_model(ctx: TrainContext, args, load_dir: str):
    """``--ref-load``: a frozen copy of a checkpoint's weights in the policy's layout (this
    rank's tp shard of its pipeline stage; resharded if saved under another tp/pp), for GRPO's
    KL to a fixed reference (DeepSeekMath: the SFT model). Forward only: no gradients, no
    optimizer state, so it adds one copy of the weights in ``--bf16`` / ``--fp16`` / fp32."""
    from megatron_k15.checkpointing import load_config, load_model_checkpoint

    cfg = ctx.model.config
    ref_cfg = load_config(load_dir)
    diff = [f"{f.name} {getattr(ref_cfg, f.name)!r} != {getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg)
            if f.name not in _REFERENCE_FREE_FIELDS and getattr(ref_cfg, f.name) != getattr(cfg, f.name)]
    if diff:
        raise ValueError(f"--ref-load {load_dir}: the reference model's config differs from the policy's "
                         f"({'; '.join(diff)}); give a checkpoint of the same architecture")
    model = build_stage_model(args, cfg, ctx.pc, ctx.layer_ranges)
    load_model_checkpoint(model, load_dir, ctx.pc.pp_rank, ctx.pc.pp_size)
    model.requires_grad_(False)
    return model.eval()


def advantages_for(loss: str, rewards: torch.Tensor, group_ids: torch.Tensor, tau: float = 1.0,
                   exact_logz: bool = False, estimator: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(baseline, advantages) per sample from its whole group (never one microbatch of it).
    ``estimator`` (``--advantage-estimator``; auto: GRPO's, GSPO's and CISPO's group-norm,
    PPO's group-mean; OMD uses its baseline) is one of ``losses.ADVANTAGE_ESTIMATORS``."""
    baseline = group_baseline(rewards, group_ids, tau, exact_logz if loss == "omd" else False)
    if estimator == "auto":
        estimator = "group-norm" if loss in ("grpo", "gspo", "cispo") else "group-mean"
    if loss == "omd":
        return baseline, rewards - baseline
    return baseline, group_advantages(rewards, group_ids, estimator)


def varied_groups(finished: list[Trajectory], rewards: list[float]) -> list:
    """Ids of the groups whose finished samples got different rewards (so a gradient), in the
    order the groups first appear in ``finished``."""
    seen: dict = defaultdict(set)
    for t, r in zip(finished, rewards):
        seen[t.group_id].add(r)
    return [g for g, v in seen.items() if len(v) > 1]


def flat_groups(finished: list[Trajectory], rewards: list[float], correct: list[bool], metrics: dict) -> set:
    """Groups whose finished samples all got the same reward: their advantages are 0, so at
    the iteration's first update (policy = pi_i) they contribute no gradient to any loss.
    Records ``solve_all_fraction`` / ``solve_none_fraction`` (groups all / none correct) and
    ``zero_advantage_fraction`` (samples in flat groups) in ``metrics``."""
    by_group = defaultdict(list)
    for t, r, c in zip(finished, rewards, correct):
        by_group[t.group_id].append((r, c))
    flat = set(by_group) - set(varied_groups(finished, rewards))
    metrics.update(
        solve_all_fraction=sum(all(c for _, c in v) for v in by_group.values()) / len(by_group),
        solve_none_fraction=sum(not any(c for _, c in v) for v in by_group.values()) / len(by_group),
        zero_advantage_fraction=sum(t.group_id in flat for t in finished) / len(finished))
    return flat


def mismatch_sums(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
                  is_cap: Optional[float] = None, ref_logp: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Over the masked tokens of one microbatch: (tokens, sum |old - rollout|, sum k3, tokens
    whose TIS weight is capped, sum k3 to the reference), float64. k3 = rho - 1 - log rho with
    rho = pi_train / pi_rollout estimates KL(pi_rollout || pi_train) from the rollout's own
    samples (at temperature 1 without top-p / top-k; ``rl.losses`` module docstring for the
    limits); with ``ref_logp`` the last is the same estimate of KL(pi_i || pi_ref) (0 without)."""
    m = mask.double()
    d = old_logp.double() - rollout_logp.double()
    capped = ((d.exp() > is_cap).double() * m).sum() if is_cap else d.new_zeros(())
    ref_k3 = (k3(ref_logp.double() - old_logp.double()) * m).sum() if ref_logp is not None else d.new_zeros(())
    return torch.stack([m.sum(), (d.abs() * m).sum(), (k3(d) * m).sum(), capped, ref_k3])


def generation_parallel(pc) -> tuple[int, int, object]:
    """(rank, size, group) of this rank in the generation-parallel set, the dp x cp ranks:
    each generates whole sequences; tp ranks (decoding together) and pp stages share a rank."""
    if pc.dp_size * pc.cp_size == 1:
        return 0, 1, None
    return dist.get_rank(pc.dp_cp_group), pc.dp_size * pc.cp_size, pc.dp_cp_group


class RLIteration:
    """State that lives across iterations: replay buffer, and the loss function."""

    def __init__(self, ctx: TrainContext, args, tokenizer, records: list[dict], prompt_ids: list[list[int]],
                 judge=None):
        """``records[i]`` / ``prompt_ids[i]``: the prompt set (indices are what samplers draw);
        ``judge``: an optional generative reward model (``rewards.judge``). ``args.ref_load``: a
        checkpoint for GRPO's fixed KL reference (``load_reference_model``); without it the
        reference is the iteration's starting policy pi_i."""
        self.judge = judge
        ref_load = getattr(args, "ref_load", None)
        self.reference = load_reference_model(ctx, args, ref_load) if ref_load else None
        self.ctx, self.args, self.tok = ctx, args, tokenizer
        self.records_by_index = records
        self.records = {r["id"]: r for r in records}
        self.tasks = tasks_of(records)  # a mixed set gets per-task metrics (rl.task_metrics)
        self.prompt_ids = {r["id"]: list(map(int, ids)) for r, ids in zip(records, prompt_ids)}
        self.last_success: dict = {}
        self.reasoning_tags = parse_reasoning_tags(getattr(args, "reasoning_tags", "auto"))
        self._prompt_open: dict = {}
        self.buffer = ReplayBuffer(max_size=args.replay_buffer_size or None, max_age=args.replay_max_age or None)
        self.loss_fn = get_loss_fn(args.rl_loss)
        self.settings = RolloutSettings(
            samples_per_prompt=args.samples_per_prompt, max_tokens=args.rollout_max_tokens,
            segment_tokens=args.rollout_segment_tokens, temperature=args.temperature, top_p=args.top_p,
            top_k=args.top_k, seed=args.seed, repeat_detection=not args.no_repeat_detection,
            batch_size=args.rollout_batch_size,
            stop=StopStrings(tokenizer, args.stop_strings) if getattr(args, "stop_strings", None) else None)
        pc = ctx.pc
        self.gen_rank, self.gen_size, self.gen_group = generation_parallel(pc)
        # --tool: the tp x pp ranks of a generation rank decode the same requests
        self.settings.tools = tool_use_from_args(args, tokenizer, self.gen_rank)
        # --overlap-grading: a trajectory is graded in a worker thread as soon as its response
        # is complete, while the engine decodes the others; the tp x pp ranks of a generation
        # rank (which see the same trajectories) take every (tp * pp)-th one each
        self.overlap_grading = getattr(args, "overlap_grading", True)
        self._replica_share = (pc.tp_rank + pc.tp_size * pc.pp_rank, pc.tp_size * pc.pp_size)
        self._early_grades: dict = {}
        # the policy generates its own rollouts: same weights, KV-cached engine (one pipeline
        # stage per rank: hidden states go stage to stage, tokens come back from the last)
        self.generator = build_generator(ctx.model, args, max_batch_size=args.rollout_batch_size,
                                         pp_group=pc.pp_group if pc.pp_size > 1 else None)
        cfg = ctx.model.config
        self.eos_ids = cfg.eos_ids() or ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
        self.peak_tflops = device_peak_tflops(getattr(args, "params_dtype", None))  # for train_mfu

    def prompt_open(self, prompt_id) -> bool:
        """Whether the prompt (its chat template) opens a reasoning block for the response."""
        if prompt_id not in self._prompt_open:
            self._prompt_open[prompt_id] = prompt_opens_reasoning(
                response_text(self.tok, self.prompt_ids[prompt_id], None, self.reasoning_tags), self.reasoning_tags)
        return self._prompt_open[prompt_id]

    def _gather(self, mine: list[tuple[int, Trajectory]]) -> list[Trajectory]:
        """Every generation-parallel rank's (global index, trajectory), in global order."""
        if self.gen_size == 1:
            return [t for _, t in mine]
        parts = [None] * self.gen_size
        dist.all_gather_object(parts, [(i, t.to_dict()) for i, t in mine], group=self.gen_group)
        return [Trajectory.from_dict(d) for _, d in sorted((p for part in parts for p in part),
                                                           key=lambda p: p[0])]

    def state_dict(self) -> dict:
        return {"replay_buffer": self.buffer.state_dict(), "ref_load": getattr(self.args, "ref_load", None)}

    def load_state_dict(self, state: dict) -> None:
        """A resumed run keeps the KL reference it trained with: a checkpoint saved with
        ``--ref-load`` refuses to resume without one (it would silently switch the KL to pi_i)."""
        if "replay_buffer" in state:
            self.buffer.load_state_dict(state["replay_buffer"])
        saved = state.get("ref_load")
        if saved and not getattr(self.args, "ref_load", None):
            raise ValueError(f"this checkpoint trained with --ref-load {saved} (GRPO's fixed KL reference): "
                             f"resume with --ref-load {saved} (or the same weights elsewhere)")

    def _fresh_trajectories(self, prompt_indices: list[int], iteration: int, seen: Counter) -> list[Trajectory]:
        """k new trajectories per prompt. A prompt drawn again in the same iteration (an epoch
        boundary, sampling with replacement, another dynamic-sampling round) gets a group of its
        own, ``id@iteration#j``, so its samples get other seeds instead of repeating the first."""
        fresh = []
        for idx in prompt_indices:
            rec = self.records_by_index[idx]
            j = seen[rec["id"]]
            seen[rec["id"]] += 1
            gid = f"{rec['id']}@{iteration}" + (f"#{j}" if j else "")
            for k in range(self.args.samples_per_prompt):
                fresh.append(Trajectory(prompt_id=rec["id"], prompt_ids=list(self.prompt_ids[rec["id"]]),
                                        sample_index=k, start_iteration=iteration, group_id=gid))
        return fresh

    def _rollout(self, trajs: list[Trajectory], iteration: int) -> list[Trajectory]:
        """Each generation-parallel rank extends the trajectories of its groups; returns all of
        them, extended, in their order, on every rank."""
        groups = sorted({t.group_id for t in trajs})
        if len(groups) < self.gen_size:
            # a rank without requests would skip the engine's collectives and hang the others
            raise ValueError(f"iteration {iteration}: {len(groups)} prompt groups for {self.gen_size} "
                             "generation-parallel (dp x cp) ranks; sample at least that many prompts")
        mine_groups = {g for i, g in enumerate(groups) if i % self.gen_size == self.gen_rank}
        mine = [(i, t) for i, t in enumerate(trajs) if t.group_id in mine_groups]
        own = [t for _, t in mine]
        if self.overlap_grading:
            from concurrent.futures import ThreadPoolExecutor

            from megatron_k15.rewards.reasoning import grade_response

            futures = {}
            share_rank, share_size = self._replica_share
            with ThreadPoolExecutor(max(1, getattr(self.args, "reward_workers", 1))) as pool:
                def on_final(i, response_ids):
                    if i % share_size == share_rank:
                        t = own[i]
                        futures[(t.group_id, t.sample_index)] = pool.submit(
                            grade_response, *self._grading_job(t.prompt_id, response_ids))

                rollout(self.generator, own, iteration, self.settings, self.eos_ids, on_final)
                self.generator.release()  # the KV cache's memory goes back to the training step
                self._early_grades.update({key: f.result() for key, f in futures.items()})
        else:
            rollout(self.generator, own, iteration, self.settings, self.eos_ids)
            self.generator.release()
        return self._gather(mine)

    def _grading_job(self, prompt_id, response_ids: list[int]) -> tuple:
        """The arguments of ``rewards.reasoning.grade_response`` for one response."""
        return (response_text(self.tok, response_ids, getattr(self.args, "stop_strings", None), self.reasoning_tags),
                self.records[prompt_id], self.reasoning_tags, self.prompt_open(prompt_id))

    def _score(self, finished: list[Trajectory], iteration: int, judgements: list) -> tuple[list, list]:
        """Rewards and correctness of the finished trajectories (every rank holds them all): the
        ranks split the grading and all-gather it, so each response is graded once and every
        rank trains on the same grades (graders with wall-clock limits, sandboxed code and
        sympy, could disagree under load, and what gets trained must not). With
        --overlap-grading most were graded during the rollout already; those grades are
        all-gathered and the rest graded here."""
        args = self.args
        world = dist.get_world_size() if dist.is_initialized() else 1
        grades = None
        if self.overlap_grading:  # graded during the rollout, each on one rank: share them
            local, self._early_grades = self._early_grades, {}
            parts = [local]
            if world > 1:
                parts = [None] * world
                dist.all_gather_object(parts, local)
            known = {key: g for part in parts for key, g in part.items()}
            grades = [known.get((t.group_id, t.sample_index)) for t in finished]
        return score(finished, self.records, self.tok, iteration,
                     length_penalty_weight=args.length_penalty_weight,
                     length_penalty_start_iter=args.length_penalty_start_iter,
                     repeat_penalty=args.repeat_penalty,
                     reasoning_tags=self.reasoning_tags, prompt_open=self.prompt_open,
                     judge=self.judge, judgements=judgements,
                     overlong=((args.rollout_max_tokens, args.overlong_buffer_tokens,
                                args.overlong_penalty_factor) if args.overlong_buffer_tokens else None),
                     shard=(dist.get_rank(), world, None) if world > 1 else None,
                     workers=getattr(args, "reward_workers", 1), grades=grades,
                     stop_strings=getattr(args, "stop_strings", None))

    def run(self, iteration: int, prompt_indices: list[int], lr: float,
            draw_prompts: Optional[Callable[[int], list[int]]] = None) -> dict:
        """One RL iteration; returns its metrics (identical on every rank). ``draw_prompts(n)``:
        n more prompt indices from the sampler, for ``--dynamic-sampling``'s further rounds."""
        args, ctx, pc = self.args, self.ctx, self.ctx.pc
        t0 = time.time()
        # 1. the iteration's trajectories: resumed partial ones first, then k fresh per prompt
        seen: Counter = Counter()
        resumed = self.buffer.pop_for_resume(len(self.buffer), iteration)
        with phase("rollout"):
            everything = self._rollout(resumed + self._fresh_trajectories(prompt_indices, iteration, seen),
                                       iteration)
        t_rollout = time.time() - t0

        # 2. partial ones go back to the buffer; finished ones are scored and trained on
        finished = [t for t in everything if t.finished]
        for t in everything:
            if not t.finished:
                self.buffer.add(t)
        judgements: list = []
        t_score = time.time()
        with phase("score"):
            rewards, correct = self._score(finished, iteration, judgements) if finished else ([], [])
        t_score = time.time() - t_score
        rounds, kept = 1, None
        if args.dynamic_sampling:
            # DAPO's dynamic sampling: more rounds of fresh prompts until the iteration holds as
            # many groups whose rewards differ (each then has a gradient) as it drew prompts; train
            # on the first that many of them, in order, and on nothing else
            target = len(prompt_indices)
            while True:
                varied = varied_groups(finished, rewards)
                if len(varied) >= target or rounds >= args.dynamic_sampling_max_rounds or draw_prompts is None:
                    break
                t_round = time.time()
                with phase("rollout"):
                    more = self._rollout(self._fresh_trajectories(draw_prompts(target), iteration, seen), iteration)
                t_rollout += time.time() - t_round
                rounds += 1
                everything += more
                new = [t for t in more if t.finished]
                t_round = time.time()
                with phase("score"):
                    r_new, c_new = self._score(new, iteration, judgements) if new else ([], [])
                t_score += time.time() - t_round
                finished, rewards, correct = finished + new, rewards + r_new, correct + c_new
            kept = set(varied[:target])
        rollout_tokens = sum(t.segment_ids.count(iteration) for t in everything)
        # score_time_s: grading left after the rollout (most of it overlaps it with
        # --overlap-grading), the grades' all-gather and a judge's regrading
        metrics = {"rollout_tokens": rollout_tokens, "rollout_time_s": t_rollout, "score_time_s": t_score,
                   "rollout_tokens_per_s": rollout_tokens / max(t_rollout, 1e-9),
                   "replay_buffer_size": len(self.buffer), "num_finished": len(finished)}
        reasons = Counter(t.stop_reason for t in everything)
        for r in ("eos", "length", "repeat", "partial", "stop"):
            metrics[f"stop_{r}_fraction"] = reasons.get(r, 0) / max(1, len(everything))
        if args.dynamic_sampling:
            metrics.update(sampling_rounds=rounds, kept_groups=len(kept))
        if not finished:
            metrics.update(loss=0.0, grad_norm=0.0, lr=lr)
            return metrics
        if self.judge is not None:
            metrics.update(judge_metrics(judgements, correct))
        lengths = [t.response_len for t in finished]
        metrics.update(reward_mean=sum(rewards) / len(rewards), accuracy=sum(correct) / len(correct),
                       response_length_mean=sum(lengths) / len(lengths), response_length_max=max(lengths))
        if self.settings.tools is not None:
            metrics.update(tool_calls_mean=sum(t.extra.get("tool_calls", 0) for t in finished) / len(finished),
                           tool_tokens_fraction=sum(t.tool_tokens for t in finished) / max(1, sum(lengths)))
        metrics.update(by_task([task_of(self.records[t.prompt_id]) for t in finished],
                               {"reward_mean": rewards, "accuracy": correct, "response_length_mean": lengths},
                               all_tasks=self.tasks))
        self.last_success = defaultdict(list)
        for t, c in zip(finished, correct):
            self.last_success[t.prompt_id].append(float(c))

        # 3. training data: each dp rank takes whole groups of the finished trajectories; its
        # cp ranks each hold a zigzag shard of every sequence
        gids = sorted({t.group_id for t in finished})
        gindex = {g: i for i, g in enumerate(gids)}
        r_all = torch.tensor(rewards, dtype=torch.float32)
        g_all = torch.tensor([gindex[t.group_id] for t in finished])
        baseline, adv = advantages_for(args.rl_loss, r_all, g_all, args.rl_tau, args.exact_logz,
                                       getattr(args, "advantage_estimator", "auto"))
        flat = flat_groups(finished, rewards, correct, metrics)
        skip = flat if args.skip_zero_advantage else set()
        # DAPO's overlong filtering: responses cut off by the budget are not trained on (they
        # still count in their group's baseline) and not counted by the normaliser; with dynamic
        # sampling only the kept groups are trained on and counted
        trainable = [not (args.overlong_filter and t.stop_reason == "length")
                     and (kept is None or t.group_id in kept) for t in finished]
        trained = [ok and t.group_id not in skip for ok, t in zip(trainable, finished)]
        metrics["trained_samples"] = sum(trained)
        log_dir = getattr(args, "rollout_log_dir", None)
        if log_dir and dist.get_rank() == 0 and (iteration + 1) % args.rollout_log_interval == 0:
            write_rollout_log(log_dir, iteration + 1, rollout_rows(finished, iteration, self.records, self.tok,
                                                                   rewards, correct, adv.tolist(), trained))
        # dp ranks take whole groups, round robin over the groups that have samples to train on
        # (all of them unless filtered: overlong, dynamic sampling), so none is left idle
        dp_of = {g: i % pc.dp_size for i, g in enumerate(sorted({t.group_id for ok, t in zip(trainable, finished) if ok}))}
        # the per-update normaliser counts samples (OMD, GSPO, and the token-level losses under
        # --loss-agg-mode seq-mean-token-mean) or response tokens (token-mean)
        per_sample = (args.rl_loss in SEQUENCE_LEVEL_LOSSES
                      or getattr(args, "loss_agg_mode", "token-mean") in PER_SAMPLE_AGG_MODES)
        # each sample's loss tokens in all its cp shards (seq-mean-token-mean divides by them)
        n_all = torch.tensor([float(loss_mask(t, iteration, args.include_old_segments).sum()) for t in finished])
        device = platform.current_device()
        pad = cp_pad_multiple(pc.cp_size, ctx.model.tp_size, ctx.model.sequence_parallel)
        sp_size = ctx.model.tp_size if ctx.model.sequence_parallel else 1
        t1 = time.time()
        # update u trains on the u-th contiguous slice of the trainable finished samples (global
        # order, so the same in every layout); inside it each dp rank takes its groups' samples. The
        # loss is divided by the slice's count (samples for OMD / GSPO, response tokens for the
        # token-level losses unless --loss-agg-mode seq-mean-token-mean), skipped samples included,
        # so skipping changes no gradient.
        updates = max(1, args.updates_per_iter)
        order = [i for i, ok in enumerate(trainable) if ok]
        bounds = [round(u * len(order) / updates) for u in range(updates + 1)]
        plan, trained_lengths = [], []  # (the global lengths: for the model-FLOPs throughput)
        for u in range(updates):
            span = order[bounds[u]:bounds[u + 1]]
            total = float(len(span)) if per_sample else float(sum(float(n_all[i]) for i in span))
            if total > 0:
                trained_lengths += [len(finished[i].token_ids) - 1 for i in span if finished[i].group_id not in skip]
            idx = [i for i in span if dp_of[finished[i].group_id] == pc.dp_rank
                   and finished[i].group_id not in skip]
            sel = torch.tensor(idx, dtype=torch.long)
            extra = {"rewards": r_all[sel], "group_ids": g_all[sel], "baseline": baseline[sel],
                     "advantages": adv[sel], "loss_tokens": n_all[sel]}
            trajs = [finished[i] for i in idx]
            if not idx:
                chunk = []
            elif args.use_dynamic_batch_size:
                chunk = build_packed_microbatches(trajs, iteration, args.max_tokens_per_gpu * pc.cp_size,
                                                  args.include_old_segments, device, extra, pc.cp_size,
                                                  pc.cp_rank, sp_size)
            else:
                chunk = build_microbatches(trajs, iteration, args.micro_batch_size, pad, args.include_old_segments,
                                           device, extra, cp_size=pc.cp_size, cp_rank=pc.cp_rank)
            plan.append((chunk, total))
        # pi_i's per-token entropy on its own samples: the mean -log-prob the engine recorded
        # for the tokens it sampled in this iteration (every finished trajectory, trained or not)
        sampled = [lp for t in finished for lp, it in zip(t.logprobs, t.segment_ids) if it == iteration]
        metrics["entropy"] = -math.fsum(sampled) / max(1, len(sampled))
        # old log-probs: the policy pi_i at the start of the iteration (one forward pass); their
        # difference to the engine's log-probs of the same tokens measures how far the rollout
        # numerics are from the training forward's
        # (with --ref-load, the frozen reference's log-probs of the same tokens too)
        sums = torch.zeros(5, dtype=torch.float64, device=device)  # tokens, |diff|, k3, capped (TIS), ref k3
        for chunk, _ in plan:
            # (a rank without samples still runs: under expert parallelism it serves the others' tokens)
            with phase("logprobs"):
                old = policy_logprobs(ctx, chunk)
                ref = policy_logprobs(ctx, chunk, self.reference) if self.reference is not None else []
            last = ctx.pc.is_last_stage
            for i, mb in enumerate(chunk):
                mb["old_logp"] = old[i] if last else None
                if ref:
                    mb["ref_logp"] = ref[i] if last else None
                if last:
                    sums += mismatch_sums(old[i], mb["rollout_logp"], mb["mask"], args.rollout_is_cap,
                                          mb.get("ref_logp"))
        tokens, diff_sum, k3, capped, ref_k3 = reduce_sums(sums.tolist(), ctx)  # one host sync
        metrics.update(rollout_logp_abs_diff=diff_sum / max(tokens, 1.0), rollout_kl=k3 / max(tokens, 1.0),
                       logprob_time_s=time.time() - t1)
        if args.rollout_is_cap:
            metrics["rollout_is_capped_fraction"] = capped / max(tokens, 1.0)
        if self.reference is not None:
            metrics["ref_kl"] = ref_k3 / max(tokens, 1.0)

        if not args.keep_optimizer_state:
            ctx.optimizer.reset_state()
        ctx.moe_aux_loss = ctx.num_zeros_in_grad = ctx.moe_max_load_ratio = None  # set by this iteration's updates
        losses, norms, kls, clip_fracs = [], [], [], []
        for chunk, total in plan:
            if total <= 0:
                continue
            # a dp rank without samples in this update still joins the collective step; then no
            # rank may start bucket reductions from backward hooks (their order would differ)
            ctx.optimizer.overlap = group_reduce(len(chunk), self.gen_group, dist.ReduceOp.MIN, torch.int64) > 0
            with phase("train"):
                results, norm = train_step(ctx, chunk, self._forward_step(total), lr)
            loss_sum, kl_sum, n, n_clipped, n_units = reduce_sums([sum(r[k] for r in results) for k in range(5)], ctx)
            losses.append(loss_sum / total)
            kls.append(kl_sum / max(n, 1.0))
            clip_fracs.append(n_clipped / max(n_units, 1.0))
            norms.append(norm)
        mbs_all = [mb for chunk, _ in plan for mb in chunk]
        t_train = time.time() - t1
        # token positions this rank computed (padding included) in all updates, per second
        train_tokens = sum(float(mb["mask"].numel()) for mb in mbs_all)
        # a NaN/inf gradient (e.g. a token the training forward finds impossible) skips that
        # update (DistributedOptimizer.step); the run goes on, and the count is logged
        metrics["skipped_updates"] = sum(not math.isfinite(n) for n in norms)
        if ctx.optimizer.loss_scaler is not None:  # --fp16: overflowing updates back the scale off
            metrics["loss_scale"] = ctx.optimizer.loss_scale
        if args.rl_loss != "omd":  # the share of tokens (gspo: responses) the ratio clip held, per update
            metrics["clip_frac"] = sum(clip_fracs) / max(1, len(clip_fracs))
        metrics.update(loss=sum(losses) / max(1, len(losses)), kl_proxy=sum(kls) / max(1, len(kls)),
                       grad_norm=norms[-1] if norms else 0.0, lr=lr, train_time_s=t_train,  # incl. logprob_time_s
                       train_tokens_per_s=train_tokens / max(t_train, 1e-9),
                       peak_memory_bytes=platform.peak_memory_bytes())
        # model FLOPs: the old (and reference) log-prob forwards and forward + backward of the updates
        passes = 1 + (self.reference is not None) + 3
        metrics.update(throughput_metrics(passes * forward_flops(ctx.model.config, trained_lengths), t_train,
                                          dist.get_world_size(), self.peak_tflops, prefix="train_"))
        if ctx.moe_aux_loss is not None:
            metrics["moe_aux_loss"] = ctx.moe_aux_loss
        if ctx.moe_max_load_ratio is not None:  # the iteration's last update
            metrics["moe_max_load_ratio"] = ctx.moe_max_load_ratio
        if ctx.num_zeros_in_grad is not None:  # the iteration's last update
            metrics["num_zeros_in_grad"] = ctx.num_zeros_in_grad
        return metrics

    def _forward_step(self, normalizer: float):
        """Per microbatch: log-probs through this stage; on the last stage the loss / the
        global count, and (loss, sum (S - S_old)^2, samples) for logging. Under cp every value
        is a partial sum over cp ranks (``reduce_sums`` adds them): the sample-level ones (OMD's
        and GSPO's loss, the KL proxy, the count) are counted on cp rank 0 only, since every cp
        rank holds the whole-sequence sums after the all-reduce."""
        model, args, loss_fn, pc = self.ctx.model, self.args, self.loss_fn, self.ctx.pc
        cp_group = pc.cp_group if pc.cp_size > 1 else None
        first_cp = pc.cp_rank == 0
        seq_level = args.rl_loss in SEQUENCE_LEVEL_LOSSES
        clip_lo, clip_hi = clip_range(args.rl_loss, args.clip_eps, args.clip_eps_high)

        def step(mb, hidden):
            out = stage_forward(model, mb, hidden)
            if not model.post_process:
                return out
            per_token = [out, mb["old_logp"], mb["mask"], mb["rollout_logp"]]
            if "ref_logp" in mb:  # --ref-load
                per_token.append(mb["ref_logp"])
            if "num_samples" in mb:  # packed: one row per sample for the losses
                per_token = packed_to_rows(per_token, mb["cu_seqlens"], mb["num_samples"], mb["max_seqlen"])
            out, old_logp, mask, rollout_logp = per_token[:4]
            ref_logp = per_token[4] if len(per_token) > 4 else None  # None: GRPO's KL to old_logp
            loss, stats = loss_fn(out, old_logp, mask, mb["rewards"], mb["group_ids"], ref_logp=ref_logp,
                           tau=args.rl_tau, clip_eps=clip_lo, clip_eps_high=clip_hi, kl_coef=args.kl_coef,
                           baseline=mb["baseline"], advantages=mb["advantages"], reduction="sum",
                           loss_agg_mode=getattr(args, "loss_agg_mode", "token-mean"), seq_lengths=mb["loss_tokens"],
                           norm_tokens=args.rollout_max_tokens,
                           cp_group=cp_group, rollout_logp=rollout_logp, is_cap=args.rollout_is_cap,
                           return_metrics=True)
            with torch.no_grad():
                d = ((out.detach().double() - old_logp.double()) * mask).sum(-1)
                if cp_group is not None:
                    dist.all_reduce(d, group=cp_group)
                kl = (d ** 2).sum()  # tensors: train_step brings them to the host once per step
            loss_log = loss.detach() if (first_cp or not seq_level) else 0.0
            # clipped tokens (grpo, ppo, cispo: partial over cp shards) or samples (gspo: whole
            # sequences, counted on cp rank 0), out of as many; OMD clips nothing
            clipped = [stats.get("clipped", 0.0), stats.get("clip_units", 0.0)]
            if seq_level and not first_cp:
                clipped = [0.0, 0.0]
            return loss / normalizer, (loss_log, kl if first_cp else 0.0,
                                       float(mask.shape[0]) if first_cp else 0.0, *clipped)

        return step
