"""The verdict a reflection gives on its own answer: True (it says the answer is correct), False
(it says the answer is wrong, or doubts it), None (it says neither, or both).

Read the way a person reads it, within a small grammar (a rule set, not a model: it is fast, it
runs in the reward workers, and every rule has a test on literal strings):
- An explicit closing verdict, `Verdict: correct` or `Verdict: wrong` (the training prompt asks for
  one), decides. The free-text reading below is for everything else.
- Sentences split into clauses at punctuation and at but, and, however, because, ... Each verdict
  word (correct, right, accurate, wrong, mistake, error, ...) and adverb (correctly, wrongly, ...)
  is flipped by the negations before it in its clause: not, no, never, without, far from, and every
  n't, so "I don't think my answer is correct" denies and "I found no errors" affirms.
- A certainty word governs the verdict after it in its clause: "I am confident it is wrong" denies,
  "I'm not sure the result is right" and "I doubt it is correct" deny; a bare "I am confident."
  affirms and a bare "Not sure." denies.
- "may / might / could be wrong" denies; "might be correct" says neither.
- A question is no verdict, but a question answered by yes or no is: "Is it right? No." denies.
- Verdict words in mathematics are not verdicts: a right angle or triangle, the error function,
  an error term or bound, "make sure", "valid for"; nor is "correct" as a verb ("let me correct it"),
  nor an error the same sentence says was fixed, nor "the correct answer is 7" (the true value, named).
- A belief it reports having had ("I thought it was wrong", "at first it seemed right") gives way
  to what it says now; alone, it still counts.
- "matches", "agrees" affirm and "mismatch", "inconsistent" deny, negation applying as above.
- Every apostrophe counts (' ’ ` ´ ʼ). Clauses that agree give the verdict; clauses that disagree,
  or none at all, give None.
"""

from __future__ import annotations

import re
import unicodedata

EXPLICIT = re.compile(r"\bverdict\s*[:=\-–—]?\s*[*_\"'`(\[]*\s*(correct|right|wrong|incorrect)\b")
APOSTROPHES = re.compile(r"[’‘`´ʼ′]")
NOT_VERDICTS = re.compile(  # mathematical and idiomatic uses of verdict words
    r"\bright[ -](?:angle|angled|triangle|triangles|angles|hand|side|away|now|here|there|after|before|circular|prism)s?\b"
    r"|\b(?:to|on|at) the right\b|\ball right\b|\b(?:make|makes|made|making|to be) sure\b"
    r"|\berror (?:function|term|terms|bound|bounds|estimate)s?\b"
    r"|\b(?:margin of|standard|relative|absolute|percent|percentage|truncation|approximation) error\b"
    r"|\btrial and error\b|\bvalid (?:for|when|if|only|in|on|as long)\b"
    # "the correct answer is 7" names the true value; it is no verdict on the model's own answer
    r"|\bthe (?:correct|right) (?:answer|value|result|solution|number|total|sum|product)s?(?= (?:is|are|was|should|would|=))"
)
CONTRACTIONS = ((re.compile(r"\bcan't\b|\bcannot\b"), "can not"), (re.compile(r"\bwon't\b"), "will not"),
                (re.compile(r"n't\b"), " not"), (re.compile(r"\bfar from\b"), "not"),
                (re.compile(r"\bchecks? out\b"), "correct"), (re.compile(r"\bmakes? sense\b"), "correct"))
SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
TOKEN = re.compile(r"[a-z]+|[,;:()]")

AFFIRM = frozenset({"correct", "right", "accurate", "valid", "verified", "flawless", "correctly", "accurately", "rightly",
                    "match", "matches", "agrees"})
DENY = frozenset({"wrong", "incorrect", "mistake", "mistakes", "mistaken", "error", "errors", "erroneous", "inaccurate",
                  "invalid", "flawed", "failed", "unverified", "incorrectly", "wrongly", "mistakenly", "erroneously",
                  "inaccurately", "mismatch", "inconsistent"})
CERTAIN = frozenset({"sure", "certain", "confident", "convinced", "confidently", "certainly"})
UNCERTAIN = frozenset({"unsure", "uncertain", "doubt", "doubts", "doubtful", "unconvinced"})
NEGATORS = frozenset({"not", "no", "never", "nor", "none", "nothing", "nobody", "neither", "without", "hardly",
                      "barely"})
