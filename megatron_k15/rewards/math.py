"""Verifiable reward for math answers.

``verify(response, reference)`` takes the final answer out of a model response, normalises
LaTeX on both sides and decides equality in three steps, cheapest first:

1. string equality after normalisation;
2. exact/numeric equality when both sides are plain numbers (fractions, decimals,
   percentages, scientific notation), with a small relative tolerance;
3. symbolic equality with sympy (``simplify(a - b) == 0``, then a numeric check at random
   points), run by a warm helper process in a forked child that is killed after a hard time
   limit, because sympy (and Python big-integer arithmetic) can run for ever on adversarial
   input (:mod:`megatron_k15.rewards.deadline`: the trainer itself is never forked).

Structured answers are split first: intervals ``[a,b)``, tuples ``(a,b)`` (ordered),
sets ``\\{a,b\\}`` and bare lists ``a, b`` / ``a or b`` (order-insensitive), unions ``\\cup``.

Nothing here raises on junk input: ``verify`` returns False.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Optional

from megatron_k15.rewards.deadline import DeadlineServerPool

__all__ = ["verify", "extract_answer", "normalize_answer", "math_reward", "SYMBOLIC_TIMEOUT_S"]

SYMBOLIC_TIMEOUT_S = 1.5
_MAX_ANSWER_CHARS = 1000
_MAX_ITEMS = 64
_MAX_SYMBOLIC_CHARS = 300
_REL_TOL = 1e-6
_ABS_TOL = 1e-9

# ----------------------------------------------------------------------------------------
# Brace helpers


def _match_brace(s: str, i: int) -> int:
    """Index just past the group that opens at s[i] (one of '{', '(', '['); -1 if unbalanced."""
    pairs = {"{": "}", "(": ")", "[": "]"}
    opener = s[i]
    closer = pairs[opener]
    depth = 0
    j = i
    while j < len(s):
        c = s[j]
        if c == "\\" and j + 1 < len(s) and s[j + 1] in "{}":
            j += 2
            continue
        if c == opener:
            depth += 1
        elif c == closer:
            depth -= 1
            if depth == 0:
                return j + 1
        j += 1
    return -1


def _read_arg(s: str, i: int) -> tuple[Optional[str], int]:
    """Read one LaTeX argument starting at s[i] (after skipping spaces): ``{...}``, a
    ``\\command`` or a single character. Returns (content, index after it)."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        return None, i
    if s[i] == "{":
        end = _match_brace(s, i)
        if end < 0:
            return None, i
        return s[i + 1 : end - 1], end
    if s[i] == "\\":
        m = re.match(r"\\[a-zA-Z]+", s[i:])
        if m:
            return m.group(0), i + len(m.group(0))
        return s[i : i + 2], i + 2
    return s[i], i + 1


# ----------------------------------------------------------------------------------------
# Answer extraction

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\b")
_ANSWER_IS_RE = re.compile(r"answer\s+is\s*[:：]?\s*(.+)", re.IGNORECASE)
_ANSWER_COLON_RE = re.compile(r"answer\s*\**\s*[:：]\s*\**\s*(.+)", re.IGNORECASE)
_NUMBER_RE = re.compile(
    r"(?=[-+]?\.?\d)[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:/\d+)?(?:[eE][-+]?\d+)?"
)


def last_boxed(text: str) -> Optional[str]:
    """The content of the last ``\\boxed{...}`` (balanced braces) or ``\\boxed x`` in ``text``."""
    matches = list(_BOX_RE.finditer(text))
    for m in reversed(matches):
        i = m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            end = _match_brace(text, i)
            if end > 0:
                return text[i + 1 : end - 1]
            continue
        # ``\boxed 5`` form: up to whitespace or '$'
        rest = re.match(r"[^\s$]+", text[i:])
        if rest:
            return rest.group(0)
    return None


