"""Experiment tracking: W&B offline (read back from its own files), the samples table, the reward-weight
sweep as the W&B agent runs it, and a Hydra multirun compared by rlvr.report."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from callbacks.samples import SamplesCallback
from rlvr import report
from rlvr.loggers import REDACTED, has_wandb_credentials, previous_wandb_run, redact
from rlvr.rewards import score
from rlvr.train import CONF_DIR, optimized_metric, reward_scorer
from tiny import TINY

ROOT = Path(__file__).resolve().parents[1]
SECRET = "sk-rlvr-test-secret-0123456789"


def train(*overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    flags = [o for o in overrides if o.startswith("-")]  # Hydra's own flags (-m) come before the overrides
    overrides = tuple(o for o in overrides if not o.startswith("-"))
    done = subprocess.run([sys.executable, "-m", "rlvr.train", *flags, *TINY, "mode=ultra-quick",
                           "reward.workers=0", *overrides],  # scoring in process: the pool is tested elsewhere
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def wandb_records(path: Path) -> list:
    """The records of a `.wandb` file: LevelDB-log framing (32 KiB blocks; per chunk a CRC, a length
    and a type: 1 full, 2 first, 3 middle, 4 last) after a 7-byte `:W&B` header."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    block, pos, payload, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the rest of a block too small for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += block - pos % block
            continue
        payload += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(Record.FromString(payload))
            payload = b""
    return records


def offline_run(output_dir: Path) -> Path:
    (run,) = (output_dir / "wandb").glob("offline-run-*")
    return run


# -- pure helpers ----------------------------------------------------------------------------


def test_redact_replaces_any_string_holding_a_secret_from_the_environment(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    config = {"model": {"name": "tiny", "token": SECRET}, "tags": ["a", f"x{SECRET}y"], "lr": 1e-6, "short": "ab"}
    assert redact(config) == {"model": {"name": "tiny", "token": REDACTED}, "tags": ["a", REDACTED], "lr": 1e-6,
                              "short": "ab"}


def test_wandb_credentials_come_from_the_environment_or_a_netrc_login(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert not has_wandb_credentials()
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert has_wandb_credentials()
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert not has_wandb_credentials()
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    assert has_wandb_credentials()


def test_a_resume_continues_the_wandb_run_found_in_the_output_folder(tmp_path):
    assert previous_wandb_run(tmp_path) is None
    (tmp_path / "wandb").mkdir()
    (tmp_path / "wandb" / "latest-run").symlink_to("offline-run-20261125_051959-3w9fenmi")
    assert previous_wandb_run(tmp_path) == "3w9fenmi"


def test_samples_file_drops_rows_that_a_resumed_run_writes_again(tmp_path):
    path = tmp_path / "samples.jsonl"

    def rows(step):
        return [{"step": step, "prompt": "p", "response": "r", "ground_truth": "1"}]

    first = SamplesCallback(path, every=10, count=1)
    for step in (0, 10, 20):
        first._append(rows(step))
    resumed = SamplesCallback(path, every=10, count=1)  # the crash came after step 20, the checkpoint at 10
    resumed._append(rows(10))
    resumed._append(rows(20))
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 10, 20]


# -- W&B, for real, offline --------------------------------------------------------------------


@pytest.mark.slow
def test_wandb_unreachable_goes_offline_and_logs_rewards_config_and_samples_but_no_secret(tmp_path):
    """A key is set but the server refuses (port 9): the run says so once, goes on offline, and its
    local W&B files hold every metric and the config, and no secret from the environment."""
    env = {**os.environ, "WANDB_API_KEY": SECRET, "HF_TOKEN": SECRET, "OPENAI_API_KEY": SECRET,
           "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_DIR": str(tmp_path)}
    env.pop("WANDB_MODE", None)
    done = train("steps=2", "logger=wandb", "logger.init_timeout=2", "logger.tags=[ci]", "logger.group=g1",
                 "logger.name=two-steps", "samples.every=1", "samples.count=2", f"output_dir={tmp_path}", env=env)
    assert (done.stdout + done.stderr).count("W&B unreachable") == 1
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file() and (tmp_path / ".hydra" / "config.yaml").is_file()
    records = wandb_records(next(offline_run(tmp_path).glob("*.wandb")))

    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.HasField("history")]
    metric_rows = [h for h in history if "reward/total" in h]
    assert len(metric_rows) == 2
    for key in ("reward/verify", "reward/format", "reward/reflect", "reward/accuracy", "train/loss"):
        assert all(key in row for row in metric_rows), key
    tables = [h for h in history if h.get("samples/_type") == "table-file"]
    assert [t["samples/nrows"] for t in tables] == [2, 2]

    config = {item.key: json.loads(item.value_json) for r in records if r.HasField("config") for item in r.config.update}
    assert config["reward"]["alpha"] == 1.0 and config["logger"]["tags"] == ["ci"] and config["model"]["name"] == "tiny"
    (run,) = [r.run for r in records if r.HasField("run")]
    assert (run.project, run.run_group, run.display_name, list(run.tags)) == ("rlvr", "g1", "two-steps", ["ci"])

    local = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [row["step"] for row in local] == [0, 0, 1, 1]
    assert set(local[0]) == {"step", "prompt", "response", "ground_truth", "verify", "format", "reflect", "reward"}
    assert "How many" in local[0]["prompt"] or "?" in local[0]["prompt"]

    assert SECRET not in done.stdout + done.stderr
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


