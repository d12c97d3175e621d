"""The reflection verdict (rlvr.reflection) on literal strings, each with a right and a wrong
answer, through the reward the trainer uses; and on the 373 judged sentences of
tests/reflections_{tune,heldout}.jsonl (written before the rules were tuned, split once at random:
random.Random(25).shuffle, first half tune). A false reward (a careful grader says reflect 0, rlvr
says 1) is never allowed; a missed verdict is."""

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from rlvr.cli import CONF_DIR
from rlvr.reflection import INSTRUCTIONS, VERDICT_LINES, echoes, instruction, reflection_verdict
from rlvr.rewards import RewardScorer, format_signal, reflect_signal, score, verify_signal

HERE = Path(__file__).resolve().parent
VERDICTS = {"correct": True, "wrong": False, "none": None}


def with_box(box: str, reflection: str) -> str:
    return f"<think>work</think> The answer is \\boxed{{{box}}}. <reflection>{reflection}</reflection>"


def reflects(reflection: str, **kwargs) -> tuple[float, float]:
    """reflect for a right answer (18) and a wrong one (17) to 6 * 3."""
    return tuple(score(with_box(box, reflection), "18", **kwargs)["reflect"] for box in ("18", "17"))


def expected(verdict: bool | None) -> tuple[float, float]:
    return {True: (1.0, 0.0), False: (0.0, 1.0), None: (0.0, 0.0)}[verdict]


CONTRACT = [  # (reflection, the verdict it gives)
    ("Verdict: correct", True), ("Verdict: wrong", False),
    # tolerated: case, markdown emphasis, a trailing period, right / incorrect, another separator
    ("VERDICT: Correct", True), ("**Verdict: wrong**", False), ("**Verdict:** correct.", True),
    ("Verdict: _incorrect_", False), ("Verdict: right.", True), ("Verdict - wrong", False),
    ("I checked the sum twice.\n\nVerdict: correct\n", True),
    ("I think it's right. Verdict: correct", True),  # the last line ends with it
    ("I am confident it is correct.\nVerdict: wrong", False),  # the last line decides
    # no verdict
    ("Verdict: correct or wrong", None),  # the short instruction's own words, copied
    ("Verdict: correct/wrong", None), ("Verdict: wrong or correct", None),
    ("Verdict: correct\nVerdict: wrong", None), ("Verdict: wrong\nVerdict: correct", None),  # they disagree
    ("If my sum is right:\nVerdict: correct\nOtherwise:\nVerdict: wrong", None),  # a condition holding both
    ("If the carry was right,\nVerdict: correct", None),  # a verdict line under a condition
    ("\"Verdict: correct\"", None), ("I will end with 'Verdict: wrong'.", None),  # quoted
    ("Verdict: maybe correct", None), ("Verdict: correct?", None), ("Verdict:", None),  # not an option alone
    ("Verdict: correct\nI double-checked it.", None),  # more text after the verdict line
]


@pytest.mark.parametrize(("reflection", "verdict"), CONTRACT)
def test_the_verdict_line_contract(reflection, verdict):
    assert reflection_verdict(reflection) is verdict
    assert reflects(reflection) == expected(verdict)


def test_the_instruction_asks_for_the_lines_the_parser_reads():
    assert [reflection_verdict(line) for line in VERDICT_LINES] == [True, False]
    assert all(line in INSTRUCTIONS["default"] for line in VERDICT_LINES)
    assert reflection_verdict(INSTRUCTIONS["default"]) is None and reflection_verdict(INSTRUCTIONS["short"]) is None
    with pytest.raises(ValueError, match="unknown instruction 'long'"):
        instruction("long")


def test_the_configs_take_the_instruction_from_its_one_definition():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cpu = compose(config_name="config", overrides=["gpu=cpu"]).prompt.instruction
        gpu = compose(config_name="config", overrides=["gpu=h100"]).prompt.instruction
    assert cpu == INSTRUCTIONS["short"] and gpu == INSTRUCTIONS["default"]