def _clean_tail(ans: str) -> str:
    ans = ans.strip()
    # drop a sentence continuation after a math span, markdown emphasis and final dots
    ans = re.sub(r"^\*+|\*+$", "", ans).strip()
    if ans.startswith("$"):
        end = ans.find("$", 1)
        if end > 0 and not ans.startswith("$$"):
            ans = ans[: end + 1]
    elif ans.startswith("\\("):
        end = ans.find("\\)")
        if end > 0:
            ans = ans[: end + 2]
    ans = ans.strip().rstrip(".。").strip()
    return ans


def _last_number(text: str) -> Optional[str]:
    best = None
    for m in _NUMBER_RE.finditer(text):
        tok = m.group(0)
        if re.search(r"\d", tok):
            best = tok
    return best


def extract_answer(response: str) -> Optional[str]:
    """The final answer in a response, or None when there is none."""
    try:
        if not isinstance(response, str) or not response.strip():
            return None
        boxed = last_boxed(response)
        if boxed is not None:
            return boxed.strip()
        for rx in (_ANSWER_IS_RE, _ANSWER_COLON_RE):
            hits = list(rx.finditer(response))
            if hits:
                line = hits[-1].group(1).split("\n")[0]
                ans = _clean_tail(line)
                if ans:
                    return ans
        return _last_number(response)
    except Exception:  # noqa: BLE001 - never raise on junk
        return None


# ----------------------------------------------------------------------------------------
# Normalisation

_UNWRAP_CMDS = ("text", "textbf", "textit", "textrm", "mathrm", "mathbf", "mathit", "mbox",
                "operatorname", "textnormal", "mathsf", "boldsymbol", "mathbb")
_UNITS = (
    "square units", "sq units", "units", "unit", "square feet", "square inches", "square meters",
    "square centimeters", "square cm", "sq ft", "sq in", "cubic feet", "cubic inches",
    "cubic meters", "cubic centimeters", "cubic units", "centimeters", "centimetres", "meters",
    "metres", "millimeters", "kilometers", "inches", "inch", "feet", "foot", "ft", "yards",
    "yard", "miles", "mile", "cm", "mm", "km", "m", "in", "degrees", "degree", "radians",
    "dollars", "dollar", "cents", "cent", "hours", "hour", "hrs", "minutes", "minute", "mins",
    "seconds", "second", "sec", "days", "day", "weeks", "week", "months", "years", "year",
    "kg", "grams", "gram", "g", "pounds", "lbs", "lb", "ounces", "oz", "liters", "litres",
    "liter", "ml", "mph", "kmh", "people", "students", "ways", "points", "percent",
)
# words that are math after a number, not units or nouns: "2 pi" is 2*pi
_MATH_WORDS = {"pi", "sin", "cos", "tan", "cot", "sec", "csc", "log", "ln", "exp", "sqrt", "sinh", "cosh",
               "tanh", "mod"}
_UNITS_RE = re.compile(
    r"(?:(?<=[\d}) ])|^)\s*(?:" + "|".join(re.escape(u) for u in sorted(_UNITS, key=len, reverse=True))
    + r")(?:\^\{?[23]\}?|²|³)?\s*$"
)


def _unwrap_commands(s: str) -> str:
    pat = re.compile(r"\\(" + "|".join(_UNWRAP_CMDS) + r")\s*\{")
    for _ in range(50):
        m = pat.search(s)
        if not m:
            break
        start = m.start()
        brace = m.end() - 1
        end = _match_brace(s, brace)
        if end < 0:
            s = s[:start] + s[brace + 1 :]
            continue
        s = s[:start] + s[brace + 1 : end - 1] + s[end:]
    return s


