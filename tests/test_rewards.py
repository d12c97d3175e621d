"""The reward signals on literal strings (each rule and each trap the issue names) and on gold data."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlvr.rewards import (
    RewardScorer,
    format_signal,
    ground_truth_answer,
    last_boxed,
    pearson,
    reflect_signal,
    reflection_verdict,
    score,
    score_batch,
    verify_signal,
    weights_from_env,
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
        (r"\boxed{18} was wrong, it is \boxed{17}", "18", 0.0),  # only the last box counts
        ("The answer is 18.", "18", 0.0),  # no box, no credit
        (r"\boxed{}", "18", 0.0),
    ],
)
def test_verify(response, truth, expected):
    assert verify_signal(response, truth) == expected


def test_ground_truth_answer():
    assert ground_truth_answer("work\n#### 1,000") == "1,000"
    assert ground_truth_answer(r" \frac{1}{2} ") == r"\frac{1}{2}"


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


@pytest.mark.parametrize(
    ("text", "verdict"),
    [
        ("The answer is correct.", True),
        ("I verified each step and I am confident.", True),
        ("Everything looks right.", True),
        ("This is accurate.", True),
        ("I made a mistake somewhere.", False),
        ("The result is incorrect.", False),  # "incorrect" is not "correct"
        ("That is wrong.", False),
        ("I am uncertain.", False),
        ("The check failed.", False),
        ("This is not correct.", False),
        ("It isn't right.", False),
        ("It isn\u2019t right.", False),  # typographic apostrophe
        ("I am not confident.", False),
        ("I found no errors.", True),  # a negated denial affirms
        ("Alright, let me think.", None),  # "alright" is not "right"
        ("I am confident, but there may be an error.", None),  # both: ambiguous
        ("Let me look at it again.", None),  # neither: ambiguous
        ("Not sure. The method is correct.", None),  # negation stays in its clause: deny, then affirm
    ],
)
def test_reflection_verdict(text, verdict):
    assert reflection_verdict(text) is verdict


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


def test_pathological_responses_time_out_without_stalling():
    nested = "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}"
    huge = "\\boxed{" + "9" * 200_000 + "}"
    tower = "\\boxed{(x+1)^{(x+1)^{(x+1)^{(x+1)^{99999}}}}}"
    responses = [GOOD] * 6 + [nested, huge, tower]
    truths = ["18"] * 8 + ["(x+1)^{(x+1)^{(x+1)^{(x+1)^{99998}}}}"]
    with RewardScorer(workers=2, timeout=1.0) as s:
        s([GOOD], ["18"])  # start the pool outside the timed part
        began = time.perf_counter()
        batch = s(responses, truths)
        elapsed = time.perf_counter() - began
    assert batch.verify[:6].tolist() == [1.0] * 6
    assert batch.verify[6:].tolist() == [0.0] * 3
    assert batch.timeouts >= 1
    assert elapsed < 20  # each slow one costs at most its 1 s limit (plus a pool restart if stuck)


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
