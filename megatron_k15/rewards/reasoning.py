"""What a verifier grades in the response of a reasoning model.

Reasoning models (Qwen3, DeepSeek-R1 and its distillations) think between tags and answer
after the closing one: ``<think> ... </think> The answer is \\boxed{4}``. The verifier must
see the answer, not the thoughts: a value boxed while thinking is not the model's answer, and
a response that ran out of tokens before closing its reasoning gave no answer at all (grading
its thoughts would reward truncated, unfinished chains). Some chat templates open the block
in the prompt (R1's ends with ``<think>\\n``): a prompt that ends with the opening tag
leaves the block open for the response (a tag elsewhere in the prompt, say in an
instruction, does not).

    tags None (``--reasoning-tags none``)     -> the whole response
    the response closes a block                -> the text after its last closing tag
    a block is open at the end of the response -> None: no answer (reward 0)
    no tags anywhere                           -> the whole response (a plain model)

gpt-oss speaks OpenAI's harmony format (``--reasoning-tags harmony``): it reasons in the
analysis channel and answers in the final one,
``<|channel|>analysis<|message|>...<|end|><|start|>assistant<|channel|>final<|message|>ANSWER<|return|>``.
Those markers are special tokens, so such responses are decoded with special tokens kept;
the answer is the text after the last ``<|channel|>final<|message|>`` up to the next marker
that ends a message, and a response still in its analysis channel has no answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class ReasoningTags:
    open: str = "<think>"
    close: str = "</think>"
    # the tags are special tokens: decode responses with special tokens kept (harmony)
    keep_special: bool = False
    # markers that end the answer after the closing tag (harmony's end of a message)
    answer_end: tuple = ()


HARMONY = ReasoningTags("<|channel|>analysis<|message|>", "<|channel|>final<|message|>", keep_special=True,
                        answer_end=("<|end|>", "<|return|>", "<|call|>", "<|start|>"))


def parse_reasoning_tags(spec: str, flag: str = "--reasoning-tags") -> Optional[ReasoningTags]:
    """``auto`` (``<think>`` / ``</think>``), ``harmony`` (gpt-oss's channels), ``none``, or
    ``OPEN,CLOSE``."""
    if spec == "auto":
        return ReasoningTags()
    if spec == "harmony":
        return HARMONY
    if spec == "none":
        return None
    parts = spec.split(",")
    if len(parts) != 2 or not all(p.strip() for p in parts) or parts[0].strip() == parts[1].strip():
        raise ValueError(f"{flag} {spec!r}: give auto, harmony, none, or two different tags as OPEN,CLOSE "
                         "(e.g. '<think>,</think>')")
    return ReasoningTags(parts[0].strip(), parts[1].strip())


def prompt_opens_reasoning(prompt: str, tags: Optional[ReasoningTags]) -> bool:
    """True when the prompt ends with the opening tag (trailing whitespace aside): the chat
    template started the reasoning block the response continues."""
    return tags is not None and prompt.rstrip().endswith(tags.open)


def tags_survive_decoding(tok, tags: Optional[ReasoningTags]) -> bool:
    """False when the tokenizer drops the tags on decoding (special tokens): grading would then
    never see them and fall back to whole responses."""
    if tags is None or tags.keep_special:
        return True
    return all(t in tok.decode(tok.encode(f"a{t}b")) for t in (tags.open, tags.close))


def graded_text(response: str, tags: Optional[ReasoningTags], prompt_open: bool = False) -> Optional[str]:
    """The part of ``response`` a verifier grades (module docstring); None when the response
    ends inside its reasoning. ``prompt_open``: the prompt opened the block
    (``prompt_opens_reasoning``)."""
    if tags is None:
        return response
    close = response.rfind(tags.close)
    if response.rfind(tags.open) > close:
        return None
    if close < 0:
        return None if prompt_open else response
    answer = response[close + len(tags.close):]
    ends = [i for i in (answer.find(m) for m in tags.answer_end) if i >= 0]
    return answer[:min(ends)] if ends else answer


def grade_response(response: str, record: dict, tags: Optional[ReasoningTags] = None,
                   prompt_open: bool = False) -> tuple[Optional[str], float]:
    """(the graded part of ``response``, the record's verifier reward for it); (None, 0.0) when
    the response ends inside its reasoning."""
    from megatron_k15.rewards.registry import compute_reward

    answer = graded_text(response, tags, prompt_open)
    return answer, (0.0 if answer is None else float(compute_reward(answer, record)))


def response_text(tokenizer, response_ids, stop_strings=None, tags: Optional[ReasoningTags] = None) -> str:
    """The text a verifier grades: the response's tokens without special ones (EOS...), and
    with ``stop_strings`` (``--stop`` / ``--stop-strings``) the text before the first of them.
    With tags that are special tokens (harmony) those are kept; only EOS and padding go."""
    from megatron_k15.generation.stop_strings import cut_at_stop

    keep = tags is not None and tags.keep_special
    if keep:
        drop = {i for i in (tokenizer.eos_id, tokenizer.pad_id) if i is not None}
    else:
        drop = set(getattr(tokenizer, "special_ids", []) or [])
    ids = [i for i in response_ids if i not in drop and i < tokenizer.vocab_size]
    text = tokenizer.decode(ids, keep_special=True) if keep else tokenizer.decode(ids)
    return cut_at_stop(text, stop_strings)


def grade_responses(jobs: list[tuple], workers: int = 1) -> list[tuple[Optional[str], float]]:
    """``grade_response(*job)`` for each job (response, record, tags, prompt_open), in order;
    ``workers > 1`` threads share them (code tests wait on their sandbox processes, sympy
    checks on the symbolic-check servers, so threads run them in parallel)."""
    if workers > 1 and len(jobs) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(workers, len(jobs))) as pool:
            return list(pool.map(lambda job: grade_response(*job), jobs))
    return [grade_response(*job) for job in jobs]


def reward_of_response(response: str, record: dict, tags: Optional[ReasoningTags] = None,
                       prompt_open: bool = False) -> float:
    """The record's verifier reward for the graded part of ``response``; 0 without an answer."""
    return grade_response(response, record, tags, prompt_open)[1]


def reasoning_tags_warning(tok, tags: Optional[ReasoningTags]) -> Optional[str]:
    """A message for the user when the tokenizer would hide the tags from grading."""
    if tags is None or tags_survive_decoding(tok, tags):
        return None
    return (f"warning: the tokenizer drops {tags.open!r} / {tags.close!r} when decoding (special "
            "tokens), so responses are graded whole; pass --reasoning-tags none to silence this, "
            "or tags the tokenizer keeps")
