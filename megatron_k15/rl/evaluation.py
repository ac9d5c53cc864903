"""Accuracy of the current policy on a held-out prompt set (greedy, or pass@k with n samples;
with n > 1 also maj@n, self-consistency: a math problem counts when its most common final
answer is right).

Prompts are split over data-parallel replicas (``dp_rank``/``dp_size``); the ranks of a
replica (tp, and pp / cp when the generator was built with those groups) decode together and
all see the same tokens. Every rank gets the totals. Used by ``train_rl --eval-data`` (before the first and after the last iteration, and
every ``--eval-interval``) and by ``tools/evaluate.py``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_k15.generation.engine import GenerationEngine
from megatron_k15.generation.stop_strings import StopStrings
from megatron_k15.rewards.judge import Judgement, judge_metrics
from megatron_k15.rewards.reasoning import ReasoningTags, grade_response, prompt_opens_reasoning, response_text
from megatron_k15.rl.task_metrics import by_task, task_of, tasks_of


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    prob = 1.0
    for i in range(n - c + 1, n + 1):
        prob *= 1.0 - k / i
    return 1.0 - prob


def vote_key(graded: Optional[str], record: dict) -> Optional[str]:
    """A math response's vote for maj@n: its final answer (``rewards.math.extract_answer``);
    None for other tasks and responses without an answer."""
    if graded is None or task_of(record) != "math":
        return None
    from megatron_k15.rewards.math import extract_answer

    return extract_answer(graded)


# distinct (normalised) answers of one problem whose equality is checked symbolically; the
# rest vote by their normalised text alone (sympy checks cost milliseconds each, pairwise)
MAJORITY_SYMBOLIC_ANSWERS = 4


def majority_correct(samples: list[dict]) -> bool:
    """maj@n of one problem: the first sample holding the most voted answer (ties: the answer
    given first) is correct. Answers vote by their text normalised as the math verifier
    normalises it; the :data:`MAJORITY_SYMBOLIC_ANSWERS` most voted of those also pool with
    the ones the verifier finds equal (``1/2``, ``\\frac{1}{2}``, ``0.5``). Samples without an
    ``answer`` do not vote; no vote at all counts as wrong."""
    from megatron_k15.rewards.math import answers_equal, normalize_answer

    votes: dict[str, list[int]] = {}  # normalised text -> the positions of its samples
    for k, s in enumerate(samples):
        if s.get("answer") is not None:
            votes.setdefault(normalize_answer(s["answer"]), []).append(k)
    if not votes:
        return False
    order = sorted(votes, key=lambda a: -len(votes[a]))  # most voted first (stable: ties keep order)
    pools: list[list[str]] = []
    for key in order[:MAJORITY_SYMBOLIC_ANSWERS]:
        home = next((p for p in pools if answers_equal(key, p[0])), None)
        if home is None:
            pools.append([key])
        else:
            home.append(key)
    pools += [[key] for key in order[MAJORITY_SYMBOLIC_ANSWERS:]]
    best = max(pools, key=lambda p: (sum(len(votes[a]) for a in p), -min(votes[a][0] for a in p)))
    return samples[min(votes[a][0] for a in best)]["correct"]


def _replica_share(dp_rank: int) -> tuple[int, int]:
    """(this rank's index, number of ranks) among the ranks given the same ``dp_rank``."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return 0, 1
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, dp_rank)
    members = [r for r, d in enumerate(ranks) if d == dp_rank]
    return members.index(dist.get_rank()), len(members)


