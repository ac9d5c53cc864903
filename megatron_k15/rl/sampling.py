"""Prompt samplers for RL iterations: uniform, curriculum (easy to hard) and prioritised.

Every sampler draws ``sample(n, iteration) -> list[int]`` (indices into the prompt records)
from a ``numpy.random.Generator`` seeded once; ``state_dict()`` captures the generator state
plus everything else that influences future draws (plain Python types: picklable and
JSON-serialisable), so ``load_state_dict`` on a fresh sampler built with the same records
continues exactly where the saved one stopped. The state names its prompts by a fingerprint
of their ids, so a resume with another prompt set of the same size is refused instead of
giving its prompts the saved ones' success rates, and weighted sets given in another order
are matched to their own states. ``update(prompt_ids, successes)`` feeds back
per-sample correctness (a no-op except for the prioritised sampler).

* ``UniformSampler``: epochs of random permutations; each prompt is seen once per epoch.
* ``CurriculumSampler``: before ``switch_iter`` only the easy pool is used: prompts with
  ``difficulty <= threshold`` if a threshold is given, else the ``easy_fraction`` easiest
  prompts (ties broken by index). From ``switch_iter`` on, ``after="all"`` (default) samples
  from every prompt, ``after="hard"`` only from the prompts outside the easy pool. Within a
  pool, sampling is by epochs of permutations as in the uniform sampler (restarted when the
  pool changes).
* ``PrioritizedSampler``: prompt i is drawn with probability proportional to
  ``(1 - s_i) + floor``, s_i its tracked success rate: an exponential moving average
  ``s <- (1 - alpha) s + alpha * mean(successes in this update)`` (``alpha`` given) or the
  running mean of all its outcomes (``alpha=None``). Prompts never attempted start at their
  record's ``pass_rate`` (``tools/curate_prompts.py``), else at ``initial_success``; the
  running mean replaces that start with the first outcomes, the moving average blends it
  out. n <= #prompts are drawn without replacement.
* ``MixtureSampler``: weighted prompt sets, one of the above per set (see its docstring).
"""

from __future__ import annotations

import hashlib
import inspect
from typing import Any, Optional, Sequence

import numpy as np

__all__ = ["PromptSampler", "UniformSampler", "CurriculumSampler", "PrioritizedSampler",
           "MixtureSampler", "build_sampler", "SAMPLERS"]


def _field(records, name: str, default: float) -> list[float]:
    """Each record's numeric ``name`` (dict key or attribute), ``default`` where absent."""
    if isinstance(records, int):
        return [default] * records
    out = []
    for r in records:
        d = r.get(name, default) if isinstance(r, dict) else getattr(r, name, default)
        out.append(float(d if d is not None else default))
    return out


def prompts_fingerprint(records) -> Optional[str]:
    """A short hash of the records' ids in order (None for a bare count of prompts)."""
    if isinstance(records, int):
        return None
    h = hashlib.sha256()
    for r in records:
        h.update(str(r.get("id", "")).encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()[:16]


def _check_fingerprint(state: dict, fingerprint: Optional[str]) -> None:
    saved = state.get("fingerprint")
    if saved is not None and fingerprint is not None and saved != fingerprint:
        raise ValueError("sampler state is for other prompts (same count, different ids or order): resume "
                         "with the checkpoint's --prompt-data, or start from its weights with --finetune")


def _difficulties(records) -> list[float]:
    return _field(records, "difficulty", 0.0)


class PromptSampler:
    """Base class: ``records`` is a sequence of prompt records (dicts with an optional
    ``difficulty``) or just the number of prompts."""

    name = "base"

    def __init__(self, records, seed: int = 0):
        self.difficulty = _difficulties(records)
        self.num_prompts = len(self.difficulty)
        if self.num_prompts == 0:
            raise ValueError("sampler needs at least one prompt")
        self.seed = int(seed)
        self.rng = np.random.default_rng(self.seed)
        self.fingerprint = prompts_fingerprint(records)

    def __len__(self) -> int:
        return self.num_prompts

    def sample(self, n: int, iteration: int = 0) -> list[int]:
        raise NotImplementedError

    def update(self, prompt_ids: Sequence[int], successes: Sequence[float]) -> None:
        """Feedback after scoring (ignored by samplers that do not use it)."""

    # state ------------------------------------------------------------------------------
    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, state: dict) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "num_prompts": self.num_prompts, "seed": self.seed,
                "fingerprint": self.fingerprint, "rng": self.rng.bit_generator.state, **self._extra_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"sampler state is for {state.get('name')!r}, not {self.name!r}")
        if int(state["num_prompts"]) != self.num_prompts:
            raise ValueError(f"sampler state has {state['num_prompts']} prompts, this one {self.num_prompts}")
        _check_fingerprint(state, self.fingerprint)
        self.seed = int(state["seed"])
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = state["rng"]
        self._load_extra_state(state)


