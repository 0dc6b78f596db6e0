"""The model registry: architecture configs from `conf/model/*.yaml`, turned into Hugging Face configs and models.

A model file names the architecture (`model_type` plus the usual Hugging Face config fields) so that a model can be
built offline, with random weights or on the meta device (for the planner), without downloading anything. With
`path:` set (a local directory or a hub id), the config and the weights come from there instead; the architecture
fields of the file are then only checked against the loaded config.

`vocab_size: null` means "take the tokenizer's": pass the tokenizer's size to `build_hf_config(cfg, vocab_size=...)`.
"""

from __future__ import annotations

import dataclasses
import difflib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
)

# Fields forwarded verbatim to the Hugging Face config class (same names there).
ARCHITECTURE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "rope_theta",
    "rms_norm_eps",
    "tie_word_embeddings",
    "hidden_act",
    "initializer_range",
)

# Families whose attention projections carry a bias by construction (no config switch in Hugging Face).
_ALWAYS_ATTENTION_BIAS = {"qwen2"}
# Families with an `attention_bias` config switch.
_ATTENTION_BIAS_SWITCH = {"llama", "mistral"}


@dataclass
class ModelConfig:
    """One model of the registry: what `conf/model/<name>.yaml` holds (the YAML keys are these field names)."""

    name: str
    """Registry name, the file name without `.yaml` (e.g. `qwen2_72b`)."""
    model_type: str | None = None
    """Hugging Face `model_type` of the family (`qwen2`, `llama`, ...). May be null only when `path` is set."""
    hidden_size: int | None = None
    """Width of the residual stream."""
    intermediate_size: int | None = None
    """Width of the MLP (SwiGLU) hidden layer."""
    num_hidden_layers: int | None = None
    """Number of decoder layers."""
    num_attention_heads: int | None = None
    """Number of query heads."""
    num_key_value_heads: int | None = None
    """Number of key/value heads (grouped-query attention); equal to `num_attention_heads` for plain MHA."""
    vocab_size: int | None = None
    """Rows of the embedding and the lm_head; null = the tokenizer's size, given at build time."""
    max_position_embeddings: int | None = None
    """Longest sequence the rotary embedding is configured for."""
    rope_theta: float | None = None
    """Base of the rotary position embedding."""
    rms_norm_eps: float | None = None
    """Epsilon of the RMSNorm layers."""
    tie_word_embeddings: bool = False
    """Whether the lm_head shares the embedding's weight (stored once on the host)."""
    attention_bias: bool = False
    """Whether q/k/v projections have a bias (always true for qwen2, a switch for llama)."""
    hidden_act: str = "silu"
    """Activation of the MLP."""
    initializer_range: float = 0.02
    """Standard deviation of the random initialization."""
    attn_implementation: str = "sdpa"
    """Attention kernel for Hugging Face modules: `sdpa`, `eager` or `flash_attention_2`."""
    path: str | None = None
    """Local directory or hub id with real weights (config.json + safetensors); null = random init."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Further keyword arguments for the Hugging Face config class (e.g. `rope_scaling`), passed through unchecked."""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("model.name must be a non-empty string")
        if self.path is None:
            missing = [k for k in ("model_type", *ARCHITECTURE_FIELDS) if getattr(self, k) is None]
            if missing:
                raise ValueError(
                    f"model {self.name!r}: {', '.join('model.' + k for k in missing)} must be set when model.path is "
                    "null (the architecture is needed to build a model without a checkpoint)"
                )
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ValueError(f"model.{key} must be positive, got {value}")
        if self.vocab_size is not None and self.vocab_size <= 0:
            raise ValueError(f"model.vocab_size must be positive or null (= the tokenizer's), got {self.vocab_size}")
        heads, kv_heads = self.num_attention_heads, self.num_key_value_heads
        if heads is not None and kv_heads is not None and (kv_heads <= 0 or heads % kv_heads):
            raise ValueError(
                f"model.num_key_value_heads ({kv_heads}) must be positive and divide num_attention_heads ({heads})"
            )
        if (
            heads is not None
            and self.hidden_size is not None
            and self.hidden_size % heads
            and "head_dim" not in self.extra
        ):
            raise ValueError(
                f"model.hidden_size ({self.hidden_size}) is not a multiple of num_attention_heads ({heads}); "
                "set model.extra.head_dim"
            )
        if self.model_type in _ALWAYS_ATTENTION_BIAS and not self.attention_bias:
            raise ValueError(f"model.attention_bias must be true for model_type {self.model_type!r} (not switchable)")
        if self.attn_implementation not in ("sdpa", "eager", "flash_attention_2"):
            raise ValueError(
                f"model.attn_implementation must be sdpa, eager or flash_attention_2, got {self.attn_implementation!r}"
            )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ModelConfig:
        """Build from a `model:` block (dict or DictConfig), rejecting unknown keys with a did-you-mean hint."""
        return from_mapping(cls, values, prefix="model")


