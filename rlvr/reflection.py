"""The verdict a reflection gives on its own answer, and the instruction that asks for it: one
definition, so that the prompt and the parser cannot drift apart.

`reflection_verdict` returns True (the answer is correct), False (it is wrong, or may be) or None
(no verdict). The reflect signal pays only for a verdict that agrees with verify, and a policy under
RL looks for any wording that scores, so the reading fails closed: a false reward teaches the model
to say what is not so, a missed one only costs it some reward.

1. The contract. The last non-blank line `Verdict: correct` or `Verdict: wrong` decides (case,
   markdown emphasis, a trailing period, `:`/`-`/`=`, a "My"/"Final" before it, and `right` /
   `incorrect` tolerated). No verdict: a verdict line naming both options ("Verdict: correct or
   wrong", the short instruction's own words), verdict lines that disagree, a verdict line with
   anything else on it ("Verdict: maybe correct") or text after it, a verdict in quotation marks, a
   verdict line under a condition, the keyword anywhere else, and a reflection that repeats the
   instruction (8 of its words in a row, or half of a longer reflection in its 5-grams).
2. Free text, without a verdict line: affirm or deny only when every verdict read agrees, and only
   within a small grammar (a rule set, not a model: it is fast, it runs beside the reward workers,
   and every rule has a test on literal strings):
   - Verdict words (correct, right, wrong, mistake, error, ...) are flipped by the negations before
     them in their clause (not, no, never, without, n't), so "I found no errors" affirms.
   - "I am not sure it is right", "I doubt it is correct", "it may be wrong", "Unsure." deny (the
     instruction's "it may be wrong"); "it might be correct" and "I'm not sure it is wrong" say neither.
   - Anything a careful grader would not take as one clear verdict on the answer gives None for the
     whole reflection: a condition (if, unless, assuming, would, whether, ...), a question left
     unanswered ("Is it right? No." is answered), quoted verdicts, options joined by "or", a hedge
     that retracts ("or maybe not", "then again"), a doubt in words outside the lists above
     (surprised, bet, shaky, probably, ...) beside an affirmation, and a negation left without its
     verb by an inserted clause ("I do not, having checked, think it holds").
   - A verdict about something else (the question, the problem, the method, a step) is not about the
     answer; the subject is the nearest noun before the verdict word in its sentence. Mathematical
     uses are not verdicts: a right angle, "turn right" ("right" counts only as a predicate, before
     "answer" or alone), the error function, "the correct answer is 7" (the true value, named), "let
     me correct it" (a verb), an error the sentence says was fixed, someone else's answer.
   - A belief it reports having had ("I thought it was wrong, but it is correct") gives way to what
     it says now, and alone is no verdict. A bare "correct" or "wrong", alone, is a clear verdict.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

# ---------------------------------------------------------------------------------------------
# The contract: the words the prompt asks for are the words the parser reads
# ---------------------------------------------------------------------------------------------

KEYWORD = "Verdict"
CORRECT, WRONG = "correct", "wrong"
VERDICT_LINES = (f"{KEYWORD}: {CORRECT}", f"{KEYWORD}: {WRONG}")
OPTIONS = {CORRECT: True, "right": True, WRONG: False, "incorrect": False}  # the named two, and one synonym each

INSTRUCTIONS = {
    # conf/config.yaml's prompt.instruction: ${instruction:default}
    "default": ("Think step by step inside <think>...</think>. Then give the final answer in \\boxed{}. "
                "Finally, inside <reflection>...</reflection>, say whether you are confident that your answer is "
                f"correct or that it may be wrong, and end it with \"{VERDICT_LINES[0]}\" or \"{VERDICT_LINES[1]}\"."),
    # the cpu profile's (every byte is a token for tiny-arith, which was warm-started on this prompt)
    "short": f"Answer as <think>...</think> \\boxed{{}} <reflection>{KEYWORD}: {CORRECT} or {WRONG}</reflection>.",
}
DEFAULT_INSTRUCTION = INSTRUCTIONS["default"]


def instruction(name: str = "default") -> str:
    """A built-in instruction by name (the `${instruction:NAME}` resolver of the configs)."""
    if name not in INSTRUCTIONS:
        raise ValueError(f"unknown instruction {name!r}: choose one of {', '.join(INSTRUCTIONS)}")
    return INSTRUCTIONS[name]


# ---------------------------------------------------------------------------------------------
# Text clean-up
# ---------------------------------------------------------------------------------------------

APOSTROPHES = re.compile(r"[’‘`´ʼ′]")
EMPHASIS = re.compile(r"[*_#>~]+")
OPTION_WORDS = "|".join(OPTIONS)
# A verdict line: the keyword, a separator, then the rest of the line.
VERDICT_LINE = re.compile(rf"(?:^|(?<=[.!?;])\s+)\s*(?:(?:so|my|the|final|overall)\s+){{0,2}}{KEYWORD.lower()}\s*[:=\-–—]\s*(.*?)\s*$")
CLEAN_VALUE = re.compile(rf"^({OPTION_WORDS})\.?$")
QUOTED = re.compile(r"[\"“”«»„]|(?:^|(?<=[\s(\[]))'[^'\n]*'(?=$|[\s.,;:!?)\]])")
NOT_VERDICTS = re.compile(  # mathematical and idiomatic uses of verdict words
    r"\bright[ -](?:angle|angled|triangle|triangles|angles|hand|side|away|now|here|there|after|before|circular|prism)s?\b"
    r"|\b(?:to|on|at) the right\b|\ball right\b|\b(?:make|makes|made|making|to be) sure\b"
    r"|\berror (?:function|term|terms|bound|bounds|estimate)s?\b"
    r"|\b(?:margin of|standard|relative|absolute|percent|percentage|truncation|approximation|rounding) error\b"
    r"|\btrial and error\b|\bvalid (?:for|when|if|only|in|on|as long)\b"
    # "the correct answer is 7" names the true value; it is no verdict on the model's own answer
    r"|\b(?:the )?(?:correct|right) (?:answer|value|result|solution|number|total|sum|product)s?(?=\s*(?:is|are|was|should|would|=|:))"
)
CONTRACTIONS = ((re.compile(r"\bcan't\b|\bcannot\b"), "can not"), (re.compile(r"\bwon't\b"), "will not"),
                (re.compile(r"n't\b"), " not"), (re.compile(r"\bfar from\b|\banything but\b"), "not"))
PHRASES = ((re.compile(r"\b(?:as|so) long as\b|\bin case\b|\bin the event\b"), "if"),
           (re.compile(r"(?:^|(?<=[.!?\n]))\s*(?:right|ok|okay|alright|sure)\s*,(?=\s*[a-z])"), " "),  # "Right, let me check"
           (re.compile(r"\b(?:official|given|reference|book's|textbook's|provided|expected|model|key's) (?:answer|solution)s?\b"),
            " reference "),  # someone else's answer
           (re.compile(r"\ba little doubt\b"), "doubt"),
           (re.compile(r"\blittle doubt\b|\bbeyond (?:any |a |all )?doubts?\b"), "no doubt"),
           (re.compile(r"\bwith (?:certainty|confidence)\b"), "surely"),
           (re.compile(r"\b(?:error|mistake|fault)s?[- ]free\b"), "correct"),
           (re.compile(r"\b(?:other|another|alternative|alternate|previous|first|earlier|initial|original) (?:answer|solution|result)s?\b"),
            " reference "),  # not the answer it gives
           (re.compile(r"\bin the case (?:where|that|of)\b"), "if"),
           (re.compile(r"\bfamous last words\b|\bgive or take\b|\b(?:oh|yeah),? (?:sure|right)\b|\bas if\b"), " qualm "),
           (re.compile(r"\bat first\b"), "initially"), (re.compile(r"\bor so\b|\bnever mind\b|\bscratch that\b"), " qualm "),
           (re.compile(r"\b(?:answer|solution)s? (?:to|of|for) (?:the |this |that )?(?:question|problem)\b"), "answer"),
           (re.compile(r"\b(?:no|any) (?:problems?|issues?)\b"), r" no errors "),
           (re.compile(r"\blow confidence\b|\bconfidence is low\b"), "not confident"),
           (re.compile(r"\bhigh confidence\b|\bconfidence is high\b|\bstand by\b"), "confident"),
           (re.compile(r"\bconfidence\b|\bcertainty\b"), " qualm "),  # "Confidence: medium"
           (re.compile(r"\bon the fence\b"), "unsure"), (re.compile(r"\bnot only\b"), " "),
           (re.compile(r"\d+\s*%|\bpercent\b"), " qualm "),
           (re.compile(r"\bcould not (find|see|spot|detect|locate|identify)\b"), r"did not \1"),
           (re.compile(r"\bcould not be (?:any )?more\b"), "is"),  # "it couldn't be more correct"
           (re.compile(r"\bwho knows\b|\bhard to say\b|\bnot clear\b"), " qualm "),
           (re.compile(r"\b(?:checks?|checked) out\b|\bmakes? sense\b|\badds? up\b|\bholds? up\b"), "correct"),
           (re.compile(r"\b(?:looks?|is|all) (?:good|fine)\b"), "correct"),
           (re.compile(r"\b(?:is|be|are|was|feels?|seems?|looks?) off\b|\boff by\b|\bmessed up\b"), "wrong"),
           (re.compile(r"\bthen again\b|\bor (?:maybe|perhaps|possibly|not|is it|am i)\b|\bnot really\b"
                       r"|\bsort of\b|\bkind of\b|\bmore or less\b"), " qualm "))
SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+|\.{2,}|…")
TOKEN = re.compile(r"[a-z]+|\d+|[,;:()\-–—]")

# ---------------------------------------------------------------------------------------------
# The free-text grammar's words
# ---------------------------------------------------------------------------------------------

AFFIRM = frozenset({"correct", "right", "accurate", "valid", "verified", "confirmed", "flawless", "correctly",
                    "accurately", "rightly", "match", "matches", "agrees", "consistent"})
DENY = frozenset({"wrong", "incorrect", "mistake", "mistakes", "mistaken", "error", "errors", "erroneous",
                  "inaccurate", "invalid", "flawed", "failed", "fails", "unverified", "incorrectly", "wrongly",
                  "mistakenly", "erroneously", "inaccurately", "mismatch", "inconsistent", "disagrees"})
CERTAIN = frozenset({"sure", "certain", "confident", "convinced", "surely", "trust"})
UNCERTAIN = frozenset({"unsure", "uncertain", "doubt", "doubts", "doubtful", "unconvinced"})
NEGATORS = frozenset({"not", "no", "never", "none", "nothing", "nobody", "without", "hardly", "scarcely", "unlikely"})
HEDGES = frozenset({"may", "might", "could", "should", "possibly", "perhaps", "maybe", "probably", "likely"})
# After a negation, an inserted clause ("I do not, having checked, think ...") or a frame that is no verdict
# ("I am not saying it is wrong"): no verdict.
INSERTIONS = frozenset({"after", "having", "despite", "given", "even", "as", "on", "in", "for", "with", "upon", "once",
                        "honestly", "frankly", "really", "truly", "considering", "being", "though", "although",
                        "saying", "say", "claiming", "claim", "suggesting", "implying", "arguing", "asserting",
                        "that"})
INVERTED = frozenset({"had", "were", "should"})  # "Had I erred, ...", "Should the units be hours, ...": a condition
# Doubt that denies alone ("I'm skeptical of this result"); negated, it says nothing clear.
DOUBTFUL = frozenset({"skeptical", "sceptical", "questionable", "dubious", "suspicious", "shaky", "iffy", "fishy",
                      "unreliable", "hesitant"})
# Doubt in words outside the lists: beside an affirmation, no verdict (never read as one).
QUALMS = frozenset({"qualm", "surprised", "surprise", "surprising", "bet", "wager", "shaky", "skeptical",
                    "sceptical", "questionable", "dubious", "suspicious", "suspect", "suspicion", "reservation",
                    "reservations", "fence", "hesitant", "hesitate", "hunch", "guess", "guessing", "wonder",
                    "wondering", "unlikely", "iffy", "tentative", "tentatively", "fishy", "concern", "concerns",
                    "concerned", "worried", "worry", "afraid", "fear", "unclear", "idea", "hopefully", "hope",
                    "somewhat", "partly", "partially", "presumably", "supposedly", "arguably", "apparently",
                    "allegedly", "lean", "leaning", "feeling", "bad", "low", "stake", "wait", "almost", "nearly",
                    "mostly", "largely", "roughly", "approximately", "kidding", "joking", "knows", "hmm", "except",
                    "besides", "apart", "barely", "ish", "gut", "theory", "principle", "fingers", "crossed",
                    "retract", "disregard", "less", "wish", "presuming", "conditional", "conditionally", "neither", "nor", "odd", "strange",
                    "weird", "unsafe", "risky", "tell", "know", "unknown", "maybe", "perhaps", "possibly",
                    "probably", "likely", "might", "may", "could"})
# A condition, an embedded question or a counterfactual: no verdict at all.
CONDITIONS = frozenset({"if", "unless", "assuming", "assume", "provided", "providing", "supposing", "suppose",
                        "whether", "otherwise", "else", "would", "when", "whenever", "until", "presuming",
                        "conditional", "conditionally", "neither", "nor"})
BOUNDARIES = frozenset({",", ";", ":", "(", ")", "-", "–", "—", "but", "and", "however", "although", "though",
                        "yet", "whereas", "because", "since", "so", "while", "except", "then", "thus", "hence"})
ANSWER_NOUNS = frozenset({"answer", "answers", "result", "results", "solution", "value", "sum", "total", "product",
                          "difference", "quotient", "calculation", "calculations", "computation", "arithmetic",
                          "work", "number", "everything", "output"})
OTHER_NOUNS = frozenset({"question", "questions", "problem", "problems", "statement", "method", "methods",
                         "approach", "formula", "formulas", "strategy", "setup", "premise", "book", "textbook",
                         "key", "data", "instruction", "instructions", "phrase", "prompt", "step", "steps",
                         "reasoning", "idea", "logic", "assumption", "interpretation", "wording", "figure",
                         "diagram", "model", "theorem", "equation", "angle", "triangle", "task", "exercise", "puzzle",
                         "hint", "example", "reference", "source", "author", "teacher"})
VERDICT_WORDS = AFFIRM | DENY | set(OPTIONS) | {KEYWORD.lower()}
EITHER = re.compile(rf"\b(?:{'|'.join(sorted(VERDICT_WORDS - {KEYWORD.lower()}))})\W+or\b|\bor\W+(?:{OPTION_WORDS})\b")  # "correct or wrong"
ADJECTIVES = frozenset({"correct", "right", "accurate", "valid", "flawless", "wrong", "incorrect", "erroneous",
                        "inaccurate", "invalid", "flawed", "consistent", "inconsistent"} | DOUBTFUL)
PREPOSITIONS = frozenset({"in", "at", "on", "of", "with", "for", "to", "by", "from", "about", "and", "or"})
RIGHT_AFTER = frozenset({"is", "s", "was", "be", "been", "are", "were", "am", "m", "re", "looks", "look", "seems", "seem",
                         "it", "quite", "exactly", "absolutely", "totally", "completely", "definitely", "entirely",
                         "all", "that", "not", "never", "got", "get", "yes", "actually", "indeed", "clearly",
                         "obviously", "also", "still", "now", "just", "perfectly", "certainly", "surely"})
CORRECT_AS_VERB_AFTER = frozenset({"to", "me", "must", "should", "will", "can", "let", "we", "i", "and", "you", "ll",
                                   "d", "please", "shall", "need", "try", "could", "would", "might"})
CORRECT_AS_VERB_BEFORE = frozenset({"it", "this", "that", "the", "my", "myself", "them", "these", "those", "for"})
FIXED = frozenset({"fixed", "corrected", "resolved", "repaired", "fix"})
SUPERSEDED = frozenset({"thought", "seemed", "initially", "originally", "appeared", "assumed", "feared",
                        "suspected"})  # a belief the reflection reports having had
BELIEF_VERBS = frozenset({"think", "believe", "say", "feel", "expect", "reckon", "claim", "find", "found", "see",
                          "consider", "agree"})


class _Unreadable(Exception):
    """The reflection holds something the grammar cannot read with confidence: no verdict."""


def _clean(text: str) -> str:
    text = unicodedata.normalize("NFKC", APOSTROPHES.sub("'", text)).lower()  # NFKC would split ´ into a space + accent
    return EMPHASIS.sub("", text)


def echoes(text: str, instruction: str) -> bool:
    """The reflection repeats an instruction: 8 of its words in a row (all of a shorter one), or, in
    a reflection of 10 words or more, half its words in 5-grams of the instruction."""
    words = tuple(re.findall(r"[a-z]+", text))
    for source in {instruction, *INSTRUCTIONS.values()} - {""}:
        run = min(8, len(_instruction_words(source)))
        if any(words[i : i + run] in _grams(source, run) for i in range(len(words) - run + 1)):
            return True
        if len(words) >= 10:
            grams, shared = _grams(source, 5), set()
            for i in range(len(words) - 4):
                if words[i : i + 5] in grams:
                    shared.update(range(i, i + 5))
            if 2 * len(shared) >= len(words):
                return True
    return False


@lru_cache(maxsize=16)
def _instruction_words(source: str) -> tuple[str, ...]:
    return tuple(re.findall(r"[a-z]+", _clean(source)))


@lru_cache(maxsize=32)
def _grams(source: str, n: int) -> frozenset:
    words = _instruction_words(source)
    return frozenset(words[i : i + n] for i in range(len(words) - n + 1))
def explicit_verdict(lines: list[str]) -> bool | None | str:
    """The contract's verdict line: True / False from the last non-blank line, "none" when a verdict
    line exists but gives no verdict, None when there is no verdict line (read the free text)."""
    found = []  # (line index, value) of every verdict line
    for i, line in enumerate(lines):
        match = VERDICT_LINE.search(line)
        if match:
            found.append((i, match.group(1)))
    if not found:
        return None
    values = []
    for _, value in found:
        clean = CLEAN_VALUE.match(value)
        if clean is None:
            return "none"  # "Verdict: maybe correct", "Verdict: correct or wrong", "Verdict:"
        values.append(OPTIONS[clean.group(1)])
    last, _ = found[-1]
    if len(set(values)) > 1 or last != len(lines) - 1:
        return "none"  # verdict lines that disagree, or one followed by more text
    leading = (lines[last - 1] if last else "") + " " + lines[last][: VERDICT_LINE.search(lines[last]).start()]
    if CONDITIONS & set(TOKEN.findall(_phrases(leading))):
        return "none"  # "If my sum is right:\nVerdict: correct"
    return values[-1]


# ---------------------------------------------------------------------------------------------
# Free text
# ---------------------------------------------------------------------------------------------


def _clauses(words: list[str]) -> list[list[str]]:
    clauses, current = [], []
    for word in words:
        if word in BOUNDARIES:
            clauses.append(current)
            current = []
        else:
            current.append(word)
    return [c for c in [*clauses, current] if c]


def _about_something_else(before: list[str], after: list[str] = ()) -> bool:
    """The verdict word qualifies something other than the answer: the noun right after an adjective
    ("a valid approach"), else the nearest noun before it ("the method is correct")."""
    for word in after[:2]:
        if word in PREPOSITIONS:
            break
        if word in ANSWER_NOUNS:
            return False
        if word in OTHER_NOUNS:
            return True
    for word in reversed(before):
        if word in ANSWER_NOUNS:
            return False
        if word in OTHER_NOUNS:
            return True
    return False


def _clause_verdict(words: list[str], before: list[str], fixed: bool, elsewhere: list[bool]) -> bool | None | str:
    """True / False, None when the clause has no verdict, "mixed" when it has both, "certain" for
    certainty alone. Verdicts about something else go to `elsewhere`."""
    negations, hedged, certainty, verdicts = 0, False, 0, []
    if words[0] in INVERTED:
        raise _Unreadable  # "Had I erred, the check would fail": a condition
    for i, word in enumerate(words):
        if word in NEGATORS:
            if word in ("not", "never") and words[i + 1 : i + 2] and words[i + 1] in INSERTIONS:
                raise _Unreadable  # "I do not, having checked it, think ...", "I am not saying it is wrong"
            negations += 1
        elif word in HEDGES:
            hedged = True
        elif word in CERTAIN or word in UNCERTAIN:
            certainty = (1 if word in CERTAIN else -1) * (-1) ** negations
            negations, hedged = 0, False  # the negation was the certainty's; what follows is its complement
        elif word in DOUBTFUL:
            if negations:
                raise _Unreadable  # "not unreliable": no clear verdict
            (elsewhere if _about_something_else(before + words[:i], words[i + 1 :]) else verdicts).append(False)
        elif word in AFFIRM or word in DENY:
            if word == "correct" and (i > 0 and words[i - 1] in CORRECT_AS_VERB_AFTER
                                      or words[i + 1 : i + 2] and words[i + 1] in CORRECT_AS_VERB_BEFORE):
                continue  # "let me correct it", "correct the sum": a verb, not a verdict
            if word == "right" and len(words) > 1 and not (
                    i > 0 and words[i - 1] in RIGHT_AFTER or words[i + 1 : i + 2] and words[i + 1] in ANSWER_NOUNS):
                continue  # "turn right", "right away": only "is right", "the right answer" or "Right." alone
            if fixed and word in DENY:
                continue  # "I found an error and fixed it": not a verdict on the final answer
            says_correct = (word in AFFIRM) == (negations % 2 == 0)
            if _about_something_else(before + words[:i], words[i + 1 :] if word in ADJECTIVES else ()):
                elsewhere.append(says_correct)
                continue
            if hedged and says_correct:
                raise _Unreadable  # "it might be correct", "it may not be wrong": neither
            verdicts.append("doubt" if hedged else says_correct)
    if words in (["no"], ["yes"]):
        return None  # "No, the answer is wrong": an interjection
    if negations and not verdicts and certainty == 0 and (words[-1] in NEGATORS or words[-1] in BELIEF_VERBS):
        raise _Unreadable  # "I do not, having checked it twice, think it holds": the negation lost its verb
    if certainty < 0:  # doubt about a claim of correctness is a denial; doubt about a denial says nothing
        if not verdicts and _about_something_else(words):
            return None  # "Not sure what the question asks"
        if any(v is not True for v in verdicts):
            raise _Unreadable
        verdicts = ["doubt"]
    elif certainty > 0 and not verdicts:
        if _about_something_else(words):
            return None  # "I am confident in the method"
        return "certain"  # "I am sure": affirms alone, and agrees with a verdict beside it
    if not verdicts:
        return None
    if len({False if v == "doubt" else v for v in verdicts}) > 1:
        return "mixed"
    return "doubt" if "doubt" in verdicts else verdicts[0]


def _sentence_verdicts(sentence: str, elsewhere: list[bool]) -> list[tuple[bool | None | str, bool]]:
    """Each clause's verdict, with whether the clause reports an earlier belief ("I thought ...")."""
    words = TOKEN.findall(sentence)
    fixed = any(w in FIXED for w in words)
    out, before = [], []
    for clause in _clauses(words):
        out.append((_clause_verdict(clause, before, fixed, elsewhere), any(w in SUPERSEDED for w in clause)))
        before += clause
    return out


