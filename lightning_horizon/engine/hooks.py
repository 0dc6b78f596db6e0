"""How the engine hooks into a Hugging Face causal LM.

The model object stays the user's: its parameters (views into the host store), names, ``state_dict`` and config.
The engine replaces only what some of its modules *do* when called, as instance attributes that :meth:`close`
removes again: the embedding gathers rows from the host masters, each decoder layer runs a streamed template through
a :class:`~.segments.LayerFunction`, the final norm runs streamed too (or is deferred to the head, which fuses it with
the chunked loss), the decoder's ``forward`` refuses a KV cache in a training forward, and the ``...ForCausalLM``'s
``forward`` returns the chunked loss (or logits). The model's own decoder ``forward`` still builds attention masks,
position ids and rotary embeddings, so packing, padding and model-specific arguments behave exactly as in Hugging
Face; Hugging Face's output recording (``output_hidden_states``) sees the streamed layers' outputs.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch

from .loss import ChunkedLoss
from .moe import RouterAuxFunction
from .segments import EmbedFunction, ForwardPass, HeadLogitsFunction, HeadLossFunction, NormFunction

_NO_LOGITS = (
    "logits were not computed: with labels, the horizon engine computes the loss in chunks and never materialises "
    "the (batch x sequence x vocabulary) logits. For logits, call the model without labels and compute the loss from "
    "them (e.g. model.loss_function(logits=out.logits, labels=labels, vocab_size=model.config.vocab_size)), which "
    "holds all the logits in memory: fine for a small batch"
)


class ModelPatch:
    """Installs the engine into a model's modules, and removes it again (see the module docstring).

    Args:
        parts: Where the model keeps its parts.
        runner: Runs the streamed passes (:class:`~.passes.PassRunner`).
        device: Compute device (the model's layer buffers move there while installed).
        loss_chunk_tokens: Rows of logits the chunked loss computes at once.
        synchronize: Waits until the masters are final (before ``state_dict``, ``load_state_dict``).
        invalidate: Forgets weights resident on the GPU (after ``load_state_dict`` changed the masters).
        discard: Forgets the engine's gradients of every parameter (the model's ``zero_grad`` calls it first: the
            host holds the gradients, so clearing ``param.grad`` alone would leave them to add to the next ones).
    """

    def __init__(
        self,
        parts,
        runner,
        device: torch.device,
        loss_chunk_tokens: int,
        synchronize: Callable[[], None],
        invalidate: Callable[[], None],
        discard: Callable[[], None] | None = None,
    ) -> None:
        from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast

        self.parts, self.runner, self.device, self.loss_chunk_tokens = parts, runner, device, loss_chunk_tokens
        self.synchronize, self.invalidate, self.discard = synchronize, invalidate, discard
        self._zero_grads: list[tuple[torch.nn.Module, Any]] = []
        """Modules whose ``zero_grad`` is replaced, with their own instance attribute (None: the class's)."""
        self._output_classes = (CausalLMOutputWithPast, MoeCausalLMOutputWithPast)
        fields = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
        self._cache_field = "cache" if "cache" in fields else "past_key_values"
        params = inspect.signature(type(parts.base).forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._defer_norm = False
        """The head applies the final norm (fused with the chunked loss): the norm module passes hidden states on."""
        self._finished: ForwardPass | None = None
        """The pass of the decoder call that just returned."""
        self._replaced: list[tuple[torch.nn.Module, Any]] = []
        self._moved_buffers: list[tuple[torch.nn.Module, str, torch.device]] = []
        self._hooks: list = []

    # ------------------------------------------------------------------------------------------ installation
    def install(self) -> None:
        """Replaces what the model's modules do when called (instance attributes; :meth:`uninstall` removes them)."""
        parts = self.parts
        base_forward = parts.base.forward
        # A score head (sequence classification) keeps the model's own forward (pooling, loss): the decoder's
        # final norm runs on its own and the score layer runs streamed on its output.
        top = parts.lm_head if parts.score_head else parts.model
        self._replaced = [
            (module, module.__dict__.get("forward"))
            for module in (parts.embed, parts.norm, parts.base, top, *parts.layers)
        ]
        parts.embed.forward = self._embed_call
        for i, layer in enumerate(parts.layers):
            layer.forward = functools.partial(self._layer_call, i)
        parts.norm.forward = self._norm_call
        parts.base.forward = functools.partial(self._base_call, base_forward)
        if parts.score_head:
            parts.lm_head.forward = self._score_call
            self.runner.forward_head_uses = 2  # the norm on its own, then the score
        else:
            parts.model.forward = self._causal_lm_forward
        parts.model.__dict__["_horizon_engine"] = weakref.ref(self)
        self.guard_zero_grad(parts.model)
        # Layer buffers move too: templates are bound to layer i's own buffers before running as layer i.
        streamed = {id(m) for top in (parts.embed, parts.norm, parts.lm_head) for m in top.modules()}
        for module in parts.model.modules():
            if id(module) in streamed:
                continue
            for name, buf in list(module._buffers.items()):
                if buf is not None and buf.device != self.device:
                    self._moved_buffers.append((module, name, buf.device))
                    module._buffers[name] = buf.to(self.device)
        _warn_about_inner_hooks(parts)
        self._hooks = [
            parts.model.register_state_dict_pre_hook(lambda *a, **k: self.synchronize()),
            parts.model.register_load_state_dict_pre_hook(lambda *a, **k: self.synchronize()),
            parts.model.register_load_state_dict_post_hook(lambda *a, **k: self.invalidate()),
        ]

    def uninstall(self) -> None:
        """Gives the model its own forward methods and buffers back (undoes :meth:`install`)."""
        for attr, replaced in (("forward", self._replaced), ("zero_grad", self._zero_grads)):
            for module, own in replaced:  # the instance attribute it had, or none (the class's method)
                if own is None:
                    module.__dict__.pop(attr, None)
                else:
                    setattr(module, attr, own)
        self._replaced, self._zero_grads = [], []
        self.parts.model.__dict__.pop("_horizon_engine", None)
        for module, name, device in self._moved_buffers:
            module._buffers[name] = module._buffers[name].to(device)
        self._moved_buffers = []
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    # ---------------------------------------------------------------------------------- what the modules do
    def _layer_call(self, index: int, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        if args:
            raise TypeError(f"decoder layer {index} got unexpected positional arguments; pass them by keyword")
        return self.runner.layer_call(index, hidden_states, kwargs)

    def _embed_call(self, input_ids: torch.Tensor) -> torch.Tensor:
        return EmbedFunction.apply(self.runner.anchor, self.runner, input_ids)

    def _norm_call(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._defer_norm:  # the head applies it, fused with the chunked loss
            return hidden_states
        if self.runner.current is None:
            raise RuntimeError("the final norm of a streamed model ran outside a forward pass of its decoder")
        return NormFunction.apply(hidden_states, self.runner.anchor, self.runner.current)

    def guard_zero_grad(self, root: torch.nn.Module) -> None:
        """``zero_grad()`` of ``root`` and of every module between it and the streamed model (a PEFT wrapper, the
        LightningModule) also forgets the engine's host gradients, as ``optimizer.zero_grad()`` does: the host holds
        the gradients, so clearing ``param.grad`` alone would leave them to add to the next backward's."""
        model = self.parts.model
        done = {id(m) for m, _ in self._zero_grads}
        for module in root.modules():
            if id(module) in done or not any(m is model for m in module.modules()):
                continue
            self._zero_grads.append((module, module.__dict__.get("zero_grad")))
            module.zero_grad = functools.partial(self._zero_grad, module, module.__dict__.get("zero_grad"))

    def _zero_grad(self, module: torch.nn.Module, own: Any, set_to_none: bool = True) -> None:
        if self.discard is not None:
            self.discard()
        (own or type(module).zero_grad.__get__(module))(set_to_none=set_to_none)

    def _score_call(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The score layer of a sequence classifier on the decoder's output (after its final norm), streamed."""
        fpass, self._finished = self._finished, None
        if fpass is None:
            raise RuntimeError(
                "the score head of a streamed model runs on the output of the decoder call just before it: call "
                "model.model(...) then model.score(...) once, or the model itself"
            )
        return HeadLogitsFunction.apply(hidden_states.to(self.device), self.runner.anchor, fpass, False)

    def _base_call(self, forward, *args: Any, **kwargs: Any):
        """The decoder's own ``forward`` (``model.model(...)``), without a KV cache when gradients are on: a training
        forward runs each layer again in the backward, which would append to a cache twice."""
        cache = _pop_cache(kwargs)
        if torch.is_grad_enabled():
            if cache is not None or kwargs.get("use_cache"):
                raise ValueError(
                    "the horizon engine runs a forward with gradients without a KV cache (its backward recomputes "
                    "layers): pass use_cache=False, or run under torch.no_grad() to use a cache (e.g. generate)"
                )
            kwargs["use_cache"] = False
        if cache is not None:
            kwargs[self._cache_arg] = cache
        self.runner.current = None
        try:
            return forward(*args, **kwargs)
        finally:
            self._finished, self.runner.current = self.runner.current, None

    def sequence_logprobs(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Each sequence's summed log-probability of its label tokens, ``(B,)`` FP32, through the chunked head (no
        ``B x S x V`` logits); see :func:`lightning_horizon.preference.sequence_logprobs`."""
        if self.parts.score_head:
            raise ValueError(
                f"{type(self.parts.model).__name__} has a score head, not a language-model head: it gives no token "
                "log-probabilities"
            )
        runner = self.runner
        to_dev = lambda t: t.to(self.device) if isinstance(t, torch.Tensor) else t  # noqa: E731
        self._defer_norm = True
        runner.forward_head_uses = 1
        try:
            out = self.parts.base(
                input_ids=input_ids,
                attention_mask=to_dev(attention_mask),
                position_ids=to_dev(position_ids),
                use_cache=False,
            )
            fpass, self._finished = self._finished, None
            assert fpass is not None
        finally:
            self._defer_norm = False
        hidden = out.last_hidden_state
        loss_fn = ChunkedLoss(
            hidden, labels, None, self.loss_chunk_tokens, self.parts.logit_softcap(), norm=True, per_sequence=True
        )
        return HeadLossFunction.apply(hidden, runner.anchor, fpass, loss_fn)

    def _causal_lm_forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs: Any,
    ):
        config = self.parts.config
        runner = self.runner
        cache = _pop_cache(kwargs)
        if use_cache is None:  # a cache only when asked for (generate asks): validation would hold one per layer
            use_cache = cache is not None
        if _flag(kwargs.pop("output_attentions", None), config, "output_attentions"):
            raise ValueError(
                "output_attentions is not supported under the horizon engine: the attention weights of the streamed "
                "layers are not kept (they would be batch x heads x sequence x sequence per layer)"
            )
        want_hidden = _flag(kwargs.pop("output_hidden_states", None), config, "output_hidden_states")
        return_dict = kwargs.pop("return_dict", None)
        aux_spec = self.parts.aux_loss(kwargs.pop("output_router_logits", None))
        to_dev = lambda t: t.to(self.device) if isinstance(t, torch.Tensor) else t  # noqa: E731
        # With hidden states returned, the final norm runs on its own (its output is the last hidden state, with
        # gradients); otherwise the head applies it, fused with the chunked loss.
        fused_norm = not want_hidden
        runner.record_routers = aux_spec is not None
        self._defer_norm = fused_norm
        runner.forward_head_uses = 1 if fused_norm else 2
        try:
            out = self.parts.base(
                input_ids=input_ids,
                attention_mask=to_dev(attention_mask),
                position_ids=to_dev(position_ids),
                inputs_embeds=to_dev(inputs_embeds),
                use_cache=use_cache,
                output_hidden_states=want_hidden,
                **({} if cache is None else {self._cache_arg: cache}),
                **{k: to_dev(v) for k, v in kwargs.items()},
            )
            fpass, self._finished = self._finished, None
            assert fpass is not None
        finally:
            runner.record_routers = False
            self._defer_norm = False
            runner.forward_head_uses = 1
        hidden = out.last_hidden_state  # before the final norm when the head applies it
        aux = None
        if aux_spec is not None:  # the routers' load-balancing loss (see .moe)
            hidden, aux = RouterAuxFunction.apply(hidden, runner.anchor, fpass, aux_spec, to_dev(attention_mask))
        fields: dict[str, Any] = {}
        if want_hidden:
            fields["hidden_states"] = out.hidden_states
        if use_cache:
            fields[self._cache_field] = getattr(out, self._cache_field, None)
        softcap = self.parts.logit_softcap()
        if labels is not None:
            loss_fn = ChunkedLoss(hidden, labels, num_items_in_batch, self.loss_chunk_tokens, softcap, fused_norm)
            loss = HeadLossFunction.apply(hidden, runner.anchor, fpass, loss_fn)
            fields["logits"] = None
        else:
            if isinstance(logits_to_keep, int) and logits_to_keep > 0:
                hidden = hidden[:, -logits_to_keep:]
            elif isinstance(logits_to_keep, torch.Tensor):
                hidden = hidden[:, logits_to_keep.to(hidden.device)]
            loss = None
            fields["logits"] = HeadLogitsFunction.apply(hidden, runner.anchor, fpass, fused_norm)
        if aux is not None:
            loss = None if loss is None else loss + aux_spec.coef * aux
            result = self._output_classes[1](loss=loss, aux_loss=aux, **fields)
        else:
            result = self._output_classes[0](loss=loss, **fields)
        if return_dict is False:
            return result.to_tuple()
        if labels is not None:
            result.__class__ = _without_logits(type(result))
        return result


def streaming_patch(model: torch.nn.Module) -> ModelPatch | None:
    """The engine's patch of ``model`` (a ``...ForCausalLM`` or a PEFT wrapper of one), or None when not streamed."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    owner = inner.__dict__.get("_horizon_engine")
    return None if owner is None else owner()


def check_not_streamed(model: torch.nn.Module) -> None:
    """Refuses a model whose modules another engine still hooks (that engine was not closed)."""
    owner = model.__dict__.get("_horizon_engine")
    if owner is not None and owner() is not None:
        raise ValueError(
            f"this {type(model).__name__} is already streamed by a HorizonEngine that was not closed: call its "
            "close() first (the horizon strategy closes its engine at the end of every fit/validate/test)"
        )


def _warn_about_inner_hooks(parts) -> None:
    """Module hooks inside the decoder layers or the head never fire: GPU templates run in their place."""
    inner = []
    for top in (*parts.layers, parts.norm, parts.lm_head):
        for name, module in top.named_modules():
            hooks = [h for d in (module._forward_hooks, module._forward_pre_hooks) for h in d.values()]
            if name and any(getattr(h, "__name__", "") != "output_capturing_hook" for h in hooks):
                inner.append(f"{type(top).__name__}.{name}")
    if inner:
        warnings.warn(
            f"forward hooks on modules inside streamed decoder layers or the head ({', '.join(inner[:3])}"
            f"{', ...' if len(inner) > 3 else ''}) will not fire: the engine runs GPU copies of those modules. "
            "Hooks on the decoder layers themselves, the decoder and the model do fire.",
            stacklevel=4,
        )


def _pop_cache(kwargs: dict[str, Any]) -> Any:
    """Removes a KV cache passed by either name (``cache``; ``past_key_values`` before Transformers 5.2x)."""
    cache = kwargs.pop("cache", None)
    legacy = kwargs.pop("past_key_values", None)
    return cache if cache is not None else legacy


def _flag(value: Any, config: Any, name: str) -> bool:
    return bool(getattr(config, name, False) if value is None else value)


@functools.cache
def _without_logits(cls: type) -> type:
    """``cls`` (a model output class) whose ``logits`` attribute raises a clear error instead of returning None."""

    def logits(self):
        raise AttributeError(_NO_LOGITS)

    def reduce(self):  # copies and pickles as the plain output class (logits None)
        return cls, tuple(None if f.name == "logits" else getattr(self, f.name) for f in dataclasses.fields(cls))

    return type(cls.__name__, (cls,), {"logits": property(logits), "__reduce__": reduce, "__module__": cls.__module__})