def _fix_frac_sqrt(s: str) -> str:
    """Give ``\\frac`` and ``\\sqrt`` braced arguments: ``\\frac12`` -> ``\\frac{1}{2}``."""
    out = []
    i = 0
    n = len(s)
    while i < n:
        if s.startswith("\\frac", i) and not s[i + 5 : i + 6].isalpha():
            a, j = _read_arg(s, i + 5)
            b, k = _read_arg(s, j) if a is not None else (None, j)
            if a is None or b is None:
                out.append(s[i:])
                break
            out.append("\\frac{" + _fix_frac_sqrt(a) + "}{" + _fix_frac_sqrt(b) + "}")
            i = k
        elif s.startswith("\\sqrt", i) and not s[i + 5 : i + 6].isalpha():
            j = i + 5
            root = ""
            while j < n and s[j] == " ":
                j += 1
            if j < n and s[j] == "[":
                end = _match_brace(s, j)
                if end < 0:
                    out.append(s[i:])
                    break
                root = "[" + s[j + 1 : end - 1] + "]"
                j = end
            a, k = _read_arg(s, j)
            if a is None:
                out.append(s[i:])
                break
            out.append("\\sqrt" + root + "{" + _fix_frac_sqrt(a) + "}")
            i = k
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def _repeating_decimals(s: str) -> str:
    """``0.\\overline{3}`` -> ``\\frac{1}{3}``, ``1.2\\overline{36}`` -> ``\\frac{68}{55}`` (exact):
    I.A(B repeated) = I + (AB - A) / (10^|A| (10^|B| - 1)). ``\\bar{3}``, ``\\dot{6}`` and an
    unbraced single digit (``0.\\overline 3``) mark a repetend too."""

    def to_fraction(m: re.Match) -> str:
        whole, fixed, rep = m.group(1) or "0", m.group(2), m.group(3) or m.group(4)
        num = int(fixed + rep) - (int(fixed) if fixed else 0)
        value = int(whole) + Fraction(num, 10 ** len(fixed) * (10 ** len(rep) - 1))
        return f"\\frac{{{value.numerator}}}{{{value.denominator}}}"

    return re.sub(r"(\d*)\.(\d*)\\(?:overline|bar|dot)\s*(?:\{\s*(\d+)\s*\}|(\d))", to_fraction, s)


def _canon_number_text(s: str) -> str:
    s = re.sub(r"(?<![\d.])\.(\d)", r"0.\1", s)  # .5 -> 0.5
    s = re.sub(r"(\d+\.\d*?[1-9])0+(?![\d])", r"\1", s)  # 2.50 -> 2.5
    s = re.sub(r"(\d+)\.0+(?![\d])", r"\1", s)  # 3.00 -> 3
    s = re.sub(r"(\d+)\.(?![\d])", r"\1", s)  # 3. -> 3
    return s