ECHO = INSTRUCTIONS["default"].split("Finally, ")[1]


@pytest.mark.parametrize("reflection", [
    ECHO,  # the instruction repeated: it ends with both verdict lines, quoted
    ECHO.replace('"Verdict: correct" or "Verdict: wrong".', "\nVerdict: wrong"),  # its last words a verdict line
    "Think step by step. Then say whether you are confident that your answer is correct or that it may be wrong."
    " Verdict: correct",
])
def test_a_reflection_that_repeats_the_instruction_gives_no_verdict(reflection):
    assert reflection_verdict(reflection) is None
    assert reflects(reflection) == (0.0, 0.0)


def test_the_scorer_knows_the_instruction_it_was_given():
    own = "Close with your own judgement on the boxed number and on the working that led to it."
    copied = own + "\nVerdict: correct"
    assert reflection_verdict(copied) is True  # unknown to the default scorer: a plain verdict line
    assert reflection_verdict(copied, own) is None
    assert reflects(copied) == (1.0, 0.0) and reflects(copied, instruction=own) == (0.0, 0.0)
    with RewardScorer(workers=0, instruction=own) as scorer:
        assert scorer([with_box("18", copied)], ["18"]).reflect.tolist() == [0.0]
    with RewardScorer(workers=0) as scorer:  # built without one: the default instruction
        assert scorer([with_box("18", copied)], ["18"]).reflect.tolist() == [1.0]
    assert echoes("i am confident that my answer is correct.", INSTRUCTIONS["default"]) is False  # a few words in common
    assert reflection_verdict("It may be wrong.") is False  # the instruction's own phrase, used as asked


FREE_TEXT = [  # (reflection, the verdict a careful grader takes from it)
    # plain affirmations and denials, and a bare verdict word alone
    ("correct", True), ("Wrong.", False), ("Right.", True), ("The answer is correct.", True),
    ("I found no errors.", True), ("I made a mistake in step 2.", False), ("Everything checks out.", True),
    ("The answer is incorrect, I am sure.", False), ("I'm confident in this answer.", True),
    # doubts deny (the instruction's "it may be wrong")
    ("It might be wrong.", False), ("I'm not sure it is right.", False), ("I'm skeptical of this result.", False),
    ("I'm on the fence about this answer.", False), ("Low confidence.", False),
    # conditionals
    ("If my arithmetic is right, the answer is correct.", None), ("Unless I misread it, it is right.", None),
    ("The answer is correct as long as the price is per item.", None), ("It would be correct if x > 0.", None),
    # questions left unanswered; answered ones count
    ("Is the answer correct?", None), ("Correct? Wrong? Hard to say.", None), ("It's right... or is it?", None),
    ("Is it right? No.", False), ("Did I make a mistake? No.", True),
    # verdicts about something other than the answer
    ("The question is wrong.", None), ("The method is correct.", None), ("The problem statement is incorrect.", None),
    ("The question has a typo; it is wrong as written.", None), ("I'm confident the question is ambiguous.", None),
    ("My approach is right.", None), ("The first step is correct but the second is wrong.", None),
    ("The method is correct, and the answer is right.", True), ("The answer to the question is correct.", True),
    ("Not sure. The method is correct.", None),  # the other subject disagrees: it may have been misread
    # quoted text
    ("\"The answer is correct.\"", None), ("He said, 'That is wrong.'", None),
    # hedges that retract themselves, and mixed verdicts
    ("Right, I believe; then again, perhaps not.", None), ("It's correct. Or maybe not.", None),
    ("I think it's right, but I'm not sure.", None), ("I am confident, but there may be an error.", None),
    ("It is probably correct, but it could be wrong.", None), ("It might be correct.", None),
    ("I'm not sure it is wrong.", None), ("It seems right to me, but who knows.", None),
    # negation separated from its verb by an inserted clause
    ("I do not, having checked it twice, think it holds.", None),
    ("I am not, given the rounding, confident it is correct.", None),
    ("I do not \u2014 after all that work \u2014 believe the answer is right.", None),
    # doubt in words outside the lists, beside an affirmation
    ("I'd be surprised if this holds up.", None), ("I wouldn't bet on it being correct.", None),
    ("Almost correct.", None), ("Probably right.", None), ("I'm 50% sure it is right.", None),
    ("Everything is right except the final sum.", None), ("I hope it is correct.", None),
    ("I believe it's correct, though not with certainty.", None),
    # idioms, verbs and someone else's answer
    ("It's anything but correct.", False), ("My answer is error-free.", True), ("Oh sure, it's totally correct.", None),
    ("I'll correct the sum.", None), ("Correct the answer to 17.", None), ("The other answer is wrong.", None),
    ("The book's answer is wrong.", None), ("I used the right numbers.", None), ("This is a valid approach.", None),
    ("Is it right? No doubt.", None), ("Is it right? Yes and no.", None), ("Is it wrong? No, it's correct.", True),
    ("The instructions want me to say verdict: correct", None), ("My verdict: correct", True),
    ("I thought it was wrong, but it is correct.", True), ("I thought it was correct.", None),
    # not verdicts at all
    ("Right, let me check again.", None), ("The triangle has a right angle.", None), ("Let me correct that.", None),
    ("The correct answer is 7.", None), ("Correct answer: 18", None), ("Hmm.", None), ("Yes.", None),
]


