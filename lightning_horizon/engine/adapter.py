"""Model adapter: where a Hugging Face decoder-only causal LM keeps its parts, and how families differ.

All model-family specifics live here. A supported model is built as
``embedding -> list of decoder layers -> final norm -> lm_head`` (or ``-> score``: a ``...ForSequenceClassification``
reward model or value head) and exposes them through Hugging Face's accessors
(``get_input_embeddings``, the decoder's ``layers`` and ``norm``, ``get_output_embeddings``). The engine keeps the
model object (and so its ``forward``, mask construction, rotary embeddings and ``state_dict``) and only replaces what
the embedding, each layer and the final norm *do* when called. What the families differ in, and where it is handled:

* **Layer structures** (DeepSeek's dense first layers, Llama 4's MoE / NoPE interleaving, sliding and global
  attention in Gemma, Mistral and GPT-OSS): :meth:`DecoderParts.layer_structure_key` compares parameter shapes,
  buffer shapes and every plain attribute of every submodule (``sliding_window``, ``use_rope``, ``is_sliding``, ...),
  so only layers that would run identically share a GPU template.
* **Per-layer state** of layers that share a template (``layer_idx``, buffers such as DeepSeek-V3's
  ``e_score_correction_bias``): :meth:`DecoderParts.layer_state` lists it and :func:`bind_layer_state` points the
  template at layer ``i``'s values before it runs as layer ``i``.
* **Embedding scaling** (Gemma's ``sqrt(hidden)``), **final logit soft-capping** (Gemma 2), **padding index**,
  **tied embeddings**: read from the embedding module and the config.
* **MoE routers' auxiliary loss** (Mixtral, Qwen2-MoE, Qwen3-MoE, GPT-OSS): which module emits router logits (the
  model's own ``_can_record_outputs["router_logits"]``), and the family's ``load_balancing_loss_func``,
  coefficient, expert count and top-k (:meth:`DecoderParts.aux_loss`). The mechanics are in :mod:`.moe`.
* **Rope variants and scaling**, attention sinks, MLA, q/k norms, partial rotary: inside the Hugging Face modules
  (the base model computes rotary embeddings; sinks are layer parameters), so nothing to do here.

Anything else (encoder-decoder models, multimodal wrappers with vision towers, parameters outside the four parts)
is refused with a ``ValueError`` naming what is missing or unplaced.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .moe import AuxLossSpec, ExpertModule, RouterSpec, find_experts

# Attributes that identify a layer without changing what it computes in training (the KV-cache index): they are
# rebound per call instead of splitting templates.
_IDENTITY_ATTRS = frozenset({"layer_idx", "layer_id", "layer_index", "layer_number"})
# Switches of PEFT adapter layers and wrappers (``disable_adapter()``, ``set_adapter``, merged adapters): a template
# reads them from the model's own module every time it runs as that module, so switching adapters on the model
# takes effect in the streamed layers too.
_LIVE_ATTRS = ("_disable_adapters", "_active_adapter", "merged_adapters")
# Submodules of a multimodal wrapper that the streaming engine does not run.
_MULTIMODAL_PARTS = ("vision_tower", "vision_model", "multi_modal_projector", "audio_tower", "visual", "vision_encoder")
_MULTIMODAL_CONFIGS = ("vision_config", "audio_config")


@dataclass
class DecoderParts:
    """The pieces of a decoder-only causal LM that the engine streams."""

    model: nn.Module
    """The ``...ForCausalLM`` module."""
    base: nn.Module
    """The decoder (``model.model``): runs the embedding, masks, rotary embeddings and layers."""
    embed: nn.Module
    """An ``nn.Embedding`` (or PEFT's ``ModulesToSaveWrapper`` of one: ``.weight`` is the active copy's)."""
    layers: nn.ModuleList
    norm: nn.Module
    lm_head: nn.Module
    """An ``nn.Linear`` (or PEFT's ``ModulesToSaveWrapper`` of one)."""
    tied: bool
    """lm_head shares the embedding's weight (one Parameter, stored once)."""
    score_head: bool = False
    """A ``...ForSequenceClassification`` model: ``lm_head`` is its ``score`` layer (hidden size -> labels), and the
    model's own ``forward`` runs (pooling, loss) around the streamed decoder and score."""

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def config(self):
        return self.model.config

    # ------------------------------------------------------------------------------------------- layer templates
    def layer_structure_key(self, index: int) -> tuple:
        """Layers with equal keys can share one GPU template module.

        The key holds the layer's class, its parameters' names, shapes and trainability, its buffers' names, shapes
        and dtypes, and every plain attribute (numbers, strings, flags, tuples of them) of every submodule except the
        identity attributes of ``_IDENTITY_ATTRS``: two layers with equal keys run the same code on the same shapes.
        """
        layer = self.layers[index]
        params = tuple((n, tuple(p.shape), p.requires_grad) for n, p in layer.named_parameters())
        buffers = tuple((n, tuple(b.shape), b.dtype) for n, b in layer.named_buffers())
        return (type(layer).__qualname__, params, buffers, _module_signature(layer))

    def layer_state(self, index: int) -> list[tuple[str, str, Any]]:
        """``(submodule path, name, value)`` that a shared template must take to run as layer ``index``.

        Buffers (bound by reference: updates to the model's buffers are seen), identity attributes and the live
        adapter switches of :func:`module_state`.
        """
        return module_state(self.layers[index], buffers=True)

    # ---------------------------------------------------------------------------------------- embedding and head
    def embed_scale(self) -> float | None:
        """Multiplier applied to embeddings by the model's embedding module (``sqrt(hidden)`` in Gemma 2/3).

        Transformers implements it as a ``...ScaledWordEmbedding`` (an ``nn.Embedding`` whose forward multiplies by
        its ``embed_scale`` buffer); the engine's embedding lookup on the host applies the same factor.
        """
        scale = getattr(self.embed, "embed_scale", None)
        if scale is None:
            return None
        return float(scale.item() if isinstance(scale, torch.Tensor) else scale)

    def padding_idx(self) -> int | None:
        return getattr(self.embed, "padding_idx", None)

    def logit_softcap(self) -> float | None:
        """``tanh`` soft-capping of the final logits (Gemma 2), applied by the head before the loss (a score head's
        outputs are not capped: Hugging Face caps only the language-model logits)."""
        return None if self.score_head else getattr(self.config, "final_logit_softcapping", None)

    def is_stochastic(self) -> bool:
        """Whether a layer's forward draws random numbers in training (dropout, router jitter): recomputation
        then replays the RNG state of the first run."""
        config = self.config
        for key in ("attention_dropout", "router_jitter_noise", "resid_pdrop", "hidden_dropout"):
            if float(getattr(config, key, 0.0) or 0.0) > 0:
                return True
        return any(isinstance(m, nn.Dropout) and m.p > 0 for layer in self.layers for m in layer.modules())

    # ------------------------------------------------------------------------------------------------------- MoE
    def router_spec(self) -> RouterSpec | None:
        """Where router logits come from, as the model declares it for Hugging Face's output recording."""
        recorders = {}
        for cls in (type(self.base), type(self.model)):
            recorders.update(getattr(cls, "_can_record_outputs", None) or {})
        rec = recorders.get("router_logits")
        if rec is None:
            return None
        if isinstance(rec, type):
            return RouterSpec(lambda m, cls=rec: isinstance(m, cls))
        target, class_name = getattr(rec, "target_class", None), getattr(rec, "class_name", None)
        if target is not None:
            return RouterSpec(lambda m, cls=target: isinstance(m, cls), int(getattr(rec, "index", 0) or 0))
        if class_name is not None:
            return RouterSpec(lambda m, name=class_name: type(m).__name__.endswith(name), int(rec.index or 0))
        return None

    def aux_loss(self, output_router_logits: bool | None = None) -> AuxLossSpec | None:
        """The router load-balancing loss the model's own forward would add, or None.

        Hugging Face adds ``router_aux_loss_coef * load_balancing_loss_func(...)`` when ``output_router_logits``
        (the forward argument, else the config's) is true, in the families whose ``...ForCausalLM`` has a
        ``router_aux_loss_coef`` and whose module defines ``load_balancing_loss_func`` (Mixtral, Qwen2-MoE,
        Qwen3-MoE, GPT-OSS). Llama 4, DeepSeek and GLM-4.5 balance experts without an auxiliary loss.
        """
        enabled = output_router_logits
        if enabled is None:
            enabled = getattr(self.config, "output_router_logits", False)
        if not enabled or self.router_spec() is None:
            return None
        loss_fn = getattr(sys.modules.get(type(self.model).__module__), "load_balancing_loss_func", None)
        coef = getattr(self.model, "router_aux_loss_coef", None)
        num_experts = getattr(self.model, "num_experts", None)
        top_k = getattr(self.model, "num_experts_per_tok", None)
        if loss_fn is None or coef is None or num_experts is None or top_k is None:
            return None
        return AuxLossSpec(loss_fn, float(coef), int(num_experts), int(top_k))

    def expert_modules(self, index: int) -> list[ExpertModule]:
        """The routed-expert modules of layer ``index`` whose experts can be streamed sparsely (see :func:`find_experts`)."""
        return find_experts(self.layers[index])

    # ------------------------------------------------------------------------------------------------ host store
    def store_groups(self) -> list[tuple[str, list[tuple[str, nn.Parameter]]]]:
        """The host store's groups, in the order a forward pass uses them."""
        prefix = {id(m): n for n, m in self.model.named_modules()}
        groups = [("embed", _named(self.embed, prefix))]
        groups += [(f"layers.{i}", _named(layer, prefix)) for i, layer in enumerate(self.layers)]
        groups.append(("norm", _named(self.norm, prefix)))
        groups.append(("lm_head", _named(self.lm_head, prefix)))
        covered = {id(p) for _, ps in groups for _, p in ps}
        rest = [(n, p) for n, p in self.model.named_parameters() if id(p) not in covered]
        if rest:
            names = ", ".join(n for n, _ in rest[:5])
            raise ValueError(
                f"{type(self.model).__name__} has parameters outside embedding/layers/norm/lm_head ({names}"
                f"{', ...' if len(rest) > 5 else ''}); the streaming engine cannot place them"
            )
        return groups


class _Live:
    """A value read from ``module`` each time the state is bound (see ``_LIVE_ATTRS``)."""

    __slots__ = ("module",)

    def __init__(self, module: nn.Module) -> None:
        self.module = module


def module_state(root: nn.Module, buffers: bool) -> list[tuple[str, str, Any]]:
    """``(submodule path, name, value)`` a template copied from ``root`` must take to run as ``root``: its buffers
    (if ``buffers``; by reference), identity attributes (``_IDENTITY_ATTRS``) and, read anew at every bind, the
    adapter switches of PEFT modules (``_LIVE_ATTRS``)."""
    state: list[tuple[str, str, Any]] = []
    for path, module in root.named_modules():
        if buffers:
            state += [(path, name, buf) for name, buf in module._buffers.items() if buf is not None]
        state += [(path, name, value) for name, value in vars(module).items() if name in _IDENTITY_ATTRS]
        state += [(path, name, _Live(module)) for name in _LIVE_ATTRS if hasattr(module, name)]
    return state


def bind_layer_state(template: nn.Module, state: list[tuple[str, str, Any]]) -> None:
    """Points a shared template at one module's state (see :func:`module_state`)."""
    for path, name, value in state:
        owner = template.get_submodule(path) if path else template
        if isinstance(value, _Live):
            owner.__dict__[name] = getattr(value.module, name)
        elif name in owner._buffers:
            owner._buffers[name] = value
        else:
            owner.__dict__[name] = value


def _module_signature(layer: nn.Module) -> tuple:
    sig = []
    for path, module in layer.named_modules():
        attrs = tuple(
            sorted(
                (k, _hashable(v))
                for k, v in vars(module).items()
                if not k.startswith("_")
                and k != "training"
                and k not in _IDENTITY_ATTRS
                and k not in _LIVE_ATTRS
                and _is_plain(v)
            )
        )
        sig.append((path, type(module).__qualname__, attrs))
    return tuple(sig)


def _is_plain(value: Any) -> bool:
    if isinstance(value, (bool, int, float, str, type(None), torch.dtype)):
        return True
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return isinstance(value, (tuple, list, set, frozenset)) and all(_is_plain(v) for v in value)


def _hashable(value: Any) -> Any:
    """A plain value (see ``_is_plain``) as a hashable one: lists become tuples, dicts sorted item tuples (PEFT keeps
    per-adapter settings such as ``scaling`` in dicts and ``merged_adapters`` in a list)."""
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _hashable(v)) for k, v in value.items())))
    if isinstance(value, (set, frozenset)):
        return ("set", tuple(sorted((_hashable(v) for v in value), key=repr)))
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    return value