def normalize_answer(ans: str) -> str:
    """Canonical text form of an answer (no structure splitting)."""
    s = ans.strip()
    inner = last_boxed(s)
    if inner is not None:
        s = inner
    s = s.replace("\n", " ").replace("\u2212", "-").replace("\u00d7", "\\times ")
    s = s.replace("\u03c0", "\\pi ").replace("\u221e", "\\infty ").replace("\u221a", "\\sqrt")
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"\\\(|\\\)|\\\[|\\\]", "", s)
    s = re.sub(r"\\(?:displaystyle|textstyle|scriptstyle)\b", "", s)
    s = re.sub(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|big|Big)(?![a-zA-Z])\s*", "", s)
    s = s.replace("\\left.", "").replace("\\right.", "")
    s = re.sub(r"(?<!\\)\\[!,;:> ]", " ", s)  # spacing commands, not the end of a row break
    s = re.sub(r"\\q?quad\b", " ", s)
    s = s.replace("~", " ")
    s = s.replace("{,}", ",")
    s = re.sub(r"\\[dt]frac(?![a-zA-Z])", r"\\frac", s)
    s = _repeating_decimals(s)
    # a number or fraction followed by words in \text: "\frac34\text{ of the pie}" (letters in
    # math mode, "\frac12 x", are a product and stay)
    m = re.fullmatch(r"\s*([-+]?(?:\\frac\s*(?:\{[^{}]*\}|\d)\s*(?:\{[^{}]*\}|\d)|\d[\d,]*(?:\.\d+)?))\s*"
                     r"\\(?:text|textrm|mbox|textnormal)\s*\{\s*[A-Za-z][A-Za-z ]*\}\s*", s)
    if m:
        s = m.group(1)
    # the real line, as an interval: "\mathbb{R}", "\mathbb R", "ℝ"
    s = re.sub(r"\\mathbb\s*(?:\{\s*R\s*\}|R(?![a-zA-Z]))|\u211d", "(-\\\\infty,\\\\infty)", s)
    s = _unwrap_commands(s)
    # degrees and percent
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|°|\\degree\b", "", s)
    s = s.replace("\\%", "").replace("%", "")
    s = re.sub(r"\\(?:le|leq|leqslant)(?![a-zA-Z])", "<=", s)
    s = re.sub(r"\\(?:ge|geq|geqslant)(?![a-zA-Z])", ">=", s)
    s = re.sub(r"\\(?:ne|neq)(?![a-zA-Z])", "!=", s)
    s = re.sub(r"\\(?:cdot|times|ast)(?![a-zA-Z])", "*", s)
    s = re.sub(r"\\div(?![a-zA-Z])", "/", s)
    s = re.sub(r"\\(?:varnothing|emptyset)(?![a-zA-Z])", "\\\\emptyset", s)
    s = s.replace("\\{", "{").replace("\\}", "}")
    s = re.sub(r"\\(?:lbrace)(?![a-zA-Z])", "{", s)
    s = re.sub(r"\\(?:rbrace)(?![a-zA-Z])", "}", s)
    s = re.sub(r"\\(?:cup)(?![a-zA-Z])", " \\\\cup ", s)
    s = re.sub(r"\s+(?:or|and)\s+", ",", s)
    s = re.sub(r"^\s*(?:or|and)\s+|\s+(?:or|and)\s*$", "", s)
    s = s.strip().rstrip(".").strip()
    # trailing unit words
    for _ in range(3):
        new = _UNITS_RE.sub("", s).strip()
        if new == s or not new:
            break
        s = new
    # a number followed by words ("5 apples"), not by a variable or a constant ("3 x", "2 pi")
    # ("4 ab" is 4ab: a two-letter word is taken for variables unless more words follow)
    m = re.match(r"^([-+]?\d[\d,]*(?:\.\d+)?)\s+([a-zA-Z]+)([a-zA-Z ]*)$", s)
    if (m and (len(m.group(2)) > 2 or (len(m.group(2)) == 2 and m.group(3).strip()))
            and m.group(2).lower() not in _MATH_WORDS):
        s = m.group(1)
    s = _fix_frac_sqrt(s)
    # a logarithm's base: "\log_2 8", "\log_{10}(x)" -> "\log(8,2)", "\log(x,10)" (sympy's log(x, b))
    s = re.sub(r"\\log_\{?([0-9a-zA-Z]+)\}?\s*(\([^()]*\)|\{[^{}]*\}|[A-Za-z0-9.]+)",
               lambda m: "\\log(" + m.group(2).strip("(){}") + "," + m.group(1) + ")", s)
    # keep command boundaries when spaces go: "\pi r" -> "\pi*r", "\sin x" -> "\sin(x)"
    s = re.sub(r"\\(ln|log|exp|sin|cos|tan|cot|sec|csc|sinh|cosh|tanh)\s+([A-Za-z0-9]+)",
               r"\\\1(\2)", s)
    s = re.sub(r"(\\(?!cup\b)[a-zA-Z]+)\s+(?=[A-Za-z0-9\\])", r"\1*", s)
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    # thousands separators (only for a whole plain number)
    if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    # a mixed number, the whole answer: "2\frac{1}{4}" is 9/4 ("express as a mixed number"), not 2 * 1/4
    m = re.fullmatch(r"([-+]?)(\d+)\\frac\{(\d+)\}\{(\d+)\}", s)
    if m and int(m.group(4)) > 0:
        whole, num, den = int(m.group(2)), int(m.group(3)), int(m.group(4))
        s = f"{'-' if m.group(1) == '-' else ''}\\frac{{{whole * den + num}}}{{{den}}}"
    # multiple choice "(B)" -> "B"
    m = re.fullmatch(r"\(?([A-Ea-e])\)", s)
    if m:
        s = m.group(1).upper()
    s = _canon_number_text(s)
    if s.startswith("+") and len(s) > 1:
        s = s[1:]
    return s


