"""A newcomer's command line: every user error is one `error:` line naming the key and the fix, exit
status 2, no traceback, no run folder left, and it comes before any model or data loads. Also the
package itself: a wheel that holds the configs and the default model, run from another directory."""

import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from rlvr.cli import check_overrides
from rlvr.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def start(*args: str, cwd: Path, module: str = "rlvr.train", env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    return done, time.perf_counter() - began


ERRORS = [  # (arguments, what the one line must say)
    (["gpu=l4"], "gpu=l4 needs a CUDA GPU and this machine has none; run with gpu=cpu"),
    (["mode=fast"], "mode=fast is not a mode; choose one of dry-run, full, quick, ultra-quick"),
    (["rollout.tempreature=0.5"], "unknown key rollout.tempreature; did you mean rollout.temperature?"),
    (["data.source=train.jsonl"], "data.source belongs to data=gsm8k or one_shot; this run has data=arithmetic"),
    (["rollout.n=1"], "rollout.n=1: GRPO compares samples within a group"),
    (["rollout.temperature=0"], "rollout.temperature=0: training needs sampling"),
    (["batch_size=6", "grpo.mini_batch_size=4"], "batch_size=6 is not divisible by grpo.mini_batch_size=4"),
    (["ckpt_path=last"], "ckpt_path=last needs the folder of the run to continue: add output_dir="),
    (["data=gsm8k", "data.source=/no/such/train.jsonl"], "data.source=/no/such/train.jsonl: no such file or folder"),
    (["model=/no/such/model"], "model.name=/no/such/model: no such file or folder"),
    (["model=Qwen/Qwen2.5-0.5B"], "model.name=Qwen/Qwen2.5-0.5B is a hub id and the Hugging Face hub cannot be reached"),
    (["validation.benchmarks=[nope]"], "validation.benchmarks: 'nope' is not in benchmark_sources"),
    (["prompt.shots=[{question:hi}]"], "prompt.shots[0]={'question': 'hi'}: each shot needs a non-empty question and answer"),
]


@pytest.mark.parametrize(("args", "message"), ERRORS, ids=[" ".join(a) for a, _ in ERRORS])
def test_a_user_error_is_one_line_status_2_and_leaves_no_folder(tmp_path, args, message):
    done, seconds = start(*args, cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-2000:]
    assert lines == [lines[-1]] and lines[-1].startswith("error: ") and message in lines[-1], done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert list(tmp_path.iterdir()) == []  # no outputs/DATE/TIME left behind
    assert seconds < 30  # before any model or data set loads


def test_a_bad_data_row_after_the_checks_is_still_one_line(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"question": "1+1?", "answer": "#### 2"}\n{"question": "2+2?", "answer": ""}\n')
    run = tmp_path / "run"
    done, _ = start("data=gsm8k", f"data.source={data}", f"output_dir={run}", cwd=ROOT)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1] == \
        f"error: {data} row 2: missing or empty field 'answer'", done.stderr[-2000:]
    assert "Traceback" not in done.stderr and not run.exists()


def test_evaluate_errors_the_same_way(tmp_path):
    done, _ = start("model=/no/such.ckpt", cwd=tmp_path, module="rlvr.evaluate")
    assert done.returncode == 2 and done.stderr.strip() == "error: model=/no/such.ckpt: no such checkpoint file"
    assert list(tmp_path.iterdir()) == []


def test_unknown_keys_get_a_did_you_mean_without_running_anything():
    with pytest.raises(UserError, match="did you mean optim.lr"):
        check_overrides(["optim.lrr=1e-3"])
    with pytest.raises(UserError, match="choose one of .*qwen2.5-math-1.5b.*tiny-arith"):
        check_overrides(["model=", "gpu=cpu", "model=nope"][-1:])
    check_overrides(["gpu=cpu", "optim.lr=1e-3", "+new.key=1", "data=gsm8k", "data.source=x.jsonl"])  # all fine


def test_help_lists_the_main_keys():
    done, _ = start("--help", cwd=ROOT)
    assert done.returncode == 0
    for key in ("mode=", "gpu=", "model=", "rollout.engine", "ckpt_path", "output_dir", "reward.alpha"):
        assert key in done.stdout, key


@pytest.mark.slow
def test_the_wheel_holds_the_configs_and_the_default_model_and_runs_from_anywhere(tmp_path):
    """Built and installed without -e: rlvr-train from another directory finds its configs, the
    shipped tiny-arith, and no data from the current directory."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(ROOT), "-w", str(wheels)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("rlvr-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"conf/config.yaml", "conf/gpu/cpu.yaml", "conf/model/tiny-arith.yaml"} <= set(names)
    assert "rlvr/assets/tiny-arith/model.safetensors" in names
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "RLVR_SHARED": str(SHARED)}
    done = subprocess.run([str(site / "bin" / "rlvr-train"), "mode=ultra-quick", "gpu=cpu", "batch_size=4",
                           f"output_dir={elsewhere / 'run'}"], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (elsewhere / "run" / "checkpoints" / "last.ckpt").is_file()
    assert str(site) in subprocess.run([sys.executable, "-c", "import rlvr; print(rlvr.__file__)"], env=env,
                                       cwd=elsewhere, capture_output=True, text=True).stdout  # the wheel's copy ran
