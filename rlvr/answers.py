"""Which answer a response gives, and that answer cleaned up the way a careful grader reads it,
before math-verify compares it with the label.

- The graded box is the last `\\boxed{...}` before `<reflection>` (the box the format signal
  checks), or the last of the whole response when there is no reflection; `\\boxed {4}` counts.
- Normalisation: NFKC (full-width digits), thousands separators written as thin spaces or `\\ `,
  a trailing unit word ("18 dollars"), and repeating decimals (`0.\\overline{3}` = 1/3).
- A relation (`5 = 4`, `x \\le 4`, `a < b`) is not a value: against a label that is a plain value
  it is wrong, except `x = 4` (a name, then the value).
- Answers that would keep a CAS busy for minutes (very long, deeply nested, numeric power towers,
  huge exponents or factorials) are wrong at once: no real answer looks like that.
"""

from __future__ import annotations

import math
import re
import unicodedata
from fractions import Fraction

BOXED = re.compile(r"\\boxed\s*\{")
MAX_ANSWER_CHARS = 2_000
MAX_BRACE_DEPTH = 40


def _balanced_from(text: str, open_brace: int) -> str | None:
    """The text inside the braces that open at `open_brace`, or None if they never close."""
    depth = 0
    for i in range(open_brace, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[open_brace + 1 : i]
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` (spaces allowed before the brace), braces balanced."""
    for match in reversed(list(BOXED.finditer(text))):
        content = _balanced_from(text, match.end() - 1)
        if content is not None:
            return content
    return None


def answer_box(response: str) -> str | None:
    """The box verify grades: the last before `<reflection>`, or the last of all without one. A box
    inside the reflection ("actually it is \\boxed{7}") neither overrides nor erases the answer, and
    never counts; when no box precedes the reflection, the last box after `</reflection>` is the only
    answer given, and counts (format scores its placement 0)."""
    cut = response.find("<reflection>")
    if cut == -1:
        return last_boxed(response)
    before = last_boxed(response[:cut])
    if before is not None:
        return before
    end = response.find("</reflection>", cut)
    return None if end == -1 else last_boxed(response[end + len("</reflection>") :])


def ground_truth_answer(ground_truth: str) -> str:
    """The answer part of a label: the text after the last `####` (GSM8K style), else the label."""
    if "####" in ground_truth:
        ground_truth = ground_truth.rsplit("####", 1)[1]
    return ground_truth.strip()


# ---------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------

_THOUSANDS = re.compile(r"(?<=\d)(?:\\,|\\ |\\;|\\!|~| |\{,\})(?=\d{3}(?!\d))")
_UNIT_WORD = re.compile(r"^\s*([-−]?\d[\d,]*(?:\.\d+)?)\s*((?:[A-Za-z]{2,}|[mgslh])\.?(?:\s+[A-Za-z]+\.?)*)\s*$")
_WHOLE_TEXT = re.compile(r"^\s*\\(?:text|textrm|mbox|mathrm)\s*\{([^{}]*)\}\s*$")
MATH_WORDS = frozenset({"pi", "sqrt", "ln", "log", "sin", "cos", "tan", "exp", "mod", "choose", "i", "e"})
_REPEATING = re.compile(r"(-?)(\d*)\.(\d*)\\(?:overline|bar)\s*\{(\d+)\}")
_RELATION = re.compile(r"(?:=|<|>|≤|≥|≠|\\le(?:q|qslant)?\b|\\ge(?:q|qslant)?\b|\\lt\b|\\gt\b|\\neq?\b|\\ne\b|\\approx\b)")
_NAME_EQUALS = re.compile(r"^\s*(?:[A-Za-z](?:_\{?\w+\}?)?|\\[A-Za-z]+|\\text\{[^{}]*\})\s*=\s*([^=<>]+)$")


def _repeating_to_fraction(match: re.Match) -> str:
    sign, whole, fixed, period = match.groups()
    value = Fraction(int(whole or "0")) + Fraction(int(fixed or "0"), 10 ** len(fixed))
    value += Fraction(int(period), (10 ** len(period) - 1) * 10 ** len(fixed))
    value = -value if sign else value
    return f"\\frac{{{value.numerator}}}{{{value.denominator}}}" if value.denominator != 1 else str(value.numerator)


def normalize(answer: str) -> str:
    """What a careful grader reads in a boxed answer (or a label): see the module docstring."""
    answer = unicodedata.normalize("NFKC", answer).replace("\u2212", "-")
    answer = _THOUSANDS.sub("", answer)
    answer = _REPEATING.sub(_repeating_to_fraction, answer)
    wrapped = _WHOLE_TEXT.match(answer)  # \text{18 dollars}: read inside, as for 18 dollars
    unit = _UNIT_WORD.match(wrapped.group(1) if wrapped else answer)
    if unit and unit.group(2).split()[0].lower().rstrip(".") not in MATH_WORDS:
        answer = unit.group(1)
    return answer.strip()


def has_relation(answer: str) -> bool:
    return bool(_RELATION.search(answer))


def value_part(answer: str, label: str) -> str | None:
    """The value the answer states, judged against the label: a relation where the label is a
    plain value is no value (None), except `name = value`, which states `value`."""
    if not has_relation(answer) or has_relation(label):
        return answer
    named = _NAME_EQUALS.match(answer)
    return named.group(1).strip() if named else None


def _exponent_depth(text: str) -> int:
    """How deeply exponents nest: 1 for x^2, 2 for e^{x^2}, 3 for 9^{9^{9}}."""
    deepest, i = 0, text.find("^")
    while i != -1:
        j = i + 1
        while j < len(text) and text[j].isspace():
            j += 1
        inner = _balanced_from(text, j) if j < len(text) and text[j] == "{" else None
        deepest = max(deepest, 1 + (_exponent_depth(inner) if inner else 0))
        i = text.find("^", j + (len(inner) + 2 if inner is not None else 1))
    return deepest


def too_costly(answer: str) -> bool:
    """Inputs that make a CAS compute for minutes in C code (out of reach of any Python timer)."""
    if len(answer) > MAX_ANSWER_CHARS:
        return True
    depth = deepest = 0
    for char in answer:
        depth += (char == "{") - (char == "}")
        deepest = max(deepest, depth)
    if deepest > MAX_BRACE_DEPTH:
        return True
    tower = _exponent_depth(answer) >= 3  # a power of a power of a power
    huge_power = re.search(r"\^\s*\{?\s*\d{6,}", answer)  # a six-digit exponent
    huge_factorial = re.search(r"\d{5,}\s*!", answer)
    # a^{b^c} in numbers, with b^c past a million: 10^{10^{10}} has ten billion digits
    huge_exponent = any(int(c) * math.log10(max(int(b), 2)) > 6
                        for b, c in re.findall(r"\d\s*\^\s*\{\s*(\d+)\s*\^\s*\{?\s*(\d{1,6})", answer))
    return bool(tower or huge_power or huge_factorial or huge_exponent)
