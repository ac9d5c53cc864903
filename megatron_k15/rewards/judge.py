"""A generative reward model: a second LLM that reasons about a response and gives a verdict.

Kimi k1.5 grades free-form math answers with a chain-of-thought reward model (a model that
writes its reasoning, then a verdict; the report measures 98.5% agreement with humans against
84.4% for a classic value-head RM). Rule-based checkers miss answers that are right in another
form ("x = 1/2" vs "0.5", an interval written in words); a judge catches them.

Here the judge is any causal LM checkpoint of this codebase (``--reward-model-load``), run by
the same generation engine as the policy, greedily, in the training job's tensor / pipeline
layout. Its prompt is a template with ``{question}``, ``{reference}`` and ``{response}``; it is
asked to end with ``Verdict: correct`` or ``Verdict: incorrect`` (``parse_verdict`` also takes
yes/no, true/false and a JSON ``"correct": true|false``; the last verdict in the text counts;
none at all, or a judge cut off by ``--reward-model-max-tokens``, counts as incorrect and is
reported). Records with their own ``reward_fn`` plug-in are never judged.

Modes (``--reward-model-mode``): ``fallback`` (default) asks the judge only where the rule-based
verifier did not give full credit, and a judge can only add credit (costing nothing on answers
the rules accept);
``replace`` lets the judge grade every response of its tasks. The judge sees the graded part of
a response (after the reasoning block, ``rewards.reasoning``); a response that never left its
reasoning scores 0 without a call.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

DEFAULT_JUDGE_TEMPLATE = """\
You are grading a student's answer to a problem against the reference answer. Decide whether \
the student's final answer is mathematically equivalent to the reference (different forms of \
the same value count as equivalent; the reasoning does not matter, only the final answer).

Problem:
{question}

Reference answer:
{reference}

Student's answer:
{response}

