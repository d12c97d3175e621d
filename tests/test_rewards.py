"""The reward signals on literal strings (each rule and each trap the issue names) and on gold data."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlvr.answers import answer_box, ground_truth_answer, last_boxed, normalize, too_costly
from rlvr.reflection import reflection_verdict
from rlvr.rewards import (
    RewardBatch,
    RewardScorer,
    format_signal,
    pearson,
    reflect_signal,
    score,
    score_batch,
    verify_signal,
    weights_from_env,
    with_overlong,
    overlong_penalty,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
GOOD = "<think>6 * 3 = 18</think>\nSo the answer is \\boxed{18}.\n<reflection>I checked it; the answer is correct.</reflection>\n"


@pytest.fixture(scope="module")
def scorer():
    with RewardScorer(workers=2, timeout=2.0) as s:
        yield s


# -- verify ------------------------------------------------------------------------------------


def test_last_boxed_balances_braces_and_takes_the_last():
    assert last_boxed(r"\boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert last_boxed(r"first \boxed{3} then \boxed{4}") == "4"
    assert last_boxed(r"\boxed{5} and a broken \boxed{6") == "5"
    assert last_boxed("no box") is None


@pytest.mark.parametrize(
    ("response", "truth", "expected"),
    [
        (r"\boxed{18}", "18", 1.0),
        (r"\boxed{18}", "Natalia sold 48/2 = 24 clips.\n#### 18", 1.0),  # GSM8K label
        (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
        (r"\boxed{\frac{1}{2}}", "0.5", 1.0),
        (r"\boxed{(3, \frac{\pi}{2})}", r"\left( 3, \frac{\pi}{2} \right)", 1.0),
        (r"\boxed{1+x^2}", "x^2+1", 1.0),
        (r"\boxed{17}", "18", 0.0),
        (r"\boxed{18} was wrong, it is \boxed{17}", "18", 0.0),  # only the last box counts (no reflection)
        ("The answer is 18.", "18", 0.0),  # no box, no credit
        (r"\boxed{}", "18", 0.0),
    ],
)
def test_verify(response, truth, expected):
    assert verify_signal(response, truth) == expected


def test_ground_truth_answer():
    assert ground_truth_answer("work\n#### 1,000") == "1,000"
    assert ground_truth_answer(r" \frac{1}{2} ") == r"\frac{1}{2}"


def with_box(box: str, reflection: str = "I am confident it is correct.") -> str:
    return f"<think>work</think> The answer is \\boxed{{{box}}}. <reflection>{reflection}</reflection>"


def test_the_graded_box_is_the_one_before_the_reflection():
    assert answer_box(with_box("4", r"Actually it is \boxed{7}.")) == "4"
    assert verify_signal(with_box("4", r"Actually it is \boxed{7}."), "4") == 1.0  # a box in the reflection cannot erase it
    assert verify_signal(with_box("7", r"Actually it is \boxed{4}."), "4") == 0.0  # ... nor override a wrong one
    assert answer_box(r"\boxed{3} no reflection, then \boxed{5}") == "5"  # without a reflection: the last box
    assert answer_box(r"<think>\boxed{2}</think> <reflection>ok</reflection>") == "2"  # the last box before it
    assert answer_box(r"<think>x</think> <reflection>ok \boxed{1}</reflection> \boxed{5}") == "5"  # the only answer given
    assert answer_box(r"<think>x</think> <reflection>it is \boxed{1}</reflection>") is None  # inside never counts
    assert verify_signal(r"<think>w</think> \boxed {4} <reflection>correct</reflection>", "4") == 1.0  # \boxed {4} is LaTeX
    assert last_boxed(r"\boxed  {\frac{1}{2}}") == r"\frac{1}{2}"


@pytest.mark.parametrize(("box", "truth", "expected"), [
    ("\uff11\uff18", "18", 1.0),  # full-width digits (NFKC)
    (r"1\,000", "1000", 1.0), (r"1\ 000", "1000", 1.0), ("1{,}000", "1000", 1.0), ("1\u2009000", "1000", 1.0),
    ("18 dollars", "18", 1.0), ("12 apples.", "12", 1.0), ("5 cm", "5", 1.0), (r"\text{18 dollars}", "18", 1.0),  # a trailing unit word
    ("3 pi", "3", 0.0),  # ... but not a mathematical word
    (r"0.\overline{3}", r"\frac{1}{3}", 1.0), (r"0.1\overline{6}", "1/6", 1.0), (r"1.\bar{09}", r"\frac{12}{11}", 1.0),
    ("5 = 4", "4", 0.0), ("2+2=4", "4", 0.0), (r"\le 4", "4", 0.0), (r"x \le 4", "4", 0.0), ("x < 4", "4", 0.0),
    ("x = 4", "4", 1.0),  # a name, then the value
    (r"x \le 4", r"x \le 4", 1.0),  # the label is a relation itself
    # what already worked keeps working
    (r"18\text{ dollars}", "18", 1.0), (r"50\%", "50", 1.0), ("1,000", "1000", 1.0), (r"\dfrac{1}{2}", "0.5", 1.0),
    ("[1, 2)", "[1,2)", 1.0), (r"\{1, 2\}", r"\{1,2\}", 1.0), ("(1, 2)", "(1,2)", 1.0), (r"90^\circ", "90", 1.0),
    ("\u22125", "-5", 1.0), ("18", "work\n#### 18", 1.0),
    (r"\begin{pmatrix}1\\\\2\end{pmatrix}", r"\begin{pmatrix}1\\\\2\end{pmatrix}", 1.0),
])
def test_answers_are_normalised_as_a_careful_grader_reads_them(box, truth, expected):
    assert verify_signal(with_box(box), truth) == expected


def test_normalize_by_hand():
    assert normalize("\uff14\uff12") == "42" and normalize(r"1\,234\,567") == "1234567"
    assert normalize(r"0.\overline{3}") == r"\frac{1}{3}" and normalize(r"2.\overline{5}") == r"\frac{23}{9}"
    assert normalize("18 dollars") == "18" and normalize("x^2 + 1") == "x^2 + 1"
    assert too_costly("9" * 5_000) and too_costly("{" * 50 + "}" * 50) and too_costly("10^{10^{10}}")
    assert not too_costly("e^{x^2}") and not too_costly(r"\frac{1}{2}") and not too_costly("2^{2^{3}}")


# -- format ------------------------------------------------------------------------------------


def test_format_accepts_the_full_structure():
    assert format_signal(GOOD) == 1.0
    assert format_signal("  " + GOOD + "\n\n  ") == 1.0


@pytest.mark.parametrize(
    "response",
    [
        GOOD.replace("<think>6 * 3 = 18</think>", "<think>  </think>"),  # blank thinking
        GOOD.replace(r"\boxed{18}", r"\boxed{ }"),  # blank box
        GOOD.replace(r"\boxed{18}", "18"),  # no box
        GOOD.replace("I checked it; the answer is correct.", " "),  # blank reflection
        GOOD + "And one more thing.",  # text after </reflection>
        GOOD.replace("<think>", "<think><think>", 1),  # two <think>
        GOOD + "<reflection>again</reflection>",  # two reflections
        "<reflection>correct</reflection>" + GOOD.replace("<reflection>I checked it; the answer is correct.</reflection>", ""),
        r"<think>x</think><reflection>correct</reflection>\boxed{18}",  # box after the reflection
        r"\boxed{18}<think>x</think><reflection>correct</reflection>",  # box before </think> only
        "<think>x</think> \\boxed{18}",  # no reflection
        GOOD.replace("6 * 3 = 18", "\u200b\u200c"),  # zero-width thinking is blank
        GOOD.replace(r"\boxed{18}", "\\boxed{\u200b\u2060}"),  # a zero-width box is blank
        GOOD.replace("I checked it; the answer is correct.", "\ufeff"),
    ],
)
def test_format_rejects(response):
    assert format_signal(response) == 0.0


def test_the_prompt_is_never_scored():
    """The predecessor scored prompt + response: a prompt with the tags earned format reward."""
    prompt = "Answer with <think>...</think>, \\boxed{}, <reflection>...</reflection>."
    assert score("18", "18")["format"] == 0.0
    assert format_signal(prompt + GOOD) == 0.0  # would-be hack: tags twice


# -- reflect -----------------------------------------------------------------------------------


REFLECTIONS = [  # (text, the verdict a careful reader takes from it)
    ("The answer is correct.", True),
    ("I verified each step and I am confident.", True),
    ("Everything looks right.", True),
    ("This is accurate.", True),
    ("It checks out.", True),
    ("I made a mistake somewhere.", False),
    ("The result is incorrect.", False),  # "incorrect" is not "correct"
    ("That is wrong.", False),
    ("I am uncertain.", False),
    ("The check failed.", False),
    ("This is not correct.", False),
    ("I found no errors.", True),  # a negated denial affirms
    ("I could not find any mistakes.", True),
    ("There is no mistake, the answer is correct.", True),
    # negation governs its clause, not a window of words
    ("I don't think my answer is correct.", False),
    ("I do not believe this is right.", False),
    ("It is far from correct.", False),
    ("I doubt it is correct.", False),
    ("No doubt, it is correct.", True),
    # certainty words modify the verdict they govern
    ("I am confident it is wrong.", False),
    ("I'm not sure the result is right.", False),
    ("I'm sure there are no errors.", True),
    ("I am confident.", True),
    ("I am not confident.", False),
    ("Not sure.", False),
    ("It might be wrong.", False),
    ("It might be correct.", None),  # a hedge says neither
    # adverbs
    ("I added them correctly.", True),
    ("I added them wrongly.", False),
    ("I subtracted incorrectly in step 2.", False),
    # questions, answered or not
    ("Is it right? No.", False),
    ("Is it right? Yes.", True),
    ("Did I make a mistake? No.", True),
    ("Is the answer wrong? Yes, in step 2.", False),
    ("Is it right?", None),
    # mathematical uses of verdict words
    ("The triangle has a right angle, and the answer is correct.", True),
    ("The triangle has a right angle.", None),
    ("I used the error function.", None),
    ("The error term vanishes, so the answer is right.", True),
    ("To make sure, I checked again; it is correct.", True),
    ("The formula is valid for x > 0.", None),
    ("Let me correct that.", None),  # a verb
    ("I found an error in step 2 and fixed it; the answer is now correct.", True),
    # every apostrophe
    ("It isn't right.", False),
    ("It isn\u2019t right.", False),
    ("This isn`t right.", False),
    ("It isn\u00b4t right.", False),
    # an explicit closing verdict decides
    ("Verdict: wrong", False),
    ("I think it's right. Verdict: correct", True),
    ("I am confident it is correct. Verdict: wrong", False),
    ("Some doubts remain.\nVerdict: **correct**", True),
    # a belief it reports having had gives way to what it says now
    ("I thought it was wrong, but it is correct.", True),
    ("At first it seemed right, but actually it is wrong.", False),
    ("It seemed wrong at first. After rechecking, it is correct.", True),
    ("I thought it was correct.", None),  # alone, a belief it had is no verdict on the answer now
    ("First, I check the sum: it is correct.", True),  # "first" in a sequence of steps
    # the true value named is no verdict; matching it is
    ("My solution is incorrect; the correct answer is 7.", False),
    ("The correct answer is 4, which matches mine.", True),
    ("My answer does not match the correct answer.", False),
    ("I got the correct answer.", True),
    ("The correct answer is 7.", None),
    # ambiguous or missing
    ("Alright, let me think.", None),  # "alright" is not "right"
    ("I am confident, but there may be an error.", None),  # both: ambiguous
    ("Let me look at it again.", None),  # neither
    ("Not sure. The method is correct.", None),  # one clause doubts, the other affirms
    ("I am not sure it is wrong.", None),  # doubt about a denial commits to nothing
]


@pytest.mark.parametrize(("text", "verdict"), REFLECTIONS)
def test_reflection_verdict(text, verdict):
    assert reflection_verdict(text) is verdict


@pytest.mark.parametrize(("text", "verdict"), REFLECTIONS)
def test_reflect_rewards_a_verdict_that_agrees_with_verify_on_a_right_and_a_wrong_answer(text, verdict):
    right, wrong = with_box("18", text), with_box("17", text)
    assert verify_signal(right, "18") == 1.0 and verify_signal(wrong, "18") == 0.0
    assert score(right, "18")["reflect"] == (1.0 if verdict is True else 0.0)
    assert score(wrong, "18")["reflect"] == (1.0 if verdict is False else 0.0)


def test_reflect_is_calibration_against_verify():
    right = GOOD
    doubtful = GOOD.replace("I checked it; the answer is correct.", "I think I made a mistake.")
    assert reflect_signal(right, 1.0) == 1.0
    assert reflect_signal(right, 0.0) == 0.0  # claims correct, was wrong
    assert reflect_signal(doubtful, 0.0) == 1.0  # admits the error: calibrated
    assert reflect_signal(doubtful, 1.0) == 0.0
    assert reflect_signal("<think>a</think>\\boxed{1}", 1.0) == 0.0  # no block
    assert reflect_signal("<reflection>Alright.</reflection>", 1.0) == 0.0  # ambiguous


def test_score_total_is_the_weighted_sum():
    assert score(GOOD, "18") == {"verify": 1.0, "format": 1.0, "reflect": 1.0, "total": 2.0}
    wrong = score(GOOD, "19", weights=(1.0, 0.25, 2.0))
    assert wrong == {"verify": 0.0, "format": 1.0, "reflect": 0.0, "total": 0.25}


def test_reward_weights_env(monkeypatch):
    monkeypatch.setenv("REWARD_WEIGHTS", "1,0,0.25")
    assert weights_from_env((1.0, 0.5, 0.5)) == (1.0, 0.0, 0.25)
    monkeypatch.setenv("REWARD_WEIGHTS", "1,2")
    with pytest.raises(ValueError, match="REWARD_WEIGHTS"):
        weights_from_env((1.0, 0.5, 0.5))
    monkeypatch.delenv("REWARD_WEIGHTS")
    assert weights_from_env((1.0, 0.5, 0.5)) == (1.0, 0.5, 0.5)


def test_pearson():
    assert pearson(torch.tensor([0.0, 1, 0, 1]), torch.tensor([0.0, 1, 0, 1])) == pytest.approx(1.0)
    assert pearson(torch.tensor([0.0, 1, 0, 1]), torch.tensor([1.0, 0, 1, 0])) == pytest.approx(-1.0)
    assert pearson(torch.tensor([1.0, 1, 1]), torch.tensor([0.0, 1, 0])) == 0.0


# -- the batch scorer --------------------------------------------------------------------------


def test_batch_matches_single_scores(scorer):
    responses = [GOOD, GOOD.replace("18}", "17}"), "nothing", GOOD.replace("correct.", "wrong.")]
    truths = ["18", "18", "18", "18"]
    batch = scorer(responses, truths)
    for i, (response, truth) in enumerate(zip(responses, truths)):
        expected = score(response, truth)
        assert [batch.verify[i].item(), batch.format[i].item(), batch.reflect[i].item(), batch.total[i].item()] == [
            expected["verify"], expected["format"], expected["reflect"], expected["total"]]
    assert batch.accuracy == pytest.approx(0.5)
    assert batch.timeouts == 0


def test_in_process_scoring_agrees(scorer):
    responses, truths = [GOOD, "\\boxed{3}"], ["18", "3"]
    a = score_batch(responses, truths, workers=0)
    b = scorer(responses, truths)
    assert torch.equal(a.total, b.total)


PATHOLOGICAL = [  # answers that would keep a CAS busy for minutes: wrong at once
    "9" * 200_000,
    "{" * 10_000 + "1" + "}" * 10_000,
    "(x+1)^{(x+1)^{(x+1)^{(x+1)^{99999}}}}",
    "9^{9^{9^{9}}}",
    "10^{10^{10}}",
    "2^{9999999}",
    "99999!",
]


@pytest.mark.parametrize("answer", PATHOLOGICAL, ids=range(len(PATHOLOGICAL)))
def test_plain_score_never_hangs(answer):
    began = time.perf_counter()
    assert score(f"<think>w</think> \\boxed{{{answer}}} <reflection>correct</reflection>", "18")["verify"] == 0.0
    assert time.perf_counter() - began < 10


def test_score_is_bounded_by_its_time_limit_on_and_off_the_main_thread():
    """A slow but legitimate-looking answer (a polynomial of degree 99,999) runs into the limit."""
    import threading

    slow = r"\boxed{(x+1)^{99999}}"
    began = time.perf_counter()
    assert score(slow, "(x+1)^{99998}", timeout=1.0)["verify"] == 0.0  # main thread: an interval timer
    assert time.perf_counter() - began < 5
    result = {}
    thread = threading.Thread(target=lambda: result.update(score(slow, "(x+1)^{99998}", timeout=1.0)))
    began = time.perf_counter()
    thread.start()
    thread.join(60)
    assert result["verify"] == 0.0 and time.perf_counter() - began < 45  # elsewhere: a process, killed when late


class _SleepsInItsFinalizer:
    """Its finalizer sleeps through the first alarm: the _Timeout raised there is reported as
    "Exception ignored" and dropped, as one raised inside a garbage-collector callback would be."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __del__(self) -> None:
        time.sleep(self.seconds)


