"""rlvr: GRPO for small math models with a multi-signal reward (see README.md)."""

import logging

# transformers imports torchao when it is installed (the `lean` extra), and torchao's import logs
# that kernels for other GPUs and Pythons did not load: noise on every run, before any rlvr code.
for _name in ("torchao", "torch.utils._pytree", "math_verify"):  # math-verify: "timeout disabled" (rlvr bounds it itself)
    logging.getLogger(_name).setLevel(logging.ERROR)
