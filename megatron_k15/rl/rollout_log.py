"""What the policy wrote: the finished rollouts of an iteration as JSONL (``--rollout-log-dir``).

Scalars say that the reward went up; only the responses say how (a shorter path to the
answer, a formatting trick the verifier lets through, a loop cut by repeat detection). Every
``--rollout-log-interval`` iterations rank 0 writes ``DIR/iter_{n:07d}.jsonl`` (n as logged,
counting from 1), one object per trajectory that finished in iteration n and was scored:

    iteration, prompt_id, group_id, sample_index, task, prompt, response (decoded, special
    tokens kept), response_tokens, stop_reason (eos / length / repeat / stop), reward (the trained
    one: verifier, repeat, length and overlong terms), correct (the verifier's verdict),
    advantage (the loss's: reward - baseline for OMD, group-normalised for GRPO / GSPO),
    trained (false when filtered: overlong, dynamic sampling, zero-advantage skipping),
    segments (the iterations, as logged, that generated it: several for a partial rollout
    resumed from the replay buffer), logprob_mean (the engine's mean log-prob of this iteration's tokens),
    and with ``--tool``: tool_calls, tool_tokens (the inserted outputs' tokens, part of the response)

in the iteration's order (groups together). Unfinished (partial) trajectories are logged in
the iteration that finishes them; an iteration in which none finished writes no file. A file
is written atomically, and a resumed run that redoes an iteration rewrites its file.
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional, Sequence

from megatron_k15.files import atomic_file
from megatron_k15.generation.replay_buffer import TOOL_SEGMENT, Trajectory


def add_rollout_log_args(g) -> None:
    g.add_argument("--rollout-log-dir", default=None,
                   help="write every finished rollout (prompt, response, reward, advantage, stop reason) of "
                        "an iteration to DIR/iter_NNNNNNN.jsonl (rank 0)")
    g.add_argument("--rollout-log-interval", type=int, default=1,
                   help="with --rollout-log-dir: log every N-th iteration")


def check_rollout_log_args(args) -> Optional[str]:
    if args.rollout_log_interval < 1:
        return f"--rollout-log-interval must be >= 1, got {args.rollout_log_interval}"
    d = args.rollout_log_dir
    if d:  # rank 0 writes alone: a failure there would leave the other ranks waiting in a collective
        if os.path.exists(d) and not os.path.isdir(d):
            return f"--rollout-log-dir {d} is a file; give a directory"
        try:
            os.makedirs(d, exist_ok=True)
        except OSError as e:
            return f"--rollout-log-dir {d}: cannot create it ({e.strerror})"
        if not os.access(d, os.W_OK):
            return f"--rollout-log-dir {d}: not writable"
    return None


def rollout_log_path(directory: str, iteration: int) -> str:
    return os.path.join(directory, f"iter_{iteration:07d}.jsonl")


def rollout_rows(finished: Sequence[Trajectory], iteration: int, records: dict, tokenizer,
                 rewards: Sequence[float], correct: Sequence[bool], advantages: Sequence[float],
                 trained: Sequence[bool]) -> list[dict]:
    """One JSON object per finished trajectory of (0-based) ``iteration``."""
    rows = []
    for t, r, c, a, tr in zip(finished, rewards, correct, advantages, trained):
        mine = [lp for lp, it in zip(t.logprobs, t.segment_ids) if it == iteration]
        rows.append({
            "iteration": iteration + 1, "prompt_id": t.prompt_id, "group_id": t.group_id,
            "sample_index": t.sample_index, "task": records[t.prompt_id].get("task"),
            "prompt": tokenizer.decode(t.prompt_ids), "response": tokenizer.decode(t.response_ids),
            "response_tokens": t.response_len, "stop_reason": t.stop_reason, "reward": float(r),
            "correct": bool(c), "advantage": float(a), "trained": bool(tr),
            "segments": sorted({s + 1 for s in t.segment_ids if s != TOOL_SEGMENT}),
            "logprob_mean": math.fsum(mine) / len(mine) if mine else None,
        })
        if t.tool_tokens or "tool_calls" in t.extra:
            rows[-1].update(tool_calls=t.extra.get("tool_calls", 0), tool_tokens=t.tool_tokens)
    return rows


def write_rollout_log(directory: str, iteration: int, rows: list[dict]) -> str:
    """``rows`` to ``DIR/iter_{iteration:07d}.jsonl`` (1-based ``iteration``), atomically."""
    path = rollout_log_path(directory, iteration)
    with atomic_file(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
