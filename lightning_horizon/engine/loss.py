"""The head (final norm + lm_head) and the chunked causal-LM loss.

The loss never holds ``B x S x V`` logits: rows are processed ``chunk_tokens`` at a time, and only rows whose
(shifted) label is not ``-100`` are computed at all. The forward pass computes the loss value without a graph; the
backward recomputes each chunk with a graph, takes its gradients and frees it before the next chunk, accumulating the
head's weight gradients in FP32. Labels are shifted exactly as Hugging Face's ``ForCausalLMLoss`` does; the loss is
the mean over real label tokens, or the sum divided by ``num_items_in_batch`` when that is given. With
``per_sequence``, the result is instead each sequence's summed log-probability of its label tokens, ``(B,)`` FP32 (the
quantity preference losses such as DPO compare), with gradients for any upstream ``(B,)`` gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .gradients import add_rows_
from .segments import local_grads

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels of the next token at every position (``-100`` at the end), flattened."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1)


def head_logits(head: nn.Module, hidden: torch.Tensor, softcap: float | None, norm: bool = True) -> torch.Tensor:
    """Logits of ``hidden`` (before the final norm when ``norm``, else already normalised)."""
    logits = head["lm_head"](head["norm"](hidden) if norm else hidden)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


class ChunkedLoss:
    """Chunked cross-entropy over the head.

    Args:
        hidden: Last decoder layer's output, ``(B, S, H)``, before the final norm (or after it: ``norm=False``).
        labels: ``(B, S)`` token ids, ``-100`` where no loss is taken (not yet shifted).
        num_items_in_batch: Divide the summed loss by this instead of the number of label tokens.
        chunk_tokens: Rows per chunk.
        softcap: ``tanh`` soft-capping of the logits (Gemma 2), or None.
        norm: Apply the final norm to ``hidden`` chunk by chunk (fused with the loss).
        per_sequence: Return ``(B,)`` summed label-token log-probabilities instead of the mean loss
            (``num_items_in_batch`` must then be None).
    """

    def __init__(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor,
        num_items_in_batch: int | torch.Tensor | None,
        chunk_tokens: int,
        softcap: float | None,
        norm: bool = True,
        per_sequence: bool = False,
    ) -> None:
        if per_sequence and (num_items_in_batch is not None or labels.ndim != 2):
            raise ValueError("per-sequence log-probabilities need (batch, sequence) labels and no num_items_in_batch")
        target = shift_labels(labels.to(hidden.device))
        self.rows = torch.nonzero(target != IGNORE_INDEX).squeeze(1)
        self.targets = target[self.rows]
        self.num_valid = int(self.rows.numel())
        denom = num_items_in_batch if num_items_in_batch is not None else self.num_valid
        self.denom = torch.as_tensor(denom, dtype=torch.float32, device=hidden.device)
        self.shape = hidden.shape
        self.chunk_tokens = chunk_tokens
        self.softcap = softcap
        self.norm = norm
        self.per_sequence = per_sequence
        self.sequence = self.rows // labels.shape[-1] if per_sequence else None
        """Which sequence each computed row belongs to (per-sequence mode)."""

    def chunks(self):
        for part in self._parts():
            yield self.rows[part], self.targets[part]

    def forward(self, head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1])
        if self.per_sequence:
            return self._sequence_forward(head, flat)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for rows, targets in self.chunks():
            logits = head_logits(head, flat[rows], self.softcap, self.norm)
            total += F.cross_entropy(logits.float(), targets, reduction="sum")
        if self.num_valid == 0:
            return total  # no label token: zero loss and zero gradients (instead of a NaN mean)
        return total / self.denom

    def backward(
        self, head: nn.Module, params: list[nn.Parameter], hidden: torch.Tensor, grad_loss: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Gradient w.r.t. ``hidden`` and the gradients (FP32) of the head's ``params``, for upstream ``grad_loss``."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        grad_hidden = torch.zeros_like(flat)
        acc: list[torch.Tensor | None] = [None] * len(params)
        if self.per_sequence:
            self._sequence_backward(head, params, flat, grad_loss, grad_hidden, acc)
            return grad_hidden.view(self.shape), acc
        scale = grad_loss.to(torch.float32) / self.denom if self.num_valid else grad_loss.to(torch.float32)
        for rows, targets in self.chunks():
            x = flat[rows].detach().requires_grad_(True)
            with torch.enable_grad():
                logits = head_logits(head, x, self.softcap, self.norm)
                ce = F.cross_entropy(logits.float(), targets, reduction="sum")
                grad_hidden[rows], grads = local_grads(ce, scale, x, params, allow_unused=not self.norm)
            _accumulate(acc, grads)
        return grad_hidden.view(self.shape), acc

    def _parts(self):
        """Slices of the computed rows, ``chunk_tokens`` at a time."""
        for start in range(0, self.num_valid, self.chunk_tokens):
            yield slice(start, start + self.chunk_tokens)

    def _sequence_forward(self, head: nn.Module, flat: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.shape[0], dtype=torch.float32, device=flat.device)
        assert self.sequence is not None
        for part in self._parts():
            logits = head_logits(head, flat[self.rows[part]], self.softcap, self.norm)
            ce = F.cross_entropy(logits.float(), self.targets[part], reduction="none")
            add_rows_(out, self.sequence[part], -ce)
        return out

    def _sequence_backward(
        self,
        head: nn.Module,
        params: list[nn.Parameter],
        flat: torch.Tensor,
        grad_out: torch.Tensor,
        grad_hidden: torch.Tensor,
        acc: list[torch.Tensor | None],
    ) -> None:
        assert self.sequence is not None
        weight = -grad_out.to(torch.float32)  # d(log p)/d(ce) = -1, times each sequence's upstream gradient
        for part in self._parts():
            rows = self.rows[part]
            x = flat[rows].detach().requires_grad_(True)
            with torch.enable_grad():
                logits = head_logits(head, x, self.softcap, self.norm)
                ce = F.cross_entropy(logits.float(), self.targets[part], reduction="none")
                grad_hidden[rows], grads = local_grads(
                    ce, weight[self.sequence[part]], x, params, allow_unused=not self.norm
                )
            _accumulate(acc, grads)


def _accumulate(acc: list[torch.Tensor | None], grads: list[torch.Tensor | None]) -> None:
    """Adds one chunk's head gradients into the FP32 accumulators ``acc`` (in place)."""
    for i, g in enumerate(grads):
        if g is not None:
            acc[i] = g.float() if acc[i] is None else acc[i].add_(g)