class _EpochStream:
    """Endless stream of a pool's indices, one random permutation per epoch."""

    def __init__(self):
        self.pool: list[int] = []
        self.perm: list[int] = []
        self.pos = 0

    def reset(self, pool: list[int]):
        self.pool, self.perm, self.pos = list(pool), [], 0

    def take(self, n: int, rng: np.random.Generator) -> list[int]:
        out = []
        while len(out) < n:
            if self.pos >= len(self.perm):
                self.perm = [self.pool[i] for i in rng.permutation(len(self.pool)).tolist()]
                self.pos = 0
            k = min(n - len(out), len(self.perm) - self.pos)
            out.extend(self.perm[self.pos:self.pos + k])
            self.pos += k
        return out

    def state(self) -> dict:
        return {"pool": list(self.pool), "perm": list(self.perm), "pos": self.pos}

    def load(self, s: dict):
        self.pool, self.perm, self.pos = list(s["pool"]), list(s["perm"]), int(s["pos"])


class UniformSampler(PromptSampler):
    """Uniform without replacement within an epoch (random permutation per epoch)."""

    name = "uniform"

    def __init__(self, records, seed: int = 0):
        super().__init__(records, seed)
        self.stream = _EpochStream()
        self.stream.reset(list(range(self.num_prompts)))

    def sample(self, n: int, iteration: int = 0) -> list[int]:
        return self.stream.take(int(n), self.rng)

    def _extra_state(self):
        return {"stream": self.stream.state()}

    def _load_extra_state(self, state):
        self.stream.load(state["stream"])


class CurriculumSampler(PromptSampler):
    """Easy prompts first, everything (or only the hard rest) from ``switch_iter`` on."""

    name = "curriculum"

    def __init__(self, records, seed: int = 0, switch_iter: int = 0, threshold: float | None = None,
                 easy_fraction: float = 0.5, after: str = "all"):
        super().__init__(records, seed)
        if after not in ("all", "hard"):
            raise ValueError(f"after must be 'all' or 'hard', got {after!r}")
        self.switch_iter, self.threshold, self.after = int(switch_iter), threshold, after
        order = sorted(range(self.num_prompts), key=lambda i: (self.difficulty[i], i))
        if threshold is not None:
            easy = [i for i in order if self.difficulty[i] <= threshold]
        else:
            if not 0.0 < easy_fraction <= 1.0:
                raise ValueError(f"easy_fraction must be in (0, 1], got {easy_fraction}")
            easy = order[:max(1, int(round(easy_fraction * self.num_prompts)))]
        if not easy:
            raise ValueError(f"no prompt has difficulty <= {threshold}")
        easy_set = set(easy)
        self.easy_pool = sorted(easy)
        self.hard_pool = [i for i in range(self.num_prompts) if i not in easy_set]
        if after == "hard" and not self.hard_pool:
            self.hard_pool = list(range(self.num_prompts))
        self.phase = "easy"
        self.stream = _EpochStream()
        self.stream.reset(self.easy_pool)

    def pool_for(self, iteration: int) -> tuple[str, list[int]]:
        if iteration < self.switch_iter:
            return "easy", self.easy_pool
        if self.after == "hard":
            return "hard", self.hard_pool
        return "all", list(range(self.num_prompts))

    def sample(self, n: int, iteration: int = 0) -> list[int]:
        phase, pool = self.pool_for(int(iteration))
        if phase != self.phase:
            self.phase = phase
            self.stream.reset(pool)
        return self.stream.take(int(n), self.rng)

    def _extra_state(self):
        return {"phase": self.phase, "stream": self.stream.state()}

    def _load_extra_state(self, state):
        self.phase = state["phase"]
        self.stream.load(state["stream"])


