"""Model registry: public parameter counts on the meta device, config building and validation."""

import dataclasses
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lightning_horizon.models import ModelConfig, build_hf_config, build_model, check_max_seq_len, count_parameters

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

# Public figures (model cards / HF), in billions.
PUBLIC_PARAMS = {
    "qwen2_0_5b": 0.494,
    "qwen2_1_5b": 1.54,
    "qwen2_3b": 3.09,
    "qwen2_7b": 7.62,
    "qwen2_14b": 14.77,
    "qwen2_32b": 32.76,
    "qwen2_72b": 72.7,
    "llama3_8b": 8.03,
    "llama3_70b": 70.55,
}


def load_model_config(name: str) -> ModelConfig:
    raw = OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml")
    return ModelConfig.from_dict(raw.model if "model" in raw else raw)  # tiny.yaml is global-packaged


def tiny(**changes) -> ModelConfig:
    return dataclasses.replace(load_model_config("tiny"), **changes)


@pytest.mark.parametrize("name", sorted(PUBLIC_PARAMS))
def test_parameter_count_matches_public_figure(name):
    model = build_model(load_model_config(name), device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert count_parameters(model) / 1e9 == pytest.approx(PUBLIC_PARAMS[name], rel=0.005)


@pytest.mark.parametrize("name", ["qwen2_0_5b", "qwen2_3b", "qwen2_7b", "llama3_8b"])
def test_hf_config_fields(name):
    cfg = load_model_config(name)
    hf = build_hf_config(cfg)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
        assert getattr(hf, key) == getattr(cfg, key)
    assert hf.model_type == cfg.model_type
    assert hf.tie_word_embeddings == cfg.tie_word_embeddings
    assert hf.rms_norm_eps == cfg.rms_norm_eps


def test_attention_bias():
    qwen = build_model(load_model_config("qwen2_0_5b"), device="meta")
    assert qwen.model.layers[0].self_attn.q_proj.bias is not None
    llama = build_model(load_model_config("llama3_8b"), device="meta")
    assert llama.model.layers[0].self_attn.q_proj.bias is None


def test_tiny_takes_the_tokenizer_vocab_and_runs():
    cfg = tiny()
    with pytest.raises(ValueError, match="vocab_size"):
        build_hf_config(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size=500)
    assert model.config.vocab_size == 500
    out = model(torch.randint(0, 500, (2, 16)), labels=torch.randint(0, 500, (2, 16)))
    assert out.logits.shape == (2, 16, 500) and torch.isfinite(out.loss)


def test_tied_weights_counted_once():
    tied = build_model(tiny(vocab_size=512), device="meta")
    untied = build_model(tiny(vocab_size=512, tie_word_embeddings=False), device="meta")
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert count_parameters(untied) - count_parameters(tied) == 512 * 128


def test_tokenizer_larger_than_model_vocab_is_refused():
    with pytest.raises(ValueError, match="tokenizer has 600 tokens"):
        build_hf_config(tiny(vocab_size=512), vocab_size=600)
    assert build_hf_config(tiny(vocab_size=512), vocab_size=400).vocab_size == 512  # padded vocab is fine


def test_validation():
    with pytest.raises(ValueError, match=r"model.hidden_size, .* must be set when model.path is null"):
        ModelConfig(name="x", model_type="qwen2")
    with pytest.raises(ValueError, match="num_key_value_heads"):
        tiny(num_key_value_heads=3)
    with pytest.raises(ValueError, match="attention_bias must be true"):
        tiny(attention_bias=False)
    with pytest.raises(ValueError, match="hidden_size must be positive"):
        tiny(hidden_size=-1)
    with pytest.raises(ValueError, match="unknown config key"):
        ModelConfig.from_dict({"name": "x", "hiden_size": 3})
    ModelConfig(name="from_checkpoint", path="/some/dir")  # architecture may come from the checkpoint


def test_path_loads_config_and_weights(tmp_path):
    torch.manual_seed(0)
    reference = build_model(tiny(vocab_size=256))
    reference.save_pretrained(tmp_path)
    cfg = tiny(path=str(tmp_path))
    assert build_hf_config(cfg).vocab_size == 256
    loaded = build_model(cfg)
    torch.testing.assert_close(loaded.model.layers[1].mlp.up_proj.weight, reference.model.layers[1].mlp.up_proj.weight)
    with pytest.warns(UserWarning, match="hidden_size"):
        build_hf_config(tiny(path=str(tmp_path), hidden_size=256, intermediate_size=512))


def test_rows_longer_than_the_positions_are_refused_with_the_numbers():
    config = build_hf_config(tiny(max_position_embeddings=2048), vocab_size=512)
    check_max_seq_len(config, 2048, "tiny")
    with pytest.raises(
        ValueError, match=r"data\.max_seq_len=4096 is longer than model 'tiny'.*max_position_embeddings=2048"
    ):
        check_max_seq_len(config, 4096, "tiny")
    scaled = build_hf_config(
        tiny(extra={"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 2048}}),
        vocab_size=512,
    )
    check_max_seq_len(scaled, 4096, "tiny")  # an explicit RoPE scaling setting: allowed
