"""Every supported model family: logits, loss and every parameter's gradient match plain Hugging Face autograd.

One tiny random-init config per family (2-4 layers, hidden 32-64, a few experts), FP32 on the CPU with eager
attention, each chosen to exercise what makes the family differ: mixed layer structures (dense first layers, MoE
every other layer, NoPE layers, sliding/global attention), attention sinks, rope scaling, scaled embeddings, logit
soft-capping, tied embeddings and the MoE routers' auxiliary loss.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

import lightning_horizon  # noqa: F401  (registers "horizon")
from lightning_horizon import HorizonEngine
from lightning_horizon.engine import describe
from tests.helpers import VOCAB, LMModule, clone, loader, make_batch, rel_err

ATTN = 4
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=ATTN,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
MOE = dict(output_router_logits=True, router_aux_loss_coef=0.1)

# family -> (model_type, config overrides, number of distinct layer templates)
FAMILIES: dict[str, tuple[str, dict, int]] = {
    "llama3": (
        "llama",
        dict(
            num_hidden_layers=2,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        ),
        1,
    ),
    "llama4": (
        "llama4_text",
        dict(
            num_hidden_layers=4,
            head_dim=8,
            intermediate_size=32,
            intermediate_size_mlp=64,
            num_local_experts=4,
            num_experts_per_tok=1,
            interleave_moe_layer_step=2,  # MoE every other layer
            no_rope_layer_interval=4,  # layer 3 is NoPE (global attention): same shapes as layer 1, other code
            attention_chunk_size=4,
            **MOE,
        ),
        3,
    ),
    "qwen2": ("qwen2", dict(num_hidden_layers=2, tie_word_embeddings=True), 1),
    "qwen3": ("qwen3", dict(num_hidden_layers=2, head_dim=16), 1),
    "qwen2_moe": (
        "qwen2_moe",
        dict(
            num_hidden_layers=3,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=32,
            mlp_only_layers=[1],
            **MOE,
        ),
        2,
    ),
    "qwen3_moe": (
        "qwen3_moe",
        dict(num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, **MOE),
        1,
    ),
    "mistral": ("mistral", dict(num_hidden_layers=2, head_dim=8, sliding_window=4), 1),
    "mixtral": ("mixtral", dict(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2, **MOE), 1),
    "phi3": (
        "phi3",
        dict(
            num_hidden_layers=2,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5),
        ),
        1,
    ),
    "gemma2": (
        "gemma2",
        dict(
            num_hidden_layers=2,
            head_dim=8,
            sliding_window=4,
            final_logit_softcapping=0.5,
            attn_logit_softcapping=2.0,
            query_pre_attn_scalar=8,
            tie_word_embeddings=True,
        ),
        2,
    ),
    "gemma3": (
        "gemma3_text",
        dict(num_hidden_layers=3, head_dim=8, sliding_window=4, sliding_window_pattern=2, tie_word_embeddings=True),
        2,
    ),
    "glm4": (
        "glm4",
        dict(
            num_hidden_layers=2,
            head_dim=8,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5),
        ),
        1,
    ),
    "glm4_moe": (
        "glm4_moe",
        dict(
            num_hidden_layers=3,
            head_dim=8,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
            moe_intermediate_size=16,
            first_k_dense_replace=1,
            use_qk_norm=True,
        ),
        2,
    ),
    "gpt_oss": (
        "gpt_oss",
        dict(
            num_hidden_layers=2,
            head_dim=8,
            intermediate_size=32,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=4,
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=150000.0,
                factor=4.0,
                beta_fast=32.0,
                beta_slow=1.0,
                truncate=False,
                original_max_position_embeddings=16,
            ),
            **MOE,
        ),
        2,
    ),
    "deepseek_v2": (
        "deepseek_v2",
        dict(
            num_hidden_layers=3,
            num_key_value_heads=ATTN,
            q_lora_rank=None,  # V2-Lite: no query compression
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=8,
            v_head_dim=8,
            head_dim=8,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
            moe_intermediate_size=16,
            first_k_dense_replace=1,
        ),
        2,
    ),
    "deepseek_v3": (
        "deepseek_v3",
        dict(
            num_hidden_layers=3,
            num_key_value_heads=ATTN,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=8,
            v_head_dim=8,
            head_dim=8,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
            moe_intermediate_size=16,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=1,
        ),
        2,
    ),
}


def family_model(family: str, seed: int = 0):
    model_type, overrides, _ = FAMILIES[family]
    config = AutoConfig.for_model(model_type, **{**COMMON, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float()
    with torch.no_grad():  # some families initialise biases, norms and sinks to constants: make every one matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        for m in model.modules():
            for name, buf in m.named_buffers(recurse=False):
                if name == "e_score_correction_bias":
                    buf.copy_(torch.randn_like(buf) * 0.1)
    return model


def hf_reference(model, batch):
    """Logits, loss (with the aux loss where the family adds one), aux loss and gradients from plain HF autograd."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return logits, out.loss.item(), getattr(out, "aux_loss", None), grads


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_loss_and_gradients_match_hugging_face(family):
    ref = family_model(family)
    batch = make_batch(0)
    want_logits, want_loss, want_aux, want = hf_reference(clone(ref), batch)

    model = clone(ref)
    engine = HorizonEngine(model, device="cpu", compute_dtype="fp32", checkpoint_every=2)
    try:
        layer_keys = {engine.units[i].structure for i in range(engine.parts.num_layers)}
        assert len(layer_keys) == FAMILIES[family][2], "distinct layer templates"
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert rel_err(logits, want_logits) < 1e-5
        out = model(**batch)
        assert out.loss.item() == pytest.approx(want_loss, rel=1e-5)
        if want_aux is not None:
            assert out.aux_loss.item() == pytest.approx(want_aux.item(), rel=1e-5)
        out.loss.backward()
        got = {n: p.grad for n, p in model.named_parameters()}
    finally:
        engine.close()
    assert got.keys() == want.keys()
    for name in want:
        assert rel_err(got[name], want[name]) < 1e-5, name


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_compiled_layers_match_hugging_face(family):
    """compile_layers=True (the CUDA default) traces every dense family's layer and keeps HF's loss and gradients;
    layers with routed experts stay eager."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # one process compiles every family's layers; each model starts from an empty cache
    ref = family_model(family)
    batch = make_batch(0)
    _, want_loss, _, want = hf_reference(clone(ref), batch)
    model = clone(ref)
    engine = HorizonEngine(model, device="cpu", compute_dtype="fp32", checkpoint_every=2, compile_layers=True)
    try:
        moe = [i for i in range(engine.parts.num_layers) if engine.parts.expert_modules(i)]
        dense = {u.structure for i, u in enumerate(engine.units[: engine.head_uid]) if i not in moe}
        assert engine.bank.compiled == dense
        if not moe:
            assert len(dense) == FAMILIES[family][2]
        counters.clear()
        out = model(**batch)
        assert out.loss.item() == pytest.approx(want_loss, rel=1e-5)
        out.loss.backward()
        got = {n: p.grad for n, p in model.named_parameters()}
        assert bool(counters["stats"]["calls_captured"]) == bool(dense)  # compiled frames ran (cached or fresh)
    finally:
        engine.close()
    for name in want:
        assert rel_err(got[name], want[name]) < 1e-5, name


AUX_FAMILIES = [f for f in sorted(FAMILIES) if FAMILIES[f][1].get("output_router_logits") and f != "llama4"]


@pytest.mark.parametrize("family", AUX_FAMILIES)
def test_aux_loss_alone_backpropagates_to_the_routers(family):
    """Only the aux loss: its gradient reaches every router (and the layers below them) through the layer backward."""
    ref = family_model(family)
    batch = make_batch(5)
    r = clone(ref)
    r(**batch).aux_loss.backward()
    want = {n: p.grad for n, p in r.named_parameters()}
    model = clone(ref)
    engine = HorizonEngine(model, device="cpu", compute_dtype="fp32", checkpoint_every=3)
    try:
        model(**batch).aux_loss.backward()
        engine.finish_backward()
        got = {n: p.grad for n, p in model.named_parameters()}
    finally:
        engine.close()
    routers = [n for n in want if want[n] is not None and ("gate.weight" in n or "router" in n)]
    assert routers, "the aux loss reaches the routers"
    for name in want:
        a = torch.zeros_like(model.get_parameter(name)) if got[name] is None else got[name]
        b = torch.zeros_like(a) if want[name] is None else want[name]
        if b.abs().max() == 0:
            assert a.abs().max() == 0, name
        else:
            assert rel_err(a, b) < 1e-5, name


QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
# True gradient zero (softmax is shift-invariant in the key bias): rounding noise that Adam scales up to lr-sized steps.
NOISE_ONLY = ("k_proj.bias",)


def fit_steps(strategy, model, steps):
    module = LMModule(model, total=steps)
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=steps, precision="32-true", **QUIET)
    trainer.fit(module, loader(2 * steps))
    return module


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_trainer_step_matches_plain_pytorch(family):
    ref = family_model(family)
    got = fit_steps("horizon", clone(ref), steps=2)
    want = fit_steps("auto", clone(ref), steps=2)
    assert got.losses == pytest.approx(want.losses, rel=1e-5)
    for (name, p), q in zip(got.model.named_parameters(), want.model.parameters()):
        tol = 2e-4 if name.endswith(NOISE_ONLY) else 1e-5
        assert rel_err(p, q) < tol, name


# ------------------------------------------------------------------------------------- custom code and refusals
class CustomBlock(nn.Module):
    """A decoder layer of a "custom code" model: causal running-mean token mixer + MLP, pre-norm."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.mix = nn.Linear(hidden, hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        y = self.mix(self.norm(hidden_states))
        steps = torch.arange(1, y.shape[1] + 1, device=y.device, dtype=y.dtype)[None, :, None]
        x = hidden_states + y.cumsum(1) / steps
        return x + self.mlp(x)