class PrioritizedSampler(PromptSampler):
    """P(i) proportional to (1 - s_i) + floor, s_i the tracked success rate of prompt i."""

    name = "prioritized"

    def __init__(self, records, seed: int = 0, floor: float = 0.05, alpha: float | None = 0.5,
                 initial_success: float = 0.0):
        super().__init__(records, seed)
        if floor < 0:
            raise ValueError("floor must be >= 0")
        if alpha is not None and not 0.0 < alpha <= 1.0:
            raise ValueError("alpha must be in (0, 1] or None (running mean)")
        self.floor, self.alpha = float(floor), alpha
        # a curated prompt's measured pass rate (tools/curate_prompts.py) is its starting point
        self.success = np.asarray(_field(records, "pass_rate", float(initial_success)), dtype=np.float64)
        self.counts = np.zeros(self.num_prompts, dtype=np.int64)

    def probabilities(self) -> np.ndarray:
        w = np.clip(1.0 - self.success, 0.0, None) + self.floor
        total = w.sum()
        if total <= 0:  # everything solved and floor == 0: fall back to uniform
            return np.full(self.num_prompts, 1.0 / self.num_prompts)
        return w / total

    def sample(self, n: int, iteration: int = 0) -> list[int]:
        n = int(n)
        p = self.probabilities()
        if n <= self.num_prompts and np.count_nonzero(p) >= n:
            return self.rng.choice(self.num_prompts, size=n, replace=False, p=p).tolist()
        return self.rng.choice(self.num_prompts, size=n, replace=True, p=p).tolist()

    def update(self, prompt_ids: Sequence[int], successes: Sequence[float]) -> None:
        ids = np.asarray(list(prompt_ids), dtype=np.int64)
        succ = np.asarray([float(s) for s in successes], dtype=np.float64)
        if ids.shape != succ.shape:
            raise ValueError("prompt_ids and successes must have the same length")
        if ids.size == 0:
            return
        uniq, inv = np.unique(ids, return_inverse=True)
        n = np.bincount(inv, minlength=uniq.size)
        mean = np.bincount(inv, weights=succ, minlength=uniq.size) / n
        if self.alpha is None:  # running mean over all outcomes
            c = self.counts[uniq]
            self.success[uniq] = np.where(c > 0, (self.success[uniq] * c + mean * n) / (c + n), mean)
        else:
            self.success[uniq] = (1.0 - self.alpha) * self.success[uniq] + self.alpha * mean
        self.counts[uniq] += n

    def _extra_state(self):
        return {"success": self.success.tolist(), "counts": self.counts.tolist()}

    def _load_extra_state(self, state):
        self.success = np.asarray(state["success"], dtype=np.float64)
        self.counts = np.asarray(state["counts"], dtype=np.int64)


SAMPLERS = {"uniform": UniformSampler, "curriculum": CurriculumSampler,
            "prioritized": PrioritizedSampler}


