"""How the engine hooks into a Hugging Face causal LM.

The model object stays the user's: its parameters (views into the host store), names, ``state_dict`` and config.
The engine replaces only what some of its modules *do* when called, as instance attributes that :meth:`close`
removes again: the embedding gathers rows from the host masters, each decoder layer runs a streamed template through
a :class:`~.segments.LayerFunction`, the final norm is deferred to the head, and the ``...ForCausalLM.forward``
returns the chunked loss (or logits). The model's own decoder ``forward`` still builds attention masks, position ids
and rotary embeddings, so packing, padding and model-specific arguments behave exactly as in Hugging Face.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from .loss import ChunkedLoss
from .moe import RouterAuxFunction
from .segments import EmbedFunction, ForwardPass, HeadLogitsFunction, HeadLossFunction, LayerFunction


class ModelHooks:
    """The hook-up half of :class:`~.runtime.HorizonEngine` (mixed in; uses its parts, streamer and config)."""

    def _layer_call(self, index: int, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        if args:
            raise TypeError(f"decoder layer {index} got unexpected positional arguments; pass them by keyword")
        if index == 0 or self._current is None:
            self._current = ForwardPass(self, keep=torch.is_grad_enabled(), train_mode=self.model.training)
            self._current.router_logits = {} if self._record_routers else None
            if self._current.keep:
                self._start_keeping(self._current, hidden_states.shape[:-1].numel())
            self.streamer.plan([*range(index, self.parts.num_layers), self.head_uid])
        fpass = self._current
        out = LayerFunction.apply(hidden_states, self.anchor, fpass, index, kwargs)
        return (out,) if fpass.tuple_output else out

    def _embed_call(self, input_ids: torch.Tensor) -> torch.Tensor:
        return EmbedFunction.apply(self.anchor, self, input_ids)

    def _causal_lm_forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs: Any,
    ):
        from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast

        if past_key_values is not None or use_cache:
            raise ValueError("the horizon engine trains without a KV cache: pass use_cache=False / no past_key_values")
        for key in ("output_attentions", "output_hidden_states", "return_dict"):
            kwargs.pop(key, None)
        aux_spec = self.parts.aux_loss(kwargs.pop("output_router_logits", None))
        to_dev = lambda t: t.to(self.device) if isinstance(t, torch.Tensor) else t  # noqa: E731
        self._current = None
        self._record_routers = aux_spec is not None
        try:
            out = self.parts.base(
                input_ids=input_ids,
                attention_mask=to_dev(attention_mask),
                position_ids=to_dev(position_ids),
                inputs_embeds=to_dev(inputs_embeds),
                use_cache=False,
                **{k: to_dev(v) for k, v in kwargs.items()},
            )
            hidden = out.last_hidden_state  # before the final norm: the head applies it
            fpass = self._current
            assert fpass is not None
            aux = None
            if aux_spec is not None:  # the routers' load-balancing loss (see .moe)
                hidden, aux = RouterAuxFunction.apply(hidden, self.anchor, fpass, aux_spec, to_dev(attention_mask))
            if labels is not None:
                loss_fn = ChunkedLoss(
                    hidden, labels, num_items_in_batch, self.config.loss_chunk_tokens, self.parts.logit_softcap()
                )
                loss = HeadLossFunction.apply(hidden, self.anchor, fpass, loss_fn)
                if aux is None:
                    return CausalLMOutputWithPast(loss=loss, logits=None)
                loss = loss + aux_spec.coef * aux
                return MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux, logits=None)
            if isinstance(logits_to_keep, int) and logits_to_keep > 0:
                hidden = hidden[:, -logits_to_keep:]
            elif isinstance(logits_to_keep, torch.Tensor):
                hidden = hidden[:, logits_to_keep.to(hidden.device)]
            logits = HeadLogitsFunction.apply(hidden, self.anchor, fpass)
            if aux is None:
                return CausalLMOutputWithPast(loss=None, logits=logits)
            return MoeCausalLMOutputWithPast(loss=None, aux_loss=aux, logits=logits)
        finally:
            self._current = None
            self._record_routers = False

    def _install(self) -> None:
        parts = self.parts
        parts.embed.forward = self._embed_call
        for i, layer in enumerate(parts.layers):
            layer.forward = functools.partial(self._layer_call, i)
        parts.norm.forward = _identity
        parts.model.forward = self._causal_lm_forward
        # Layer buffers move too: templates are bound to layer i's own buffers before running as layer i.
        streamed = {id(m) for top in (parts.embed, parts.norm, parts.lm_head) for m in top.modules()}
        for module in parts.model.modules():
            if id(module) in streamed:
                continue
            for name, buf in list(module._buffers.items()):
                if buf is not None and buf.device != self.device:
                    self._moved_buffers.append((module, name, buf.device))
                    module._buffers[name] = buf.to(self.device)
        self._layer_state = [parts.layer_state(i) for i in range(parts.num_layers)]
        self._hooks = [
            parts.model.register_state_dict_pre_hook(lambda *a, **k: self.synchronize()),
            parts.model.register_load_state_dict_pre_hook(lambda *a, **k: self.synchronize()),
            parts.model.register_load_state_dict_post_hook(lambda *a, **k: self.streamer.invalidate()),
        ]


def _identity(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return hidden_states