class CustomDecoder(nn.Module):
    def __init__(self, hidden: int, layers: int, with_norm: bool) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, hidden)
        self.layers = nn.ModuleList(CustomBlock(hidden) for _ in range(layers))
        self.final = nn.LayerNorm(hidden)
        if with_norm:
            self.norm = self.final

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutput

        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=attention_mask)
        return BaseModelOutput(last_hidden_state=self.final(hidden))


class CustomForCausalLM(nn.Module):
    """What a `trust_remote_code` model looks like when it follows embedding -> layers -> norm -> head."""

    def __init__(self, hidden: int = 32, layers: int = 3, with_norm: bool = True) -> None:
        super().__init__()
        from types import SimpleNamespace

        self.config = SimpleNamespace(vocab_size=VOCAB, hidden_size=hidden, model_type="custom")
        self.model = CustomDecoder(hidden, layers, with_norm)
        self.lm_head = nn.Linear(hidden, VOCAB, bias=False)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def get_decoder(self):
        return self.model

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        from transformers.modeling_outputs import CausalLMOutput

        logits = self.lm_head(self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state)
        loss = None
        if labels is not None:
            target = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)


def test_custom_code_model_following_the_layout_is_streamed():
    torch.manual_seed(0)
    ref = CustomForCausalLM()
    batch = make_batch(7)
    want_logits, want_loss, _, want = hf_reference(clone(ref), batch)
    model = clone(ref)
    engine = HorizonEngine(model, device="cpu", compute_dtype="fp32", checkpoint_every=2)
    try:
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert rel_err(logits, want_logits) < 1e-5
        loss = model(**batch).loss
        assert loss.item() == pytest.approx(want_loss, rel=1e-5)
        loss.backward()
        for name, p in model.named_parameters():
            assert rel_err(p.grad, want[name]) < 1e-5, name
    finally:
        engine.close()


