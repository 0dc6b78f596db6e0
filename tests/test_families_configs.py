"""The model files of every supported family: public parameter counts on the meta device, and the streamed layout."""

from __future__ import annotations

import pytest

from lightning_horizon.engine import describe
from lightning_horizon.models import build_hf_config, build_model, count_parameters
from tests.test_models import load_model_config

# name -> (public figure in billions, HF class, source of the figure). Where the public figure counts parts that the
# text-only Hugging Face causal LM does not build, the figure below is the public one minus those parts.
PUBLIC_PARAMS = {
    "llama3_1_8b": (8.03, "LlamaForCausalLM", "model card"),
    "llama4_scout": (
        107.77,
        "Llama4ForCausalLM",
        "109B (108.64B) with the 0.87B vision tower + projector of its config",
    ),
    "qwen3_8b": (8.19, "Qwen3ForCausalLM", "model card: 8.2B"),
    "qwen3_32b": (32.8, "Qwen3ForCausalLM", "model card"),
    "qwen3_30b_a3b": (30.5, "Qwen3MoeForCausalLM", "model card"),
    "qwen2_57b_a14b": (57.4, "Qwen2MoeForCausalLM", "HF hub"),
    "mistral_7b": (7.25, "MistralForCausalLM", "HF hub (v0.3)"),
    "mixtral_8x7b": (46.7, "MixtralForCausalLM", "Mistral AI: 46.7B total"),
    "phi3_mini": (3.82, "Phi3ForCausalLM", "HF hub"),
    "phi4": (14.7, "Phi3ForCausalLM", "HF hub"),
    "gemma2_9b": (9.24, "Gemma2ForCausalLM", "HF hub"),
    "gemma3_12b": (
        11.77,
        "Gemma3ForCausalLM",
        "Gemma 3 report: 1,012M embedding + 10,759M non-embedding (+417M vision)",
    ),
    "glm4_9b": (9.40, "Glm4ForCausalLM", "HF hub (GLM-4-9B-0414)"),
    "glm4_5_air": (106.0, "Glm4MoeForCausalLM", "Z.ai: 106B total (the hub's 110B adds the 3.6B MTP layer)"),
    "gpt_oss_20b": (20.91, "GptOssForCausalLM", "OpenAI model card"),
    "gpt_oss_120b": (116.83, "GptOssForCausalLM", "OpenAI model card"),
    "deepseek_v2_lite": (15.7, "DeepseekV2ForCausalLM", "model card: 15.7B"),
    "deepseek_v3": (671.0, "DeepseekV3ForCausalLM", "model card: 671B main model (+14B MTP module not built by HF)"),
}
# Publicly stated only to 3 significant digits, or rounded: a looser bound.
LOOSE = {"glm4_5_air": 0.01}


@pytest.mark.parametrize("name", sorted(PUBLIC_PARAMS))
def test_parameter_count_matches_public_figure(name):
    billions, cls, _ = PUBLIC_PARAMS[name]
    model = build_model(load_model_config(name), device="meta")
    assert type(model).__name__ == cls
    assert count_parameters(model) / 1e9 == pytest.approx(billions, rel=LOOSE.get(name, 0.005))
    parts = describe(model)  # every family's layout is one the engine streams, with nothing left unplaced
    groups = parts.store_groups()
    assert len(groups) == parts.num_layers + 3


# name -> (number of distinct layer templates, what splits them)
TEMPLATES = {
    "llama4_scout": 2,  # every 4th layer global attention without rope
    "gemma2_9b": 2,  # sliding / global
    "gemma3_12b": 2,
    "gpt_oss_20b": 2,
    "deepseek_v3": 2,  # 3 dense layers, then MoE
    "glm4_5_air": 2,
    "qwen3_30b_a3b": 1,
}


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_layer_templates_of_mixed_stacks(name):
    parts = describe(build_model(load_model_config(name), device="meta"))
    keys = {parts.layer_structure_key(i) for i in range(parts.num_layers)}
    assert len(keys) == TEMPLATES[name]


@pytest.mark.parametrize("name", sorted(PUBLIC_PARAMS))
def test_architecture_fields_reach_the_hugging_face_config(name):
    cfg = load_model_config(name)
    hf = build_hf_config(cfg)
    assert hf.model_type == cfg.model_type
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        assert getattr(hf, key) == getattr(cfg, key), key
    for key, value in cfg.extra.items():
        if key not in ("rope_scaling", "rope_local_base_freq", "partial_rotary_factor", "sliding_window_pattern"):
            assert getattr(hf, key) == value, key  # rope settings are folded into `rope_parameters`


ROPE = {
    "llama3_1_8b": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 500000.0},
    "llama4_scout": {"rope_type": "llama3", "factor": 16.0},
    "gemma3_12b": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
    },
    "gpt_oss_20b": {"rope_type": "yarn", "factor": 32.0, "rope_theta": 150000.0},
    "deepseek_v3": {"rope_type": "yarn", "factor": 40.0, "mscale_all_dim": 1.0},
    "glm4_5_air": {"partial_rotary_factor": 0.5},
}


@pytest.mark.parametrize("name", sorted(ROPE))
def test_rope_variants_reach_the_hugging_face_config(name):
    params = build_hf_config(load_model_config(name)).rope_parameters
    for key, value in ROPE[name].items():
        if isinstance(value, dict):
            assert {k: params[key][k] for k in value} == value
        else:
            assert params[key] == value, key