def _loses_the_first_alarm_in_a_finalizer(response, ground_truth):
    obj = _SleepsInItsFinalizer(10.0)
    del obj  # the finalizer runs here, and the first alarm lands inside it
    time.sleep(10.0)  # a verification that would run on: only a second alarm can stop it
    return 1.0


def _swallows_the_first_alarm(response, ground_truth):
    try:
        time.sleep(10.0)
    except BaseException:  # a library's bare `except:`
        pass
    time.sleep(10.0)
    return 1.0


@pytest.mark.parametrize("verify", [_loses_the_first_alarm_in_a_finalizer, _swallows_the_first_alarm],
                         ids=["lost-in-finalizer", "swallowed"])
def test_a_lost_alarm_does_not_unbound_verification(monkeypatch, verify):
    """The first alarm is lost, deterministically; the call still returns within its bound (a
    one-shot timer sleeps on for 10 s and scores 1.0)."""
    from rlvr import rewards

    dropped = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: dropped.append(unraisable.exc_type))
    monkeypatch.setattr(rewards, "verify_signal", verify)
    began = time.perf_counter()
    assert rewards.verify_bounded("\\boxed{1}", "1", timeout=0.5) == (0.0, True)
    assert time.perf_counter() - began < 2.0
    if verify is _loses_the_first_alarm_in_a_finalizer:
        assert dropped == [rewards._Timeout]  # the first alarm really was lost in the finalizer
    assert rewards.verify_bounded("\\boxed{1}", "1", timeout=0.5) == (0.0, True)  # and again: nothing left armed


