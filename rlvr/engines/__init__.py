"""Rollout engines behind one two-method interface, `generate` and `load_weights`:

- `rlvr.engines.protocol`: the interface, what it takes and returns, and the per-prompt seeds;
- `rlvr.engines.hf`: Hugging Face `generate` with a counter-based sampler (CPU runs, tests, GPUs
  without vLLM);
- `rlvr.engines.vllm`: vLLM in this process, the only module that imports vllm;
- `rlvr.engines.factory`: `make_engine`, which picks one by `rollout.engine`.
"""
