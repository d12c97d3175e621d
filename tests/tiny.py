"""The settings most tests train with: the random `tiny` model (built in code), 4 prompts x 4 samples,
48 new tokens, a KL reference, verification in the trainer's process (the reward pool has tests of its
own; starting one costs seconds per run). Cheaper than the cpu profile's default (tiny-arith, 16 x 8
x 80), which tests/test_learning.py runs as a user would."""

TINY = ["gpu=cpu", "model=tiny", "batch_size=4", "rollout.n=4", "rollout.max_new_tokens=48", "grpo.micro_batch_size=16",
        "grpo.kl_coef=0.001", "optim.lr=1e-6", "optim.adapter_lr=null", "reward.workers=0"]  # adapter runs too at optim.lr, not the cpu profile's adapter_lr


def compose_config(*overrides: str):
    """The training config as `python -m rlvr.train` composes it, with these overrides."""
    from hydra import compose, initialize_config_dir

    from rlvr.train import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def trained_steps(run_dir) -> list[dict[str, str]]:
    """The rows of a run's metrics.csv that an update wrote (validation writes rows of its own)."""
    import csv
    from pathlib import Path

    with (Path(run_dir) / "metrics.csv").open(newline="") as f:
        return [row for row in csv.DictReader(f) if row.get("train/loss")]