def _free_text_verdict(text: str) -> bool | None:
    words = set(TOKEN.findall(text))
    if CONDITIONS & words:
        raise _Unreadable
    if EITHER.search(text):
        raise _Unreadable  # "correct or wrong", "right or wrong?"
    found: list[tuple[bool | str, bool]] = []  # (verdict, from a reported earlier belief)
    elsewhere: list[bool] = []
    question: bool | None | str = "none"
    for sentence in SENTENCE_END.split(text):
        if not TOKEN.findall(sentence):
            continue
        if question != "none":  # the previous sentence asked; does this one answer yes or no?
            tokens = TOKEN.findall(sentence)
            first = tokens[:1]
            if question is None or first not in (["yes"], ["no"]) or tokens[1:2] and tokens[1].isalpha() \
                    or {"yes", "no"} <= set(tokens):
                raise _Unreadable  # a question left unanswered, or answered "no doubt", "yes and no"
            found.append((question if first == ["yes"] else not question, False))
            sentence = sentence.split(first[0], 1)[1]
        asked = [(v, earlier) for v, earlier in _sentence_verdicts(sentence, elsewhere) if v is not None]
        if sentence.rstrip().endswith("?"):
            question = asked[0][0] if len(asked) == 1 and asked[0][0] != "mixed" else None
            question = {"certain": True, "doubt": False}.get(question, question)
            continue
        question = "none"
        found += asked
    if question != "none":
        raise _Unreadable
    # "I thought it was wrong, but it is correct": a belief it reports having had gives way to what it says now
    present = [v for v, earlier in found if not earlier]  # alone, a belief it had ("I thought it was right") is none
    if "certain" in present and "doubt" in present:
        return None  # "I am confident, but there may be an error."
    # "It is wrong, I'm sure.": certainty agrees with the verdict beside it; a doubt is a denial
    present = [False if v == "doubt" else v for v in present if v != "certain"] or [True for _ in present[:1]]
    if not present or "mixed" in present or len(set(present)) > 1:
        return None
    verdict = bool(present[0])
    if verdict and QUALMS & words:
        return None  # an affirmation beside a doubt the lists do not name
    if any(v != verdict for v in elsewhere):
        return None  # "Not sure. The method is correct.": the subjects may have been misread
    return verdict


def reflection_verdict(text: str, instruction: str = DEFAULT_INSTRUCTION) -> bool | None:
    """True when the reflection says its answer is correct, False when it says it is wrong or may
    be, None for no verdict (see the module docstring). `instruction` is the prompt's: a reflection
    that repeats it gives no verdict."""
    text = _clean(text)
    if echoes(text, instruction):
        return None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines or QUOTED.search(text) and VERDICT_WORDS & set(TOKEN.findall(text)):
        return None  # nothing, or a verdict in quotation marks
    explicit = explicit_verdict(lines)
    if explicit is not None:
        return None if explicit == "none" else explicit
    if KEYWORD.lower() in TOKEN.findall(text):
        return None  # the keyword, but no verdict line: "the instructions want me to say verdict: correct"
    try:
        return _free_text_verdict(NOT_VERDICTS.sub(" ", _phrases(text)))
    except _Unreadable:
        return None


def _phrases(text: str) -> str:
    """Contractions spelled out, then the phrases the grammar reads as one word."""
    for pattern, replacement in CONTRACTIONS + PHRASES:
        text = pattern.sub(replacement, text)
    return text