def _strip_lhs(s: str) -> str:
    """``x=5`` -> ``5`` (a simple variable or function name on the left of a single '=')."""
    if s.count("=") == 1 and not re.search(r"[<>!]=", s):
        lhs, rhs = s.split("=")
        if rhs and re.fullmatch(r"\\?[a-zA-Z]+(?:_\{?\w+\}?)?(?:\([a-zA-Z]\))?", lhs):
            return rhs
    return s


# ----------------------------------------------------------------------------------------
# Structure


def _split_top(s: str, sep: str = ",") -> list[str]:
    parts, depth, cur = [], 0, []
    i = 0
    while i < len(s):
        c = s[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if depth == 0 and s.startswith(sep, i):
            parts.append("".join(cur))
            cur = []
            i += len(sep)
            continue
        cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


def _encloses(s: str) -> bool:
    """True when s[0] is a bracket and its partner (any closing bracket) is s[-1]."""
    if len(s) < 2 or s[0] not in "([{" or s[-1] not in ")]}":
        return False
    depth = 0
    for i, c in enumerate(s):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0:
                return i == len(s) - 1
    return False


_MEMBERSHIP = re.compile(r"\\?[a-zA-Z]+(?:_\{?\w+\}?)?\\in(?![a-zA-Z])(.+)")


def _structure(s: str):
    """('scalar', s) | ('seq', open, close, items) | ('set', items). ``x\\in[0,1]`` is its set."""
    m = _MEMBERSHIP.fullmatch(s)
    if m:
        s = m.group(1)
    if len(_split_top(s, "\\cup")) > 1:
        return ("set", [p for p in _split_top(s, "\\cup")])
    if _encloses(s):
        inner = s[1:-1]
        items = _split_top(inner)
        if s[0] == "{" and s[-1] == "}":
            if len(items) == 1:
                return _structure(inner) if inner else ("set", [])
            return ("set", items)
        if len(items) >= 2:
            return ("seq", s[0], s[-1], items)
        if s[0] == "(" and s[-1] == ")":
            return _structure(inner)
        return ("scalar", s)
    items = _split_top(s)
    if len(items) >= 2:
        return ("set", items)
    return ("scalar", _strip_lhs(s))


# ----------------------------------------------------------------------------------------
# Numbers


def _to_number(s: str):
    """Fraction / float for a plain number (``-3``, ``2.5``, ``1/2``, ``\\frac{1}{2}``,
    ``1.5e3``, ``1.5*10^{3}``); None otherwise."""
    s = s.strip()
    neg = False
    if s.startswith("-"):
        neg, s = True, s[1:]
    elif s.startswith("+"):
        s = s[1:]
    if _encloses(s) and s[0] == "(":
        s = s[1:-1]
    val = None
    m = re.fullmatch(r"\\frac\{([-+]?\d+(?:\.\d+)?)\}\{([-+]?\d+(?:\.\d+)?)\}", s)
    if m:
        den = Fraction(m.group(2))
        val = Fraction(m.group(1)) / den if den != 0 else None
    elif re.fullmatch(r"\d+(?:\.\d+)?/\d+(?:\.\d+)?", s):
        a, b = s.split("/")
        val = Fraction(a) / Fraction(b) if Fraction(b) != 0 else None
    elif re.fullmatch(r"\d+(?:\.\d+)?", s):
        val = Fraction(s)
    elif re.fullmatch(r"\d+(?:\.\d+)?[eE][-+]?\d{1,3}", s):
        val = Fraction(s)
    else:
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\*10\^\{?([-+]?\d{1,3})\}?", s)
        if m:
            val = Fraction(m.group(1)) * Fraction(10) ** int(m.group(2))
    if val is None:
        return None
    return -val if neg else val


def _num_close(a, b) -> bool:
    if a == b:
        return True
    fa, fb = float(a), float(b)
    return math.isclose(fa, fb, rel_tol=_REL_TOL, abs_tol=_ABS_TOL)


# ----------------------------------------------------------------------------------------
# LaTeX-ish -> sympy-parsable text

_FUNCS = {
    "sqrt", "log", "ln", "exp", "sin", "cos", "tan", "cot", "sec", "csc", "asin", "acos",
    "atan", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh", "binomial", "factorial",
    "Abs", "pi", "oo", "E", "I",
}
_GREEK = {
    "alpha", "beta", "gamma", "delta", "epsilon", "varepsilon", "zeta", "eta", "theta",
    "vartheta", "iota", "kappa", "lambda", "mu", "nu", "xi", "rho", "sigma", "tau", "upsilon",
    "phi", "varphi", "chi", "psi", "omega",
}


def _replace_cmd_with_args(s: str, cmd: str, nargs: int, fmt) -> Optional[str]:
    out, i = [], 0
    while True:
        j = s.find(cmd, i)
        if j < 0:
            out.append(s[i:])
            return "".join(out)
        after = j + len(cmd)
        if after < len(s) and s[after].isalpha():
            out.append(s[i:after])
            i = after
            continue
        out.append(s[i:j])
        k = after
        opt = None
        if cmd == "\\sqrt" and k < len(s) and s[k] == "[":
            end = _match_brace(s, k)
            if end < 0:
                return None
            opt = s[k + 1 : end - 1]
            k = end
        args = []
        for _ in range(nargs):
            a, k = _read_arg(s, k)
            if a is None:
                return None
            args.append(a)
        out.append(fmt(args, opt))
        i = k


def _latex_to_py(s: str) -> Optional[str]:
    if len(s) > _MAX_ANSWER_CHARS:
        return None
    for _ in range(20):
        if "\\frac" not in s and "\\sqrt" not in s and "\\binom" not in s:
            break
        s2 = _replace_cmd_with_args(s, "\\frac", 2, lambda a, o: f"(({a[0]})/({a[1]}))")
        s2 = s2 and _replace_cmd_with_args(
            s2, "\\sqrt", 1,
            lambda a, o: f"(({a[0]})**(1/({o})))" if o else f"sqrt({a[0]})")
        s2 = s2 and _replace_cmd_with_args(s2, "\\binom", 2, lambda a, o: f"binomial({a[0]},{a[1]})")
        if s2 is None:
            return None
        s = s2
    s = s.replace("\\infty", "oo")
    s = re.sub(r"\\pi(?![a-zA-Z])", " pi ", s)  # apart from its neighbours: "i\pi" is i*pi, not "ipi"
    s = re.sub(r"\\(arcsin|arccos|arctan)", lambda m: "a" + m.group(1)[3:], s)
    s = re.sub(r"\\(ln|log|exp|sin|cos|tan|cot|sec|csc|sinh|cosh|tanh)(?![a-zA-Z])", r"\1", s)
    s = re.sub(r"\\(" + "|".join(sorted(_GREEK, key=len, reverse=True)) + r")(?![a-zA-Z])", r" \1 ", s)
    s = re.sub(r"\|([^|]+)\|", r"Abs(\1)", s)
    s = re.sub(r"_\{?([a-zA-Z0-9]+)\}?", r"\1", s)  # x_{1} -> x1
    if "\\" in s or "=" in s or "<" in s or ">" in s:
        return None
    s = s.replace("{", "(").replace("}", ")").replace("[", "(").replace("]", ")")
    s = s.replace("^", "**")
    if not re.fullmatch(r"[A-Za-z0-9_+\-*/().,! ]*", s):
        return None
    if "__" in s or not s.strip():
        return None

    # identifiers: keep known names and single letters (+digits); split other words
    def fix_ident(m):
        w = m.group(0)
        if w in _FUNCS or w in _GREEK or re.fullmatch(r"[A-Za-z]\d*", w):
            return w
        if w.isalpha():
            return "(" + "*".join(w) + ")"
        return "(" + "*".join(re.findall(r"[A-Za-z]\d*", w)) + ")"

    s = re.sub(r"[A-Za-z_][A-Za-z0-9_]*", fix_ident, s)
    s = s.replace("ln(", "log(")
    return s


# ----------------------------------------------------------------------------------------
# Symbolic step in a killable worker


def _sympy_equal(a_py: str, b_py: str) -> bool:
    """Runs inside the worker. True when sympy proves or numerically confirms a == b."""
    import random

    import sympy
    from sympy.parsing.sympy_parser import (convert_xor, implicit_multiplication_application,
                                            parse_expr, standard_transformations)

    trans = standard_transformations + (implicit_multiplication_application, convert_xor)

    def local_dict_for(text):
        d = {}
        for w in set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text)):
            if w in ("pi",):
                d[w] = sympy.pi
            elif w == "oo":
                d[w] = sympy.oo
            elif w in ("E", "I"):
                d[w] = sympy.Symbol(w)
            elif w == "e":  # a lone e in an answer is Euler's number ("e^2 - 1", "1/e")
                d[w] = sympy.E
            elif w == "i":  # and a lone i the imaginary unit ("(1+i)^2", "e^{i\\pi}")
                d[w] = sympy.I
            elif w in ("log", "ln"):
                d[w] = sympy.log
            elif w == "Abs":
                d[w] = sympy.Abs
            elif w in _FUNCS:
                d[w] = getattr(sympy, w)
            else:
                d[w] = sympy.Symbol(w)
        return d

    a = parse_expr(a_py, local_dict=local_dict_for(a_py), transformations=trans)
    b = parse_expr(b_py, local_dict=local_dict_for(b_py), transformations=trans)
    if isinstance(a, tuple) or isinstance(b, tuple):
        return False
    if a == b:
        return True
    if a.free_symbols != b.free_symbols:
        return False
    # numeric check at random points first (cheap); simplify only when that is inconclusive
    syms = sorted(a.free_symbols, key=str)
    rng = random.Random(0)
    conclusive = True
    for _ in range(6 if syms else 1):
        subs = {x: sympy.Float(rng.uniform(0.5, 2.5)) for x in syms}
        try:
            va = complex(a.evalf(30, subs=subs))
            vb = complex(b.evalf(30, subs=subs))
        except (TypeError, ValueError):
            conclusive = False
            break
        if not all(math.isfinite(t) for t in (va.real, va.imag, vb.real, vb.imag)):
            conclusive = False
            break
        if abs(va - vb) > _REL_TOL * max(1.0, abs(va), abs(vb)):
            return False
    if conclusive:
        return True
    return sympy.simplify(a - b) == 0