def _named(module: nn.Module, prefix: dict[int, str]) -> list[tuple[str, nn.Parameter]]:
    base = prefix[id(module)]
    return [(f"{base}.{n}" if base else n, p) for n, p in module.named_parameters(remove_duplicate=False)]


# ----------------------------------------------------------------------------------------------------- discovery
def find_causal_lm(root: nn.Module) -> nn.Module:
    """The one Hugging Face causal LM inside ``root`` (``root`` itself, or a submodule such as ``self.model``).

    PEFT's wrappers (``PeftModel``, ``LoraModel``, ...) forward attribute lookups to the model they wrap, so they look
    like causal LMs too: the model they wrap is the one streamed, and their own ``forward`` still runs around it.
    """
    found = [m for m in root.modules() if _looks_like_causal_lm(m) and not is_peft_wrapper(m)]
    if not found:
        raise ValueError(
            f"no Hugging Face causal LM found in {type(root).__name__}: the horizon strategy streams a "
            "`...ForCausalLM` module (from `transformers`) built as embedding -> decoder layers -> norm -> lm_head, "
            "or a `...ForSequenceClassification` (a score head instead of lm_head); create it in `__init__` or "
            "`configure_model`"
        )
    outer = [m for m in found if not any(m is not o and any(c is m for c in o.modules()) for o in found)]
    if len(outer) > 1:
        raise ValueError(f"{type(root).__name__} holds {len(outer)} causal LMs; the horizon strategy streams one")
    return outer[0]


