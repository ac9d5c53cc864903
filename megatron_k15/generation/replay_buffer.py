"""Partial rollouts (DESIGN.md section 3): trajectories and the buffer of unfinished ones.

Each RL iteration gives every trajectory at most ``--rollout-segment-tokens`` new tokens. A
trajectory that neither stopped (``eos``, ``length``, ``repeat``) nor finished its budget comes
back from the engine with stop reason ``"partial"``; the trainer puts it in the
``ReplayBuffer`` and, at a later iteration, pops it, re-prefills ``prompt_ids + response_ids``
and continues it with that iteration's policy. Every response token remembers the iteration
whose policy produced it (``segment_ids``) and its log-prob at generation time
(``logprobs``), so that

* only finished trajectories are scored and trained on;
* by default only the tokens of the *current* iteration's segment enter the loss
  (``loss_mask``); tokens from earlier segments were sampled by an older policy and are masked
  out (``include_old_segments=True`` keeps them) but still count in the response length.

A tool's output written into a response (``rl.tools``: the policy ran code while reasoning) is
part of the sequence but not the policy's: its tokens are tagged ``TOOL_SEGMENT`` instead of
an iteration, carry a log-prob of 0, and are never in the loss.

Ordering: ``pop_for_resume`` returns the oldest trajectories first (by the iteration that
started them, then by insertion order), so no trajectory starves.

Eviction policy (both limits optional):

* ``max_age``: a trajectory started at iteration ``s`` is *stale* at iteration ``i`` when
  ``i - s > max_age``. ``evict_stale(i)`` (also run by ``pop_for_resume(..., iteration=i)``)
  removes stale trajectories and returns them, marked ``stop_reason="evicted"``, so the caller
  can log them and resample their prompt (their group is then short of a sample).
* ``max_size``: when ``add`` would make the buffer hold more than ``max_size`` trajectories,
  the oldest ones are evicted (they are also the stalest, the ones whose early tokens came from
  the most outdated policy) and returned by ``add``.

``state_dict()`` is plain JSON-serialisable data (lists, ints, floats, strings) for
checkpoints; ``load_state_dict`` restores the exact buffer, order included.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch

__all__ = [
    "STOP_REASONS",
    "FINISHED_STOP_REASONS",
    "Trajectory",
    "ReplayBuffer",
    "loss_mask",
    "TOOL_SEGMENT",
]

FINISHED_STOP_REASONS = ("eos", "length", "repeat", "stop")  # stop: a --stop-strings string
STOP_REASONS = FINISHED_STOP_REASONS + ("partial", "evicted")
TOOL_SEGMENT = -1  # segment id of a tool output's tokens (no policy generated them)


@dataclass
class Trajectory:
    """One sampled response to one prompt, possibly still unfinished.

    Attributes:
        prompt_id: the prompt's ``id`` from the prompt JSONL.
        prompt_ids: prompt token ids.
        response_ids: generated token ids so far (all segments).
        segment_ids: per response token, the RL iteration whose policy generated it
            (``TOOL_SEGMENT`` for a tool output's tokens).
        logprobs: per response token, its log-prob under that policy at generation time (0
            for a tool output's).
        sample_index: index of this sample within the prompt's group of k samples.
        stop_reason: None while running, then one of ``STOP_REASONS``.
        start_iteration: iteration that started the trajectory (defaults to the first
            segment's iteration).
        group_id: identifies the group of k samples (by default the prompt id and start
            iteration are enough; set it when one prompt is sampled twice in an iteration).
        extra: any JSON-serialisable metadata (task, reference answer, seed, ...).
    """

    prompt_id: str
    prompt_ids: List[int]
    response_ids: List[int] = field(default_factory=list)
    segment_ids: List[int] = field(default_factory=list)
    logprobs: List[float] = field(default_factory=list)
    sample_index: int = 0
    stop_reason: Optional[str] = None
    start_iteration: Optional[int] = None
    group_id: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.prompt_ids = [int(t) for t in self.prompt_ids]
        self.response_ids = [int(t) for t in self.response_ids]
        self.segment_ids = [int(s) for s in self.segment_ids]
        self.logprobs = [float(x) for x in self.logprobs]
        if not (len(self.response_ids) == len(self.segment_ids) == len(self.logprobs)):
            raise ValueError(f"response_ids ({len(self.response_ids)}), segment_ids "
                             f"({len(self.segment_ids)}) and logprobs ({len(self.logprobs)}) "
                             "must have the same length")
        if self.stop_reason is not None and self.stop_reason not in STOP_REASONS:
            raise ValueError(f"stop_reason must be one of {STOP_REASONS} or None, got "
                             f"{self.stop_reason!r}")
        if self.start_iteration is None and self.segment_ids:
            self.start_iteration = next((it for it in self.segment_ids if it != TOOL_SEGMENT), None)

    # -------------------------------------------------------------- building
    def append_segment(self, token_ids: Sequence[int], logprobs: Sequence[float],
                       iteration: int, stop_reason: Optional[str] = None) -> "Trajectory":
        """Append the tokens one iteration generated (and set the new stop reason)."""
        if len(token_ids) != len(logprobs):
            raise ValueError(f"{len(token_ids)} tokens but {len(logprobs)} log-probs")
        if iteration < 0:
            raise ValueError(f"iteration must be >= 0, got {iteration} (tool outputs: append_tool_output)")
        if self.last_iteration is not None and iteration < self.last_iteration:
            raise ValueError(f"iteration {iteration} precedes the last segment's "
                             f"{self.last_iteration}")
        if self.start_iteration is None:
            self.start_iteration = int(iteration)
        self.response_ids.extend(int(t) for t in token_ids)
        self.logprobs.extend(float(x) for x in logprobs)
        self.segment_ids.extend([int(iteration)] * len(token_ids))
        if stop_reason is not None and stop_reason not in STOP_REASONS:
            raise ValueError(f"stop_reason must be one of {STOP_REASONS}, got {stop_reason!r}")
        self.stop_reason = stop_reason
        return self

    def append_tool_output(self, token_ids: Sequence[int]) -> "Trajectory":
        """Append a tool's output (tokens no policy sampled: log-prob 0, never in the loss)."""
        self.response_ids.extend(int(t) for t in token_ids)
        self.logprobs.extend([0.0] * len(token_ids))
        self.segment_ids.extend([TOOL_SEGMENT] * len(token_ids))
        return self

    @property
    def tool_tokens(self) -> int:
        return self.segment_ids.count(TOOL_SEGMENT)

    # -------------------------------------------------------------- queries
    @property
    def finished(self) -> bool:
        return self.stop_reason in FINISHED_STOP_REASONS

    @property
    def response_len(self) -> int:
        return len(self.response_ids)

    @property
    def token_ids(self) -> List[int]:
        """prompt + response: what to re-prefill when resuming."""
        return self.prompt_ids + self.response_ids

    @property
    def last_iteration(self) -> Optional[int]:
        return next((it for it in reversed(self.segment_ids) if it != TOOL_SEGMENT), self.start_iteration)

    @property
    def num_segments(self) -> int:
        return len(self.segments())

    def segments(self) -> List[tuple]:
        """[(iteration, start, end)] response-token ranges of each segment, in order (a
        segment's range includes the tool outputs inside it)."""
        out, i = [], 0
        for it, grp in itertools.groupby(self.segment_ids):
            n = sum(1 for _ in grp)
            if out and (it == TOOL_SEGMENT or it == out[-1][0]):
                out[-1] = (out[-1][0], out[-1][1], i + n)
            else:
                out.append((it, i, i + n))
            i += n
        return out

    def loss_mask(self, current_iteration: int, include_old_segments: bool = False,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return loss_mask(self, current_iteration, include_old_segments, dtype)

    # -------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Trajectory":
        return cls(**d)


def loss_mask(traj: Trajectory, current_iteration: int, include_old_segments: bool = False,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(response_len,) mask: 1 for response tokens generated at ``current_iteration``, 0 for
    tokens of earlier segments (1 for those too when ``include_old_segments``) and for tool
    outputs. Tokens tagged with a *later* iteration than ``current_iteration`` are an error."""
    seg = torch.tensor(traj.segment_ids, dtype=torch.int64)
    if seg.numel() and int(seg.max()) > current_iteration:
        raise ValueError(f"trajectory has tokens from iteration {int(seg.max())} > current "
                         f"iteration {current_iteration}")
    if include_old_segments:
        return (seg != TOOL_SEGMENT).to(dtype)
    return (seg == current_iteration).to(dtype)


class ReplayBuffer:
    """FIFO store of unfinished (``"partial"``) trajectories; see the module docstring for
    the ordering and eviction policy.

    Args:
        max_size: at most this many trajectories (None: unbounded).
        max_age: evict trajectories started more than ``max_age`` iterations ago (None: never).
    """

    def __init__(self, max_size: Optional[int] = None, max_age: Optional[int] = None):
        if max_size is not None and max_size < 0:
            raise ValueError(f"max_size must be >= 0, got {max_size}")
        if max_age is not None and max_age < 0:
            raise ValueError(f"max_age must be >= 0, got {max_age}")
        self.max_size = max_size
        self.max_age = max_age
        self._items: List[Trajectory] = []  # kept sorted by (start_iteration, insertion)
        self.num_added = 0
        self.num_resumed = 0
        self.num_evicted = 0
        self.last_evicted: List[Trajectory] = []  # evicted by the last pop_for_resume

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self):
        return iter(list(self._items))

    @property
    def num_tokens(self) -> int:
        """Prompt + response tokens held (what resuming all of them would re-prefill)."""
        return sum(len(t.prompt_ids) + len(t.response_ids) for t in self._items)

    def add(self, traj: Trajectory) -> List[Trajectory]:
        """Store an unfinished trajectory; returns the trajectories evicted to respect
        ``max_size`` (possibly ``traj`` itself when it is the oldest and max_size is 0)."""
        if traj.finished:
            raise ValueError(f"trajectory already finished ({traj.stop_reason!r}); only "
                             "unfinished trajectories go to the replay buffer")
        traj.stop_reason = "partial"
        key = self._key(traj)
        pos = len(self._items)
        while pos > 0 and self._key(self._items[pos - 1]) > key:  # stable: after equal keys
            pos -= 1
        self._items.insert(pos, traj)
        self.num_added += 1
        evicted: List[Trajectory] = []
        if self.max_size is not None:
            while len(self._items) > self.max_size:
                evicted.append(self._evict(0))
        return evicted

    @staticmethod
    def _key(traj: Trajectory) -> int:
        it = traj.start_iteration
        return -1 if it is None else it

    def _evict(self, index: int) -> Trajectory:
        t = self._items.pop(index)
        t.stop_reason = "evicted"
        self.num_evicted += 1
        return t

    def evict_stale(self, iteration: int) -> List[Trajectory]:
        """Remove and return trajectories older than ``max_age`` at ``iteration``."""
        if self.max_age is None:
            return []
        keep, out = [], []
        for t in self._items:
            if t.start_iteration is not None and iteration - t.start_iteration > self.max_age:
                t.stop_reason = "evicted"
                out.append(t)
            else:
                keep.append(t)
        self._items = keep
        self.num_evicted += len(out)
        return out

    def pop_for_resume(self, max_n: int, iteration: Optional[int] = None) -> List[Trajectory]:
        """Remove and return up to ``max_n`` trajectories, oldest first. With ``iteration``,
        stale ones are evicted first (see ``evict_stale``; retrieve them via
        ``last_evicted``)."""
        self.last_evicted = self.evict_stale(iteration) if iteration is not None else []
        n = max(0, min(int(max_n), len(self._items)))
        out, self._items = self._items[:n], self._items[n:]
        self.num_resumed += n
        return out

    def peek(self, max_n: Optional[int] = None) -> List[Trajectory]:
        return list(self._items if max_n is None else self._items[:max_n])

    def clear(self) -> None:
        self._items = []

    def stats(self) -> Dict[str, int]:
        return {"size": len(self._items), "tokens": self.num_tokens, "added": self.num_added,
                "resumed": self.num_resumed, "evicted": self.num_evicted}

    # -------------------------------------------------------------- checkpoints
    def state_dict(self) -> Dict[str, Any]:
        return {
            "version": 1,
            "max_size": self.max_size,
            "max_age": self.max_age,
            "num_added": self.num_added,
            "num_resumed": self.num_resumed,
            "num_evicted": self.num_evicted,
            "trajectories": [t.to_dict() for t in self._items],
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("version") != 1:
            raise ValueError(f"unsupported replay buffer state version {state.get('version')!r}")
        self.max_size = state["max_size"]
        self.max_age = state["max_age"]
        self.num_added = int(state["num_added"])
        self.num_resumed = int(state["num_resumed"])
        self.num_evicted = int(state["num_evicted"])
        self._items = [Trajectory.from_dict(dict(d)) for d in state["trajectories"]]