Think step by step, then finish with one line that is exactly "Verdict: correct" or \
"Verdict: incorrect"."""

JUDGE_FIELDS = ("question", "reference", "response")

_VERDICT = re.compile(
    # a line that starts with the verdict (markdown allowed): "Verdict: correct", "**Verdict**: **No**"
    r"^[\s>*_#`-]*verdict[\s*_:#`'\"-]*(correct|incorrect|yes|no|true|false)(?![\w-])"
    # or a JSON field: {"correct": true}, "verdict": "incorrect"
    r"|\"(?:correct|is_correct|verdict)\"\s*:\s*\"?(true|false|correct|incorrect|yes|no)\b",
    re.IGNORECASE | re.MULTILINE)
_POSITIVE = {"correct", "yes", "true"}


def parse_verdict(text: str) -> Optional[bool]:
    """The last verdict in the judge's text: True (correct), False, or None when there is none.
    A verdict line must start with it, so a "Verdict: correct" quoted inside a sentence (e.g.
    planted in the graded answer and repeated by the judge) does not count."""
    last = None
    for m in _VERDICT.finditer(text):
        last = (m.group(1) or m.group(2)).lower() in _POSITIVE
    return last


def check_judge_template(template: str, source: str = "--reward-model-prompt") -> None:
    """Every field present, no unknown field, braces balanced: fail before any work."""
    import string

    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ValueError(f"{source}: not a valid template ({e}); write literal braces as {{{{ }}}}") from None
    unknown = sorted(set(names) - set(JUDGE_FIELDS))
    missing = [f for f in JUDGE_FIELDS if f not in names]
    if unknown or missing:
        raise ValueError(f"{source}: the judge template must contain {{question}}, {{reference}} and "
                         f"{{response}}" + (f"; unknown fields {unknown}" if unknown else "")
                         + (f"; missing {missing}" if missing else ""))


@dataclass
class Judgement:
    """One judge call: which response (index into the regraded list), the verdict (None when
    the text has none or the judge ran out of tokens; counted as incorrect), the judge's text,
    the reward before and after, and whether the judge hit its token budget."""

    index: int
    verdict: Optional[bool]
    text: str
    before: float
    after: float
    truncated: bool = False


def judge_metrics(judgements: Sequence[Judgement], correct: Sequence[bool]) -> dict:
    """``judge_calls``, the fractions judged correct, without a verdict and cut off by
    --reward-model-max-tokens, ``judge_flipped`` (calls whose 0/1 outcome differs from the
    rule-based verifier's), and ``rule_accuracy``: the verifier's alone over all responses
    (``correct``: each response's final correctness), comparable with runs without a judge."""
    n = len(judgements)
    rule_correct = (sum(correct) - sum(j.after >= 1.0 for j in judgements)
                    + sum(j.before >= 1.0 for j in judgements))
    return {"judge_calls": n, "rule_accuracy": rule_correct / max(1, len(correct)),
            "judge_correct_fraction": sum(bool(j.verdict) for j in judgements) / max(1, n),
            "judge_unparsed_fraction": sum(j.verdict is None for j in judgements) / max(1, n),
            "judge_truncated_fraction": sum(j.truncated for j in judgements) / max(1, n),
            "judge_flipped": sum((j.before >= 1.0) != (j.after >= 1.0) for j in judgements)}


@dataclass
class GenerativeJudge:
    """Grades (question, reference, response) triples with a judge model.

    ``generator``: a generation engine on the judge model (tp ranks and pp stages of a replica
    decode together); requests are split over the ``group`` ranks (data x context parallel in
    RL) and the verdicts all-gathered, so every rank returns the same list.
    ``encode(text) -> ids`` renders and tokenizes a judge prompt (with the judge's chat template
    when asked); ``decode(ids) -> text``."""

    generator: object
    encode: object
    decode: object
    eos_ids: Sequence[int]
    template: str = DEFAULT_JUDGE_TEMPLATE
    max_new_tokens: int = 1024
    tasks: frozenset = frozenset({"math"})
    mode: str = "fallback"
    rank: int = 0
    size: int = 1
    group: object = None

    def applies_to(self, record: dict) -> bool:
        """A record of the judge's tasks, without its own ``reward_fn`` plug-in (which is final)."""
        return record.get("task", "math") in self.tasks and not record.get("reward_fn")

    def prompt(self, record: dict, response: str) -> str:
        return self.template.format(question=record.get("prompt", ""),
                                    reference=str(record.get("answer", "")), response=response)

    @torch.no_grad()
    def judge(self, items: list[tuple[dict, str]], split: bool = True) -> list[tuple[Optional[bool], str, bool]]:
        """(verdict, judge text, truncated) for each (record, graded response). A judge cut off
        by its token budget has no verdict. ``split``: the items are the same on every
        ``group`` rank, which each judge a share and all-gather the texts; without it the
        caller's replica judges all its items (every rank of a replica must call)."""
        from megatron_k15.generation.sampling import SamplingParams

        size = self.size if split else 1
        mine = [i for i in range(len(items)) if i % size == (self.rank if split else 0)]
        texts: dict[int, tuple[str, bool]] = {}
        if mine:
            results = self.generator.generate(
                [self.encode(self.prompt(*items[i])) for i in mine], self.max_new_tokens,
                SamplingParams(temperature=0.0), None, list(self.eos_ids))
            texts = {i: (self.decode(r.output_ids), getattr(r, "stop_reason", "eos") == "length")
                     for i, r in zip(mine, results)}
        self.generator.release()
        if size > 1:
            parts = [None] * size
            dist.all_gather_object(parts, texts, group=self.group)
            texts = {i: t for part in parts for i, t in part.items()}
        return [(None if cut else parse_verdict(text), text, cut) for text, cut in (texts[i] for i in range(len(items)))]

    def regrade(self, records: list[dict], graded: list[Optional[str]], rewards: list[float],
                split: bool = True, replica: int = 0) -> tuple[list[float], list[Judgement]]:
        """New rewards and the judgements: where the judge is asked (module docstring) its 0/1,
        in fallback mode never below the rule's reward (partial credit stays). ``graded[i]`` is
        None for a response without an answer.

        Which responses are judged must be the same on every rank that judges them together,
        but rule-based rewards can differ between ranks (a verifier that times out under load):
        so the rewards of the lowest rank of each ``replica`` (all ranks: 0 when ``split``) are
        taken everywhere before anything is asked."""
        rewards = _agreed(list(rewards), 0 if split else replica)
        ask = [i for i, (rec, g) in enumerate(zip(records, graded))
               if g is not None and self.applies_to(rec) and (self.mode == "replace" or rewards[i] < 1.0)]
        out = list(rewards)
        judgements = []
        for i, (verdict, text, cut) in zip(ask, self.judge([(records[i], graded[i]) for i in ask], split)):
            out[i] = 1.0 if verdict else 0.0
            if self.mode == "fallback":
                out[i] = max(out[i], rewards[i])
            judgements.append(Judgement(i, verdict, text, rewards[i], out[i], cut))
        return out, judgements


def _agreed(values: list, replica: int) -> list:
    """``values`` of the lowest global rank with the same ``replica`` key (every rank calls)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (replica, values))
    return next(v for key, v in parts if key == replica)


def judge_from_args(args, *, rank: int = 0, size: int = 1, group=None, max_batch_size: Optional[int] = None,
                    shard_kv_over_cp: bool = False) -> Optional[GenerativeJudge]:
    """The judge ``--reward-model-load`` asks for (None without it): its model stage built and
    loaded in this rank's pipeline stage (``generation.loading``), its tokenizer, template and
    engine. ``shard_kv_over_cp``: the cp ranks decode the same requests together (evaluate);
    in RL each cp rank judges its own share."""
    if not getattr(args, "reward_model_load", None):
        return None
    from megatron_k15.checkpointing import load_config, tokenizer_dir
    from megatron_k15.data.tokenizer import load_tokenizer, render_user_prompt
    from megatron_k15.generation.loading import load_generation_replica

    model, generator = load_generation_replica(
        args, load_config(args.reward_model_load), load_dir=args.reward_model_load,
        max_batch_size=max_batch_size or getattr(args, "rollout_batch_size", 64),
        shard_kv_over_cp=shard_kv_over_cp)
    tok = load_tokenizer(args.reward_model_tokenizer or tokenizer_dir(args.reward_model_load))
    special = set(getattr(tok, "special_ids", []) or [])

    def encode(text: str) -> list[int]:
        return tok.encode(render_user_prompt(tok, text) if args.reward_model_chat_template else text)

    def decode(ids) -> str:
        return tok.decode([t for t in ids if t not in special and t < tok.vocab_size])

    template = DEFAULT_JUDGE_TEMPLATE
    if args.reward_model_prompt:
        with open(args.reward_model_prompt, encoding="utf-8") as f:
            template = f.read()
    eos = model.config.eos_ids() or ([tok.eos_id] if tok.eos_id is not None else [])
    return GenerativeJudge(generator, encode, decode, eos, template, args.reward_model_max_tokens,
                           frozenset(t.strip() for t in args.reward_model_tasks.split(",") if t.strip()),
                           args.reward_model_mode, rank, size, group)


# defaults of the --reward-model-* flags that only make sense with --reward-model-load
_JUDGE_DEFAULTS = {"reward_model_tokenizer": None, "reward_model_prompt": None,
                   "reward_model_chat_template": False, "reward_model_mode": "fallback",
                   "reward_model_tasks": "math", "reward_model_max_tokens": 1024}


def add_judge_args(g) -> None:
    """The ``--reward-model-*`` flags (train_rl, tools/evaluate.py)."""
    g.set_defaults(**_JUDGE_DEFAULTS)
    g.add_argument("--reward-model-load", default=None, metavar="DIR",
                   help="a generative reward model (judge) checkpoint of this codebase: it reasons about "
                        "each answer and ends with 'Verdict: correct|incorrect' (Kimi k1.5's CoT RM)")
    g.add_argument("--reward-model-tokenizer", metavar="PATH|byte",
                   help="the judge's tokenizer (default: DIR/tokenizer)")
    g.add_argument("--reward-model-mode", choices=["fallback", "replace"],
                   help="fallback: judge only what the rule-based verifier marks wrong; "
                        "replace: the judge grades every response of its tasks")
    g.add_argument("--reward-model-tasks", metavar="TASK[,TASK]",
                   help="prompt tasks the judge grades (default math)")
    g.add_argument("--reward-model-prompt", metavar="FILE",
                   help="judge template with {question}, {reference}, {response} (default: built in)")
    g.add_argument("--reward-model-chat-template", action="store_true",
                   help="render the judge prompt as a user turn with the judge tokenizer's chat template")
    g.add_argument("--reward-model-max-tokens", type=int,
                   help="the judge's budget per verdict (its reasoning included)")


def check_judge_args(args) -> Optional[str]:
    """A message naming the flag for a bad --reward-model-* setting, else None."""
    import os

    load = getattr(args, "reward_model_load", None)
    if not load:
        for flag, default in _JUDGE_DEFAULTS.items():
            if getattr(args, flag, default) != default:
                return f"--{flag.replace('_', '-')} needs --reward-model-load DIR (the judge checkpoint)"
        return None
    if not os.path.isdir(load):
        return f"--reward-model-load {load}: directory does not exist"
    from megatron_k15.checkpointing import CheckpointError, load_config, tokenizer_dir
    from megatron_k15.models.config import ConfigError

    try:
        load_config(load).validate(getattr(args, "tensor_model_parallel_size", 1),
                                   getattr(args, "pipeline_model_parallel_size", 1))
    except (CheckpointError, ConfigError) as e:
        return f"--reward-model-load {load}: {e}".replace(f"--load {load}: ", "")
    if args.reward_model_max_tokens < 1:
        return f"--reward-model-max-tokens must be >= 1, got {args.reward_model_max_tokens}"
    if not any(t.strip() for t in args.reward_model_tasks.split(",")):
        return "--reward-model-tasks: name at least one task (e.g. math)"
    tok = args.reward_model_tokenizer
    if tok is None and not os.path.exists(tokenizer_dir(load)):
        return (f"--reward-model-load {load} has no tokenizer/ directory; pass --reward-model-tokenizer "
                "PATH|byte")
    if tok is not None and tok != "byte" and not os.path.exists(tok):
        return f"--reward-model-tokenizer {tok}: no such file or directory (give a tokenizer path or 'byte')"
    if args.reward_model_prompt:
        try:
            with open(args.reward_model_prompt, encoding="utf-8") as f:
                check_judge_template(f.read(), f"--reward-model-prompt {args.reward_model_prompt}")
        except OSError as e:
            return f"--reward-model-prompt {args.reward_model_prompt}: {e.strerror}"
        except ValueError as e:
            return str(e)
    return None