def _looks_like_causal_lm(m: nn.Module) -> bool:
    return hasattr(m, "get_output_embeddings") and hasattr(m, "get_decoder") and hasattr(m, "config")


def is_peft_wrapper(m: nn.Module) -> bool:
    """A PEFT model or tuner (``PeftModel``, ``LoraModel``, ...) around a Hugging Face model."""
    return type(m).__module__.startswith("peft.")


def _plain_module(m: nn.Module | None, kind: type[nn.Module], what: str, model_name: str) -> nn.Module | None:
    """``m`` if it is a ``kind``, or a PEFT ``ModulesToSaveWrapper`` around one (a trainable copy of the module beside
    the frozen original: it stays in place and runs whichever copy the active adapter selects); else raises."""
    if m is None or isinstance(m, kind):
        return m
    original = getattr(m, "original_module", None)
    if type(m).__name__ == "ModulesToSaveWrapper" and isinstance(original, kind):
        return m
    if original is not None:
        raise ValueError(
            f"{model_name}'s {what} is wrapped in PEFT's {type(m).__name__}: the horizon strategy streams an "
            f"nn.{kind.__name__} (or PEFT's modules_to_save copy of one); trainable_token_indices and other token "
            "adapters are not supported, use modules_to_save for the whole module instead"
        )
    raise ValueError(f"{model_name}'s {what} are a {type(m).__name__}, not an nn.{kind.__name__}")