# The symbolic checks' servers (started on first use): each runs _sympy_equal in a child
# forked from a warm sympy image and killed at the deadline.
SYMBOLIC_SERVERS = DeadlineServerPool(f"{__name__}:_sympy_equal", warm=f"{__name__}:_sympy_available")

_SYMPY_OK: Optional[bool] = None


def _sympy_available() -> bool:
    global _SYMPY_OK
    if _SYMPY_OK is None:
        try:
            import sympy  # noqa: F401
            from sympy.parsing import sympy_parser  # noqa: F401

            # warm sympy's lazy imports and caches in the server, on a fixed harmless input,
            # so that each forked child starts hot (~10 ms instead of ~300 ms)
            _sympy_equal("(x+1)**2/sqrt(2)+pi", "x**2+2*x+1+pi")
            _sympy_equal("sin(x)**2+cos(x)**2", "1")
            _SYMPY_OK = True
        except Exception:  # noqa: BLE001
            _SYMPY_OK = False
    return _SYMPY_OK


def _looks_dangerous(py: str) -> bool:
    # giant literals or towers of powers/factorials are refused before any worker is spawned
    if re.search(r"\d{400,}", py) or re.search(r"[eE][-+]?\d{4,}", py):
        return True
    if len(py) > _MAX_SYMBOLIC_CHARS or py.count("**") > 8 or py.count("!") > 4:
        return True
    if re.search(r"\*\*\(*\d+\)*\*\*", py) or re.search(r"\*\*\(*\d{6,}", py):  # towers, huge powers
        return True
    return False


