"""Stop strings: end a generation once its text contains one of them (stop reason ``"stop"``).

Few-shot prompts of a base model need them (stop at the next ``"\\n\\nQuestion:"``), as does any
format that ends in a marker (``"</answer>"``). They are matched in the decoded text, not as
token ids: a BPE tokenizer spells a string with different tokens after different text.

After each new token a request decodes its last ``window`` tokens and looks for the strings
there. ``window`` is the longest string's length in UTF-8 bytes plus one: a token carries at
least one byte, so any occurrence the new token completes lies within that window, and an
earlier occurrence would have stopped the request at an earlier token. The cost is one decode
of ``window`` tokens per request and step, paid only when stop strings are given.

Only an occurrence that the new token completes counts: one already in the window before it
(fed by a caller that primes a resumed request with its earlier tokens, whose verdicts were
given when they were generated) does not stop the request again.

The token ids keep the tokens that spelt the stop string; :func:`cut_at_stop` gives the text
before it (what ``text`` fields and verifiers see, as in vLLM's default).
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

__all__ = ["STOP_REASON_STOP", "StopStrings", "combine_detectors", "cut_at_stop"]

STOP_REASON_STOP = "stop"


class StopStrings:
    """A factory of per-request matchers (the engines' ``repeat_detector`` interface: called
    once per request; the matcher's ``push(token)`` returns ``reason``, ``"stop"`` by default,
    once the text contains a stop string)."""

    def __init__(self, tokenizer, strings: Sequence[str], reason: str = STOP_REASON_STOP):
        strings = list(strings)
        if not strings or any(not isinstance(s, str) or not s for s in strings):
            raise ValueError(f"stop strings must be non-empty strings, got {strings!r}")
        self.tokenizer = tokenizer
        self.strings = strings
        self.reason = reason
        self.window = max(len(s.encode("utf-8")) for s in strings) + 1
        self.vocab_size = getattr(tokenizer, "vocab_size", None)

    def __call__(self) -> "_StopMatcher":
        return _StopMatcher(self)


class _StopMatcher:
    def __init__(self, spec: StopStrings):
        self.spec = spec
        self.window = spec.window  # the most tokens a match looks back over
        self.tail: list[int] = []

    def push(self, token: int) -> Optional[str]:
        spec = self.spec
        if spec.vocab_size is not None and token >= spec.vocab_size:
            return None  # a padded vocabulary's extra id spells nothing
        self.tail.append(int(token))
        del self.tail[:-spec.window]
        text = spec.tokenizer.decode(self.tail)
        found = [s for s in spec.strings if s in text]
        if not found:
            return None
        # an occurrence within the text before this token was seen already (the common prefix:
        # a character whose bytes this token completes decodes to U+FFFD without it)
        before = len(os.path.commonprefix([spec.tokenizer.decode(self.tail[:-1]), text]))
        return spec.reason if any(text.rfind(s) + len(s) > before for s in found) else None


def cut_at_stop(text: str, strings: Optional[Sequence[str]]) -> str:
    """``text`` before the first occurrence of any of ``strings`` (all of it without one)."""
    cut = min((i for i in (text.find(s) for s in strings or ()) if i >= 0), default=-1)
    return text if cut < 0 else text[:cut]


def combine_detectors(*factories: Optional[Callable[[], object]]) -> Optional[Callable[[], object]]:
    """One per-request detector factory from several (None entries skipped), e.g. RL's repeat
    detector and stop strings: its ``push`` feeds every detector and returns the first stop
    reason (True, as the repeat detector returns it, is ``"repeat"`` to the engines)."""
    live = [f for f in factories if f is not None]
    if len(live) <= 1:
        return live[0] if live else None
    return lambda: _Combined([f() for f in live])


class _Combined:
    def __init__(self, detectors: list):
        self.detectors = detectors
        self.window = max(d.window for d in detectors)

    def push(self, token: int):
        reasons = [d.push(token) for d in self.detectors]  # every detector sees every token
        return next((r for r in reasons if r), None)