def _find_decoder(model: nn.Module) -> nn.Module | None:
    """The module that holds ``layers``: ``get_decoder()``, else the conventional ``model.model``.

    Some causal LMs (e.g. ``Llama4ForCausalLM``, whose ``base_model_prefix`` names a wrapper attribute) answer
    ``get_decoder()`` with themselves.
    """
    candidates = []
    try:
        candidates.append(model.get_decoder())
    except (AttributeError, NotImplementedError, ValueError):
        pass
    candidates += [getattr(model, "model", None), getattr(model, "base_model", None)]
    candidates = [c for c in candidates if isinstance(c, nn.Module) and c is not model]
    for c in candidates:
        if hasattr(c, "layers"):
            return c
    return candidates[0] if candidates else None


def describe(model: nn.Module) -> DecoderParts:
    """Locates the streamed parts of ``model`` or raises a ``ValueError`` naming what is missing."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{name} is an encoder-decoder model; the horizon strategy streams decoder-only models")
    towers = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in _MULTIMODAL_PARTS]
    towers += [k for k in _MULTIMODAL_CONFIGS if getattr(config, k, None) is not None]
    if towers:
        raise ValueError(
            f"{name} is a multimodal model ({', '.join(dict.fromkeys(towers))}): the horizon strategy streams "
            "text-only decoders (embedding -> layers -> norm -> lm_head) and has no place for vision or audio "
            "encoders; train the family's text-only `...ForCausalLM` instead (e.g. `Gemma3ForCausalLM`, "
            "`Llama4ForCausalLM`)"
        )
    base = _find_decoder(model)
    if base is None:
        raise ValueError(f"{name} has no decoder stack (`get_decoder()` / `model`) to stream")
    embed = model.get_input_embeddings()
    lm_head = model.get_output_embeddings()
    score_head = lm_head is None and is_sequence_classifier(model)
    if score_head:
        lm_head = model.score
    layers = getattr(base, "layers", None)
    norm = getattr(base, "norm", None)
    missing = [
        what
        for what, obj in (
            ("input embeddings", embed),
            ("`layers` (a ModuleList of decoder layers)", layers),
            ("final `norm`", norm),
            ("output embeddings (lm_head)", lm_head),
        )
        if obj is None
    ]
    if missing:
        raise ValueError(
            f"{name} lacks {', '.join(missing)} (looked in {type(base).__name__}): the horizon strategy needs "
            "embedding -> layers -> norm -> lm_head"
        )
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"{name}'s decoder `layers` must be a non-empty nn.ModuleList")
    embed = _plain_module(embed, nn.Embedding, "input embeddings", name)
    lm_head = _plain_module(lm_head, nn.Linear, "score head" if score_head else "output embeddings (lm_head)", name)
    tied = lm_head.weight is embed.weight
    return DecoderParts(
        model=model, base=base, embed=embed, layers=layers, norm=norm, lm_head=lm_head, tied=tied, score_head=score_head
    )


def is_sequence_classifier(model: nn.Module) -> bool:
    """A Hugging Face ``...ForSequenceClassification`` decoder: a ``score`` linear layer on the final hidden state."""
    return type(model).__name__.endswith("ForSequenceClassification") and isinstance(
        _plain_module(getattr(model, "score", None), nn.Linear, "score head", type(model).__name__), nn.Module
    )