def test_an_alarm_after_the_result_is_known_does_nothing():
    """Once a verification has returned, a late alarm from its timer must not raise anywhere."""
    from rlvr import rewards

    assert rewards.verify_bounded("\\boxed{4}", "4", timeout=0.5) == (1.0, False)
    signal.setitimer(signal.ITIMER_REAL, 0.01)  # an alarm after disarming
    previous = signal.signal(signal.SIGALRM, rewards._on_alarm)
    try:
        time.sleep(0.1)  # the handler runs here: not armed, so no _Timeout
    finally:
        signal.signal(signal.SIGALRM, previous)


def test_pathological_responses_time_out_without_stalling():
    slow = r"\boxed{(x+1)^{99999}}"  # passes every guard; only the timer stops it
    responses = [GOOD] * 6 + [f"\\boxed{{{a}}}" for a in PATHOLOGICAL[:3]] + [slow]
    truths = ["18"] * 9 + ["(x+1)^{99998}"]
    with RewardScorer(workers=2, timeout=1.0) as s:
        s([GOOD], ["18"])  # start the pool outside the timed part
        began = time.perf_counter()
        batch = s(responses, truths)
        elapsed = time.perf_counter() - began
    assert batch.verify[:6].tolist() == [1.0] * 6
    assert batch.verify[6:].tolist() == [0.0] * 4
    assert batch.timeouts == 1  # the guarded ones are wrong at once; the slow one ran into its 1 s limit
    assert elapsed < 20