class MixtureSampler:
    """Weighted prompt sets (``--prompt-data 0.7 math 0.3 code``): one sampler of the chosen
    kind per set, over that set's prompts (its curriculum pools, its success rates), and a
    fixed share of every draw for each set.

    The n prompts of a draw are dealt one at a time to the set furthest behind its share of
    everything drawn so far, ``argmax_k (T * w_k - drawn_k)`` with T the running total, so the
    shares are exact over time (off by less than one prompt per set at any moment), however
    small n is. The draw is then shuffled, so each generation rank gets a mix. Indices are
    global (set k's prompt j is ``offsets[k] + j``), as for one concatenated set."""

    name = "mixture"

    def __init__(self, parts: Sequence[PromptSampler], weights: Sequence[float], seed: int = 0):
        if len(parts) != len(weights) or not parts:
            raise ValueError("a mixture needs one weight per prompt set")
        w = np.asarray([float(x) for x in weights], dtype=np.float64)
        if not (np.all(np.isfinite(w)) and np.all(w > 0)):
            raise ValueError(f"mixture weights must be finite and > 0, got {list(weights)}")
        self.parts, self.weights = list(parts), (w / w.sum()).tolist()
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts]).tolist()
        self.num_prompts = self.offsets[-1]
        self.seed = int(seed)
        self.rng = np.random.default_rng([self.seed, len(self.parts)])
        self.drawn = [0] * len(self.parts)

    def __len__(self) -> int:
        return self.num_prompts

    def counts(self, n: int) -> list[int]:
        """How many of the next ``n`` prompts each set gets (advances the running totals)."""
        out = [0] * len(self.parts)
        for _ in range(int(n)):
            total = sum(self.drawn) + 1
            k = max(range(len(self.parts)), key=lambda j: (total * self.weights[j] - self.drawn[j], -j))
            self.drawn[k] += 1
            out[k] += 1
        return out

    def sample(self, n: int, iteration: int = 0) -> list[int]:
        picks = [self.offsets[k] + i for k, c in enumerate(self.counts(n)) if c
                 for i in self.parts[k].sample(c, iteration)]
        return [picks[i] for i in self.rng.permutation(len(picks)).tolist()]

    def update(self, prompt_ids: Sequence[int], successes: Sequence[float]) -> None:
        ids, succ = list(prompt_ids), list(successes)
        if len(ids) != len(succ):
            raise ValueError("prompt_ids and successes must have the same length")
        sets = np.searchsorted(self.offsets, np.asarray(ids, dtype=np.int64), side="right") - 1
        for k, part in enumerate(self.parts):
            mine = [j for j, s in enumerate(sets.tolist()) if s == k]
            if mine:
                part.update([ids[j] - self.offsets[k] for j in mine], [succ[j] for j in mine])

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "num_prompts": self.num_prompts, "seed": self.seed,
                "sizes": [len(p) for p in self.parts], "weights": list(self.weights),
                "rng": self.rng.bit_generator.state, "drawn": list(self.drawn),
                "parts": [p.state_dict() for p in self.parts]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"sampler state is for {state.get('name')!r} (one prompt set or unweighted ones), "
                             "not a weighted mixture")
        order = self._saved_order(state)  # current set k was saved as set order[k]
        saved_sizes = [state["sizes"][j] for j in order]
        sizes = [len(p) for p in self.parts]
        if saved_sizes != sizes:
            raise ValueError(f"sampler state is for prompt sets of {state['sizes']} prompts, these have {sizes}")
        self.seed = int(state["seed"])
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = state["rng"]
        drawn = [int(state["drawn"][j]) for j in order]
        if np.allclose([state["weights"][j] for j in order], self.weights, rtol=0.0, atol=1e-12):
            self.drawn = drawn
        else:  # new weights take effect now: as if everything so far had been drawn at them
            from megatron_k15.data.blend import largest_remainders

            self.drawn = largest_remainders(sum(drawn), self.weights)
        for k, part in enumerate(self.parts):
            try:
                part.load_state_dict(state["parts"][order[k]])
            except ValueError as e:
                raise ValueError(f"prompt set {k + 1} of {len(self.parts)}: {e}") from None

    def _saved_order(self, state: dict) -> list[int]:
        """The saved set of each current one: by fingerprint when the same sets come in
        another order (each continues from its own state and share; the mix's ties now break
        in the new order), else by position."""
        saved = [p.get("fingerprint") for p in state["parts"]]
        mine = [p.fingerprint for p in self.parts]
        if None not in saved + mine and sorted(saved) == sorted(mine) and len(set(mine)) == len(mine):
            return [saved.index(f) for f in mine]
        return list(range(len(self.parts)))


def build_sampler(name: str, records, seed: int = 0, sizes: Sequence[int] | None = None,
                  weights: Sequence[float] | None = None, **kw):
    """Sampler for ``--sampling {uniform,curriculum,prioritized}``; ``kw`` go to its
    constructor (curriculum: switch_iter, threshold, easy_fraction, after; prioritized:
    floor, alpha, initial_success). Keywords meant for another sampler are ignored, so a
    caller can pass every sampler option; a keyword no sampler takes raises. With
    ``weights``, ``records`` are prompt sets of ``sizes`` end to end, mixed by a
    ``MixtureSampler`` (one sampler of this kind per set, each seeded on its own)."""
    if weights is not None:
        if sizes is None or sum(sizes) != (records if isinstance(records, int) else len(records)):
            raise ValueError("a weighted mixture needs the sizes of its prompt sets, adding up to the records")
        parts, start = [], 0
        for k, size in enumerate(sizes):
            part = size if isinstance(records, int) else records[start:start + size]
            try:
                parts.append(build_sampler(name, part, seed=seed + 1000003 * (k + 1), **kw))
            except ValueError as e:
                raise ValueError(f"prompt set {k + 1} of {len(sizes)}: {e}") from None
            start += size
        return MixtureSampler(parts, weights, seed=seed)
    name = {"prioritised": "prioritized"}.get(name, name)
    try:
        cls = SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose from {sorted(SAMPLERS)}") from None
    known = {p for c in SAMPLERS.values() for p in inspect.signature(c.__init__).parameters}
    unknown = set(kw) - known
    if unknown:
        raise TypeError(f"unknown sampler option(s) {sorted(unknown)}")
    mine = inspect.signature(cls.__init__).parameters
    return cls(records, seed=seed, **{k: v for k, v in kw.items() if k in mine})