# ----------------------------------------------------------------------------------------
# Equality


def _scalar_equal(a: str, b: str, timeout_s: float) -> bool:
    if a == b:
        return True
    if not a or not b:
        return False
    if re.fullmatch(r"[A-Za-z ]+", a) and re.fullmatch(r"[A-Za-z ]+", b):
        return a.casefold() == b.casefold()
    na, nb = _to_number(a), _to_number(b)
    if na is not None and nb is not None:
        return _num_close(na, nb)
    if timeout_s <= 0:
        return False
    pa, pb = _latex_to_py(a), _latex_to_py(b)
    if pa is None or pb is None or _looks_dangerous(pa) or _looks_dangerous(pb):
        return False
    return SYMBOLIC_SERVERS.call((pa, pb), timeout_s) is True


def _match_unordered(xs: list[str], ys: list[str], timeout_s: float) -> bool:
    if len(xs) != len(ys) or len(xs) > _MAX_ITEMS:
        return False
    used = [False] * len(ys)
    for x in xs:
        for j, y in enumerate(ys):
            if not used[j] and _equal(x, y, timeout_s):
                used[j] = True
                break
        else:
            return False
    return True


def _equal(a: str, b: str, timeout_s: float) -> bool:
    if a == b:
        return True
    sa, sb = _structure(a), _structure(b)
    if sa[0] != sb[0]:
        # a one-element set/list equals its element; otherwise different kinds differ
        if sa[0] == "set" and len(sa[1]) == 1 and sb[0] == "scalar":
            return _equal(sa[1][0], b, timeout_s)
        if sb[0] == "set" and len(sb[1]) == 1 and sa[0] == "scalar":
            return _equal(a, sb[1][0], timeout_s)
        return False
    if sa[0] == "scalar":
        return _scalar_equal(sa[1], sb[1], timeout_s)
    if sa[0] == "set":
        xs = [_strip_lhs(x) for x in sa[1]]
        ys = [_strip_lhs(y) for y in sb[1]]
        return _match_unordered(xs, ys, timeout_s)
    # ordered sequence: tuple / interval
    _, oa, ca, ia = sa
    _, ob, cb, ib = sb
    if oa != ob or ca != cb or len(ia) != len(ib):
        return False
    return all(_equal(x, y, timeout_s) for x, y in zip(ia, ib))