def to_plain_dict(values: Mapping[str, Any], *, prefix: str) -> dict[str, Any]:
    """`values` (a dict or an OmegaConf DictConfig, interpolations resolved) as a plain dict."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(values, DictConfig):
        return OmegaConf.to_container(values, resolve=True)  # type: ignore[return-value]
    if not isinstance(values, Mapping):
        raise ValueError(f"{prefix}: expected a mapping of settings, got {type(values).__name__}")
    return dict(values)


def check_known_keys(cls: type, values: Mapping[str, Any], *, prefix: str) -> None:
    """Raise `ValueError` naming each key of `values` that is not a field of dataclass `cls` (with a hint)."""
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in known]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), known, n=1)
            hints.append(f"{prefix}.{key}" + (f" (did you mean {prefix}.{close[0]}?)" if close else ""))
        raise ValueError(f"unknown config key(s): {', '.join(hints)}. Known keys of {prefix}: {', '.join(known)}")


def from_mapping(cls: type, values: Mapping[str, Any], *, prefix: str) -> Any:
    """Instantiate dataclass `cls` from `values`; unknown keys raise `ValueError` naming `prefix.key`."""
    values = to_plain_dict(values, prefix=prefix)
    check_known_keys(cls, values, prefix=prefix)
    return cls(**values)


def build_hf_config(cfg: ModelConfig, vocab_size: int | None = None) -> PretrainedConfig:
    """The Hugging Face config of `cfg`.

    `vocab_size` is the tokenizer's size: used when `cfg.vocab_size` is null, and checked (the tokenizer's ids must
    fit) when it is set. With `cfg.path`, the config is loaded from there (`AutoConfig.from_pretrained`) and the
    architecture fields set in the file are checked against it (a mismatch warns; the checkpoint wins).
    """
    if cfg.path is not None:
        hf_config = AutoConfig.from_pretrained(cfg.path)
        mismatched = {
            key: (getattr(cfg, key), getattr(hf_config, key, None))
            for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
            if getattr(cfg, key) is not None and getattr(hf_config, key, None) != getattr(cfg, key)
        }
        if mismatched:
            warnings.warn(
                f"model {cfg.name!r}: the checkpoint at {cfg.path} disagrees with the model file on "
                + ", ".join(f"{k} (file {a}, checkpoint {b})" for k, (a, b) in mismatched.items())
                + "; using the checkpoint's config",
                stacklevel=2,
            )
        _check_vocab(cfg.name, hf_config.vocab_size, vocab_size)
        return hf_config

    resolved_vocab = cfg.vocab_size if cfg.vocab_size is not None else vocab_size
    if resolved_vocab is None:
        raise ValueError(
            f"model {cfg.name!r} has vocab_size: null (= the tokenizer's): pass vocab_size=len(tokenizer) "
            "to build_hf_config, or set model.vocab_size"
        )
    _check_vocab(cfg.name, resolved_vocab, vocab_size)
    kwargs: dict[str, Any] = {key: getattr(cfg, key) for key in ARCHITECTURE_FIELDS}
    kwargs["vocab_size"] = resolved_vocab
    if cfg.model_type in _ATTENTION_BIAS_SWITCH:
        kwargs["attention_bias"] = cfg.attention_bias
    kwargs.update(cfg.extra)
    try:
        return AutoConfig.for_model(cfg.model_type, **kwargs)
    except ValueError as err:
        raise ValueError(f"model {cfg.name!r}: unknown model_type {cfg.model_type!r} for transformers ({err})") from err


def _check_vocab(name: str, model_vocab: int, tokenizer_vocab: int | None) -> None:
    if tokenizer_vocab is not None and tokenizer_vocab > model_vocab:
        raise ValueError(
            f"model {name!r}: the tokenizer has {tokenizer_vocab} tokens but the model only {model_vocab} "
            "embedding rows; set model.vocab_size: null to take the tokenizer's size"
        )


def build_model(
    cfg: ModelConfig,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    vocab_size: int | None = None,
    num_labels: int | None = None,
    node: tuple[int, int] | None = None,
) -> PreTrainedModel:
    """A causal LM for `cfg`: random init, or real weights when `cfg.path` (on `device="meta"`: the structure only,
    uninitialized, from `cfg.path`'s config when it has one).
    With `num_labels`, a `...ForSequenceClassification` with that many outputs instead (a reward model: 1; from a
    causal LM's checkpoint its score head starts from the model's initialisation).
    `node=(node_rank, num_nodes)`: with `cfg.path`, only the decoder layers this node holds under a sharded node
    store are read (the others stay on the meta device, see `lightning_horizon.loading.load_hf_model`)."""
    if cfg.path is not None:  # (on the meta device: the checkpoint's structure, no weight read)
        meta = torch.device(device).type == "meta"
        model = load_pretrained(
            cfg.path,
            dtype=dtype,
            attn_implementation=cfg.attn_implementation,
            num_labels=num_labels,
            meta=meta,
            node=None if meta else node,
        )
        _check_vocab(cfg.name, model.config.vocab_size, vocab_size)
        return model if meta or torch.device(device).type == "cpu" else model.to(device)
    hf_config = build_hf_config(cfg, vocab_size=vocab_size)
    auto = AutoModelForCausalLM
    if num_labels is not None:
        hf_config.num_labels, auto = num_labels, AutoModelForSequenceClassification
    with torch.device(device):
        return auto.from_config(hf_config, dtype=dtype, attn_implementation=cfg.attn_implementation)


def load_pretrained(
    path: str,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    num_labels: int | None = None,
    meta: bool = False,
    node: tuple[int, int] | None = None,
) -> PreTrainedModel:
    """Real weights from a local directory or hub id, streamed safetensors tensor by tensor into the host store's
    layout (no full model object materialised first, no second copy): see :mod:`lightning_horizon.loading`."""
    from lightning_horizon.loading import load_hf_model

    return load_hf_model(
        path, dtype=dtype, attn_implementation=attn_implementation, num_labels=num_labels, meta=meta, node=node
    )


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters, tied weights counted once (works on the meta device)."""
    # `parameters()` yields each Parameter object once, so tied weights (one shared Parameter) count once.
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def check_max_seq_len(hf_config: PretrainedConfig, max_seq_len: int, name: str) -> None:
    """Refuses rows longer than the positions the model was configured for, unless it has a RoPE scaling setting.

    Positions past ``max_position_embeddings`` train silently otherwise (the rotary embedding extrapolates): the
    model then learns positions it will not be given the same way at inference.
    """
    limit = getattr(hf_config, "max_position_embeddings", None)
    if limit is None or max_seq_len <= limit:
        return
    rope = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in (None, "default"):
        return
    where = "the checkpoint's config.json (model.path)" if getattr(hf_config, "_name_or_path", "") else "model.extra"
    raise ValueError(
        f"data.max_seq_len={max_seq_len} is longer than model {name!r}'s max_position_embeddings={limit}: lower "
        f"data.max_seq_len to at most {limit}, or extend the positions explicitly with a RoPE scaling setting in "
        f"{where} (e.g. rope_scaling: {{rope_type: yarn, factor: {-(-max_seq_len // limit)}.0, "
        f"original_max_position_embeddings: {limit}}})"
    )


def special_token_ids(tokenizer: Any) -> dict[str, Any]:
    """``bos_token_id``, ``eos_token_id`` and ``pad_token_id`` of ``tokenizer`` (None where it has none) and
    ``stop_token_ids``: its EOS and the token that closes an assistant turn in its chat template (ChatML's
    ``<|im_end|>``, Llama 3's ``<|eot_id|>``), where generation of a fine-tuned chat model must stop."""
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if getattr(tokenizer, "chat_template", None):
        marker = "lightning-horizon-reply"
        messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": marker}]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception:  # noqa: BLE001 - templates that need other roles or fields: no end-of-turn token found
            text = ""
        if marker in text:
            after = tokenizer(text.split(marker, 1)[1], add_special_tokens=False)["input_ids"]
            special = set(tokenizer.all_special_ids) | {
                i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special
            }
            if after and after[0] in special and after[0] not in stops:
                stops.insert(0, after[0])
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "stop_token_ids": stops,
    }