def test_a_dead_worker_is_replaced_and_its_batch_rescored():
    with RewardScorer(workers=2, timeout=2.0) as s:
        s([GOOD], ["18"])
        for process in list(s._pool._processes.values()):
            os.kill(process.pid, 9)
        batch = s([GOOD] * 4, ["18"] * 4)
        assert batch.verify.tolist() == [1.0] * 4
        assert s.pool_restarts == 1
        assert s([GOOD], ["18"]).verify.tolist() == [1.0]  # the new pool serves later batches


MAIN_WITH_SIDE_EFFECT = r"""
import sys
sys.path.insert(0, ROOT)
open(LOG, "a").write("imported\n")
from rlvr.rewards import RewardScorer
if __name__ == "__main__":
    with RewardScorer(workers=2, timeout=2.0) as s:
        print(s(["\\boxed{18}"] * 4, ["18"] * 4).verify.tolist())
        print(s._verify_isolated("\\boxed{18}", "18"))
"""


def test_workers_do_not_re_run_the_parents_main_module(tmp_path):
    """Spawn re-imports `__main__` in each child; for `python -m rlvr.train` that is all of Lightning."""
    log = tmp_path / "imports.log"
    script = tmp_path / "main_with_side_effect.py"
    script.write_text(MAIN_WITH_SIDE_EFFECT.replace("ROOT", repr(str(Path(__file__).resolve().parents[1])))
                      .replace("LOG", repr(str(log))))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["[1.0, 1.0, 1.0, 1.0]", "(1.0, False)"]
    assert log.read_text().splitlines() == ["imported"]  # the parent alone: 2 pool workers + 1 isolated did not


