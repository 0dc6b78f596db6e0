"""Model adapter: where a Hugging Face decoder-only causal LM keeps its parts.

All model-family specifics live here. A supported model is built as
``embedding -> list of decoder layers -> final norm -> lm_head`` and exposes them through Hugging Face's accessors
(``get_input_embeddings``, ``get_decoder().layers``, ``get_decoder().norm``, ``get_output_embeddings``). The engine
keeps the model object (and so its ``forward``, mask construction, rotary embeddings and ``state_dict``) and only
replaces what the embedding, each layer and the final norm *do* when called.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class DecoderParts:
    """The pieces of a decoder-only causal LM that the engine streams."""

    model: nn.Module
    """The ``...ForCausalLM`` module."""
    base: nn.Module
    """The decoder (``model.model``): runs the embedding, masks, rotary embeddings and layers."""
    embed: nn.Embedding
    layers: nn.ModuleList
    norm: nn.Module
    lm_head: nn.Linear
    tied: bool
    """lm_head shares the embedding's weight (one Parameter, stored once)."""

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def config(self):
        return self.model.config

    def layer_structure_key(self, index: int) -> tuple:
        """Layers with equal keys can share one GPU template module."""
        layer = self.layers[index]
        shapes = tuple((n, tuple(p.shape), p.requires_grad) for n, p in layer.named_parameters())
        layer_types = getattr(self.config, "layer_types", None)
        kind = layer_types[index] if layer_types is not None and index < len(layer_types) else None
        return (type(layer).__qualname__, shapes, kind)

    def embed_scale(self) -> float | None:
        """Multiplier applied to embeddings by the model's embedding module (e.g. sqrt(hidden) in Gemma)."""
        scale = getattr(self.embed, "embed_scale", None)
        if scale is None:
            return None
        return float(scale.item() if isinstance(scale, torch.Tensor) else scale)

    def padding_idx(self) -> int | None:
        return getattr(self.embed, "padding_idx", None)

    def logit_softcap(self) -> float | None:
        return getattr(self.config, "final_logit_softcapping", None)

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


def _named(module: nn.Module, prefix: dict[int, str]) -> list[tuple[str, nn.Parameter]]:
    base = prefix[id(module)]
    return [(f"{base}.{n}" if base else n, p) for n, p in module.named_parameters(remove_duplicate=False)]


def find_causal_lm(root: nn.Module) -> nn.Module:
    """The one Hugging Face causal LM inside ``root`` (``root`` itself, or a submodule such as ``self.model``)."""
    found = [m for m in root.modules() if _looks_like_causal_lm(m)]
    if not found:
        raise ValueError(
            f"no Hugging Face causal LM found in {type(root).__name__}: the horizon strategy streams a "
            "`...ForCausalLM` module (from `transformers`) built as embedding -> decoder layers -> norm -> lm_head; "
            "create it in `__init__` or `configure_model`"
        )
    outer = [m for m in found if not any(m is not o and any(c is m for c in o.modules()) for o in found)]
    if len(outer) > 1:
        raise ValueError(f"{type(root).__name__} holds {len(outer)} causal LMs; the horizon strategy streams one")
    return outer[0]


def _looks_like_causal_lm(m: nn.Module) -> bool:
    return hasattr(m, "get_output_embeddings") and hasattr(m, "get_decoder") and hasattr(m, "config")


def describe(model: nn.Module) -> DecoderParts:
    """Locates the streamed parts of ``model`` or raises a ``ValueError`` naming what is missing."""
    name = type(model).__name__
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(f"{name} is an encoder-decoder model; the horizon strategy streams decoder-only models")
    base = model.get_decoder()
    if base is None:
        raise ValueError(f"{name}.get_decoder() returned None: no decoder stack to stream")
    embed = model.get_input_embeddings()
    lm_head = model.get_output_embeddings()
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
            f"{name} lacks {', '.join(missing)}: the horizon strategy needs embedding -> layers -> norm -> lm_head"
        )
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"{name}'s decoder `layers` must be a non-empty nn.ModuleList")
    if not isinstance(embed, nn.Embedding):
        raise ValueError(f"{name}'s input embeddings are a {type(embed).__name__}, not an nn.Embedding")
    if not isinstance(lm_head, nn.Linear):
        raise ValueError(f"{name}'s output embeddings are a {type(lm_head).__name__}, not an nn.Linear")
    tied = lm_head.weight is embed.weight
    return DecoderParts(model=model, base=base, embed=embed, layers=layers, norm=norm, lm_head=lm_head, tied=tied)