@torch.no_grad()
def evaluate(model, tokenizer, records: list[dict], prompt_ids: list[list[int]], *, max_new_tokens: int,
             eos_ids: list[int], dp_rank: int = 0, dp_size: int = 1, dp_group=None, n_samples: int = 1,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 64,
             generator=None, reasoning_tags: Optional[ReasoningTags] = None, judge=None,
             reward_workers: int = 1, numbers: Optional[list[int]] = None,
             stop_strings: Optional[list[str]] = None, tools=None) -> dict:
    """Returns {"accuracy" (mean pass@1), "pass@k" for k in 1..n_samples, "response_length_mean",
    "results": per-problem dicts (on every rank; a math sample's final answer in ``answer``)},
    with n_samples > 1 "maj@{n_samples}" over the math problems (:func:`majority_correct`),
    and for a set of several tasks
    "{task}/accuracy", "{task}/pass@{n_samples}", "{task}/response_length_mean", "{task}/problems"
    (``rl.task_metrics``). ``generator``: a generation engine on
    ``model`` (default: a ``GenerationEngine`` decoding ``batch_size`` requests at a time).
    ``reasoning_tags``: grade the answer after the reasoning block (``rewards.reasoning``).
    ``judge``: a generative reward model (``rewards.judge``) regrading the replica's answers;
    judged samples carry ``judge_verdict`` / ``judge_text`` and the result has ``judge_*``
    counts. ``reward_workers``: threads grading this rank's responses. The ranks of a replica
    (tp, pp, cp: all given the same ``dp_rank``) decode the same requests; each grades every
    n-th of them and the grades are all-gathered, so no response is graded twice.
    ``numbers``: each record's number in the whole set (default 0, 1, ...), which seeds its
    samples and is its result's ``index``: a set evaluated in parts gets the samples it gets whole.
    ``stop_strings``: a response ends once its text contains one (``generation.stop_strings``);
    its text, graded and recorded, ends before it. ``tools``: an ``rl.tools.ToolUse``: responses
    call it as rollouts do (``--tool``); each sample records its ``tool_calls``."""
    from concurrent.futures import ThreadPoolExecutor

    from megatron_k15.generation.replay_buffer import Trajectory
    from megatron_k15.rl.trainer import RolloutSettings, rollout

    share_rank, share_size = _replica_share(dp_rank)

    numbers = list(range(len(records))) if numbers is None else list(numbers)
    mine = [i for i in range(len(records)) if i % dp_size == dp_rank]
    per_problem = []
    requests = [(i, s) for i in mine for s in range(n_samples)]
    if generator is None:
        generator = GenerationEngine(model, max_batch_size=batch_size)
    prompt_open = {i: prompt_opens_reasoning(response_text(tokenizer, list(prompt_ids[i]), None, reasoning_tags),
                                             reasoning_tags) for i in mine}
    # each request a trajectory of one segment (``rl.trainer.rollout``: tool calls go on in
    # it), seeded by its problem's number and its sample index
    trajs = [Trajectory(str(numbers[i]), list(prompt_ids[i]), sample_index=s, group_id=str(numbers[i]),
                        extra={"request": numbers[i] * 1000 + s}) for i, s in requests]
    settings = RolloutSettings(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                               repeat_detection=False, stop=StopStrings(tokenizer, stop_strings) if stop_strings
                               else None, tools=tools, request_key=lambda t, _: t.extra["request"])

    def text_of(ids) -> str:  # what is graded and recorded: the response before a stop string
        return response_text(tokenizer, ids, stop_strings, reasoning_tags)

    futures = {}
    # each response is graded (reward_workers threads) as soon as it is complete, while the
    # engine decodes the others
    with ThreadPoolExecutor(max(1, reward_workers)) as pool:
        def on_final(j, ids):
            if j % share_size == share_rank:
                i = requests[j][0]
                futures[j] = pool.submit(grade_response, text_of(ids), records[i], reasoning_tags, prompt_open[i])

        rollout(generator, trajs, 0, settings, eos_ids, on_final)
        # this rank's share (graded here if the generator does not call on_finish)
        mine_grades = {requests[j]: futures[j].result() if j in futures else
                       grade_response(text_of(t.response_ids), records[requests[j][0]], reasoning_tags,
                                      prompt_open[requests[j][0]])
                       for j, t in enumerate(trajs) if j % share_size == share_rank}
    known = mine_grades
    if share_size > 1:  # every replica's ranks, one all-gather over all ranks
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine_grades)
        known = {key: g for part in parts for key, g in part.items()}
    grades = [known[key] for key in requests]
    samples, recs = {}, []
    for (i, s), t in zip(requests, trajs):
        recs.append(records[i])
        samples[(i, s)] = {"text": text_of(t.response_ids), "length": t.response_len,
                           "stop_reason": t.stop_reason}
        if tools is not None:
            samples[(i, s)]["tool_calls"] = t.extra.get("tool_calls", 0)
    graded, verified = [g for g, _ in grades], [v for _, v in grades]
    if judge is not None:  # every replica judges its own problems
        if hasattr(generator, "release"):
            generator.release()  # the policy's KV cache makes room for the judge's
        verified, judgements = judge.regrade(recs, graded, verified, split=False, replica=dp_rank)
        keys = list(samples)
        for j in judgements:
            samples[keys[j.index]].update(judge_verdict=j.verdict, judge_text=j.text,
                                          judge_truncated=j.truncated, rule_correct=j.before >= 1.0)
    for sample, reward, text, rec in zip(samples.values(), verified, graded, recs):
        sample["correct"] = reward >= 1.0
        key = vote_key(text, rec)
        if key is not None:
            sample["answer"] = key
    for i in mine:
        per_problem.append({"id": records[i].get("id", str(numbers[i])), "index": numbers[i],
                            "task": task_of(records[i]), "samples": [samples[(i, s)] for s in range(n_samples)]})
    if dp_size > 1:
        parts = [None] * dp_size
        dist.all_gather_object(parts, per_problem, group=dp_group)
        per_problem = sorted((p for part in parts for p in part), key=lambda p: p["index"])
    return {"results": per_problem, **evaluation_metrics(per_problem, n_samples, tasks_of(records), judge is not None)}


def evaluation_metrics(per_problem: list[dict], n_samples: int, all_tasks, judged: bool = False) -> dict:
    """The metrics :func:`evaluate` reports, from its per-problem results (each with ``task``
    and ``samples``; e.g. the parts of a set evaluated in several calls, put together)."""
    out = {}
    n = max(1, len(per_problem))
    correct = [sum(s["correct"] for s in p["samples"]) for p in per_problem]
    for k in range(1, n_samples + 1):
        out[f"pass@{k}"] = sum(pass_at_k(n_samples, c, k) for c in correct) / n
    out["accuracy"] = out["pass@1"]
    voted = [p for p in per_problem if p["task"] == "math"]
    if n_samples > 1 and voted:  # self-consistency over the math problems
        out[f"maj@{n_samples}"] = sum(majority_correct(p["samples"]) for p in voted) / len(voted)
    lengths = [s["length"] for p in per_problem for s in p["samples"]]
    out["response_length_mean"] = sum(lengths) / max(1, len(lengths))
    per_task = {"accuracy": [c / n_samples for c in correct],
                "response_length_mean": [sum(s["length"] for s in p["samples"]) / n_samples for p in per_problem]}
    if n_samples > 1:
        per_task[f"pass@{n_samples}"] = [pass_at_k(n_samples, c, n_samples) for c in correct]
    out.update(by_task([p["task"] for p in per_problem], per_task, "problems", all_tasks=all_tasks))
    if judged:
        everything = [s for p in per_problem for s in p["samples"]]
        out.update(judge_metrics([
            Judgement(k, s["judge_verdict"], s["judge_text"], float(s["rule_correct"]), float(s["correct"]),
                      s["judge_truncated"]) for k, s in enumerate(everything) if "judge_text" in s],
            [s["correct"] for s in everything]))
    return out