# -- gold data ---------------------------------------------------------------------------------


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _gsm8k_boxed(answer: str) -> str:
    work, number = answer.rsplit("####", 1)
    return f"{work}\\boxed{{{number.strip()}}}"


def test_every_math500_gold_solution_verifies(scorer):
    rows = _jsonl(SHARED / "data/math500/test.jsonl")
    batch = scorer([r["solution"] for r in rows], [r["answer"] for r in rows])
    failures = [r["unique_id"] for r, v in zip(rows, batch.verify) if v != 1.0]
    assert len(rows) == 500 and failures == []


def test_every_gsm8k_test_solution_verifies(scorer):
    rows = _jsonl(SHARED / "data/gsm8k/test.jsonl")
    batch = scorer([_gsm8k_boxed(r["answer"]) for r in rows], [r["answer"] for r in rows])
    assert len(rows) == 1319 and batch.verify.sum().item() == len(rows)


@pytest.mark.parametrize(("path", "solution", "answer"), [
    ("data/math500/test.jsonl", "solution", "answer"),
    ("data/gsm8k/test.jsonl", None, "answer"),
])
def test_a_solution_scored_against_another_problem_almost_never_passes(scorer, path, solution, answer):
    rows = _jsonl(SHARED / path)
    responses = [r[solution] if solution else _gsm8k_boxed(r[answer]) for r in rows]
    shifted = [rows[(i + 1) % len(rows)][answer] for i in range(len(rows))]
    batch = scorer(responses, shifted)
    passed = [i for i, v in enumerate(batch.verify) if v == 1.0]
    assert len(passed) / len(rows) < 0.02
    # and each pass is a pair of problems whose labels really are equal
    for i in passed:
        own = rows[i][answer]
        assert verify_signal(f"\\boxed{{{ground_truth_answer(own)}}}", shifted[i]) == 1.0


def test_the_overlong_penalty_is_zero_to_the_buffers_start_then_linear_to_the_limit():
    # limit 100, buffer 20: 0 up to 80 tokens, -0.25 * 2 at 85, -0.5 * 2 at 90, the whole -2 at 100
    lengths = torch.tensor([10, 80, 85, 90, 100])
    assert overlong_penalty(lengths, max_new_tokens=100, buffer=20, penalty=2.0).tolist() == [0.0, 0.0, -0.5, -1.0, -2.0]


def test_the_overlong_signal_joins_the_total_and_stays_apart_from_the_named_ones():
    t = torch.tensor([1.0, 1.5])
    batch = RewardBatch(t, t * 0, t * 0, t, 0)
    shaped = with_overlong(batch, torch.tensor([50, 100]), max_new_tokens=100, buffer=20, penalty=1.0)
    assert shaped.total.tolist() == [1.0, 0.5] and shaped.overlong.tolist() == [0.0, -1.0]
    assert shaped.verify.tolist() == [1.0, 1.5] and batch.overlong is None  # the parts are untouched