def _multimodal(kind: str):
    small_text = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        vocab_size=VOCAB,
    )
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=16
    )
    with torch.device("meta"):
        if kind == "gemma3":
            from transformers import Gemma3Config, Gemma3ForConditionalGeneration

            return Gemma3ForConditionalGeneration(Gemma3Config(text_config=small_text, vision_config=vision))
        from transformers import Llama4Config, Llama4ForConditionalGeneration

        vision.update(vision_output_dim=32, projector_input_dim=32, projector_output_dim=32)
        text = dict(small_text, intermediate_size_mlp=64, num_local_experts=2)
        return Llama4ForConditionalGeneration(Llama4Config(text_config=text, vision_config=vision))


def _encoder_decoder():
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, vocab_size=32))


def _with_extra_parameter():
    model = CustomForCausalLM()
    model.model.register_parameter("memory_tokens", nn.Parameter(torch.zeros(4, 32)))
    return model


@pytest.mark.parametrize(
    "build,message",
    [
        (lambda: _multimodal("gemma3"), r"multimodal model \(model\.vision_tower, model\.multi_modal_projector"),
        (lambda: _multimodal("llama4"), r"multimodal model \(vision_model, multi_modal_projector"),
        (_encoder_decoder, "encoder-decoder"),
        (lambda: CustomForCausalLM(with_norm=False), r"lacks final `norm` \(looked in CustomDecoder\)"),
        (_with_extra_parameter, r"parameters outside embedding/layers/norm/lm_head \(model\.memory_tokens\)"),
    ],
    ids=["gemma3_multimodal", "llama4_multimodal", "encoder_decoder", "custom_without_norm", "extra_parameter"],
)
def test_unsupported_models_are_refused_naming_what_is_missing(build, message):
    model = build()
    with pytest.raises(ValueError, match=message):
        describe(model).store_groups()
    if not any(p.is_meta for p in model.parameters()):
        with pytest.raises(ValueError, match=message):
            HorizonEngine(model, device="cpu")


def test_bf16_compute_with_aux_loss_close_to_fp32():
    ref = family_model("mixtral")
    batch = make_batch(6)
    want = ref(**batch)
    model = clone(ref)
    engine = HorizonEngine(model, device="cpu", compute_dtype="bf16")
    try:
        out = model(**batch)
        out.loss.backward()
        assert abs(out.loss.item() - want.loss.item()) < 3e-2
        assert abs(out.aux_loss.item() - want.aux_loss.item()) < 3e-2
    finally:
        engine.close()
