"""The settings most tests train with: the random `tiny` model (built in code), 4 prompts x 4 samples,
48 new tokens, a KL reference, verification in the trainer's process (the reward pool has tests of its
own; starting one costs seconds per run). Cheaper than the cpu profile's default (tiny-arith, 16 x 8
x 80), which tests/test_learning.py runs as a user would."""

TINY = ["gpu=cpu", "model=tiny", "batch_size=4", "rollout.n=4", "rollout.max_new_tokens=48", "grpo.micro_batch_size=16",
        "grpo.kl_coef=0.001", "optim.lr=1e-6", "reward.workers=0"]