def fill_special_tokens(config: Any, generation: Any, tokenizer: Any) -> None:
    """Sets the model ``config``'s and its ``generation`` config's bos/eos/pad ids from ``tokenizer`` where they are
    unset, and adds the tokenizer's stop tokens (:func:`special_token_ids`) to the generation config's
    ``eos_token_id``, so that ``generate`` stops at the end of a reply. Values a source model set are kept. Both
    configs may be objects (``PretrainedConfig``, ``GenerationConfig``) or dicts."""
    ids = special_token_ids(tokenizer)
    for target, keys in (
        (config, ("bos_token_id", "eos_token_id", "pad_token_id")),
        (generation, ("bos_token_id", "pad_token_id")),
    ):
        for key in keys:
            if _get(target, key) is None and ids[key] is not None:
                _set(target, key, ids[key])
    eos = _get(generation, "eos_token_id")
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    for stop in ids["stop_token_ids"]:
        if stop not in eos:
            eos.append(stop)
    if eos:
        _set(generation, "eos_token_id", eos[0] if len(eos) == 1 else eos)


def _get(target: Any, key: str) -> Any:
    return target.get(key) if isinstance(target, dict) else getattr(target, key, None)


def _set(target: Any, key: str, value: Any) -> None:
    if isinstance(target, dict):
        target[key] = value
    else:
        setattr(target, key, value)