@pytest.mark.slow
def test_without_a_key_or_login_wandb_goes_offline_and_says_so_once(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(NETRC=str(tmp_path / "no-netrc"), WANDB_DIR=str(tmp_path))
    done = train("steps=1", "logger=wandb", f"output_dir={tmp_path}", env=env)
    assert (done.stdout + done.stderr).count("no API key or login") == 1
    assert any(r.HasField("history") for r in wandb_records(next(offline_run(tmp_path).glob("*.wandb"))))


# -- the sweep, expanded as `wandb agent` does -------------------------------------------------


def test_the_sweep_command_composes_and_each_weight_reaches_the_reward_module():
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    spec = yaml.safe_load((ROOT / "conf" / "sweep" / "reward_weights.yaml").read_text())
    assert set(spec["parameters"]) == {"reward.alpha", "reward.beta", "reward.gamma"}
    values = {name: round((p["min"] + p["max"]) / 2 + 0.01 * i, 3)
              for i, (name, p) in enumerate(spec["parameters"].items())}
    sweep_vars = create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})
    sweep_vars["env"] = ["/usr/bin/env"]
    command = []
    for chunk in create_sweep_command(list(spec["command"])):  # what the agent does with each chunk
        command += sweep_vars[chunk[2:-1]] if chunk.startswith("${") else [chunk]
    assert command[:4] == ["/usr/bin/env", "python", "-m", "rlvr.train"]

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=command[4:])
    scorer = reward_scorer(cfg)
    assert scorer.weights == (values["reward.alpha"], values["reward.beta"], values["reward.gamma"])
    right = r"<think>3+4</think> \boxed{7} <reflection>I am confident it is correct.</reflection>"
    assert score(right, "7", scorer.weights)["total"] == pytest.approx(sum(values.values()))
    assert optimized_metric(cfg) == spec["metric"]["name"] and cfg.logger.kind == "wandb"


# -- without W&B: a Hydra multirun, compared by rlvr.report -------------------------------------


@pytest.mark.slow
def test_a_two_job_multirun_gets_one_report_row_per_job(tmp_path, capsys):
    train("-m", "reward.beta=0,0.5", "steps=2", f"output_dir={tmp_path}")
    assert (tmp_path / "0" / "metrics.csv").is_file() and (tmp_path / "1" / "metrics.csv").is_file()
    assert yaml.safe_load((tmp_path / "1" / ".hydra" / "config.yaml").read_text())["reward"]["beta"] == 0.5

    written = report.main([str(tmp_path)])
    table = capsys.readouterr().out.split("\n\nwrote")[0].splitlines()
    assert table[0].split()[:3] == ["job", "steps", "reward/accuracy"]
    assert [line.split()[:2] for line in table[1:]] == [["reward.beta=0", "2"], ["reward.beta=0.5", "2"]]
    assert {p.name for p in written} >= {"reward.png", "accuracy.png"} and all(p.stat().st_size > 0 for p in written)