HEDGES = frozenset({"may", "might", "could", "possibly", "perhaps", "maybe"})
BOUNDARIES = frozenset({",", ";", ":", "(", ")", "but", "and", "however", "although", "though", "yet", "whereas",
                        "because", "since", "so", "while", "except", "otherwise"})
CORRECT_AS_VERB_AFTER = frozenset({"to", "me", "must", "should", "will", "would", "can", "let", "we", "i", "and"})
FIXED = frozenset({"fixed", "corrected", "resolved", "repaired", "fix"})
SUPERSEDED = frozenset({"thought", "seemed", "initially", "originally", "first", "appeared", "assumed", "feared",
                        "worried", "suspected"})  # a belief the reflection reports having had


def _clean(text: str) -> str:
    text = unicodedata.normalize("NFKC", APOSTROPHES.sub("'", text)).lower()  # NFKC would split ´ into a space + accent
    text = NOT_VERDICTS.sub(" ", text)
    for pattern, replacement in CONTRACTIONS:
        text = pattern.sub(replacement, text)
    return text


def _clauses(words: list[str]) -> list[list[str]]:
    clauses, current = [], []
    for word in words:
        if word in BOUNDARIES:
            clauses.append(current)
            current = []
        else:
            current.append(word)
    return [c for c in [*clauses, current] if c]


def _clause_verdict(words: list[str], fixed: bool) -> bool | None | str:
    """True / False, None when the clause has no verdict, "mixed" when it has both."""
    negations, hedged, certainty, verdicts = 0, False, 0, []
    for i, word in enumerate(words):
        if word in NEGATORS:
            negations += 1
        elif word in HEDGES:
            hedged = True
        elif word in CERTAIN or word in UNCERTAIN:
            certainty = (1 if word in CERTAIN else -1) * (-1) ** negations
            negations, hedged = 0, False  # the negation was the certainty's; what follows is its complement
        elif word in AFFIRM or word in DENY:
            if word == "correct" and i > 0 and words[i - 1] in CORRECT_AS_VERB_AFTER:
                continue  # "let me correct it": a verb, not a verdict
            if fixed and word in DENY:
                continue  # "I found an error and fixed it": not a verdict on the final answer
            says_correct = (word in AFFIRM) == (negations % 2 == 0)
            if hedged and says_correct and word in AFFIRM:
                continue  # "it might be correct": neither
            verdicts.append(says_correct)
    if certainty < 0:  # doubt about a claim of correctness is a denial; doubt about a denial says nothing
        verdicts = [False for v in verdicts if v] or ([] if verdicts else [False])
    elif certainty > 0 and not verdicts:
        verdicts = [True]
    if not verdicts:
        return None
    return verdicts[0] if len(set(verdicts)) == 1 else "mixed"


def _sentence_verdicts(sentence: str) -> tuple[list[tuple[bool | None | str, bool]], bool]:
    """Each clause's verdict, with whether the clause reports an earlier belief ("I thought ...")."""
    words = TOKEN.findall(sentence)
    fixed = any(w in FIXED for w in words)
    clauses = _clauses(words)
    return [(_clause_verdict(c, fixed), any(w in SUPERSEDED for w in c)) for c in clauses], sentence.rstrip().endswith("?")


def reflection_verdict(text: str) -> bool | None:
    """True when the text affirms the answer is correct, False when it denies or doubts it, None
    when it does neither or both (see the module docstring for the reading)."""
    text = _clean(text)
    explicit = EXPLICIT.findall(text)
    if explicit:
        return explicit[-1] in ("correct", "right")
    found: list[tuple[bool | str, bool]] = []  # (verdict, from a reported earlier belief)
    question: bool | None = None
    for sentence in SENTENCE_END.split(text):
        if not sentence.strip():
            continue
        if question is not None:  # the previous sentence asked; does this one answer yes or no?
            first = TOKEN.findall(sentence)[:1]
            if first in (["yes"], ["no"]):
                found.append((question if first == ["yes"] else not question, False))
                sentence = sentence.split(first[0], 1)[1]
        verdicts, is_question = _sentence_verdicts(sentence)
        asked = [(v, earlier) for v, earlier in verdicts if v is not None]
        if is_question:
            question = asked[0][0] if len(asked) == 1 and asked[0][0] != "mixed" else None
            continue
        question = None
        found += asked
    # "I thought it was wrong, but it is correct": a belief it reports having had gives way to what it says now
    present = [v for v, earlier in found if not earlier] or [v for v, _ in found]
    if not present or "mixed" in present or len(set(present)) > 1:
        return None
    return bool(present[0])