def verify(response: str, reference: str, *, timeout_s: float = SYMBOLIC_TIMEOUT_S) -> bool:
    """True when the final answer in ``response`` equals ``reference``. Never raises."""
    if not isinstance(response, str):
        return False
    ans = extract_answer(response)
    return ans is not None and answers_equal(ans, reference, timeout_s=timeout_s)


def answers_equal(ans: str, reference: str, *, timeout_s: float = SYMBOLIC_TIMEOUT_S) -> bool:
    """True when two final answers (as :func:`extract_answer` gives them) are the same: equal
    after normalisation, symbolically or numerically, as percent and decimal, or as a choice
    letter and the choice with its content. Never raises."""
    try:
        if not isinstance(ans, str) or not isinstance(reference, str):
            return False
        if not ans.strip() or not reference.strip():
            return False
        a = normalize_answer(ans[:_MAX_ANSWER_CHARS])
        b = normalize_answer(reference[:_MAX_ANSWER_CHARS])
        if not a or not b:
            return False
        if a == b:
            return True
        if _strip_lhs(a) == _strip_lhs(b):
            return True
        if _equal(a, b, timeout_s):
            return True
        # "10%" also matches "0.1" (either side may carry the percent sign)
        for x, raw_x, y in ((a, ans, b), (b, reference, a)):
            if "%" in raw_x or "percent" in raw_x:
                nx, ny = _to_number(x), _to_number(y)
                if nx is not None and ny is not None and _num_close(Fraction(nx) / 100, ny):
                    return True
        # a choice with its content, "\\textbf{(A)}\\ 5" (AMC style), answers the letter "A"
        for x, y in ((a, b), (b, a)):
            m = re.fullmatch(r"\(([A-E])\).+", x)
            if m and re.fullmatch(r"[A-E]", y):
                return m.group(1) == y
        return False
    except Exception:  # noqa: BLE001 - junk in, False out
        return False


def math_reward(response: str, record: dict) -> float:
    """Reward adapter: 1.0 when the response's answer matches ``record["answer"]``."""
    try:
        ref = record.get("answer") if isinstance(record, dict) else None
        if ref is None:
            return 0.0
        return 1.0 if verify(response, str(ref)) else 0.0
    except Exception:  # noqa: BLE001
        return 0.0