@pytest.mark.parametrize(("reflection", "verdict"), FREE_TEXT)
def test_free_text_fails_closed(reflection, verdict):
    assert reflection_verdict(reflection) is verdict
    assert reflects(reflection) == expected(verdict)


@pytest.mark.parametrize("box", ["", " ", "\u200b"])
@pytest.mark.parametrize("reflection", ["Verdict: wrong", "Verdict: correct", "wrong"])
def test_no_answer_no_reflect(box, reflection):
    assert score(with_box(box, reflection), "18")["reflect"] == 0.0
    assert reflect_signal(f"<think>w</think> no box <reflection>{reflection}</reflection>", 0.0) == 0.0


def test_the_only_box_counts_even_after_the_reflection():
    after = "<think>6 * 3</think> <reflection>Verdict: correct</reflection> \\boxed{18}"
    assert verify_signal(after, "18") == 1.0 and verify_signal(after, "17") == 0.0
    assert score(after, "18") == {"verify": 1.0, "format": 0.0, "reflect": 1.0, "total": 1.5}
    inside = "<think>6 * 3</think> <reflection>it is \\boxed{18}. Verdict: correct</reflection>"
    assert verify_signal(inside, "18") == 0.0 and score(inside, "18")["reflect"] == 0.0  # inside never counts
    both = "<think>w</think> \\boxed{17} <reflection>Verdict: wrong</reflection> \\boxed{18}"
    assert verify_signal(both, "18") == 0.0  # a box before the reflection is the answer; a later one cannot replace it
    assert format_signal(after) == 0.0


def judged(name: str) -> list[dict]:
    return [json.loads(line) for line in (HERE / f"reflections_{name}.jsonl").read_text().splitlines()]


def agreement(rows: list[dict]) -> tuple[int, int, int]:
    """(signals that agree, false rewards, signals) over each sentence with a right and a wrong answer."""
    agree = false_rewards = 0
    for row in rows:
        for careful, rlvr in zip(expected(VERDICTS[row["verdict"]]), reflects(row["text"])):
            agree += careful == rlvr
            false_rewards += careful == 0.0 and rlvr == 1.0
    return agree, false_rewards, 2 * len(rows)


@pytest.mark.parametrize(("name", "floor"), [("tune", 0.96), ("heldout", 0.96)])
def test_the_judged_sentences_earn_no_false_reward(name, floor):
    rows = judged(name)
    assert len(rows) >= 150 and {r["verdict"] for r in rows} == set(VERDICTS)
    agree, false_rewards, signals = agreement(rows)
    assert false_rewards == 0
    assert agree >= floor * signals  # benchmarks/RESULTS.md has the figures
