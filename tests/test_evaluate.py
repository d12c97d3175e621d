"""rlvr.evaluate: the metrics by hand, the benchmark files, graders fed known answers, checkpoints,
validation during training, and the report's plots."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from rlvr import report
from rlvr.cli import model_argument
from rlvr.data import DataError, benchmark_example, load_benchmark
from rlvr.engines.protocol import Generation, SamplingParams
from rlvr.evaluate import evaluate, evaluate_benchmark, majority_correct, pass_at_k, summarize
from rlvr.models import ModelSpec, load_checkpoint_policy, load_model, tiny_tokenizer
from rlvr.rewards import RewardScorer, ground_truth_answer, verify_signal
from rlvr.train import CONF_DIR, train
from tiny import TINY

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
QWEN25_EVAL = SHARED / "data/one_shot_rlvr/qwen25_eval"


def compose_config(name, *overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# -- metrics, by hand ----------------------------------------------------------------------------


def test_pass_at_k_unbiased_estimator_by_hand():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)  # 1 - C(3,3)/C(5,3)
    assert pass_at_k(8, 0, 8) == 0.0 and pass_at_k(8, 1, 8) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_majority_vote_by_hand():
    assert majority_correct(["4", "5", "4", None], [True, False, True, False])
    assert not majority_correct(["5", "5", "4"], [False, False, True])
    assert majority_correct(["4", "5"], [True, False])  # a tie goes to the answer seen first
    assert not majority_correct(["5", "4"], [False, True])
    assert not majority_correct([None, None], [False, False])
    assert majority_correct(["1 / 2", "1/2", "3"], [True, True, False])  # white space does not split votes


def test_summarize_by_hand():
    result = summarize(
        "toy", 2, correct=[[True, False], [False, False]], answers=[["4", "5"], ["x", "y"]],
        signals={"verify": 0.25, "format": 0.5, "reflect": 0.0}, lengths=[10, 20, 30, 40],
        cut=[False, False, True, False], seconds=2.0,
    )
    assert result.pass1 == 0.25 and result.pass_k == 0.5 and result.maj == 0.5
    assert result.mean_length == 25 and result.truncated == 0.25
    assert result.row()["seconds_per_problem"] == 1.0 and result.row()["maj@2"] == 0.5
    single = summarize("toy", 1, [[True], [False]], [["4"], ["5"]], {"verify": 0.5, "format": 0, "reflect": 0}, [1, 1], [False, False], 1.0)
    assert single.maj is None and single.pass_k is None and single.row()["pass@1"] == 0.5 and "maj@1" not in single.row()


# -- benchmark files ------------------------------------------------------------------------------


@pytest.mark.parametrize(("source", "count"), [
    (QWEN25_EVAL / "math500/test.jsonl", 500),
    (QWEN25_EVAL / "aime24/test.jsonl", 30),
    (QWEN25_EVAL / "aime25/test.jsonl", 30),
    (QWEN25_EVAL / "amc23/test.jsonl", 40),
    (QWEN25_EVAL / "minerva_math/test.jsonl", 272),
    (QWEN25_EVAL / "olympiadbench/test.jsonl", 675),
    (SHARED / "data/math500/test.jsonl", 500),
    (SHARED / "data/gsm8k/test.jsonl", 1319),
])
def test_every_benchmark_reads_and_its_labels_grade_themselves(source, count):
    examples = load_benchmark(str(source))
    assert len(examples) == count and all(e.question.strip() and e.answer.strip() for e in examples)
    passed = sum(verify_signal(f"\\boxed{{{ground_truth_answer(e.answer)}}}", e.answer) for e in examples[:100])
    # One minerva label, "I(0) e^{-\frac{t}{R C}}", does not parse in math-verify; every other label grades itself.
    assert passed >= min(count, 100) - (1 if "minerva" in str(source) else 0)


def test_benchmark_schemas_pick_the_right_fields():
    assert benchmark_example({"problem": "p", "answer": 27.0}, "f row 1").answer == "27"  # amc23
    assert benchmark_example({"question": "q", "final_answer": ["$69$,$84$"]}, "f row 1").answer == "69,84"  # olympiadbench
    assert benchmark_example({"problem": "p", "solution": "so \\boxed{1.6}"}, "f row 1").answer == "1.6"  # minerva
    assert benchmark_example({"question": "q", "context": "c", "answer": "1"}, "w").question == "c\n\nq"
    with pytest.raises(DataError, match="bench.jsonl row 3: missing answer"):
        benchmark_example({"problem": "p", "solution": "no box"}, "bench.jsonl row 3")
    with pytest.raises(DataError, match="row 3: missing question"):
        benchmark_example({"answer": "1"}, "bench.jsonl row 3")


def test_a_malformed_benchmark_file_names_its_row(tmp_path):
    path = tmp_path / "bench.jsonl"
    path.write_text('{"problem": "1+1?", "answer": "2"}\n{"problem": "2+2?"}\n')
    with pytest.raises(DataError, match=f"{path} row 2: missing answer"):
        load_benchmark(str(path))


# -- the grader on known answers ------------------------------------------------------------------


class AnswerEngine:
    """Answers every prompt with a fixed response per question: the gold answer or a wrong one."""

    def __init__(self, tokenizer, examples, wrong=False):
        self.tokenizer, self.examples, self.wrong = tokenizer, examples, wrong

    def generate(self, prompts, params, seed):
        out = []
        for prompt in prompts:
            text = self.tokenizer.decode(prompt)
            example = next(e for e in self.examples if e.question.strip() in text)
            answer = "-987654321" if self.wrong else ground_truth_answer(example.answer)
            response = f"<think>worked it out</think> The answer is \\boxed{{{answer}}}. " \
                       f"<reflection>I am confident it is correct.</reflection>"
            out += [self.tokenizer.encode(response) + [self.tokenizer.eos_token_id]] * params.n
        return Generation(out, [[0.0] * len(tokens) for tokens in out])

    def load_weights(self, weights):
        pass


@pytest.mark.parametrize("source", [QWEN25_EVAL / "math500/test.jsonl", SHARED / "data/gsm8k/test.jsonl"])
def test_gold_answers_score_100_and_wrong_answers_0(source):
    tokenizer = tiny_tokenizer()
    examples = load_benchmark(str(source), limit=20)
    params = SamplingParams(n=2, temperature=0.6, max_new_tokens=4096)
    with RewardScorer(workers=0) as scorer:
        right, samples = evaluate_benchmark("b", examples, AnswerEngine(tokenizer, examples), tokenizer, scorer, params)
        wrong, _ = evaluate_benchmark("b", examples, AnswerEngine(tokenizer, examples, wrong=True), tokenizer, scorer, params)
    assert (right.pass1, right.maj, right.pass_k, right.format, right.reflect) == (1.0, 1.0, 1.0, 1.0, 1.0)
    assert right.problems == 20 and right.truncated == 0.0 and len(samples) == 40
    assert (wrong.pass1, wrong.maj, wrong.pass_k, wrong.format) == (0.0, 0.0, 0.0, 1.0)
    assert wrong.reflect == 0.0  # "confident" about a wrong answer


# -- the command ----------------------------------------------------------------------------------


def test_model_argument_takes_configs_ids_folders_and_checkpoints():
    assert model_argument(["model=tiny", "limit=3"]) == ["model=tiny", "limit=3"]
    assert model_argument(["model=Qwen/Qwen2.5-Math-1.5B"]) == ["model.name=Qwen/Qwen2.5-Math-1.5B"]
    assert model_argument(["model=runs/a/checkpoints/last.ckpt"], checkpoints=True) == ["checkpoint=runs/a/checkpoints/last.ckpt"]
    assert model_argument(["model=/models/qwen"]) == ["model.name=/models/qwen"]  # rlvr.train takes folders too
    assert model_argument(["model.name=x"]) == ["model.name=x"]


def test_evaluate_command_on_math500_and_gsm8k_slices(tmp_path):
    output = tmp_path / "eval.json"
    run = [sys.executable, "-m", "rlvr.evaluate", "model=tiny", "benchmarks=[math500,gsm8k]", "limit=20",
           "sampling.max_new_tokens=32", f"output={output}", f"output_dir={tmp_path}"]
    done = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(output.read_text())
    assert set(result["benchmarks"]) == {"math500", "gsm8k"}
    for row in result["benchmarks"].values():
        assert row["problems"] == 20 and row["k"] == 1 and 0 <= row["pass@1"] <= 1
        assert 0 < row["mean_length"] <= 32 and 0 <= row["truncated"] <= 1
    assert result["sampling"] == {"temperature": 0.6, "top_p": 1.0, "max_new_tokens": 32}
    assert len(output.with_suffix(".samples.jsonl").read_text().splitlines()) == 40
    assert "math500" in done.stdout and "pass@1" in done.stdout


def test_evaluate_rebuilds_the_policy_from_a_training_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    train(compose_config("config", *TINY, "mode=ultra-quick", "optim.lr=1e-3", f"output_dir={run_dir}"))
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    spec, tokenizer, model = load_checkpoint_policy(ckpt)
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    for name, param in model.named_parameters():
        assert torch.equal(param, saved[f"policy.{name}"])
    initial = load_model(ModelSpec("tiny"), tokenizer)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), initial.parameters()))  # trained weights

    cfg = compose_config("evaluate", f"checkpoint={ckpt}", "benchmarks=[gsm8k]", "limit=4", "sampling.max_new_tokens=16",
                         f"output_dir={tmp_path / 'eval'}", "reward.workers=0")
    result = evaluate(cfg)
    assert result["model"] == str(ckpt) and result["benchmarks"]["gsm8k"]["problems"] == 4


def test_an_unknown_benchmark_lists_the_known_ones(tmp_path):
    cfg = compose_config("evaluate", "benchmarks=[math5000]", f"output_dir={tmp_path}", "reward.workers=0")
    with pytest.raises(ValueError, match="math500.*\\+benchmark_sources.math5000="):
        evaluate(cfg)


# -- validation during training, and the report ---------------------------------------------------


def test_validation_logs_each_signal_without_changing_training_and_the_report_draws_it(tmp_path):
    common = [*TINY, "mode=quick", "steps=3", "seed=1"]
    train(compose_config("config", *common, f"output_dir={tmp_path / 'plain'}"))
    train(compose_config("config", *common, f"output_dir={tmp_path / 'val'}", "validation.benchmarks=[gsm8k,math500]",
                         "validation.every=2", "validation.limit=3", "validation.max_new_tokens=16"))
    logged = rows(tmp_path / "val" / "metrics.csv")
    val_steps = [r["step"] for r in logged if r.get("val/gsm8k/accuracy")]
    assert val_steps == ["1", "2"]  # every 2 steps, and after the last; never repeated on other steps
    for bench in ("gsm8k", "math500"):
        for key in ("accuracy", "verify", "format", "reflect"):
            assert all(0 <= float(r[f"val/{bench}/{key}"]) <= 1 for r in logged if r.get(f"val/{bench}/{key}"))

    train_rows = [r for r in logged if r.get("train/loss")]
    for a, b in zip(train_rows, rows(tmp_path / "plain" / "metrics.csv"), strict=True):
        for key in ("train/loss", "reward/total", "response_length/mean"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-6), key  # sampling is forked and seeded

    written = report.main([str(tmp_path / "val")])
    names = {p.name for p in written}
    assert {"reward.png", "accuracy.png", "response_length.png", "kl.png", "validation.png"} == names
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    series = report.read_metrics(tmp_path / "val")
    assert [s for s, _ in series["val/math500/accuracy"]] == [1, 2] and len(series["reward/total"]) == 3


def test_report_names_a_folder_without_metrics(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.csv"):
        report.read_metrics(tmp_path)
