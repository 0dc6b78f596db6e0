"""Preference learning: per-sequence log-probabilities, the DPO family of losses and ``DPOModule``; reward models
(Bradley-Terry) and ``RewardModule``.

DPO (Rafailov et al., 2023) trains a policy on pairs of replies to one prompt, the ``chosen`` one preferred to the
``rejected`` one, against a frozen reference model (the policy before training). With ``pi`` and ``ref`` the summed
log-probabilities of a reply under the policy and the reference, each pair's margin is
``h = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)`` and the losses are:

- ``sigmoid`` (DPO): ``-log sigmoid(beta * h)``;
- ``ipo`` (Azar et al., 2023): ``(h - 1 / (2 beta))^2`` on log-probabilities averaged over each reply's tokens;
- ``sigmoid_norm`` (length-normalised DPO): the sigmoid loss on averaged log-probabilities.

The implicit rewards are ``beta * (pi - ref)`` of the same (summed or averaged) log-probabilities.

**Reference log-probabilities are computed once, before the first step, and cached per pair** (``reference_logps``,
saved in checkpoints): a no-grad forward pass over the training (and validation) pairs, with the policy as it is
when training starts. It costs one forward pass per pair once, and no memory beyond two numbers per pair; a reference
model kept beside the policy would cost the same forward pass at every step of every epoch and its weights again in
host memory. Under the horizon strategy both passes stream the same layers.

:func:`sequence_logprobs` computes the summed log-probabilities: under the horizon strategy through the engine's
chunked head (never the ``B x S x V`` logits; gradients for each sequence), otherwise from the model's logits.

A reward model is a ``...ForSequenceClassification`` with one label (the engine streams its decoder and its score
head); :class:`RewardModule` trains it on the same pairs with the Bradley-Terry loss
``-log sigmoid(r_chosen - r_rejected)``, each reply's reward read at its last token.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from typing_extensions import override

from lightning_horizon.data.encode import IGNORE_INDEX
from lightning_horizon.engine.hooks import streaming_patch
from lightning_horizon.engine.loss import shift_labels
from lightning_horizon.lightning_module import OptimConfig, SFTModule

log = logging.getLogger(__name__)
LOSSES = ("sigmoid", "ipo", "sigmoid_norm")
_AVERAGED = ("ipo", "sigmoid_norm")


@dataclass
class DPOSettings:
    """The preference loss (the DPO recipe's ``dpo:`` group; the YAML keys are these field names)."""

    beta: float = 0.1
    """Strength of the pull towards the reference: the inverse temperature of the implicit reward."""
    loss: str = "sigmoid"
    """``sigmoid`` (DPO), ``ipo`` or ``sigmoid_norm`` (DPO on per-token averaged log-probabilities)."""
    label_smoothing: float = 0.0
    """``sigmoid`` / ``sigmoid_norm`` only: the probability that a pair's label is flipped (conservative DPO)."""

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"dpo.loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if not (isinstance(self.beta, int | float) and math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"dpo.beta must be a positive number, got {self.beta!r}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing!r}")
        if self.label_smoothing and self.loss == "ipo":
            raise ValueError("dpo.label_smoothing applies to the sigmoid losses, not to dpo.loss=ipo")


@dataclass
class RewardSettings:
    """The reward-model loss (the reward recipe's ``reward:`` group; the YAML keys are these field names)."""

    margin: float = 0.0
    """Subtracted from each pair's reward difference inside the Bradley-Terry loss (0 = plain Bradley-Terry)."""

    def __post_init__(self) -> None:
        if isinstance(self.margin, bool) or not isinstance(self.margin, int | float) or not math.isfinite(self.margin):
            raise ValueError(f"reward.margin must be a finite number, got {self.margin!r}")


def label_token_counts(labels: torch.Tensor) -> torch.Tensor:
    """Tokens each row of ``labels`` scores (its shifted labels that are not ``-100``), ``(B,)``."""
    return (shift_labels(labels).view(labels.shape) != IGNORE_INDEX).sum(-1)


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's summed log-probability of its label tokens, ``(B,)`` FP32 (labels shifted as Hugging Face does)."""
    target = shift_labels(labels).view(labels.shape).to(logits.device)
    valid = target != IGNORE_INDEX
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * valid).sum(-1)


def sequence_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed log-probability of each row's label tokens under ``model`` (a causal LM or a PEFT wrapper of one),
    ``(B,)`` FP32, differentiable.

    Streamed by the horizon engine, the head computes it in chunks of rows (no ``B x S x V`` logits in memory);
    otherwise it comes from the model's logits. MoE routers' auxiliary loss is not part of it.
    """
    patch = streaming_patch(model)
    if patch is not None:
        return patch.sequence_logprobs(input_ids, labels, attention_mask, position_ids)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return logprobs_from_logits(out.logits, labels)


def dpo_loss(
    policy: torch.Tensor, reference: torch.Tensor, counts: torch.Tensor, settings: DPOSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the implicit rewards of the chosen and rejected replies.

    Args:
        policy: ``(2B,)`` summed log-probabilities under the policy, the chosen replies first.
        reference: ``(2B,)`` the same under the reference.
        counts: ``(2B,)`` scored tokens of each reply (the averaged losses divide by them).
        settings: Which loss, ``beta``, label smoothing.
    """
    policy, reference = policy.float(), reference.to(policy.device, torch.float32)
    if settings.loss in _AVERAGED:
        counts = counts.to(policy.device).clamp(min=1)
        policy, reference = policy / counts, reference / counts
    ratios = policy - reference
    chosen, rejected = ratios.chunk(2)
    margin = chosen - rejected
    beta = settings.beta
    if settings.loss == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    else:
        eps = settings.label_smoothing
        losses = -(1 - eps) * F.logsigmoid(beta * margin) - eps * F.logsigmoid(-beta * margin)
    return losses, beta * chosen.detach(), beta * rejected.detach()


class _PairModule(SFTModule):
    """Training and validation steps on batches of preference pairs: ``_step(batch, split)`` gives the loss."""

    def _step(self, batch: dict[str, torch.Tensor], split: str) -> torch.Tensor:
        raise NotImplementedError

    def _log_metrics(self, split: str, metrics: dict[str, torch.Tensor], pairs: int) -> None:
        """Logs ``split/name`` for each metric (averaged over pairs); the loss and the accuracy in the progress bar."""
        for name, value in metrics.items():
            self.log(
                f"{split}/{name}", value, prog_bar=name in ("loss", "accuracy", "reward_accuracy"), batch_size=pairs
            )

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._step(batch, "train")
        self._log_throughput()
        return loss

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")


class DPOModule(_PairModule):
    """Direct preference optimisation of a Hugging Face causal LM on batches of
    :class:`~lightning_horizon.data.preference.PreferenceDataModule` (see the module docstring).

    Logs ``train/loss``, ``train/reward_accuracy`` (share of pairs whose chosen reward is the larger),
    ``train/reward_margin``, ``train/rewards_chosen``, ``train/rewards_rejected``, ``train/logps_chosen``,
    ``train/logps_rejected`` and ``train/tokens_per_s`` (the same under ``val/`` for validation).

    Reference log-probabilities: a batch may carry its own (``reference_logps``, ``(2B,)``); otherwise they are taken
    from :attr:`reference_logps`, which ``on_fit_start`` (and ``on_validation_start``) fill from the datamodule's
    ``reference_dataloaders()`` when empty.

    Args:
        model: A ``...ForCausalLM`` (or a PEFT model), the policy; the reference is the policy at the start.
        settings: The loss.
        optim: Optimizer and schedule settings.
        max_steps: Optimizer steps of the run: where the cosine schedule ends.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        settings: DPOSettings | None = None,
        optim: OptimConfig | None = None,
        max_steps: int = 1000,
    ) -> None:
        super().__init__(model, optim, max_steps)
        self.settings = settings if settings is not None else DPOSettings()
        self.reference_logps: dict[str, torch.Tensor] = {}
        """Per split (``train``, ``val``): ``(pairs, 2)`` FP32 reference log-probabilities (chosen, rejected)."""

    # ------------------------------------------------------------------------------------ reference log-probs
    @override
    def on_fit_start(self) -> None:
        self._fill_reference(("train", "val"))

    @override
    def on_validation_start(self) -> None:
        self._fill_reference(("val",))

    def _fill_reference(self, splits: tuple[str, ...]) -> None:
        missing = [s for s in splits if s not in self.reference_logps]
        if not missing:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "reference_dataloaders"):
            raise ValueError(
                "DPOModule needs reference log-probabilities: train with a PreferenceDataModule (its "
                "reference_dataloaders() are scored once before training), or put them in each batch as "
                "'reference_logps' (2B values, chosen first)"
            )
        loaders = datamodule.reference_dataloaders()
        for split in missing:
            if split in loaders:
                start = time.perf_counter()
                self.reference_logps[split] = self.score_pairs(loaders[split])
                log.info(
                    "reference log-probabilities of %d %s pairs computed in %.1f s",
                    len(self.reference_logps[split]),
                    split,
                    time.perf_counter() - start,
                )

    @torch.no_grad()
    def score_pairs(self, loader: Any) -> torch.Tensor:
        """``(pairs, 2)`` summed log-probabilities (chosen, rejected) of every pair ``loader`` yields, under the
        model as it is now (in eval mode: no dropout), indexed by each batch's ``index``."""
        rows: dict[int, torch.Tensor] = {}
        was_training = self.model.training
        self.model.eval()
        try:
            for batch in loader:
                batch = self.trainer.strategy.batch_to_device(batch)
                with self.trainer.precision_plugin.forward_context():
                    logps = self._policy_logps(batch).float().cpu()
                chosen, rejected = logps.chunk(2)
                for i, index in enumerate(batch["index"].tolist()):
                    rows[index] = torch.stack((chosen[i], rejected[i]))
        finally:
            self.model.train(was_training)
        if sorted(rows) != list(range(len(rows))):
            raise ValueError("the reference dataloader must yield every pair index 0..N-1 exactly once")
        return torch.stack([rows[i] for i in range(len(rows))])

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["dpo_reference_logps"] = {k: v.clone() for k, v in self.reference_logps.items()}

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("dpo_reference_logps")
        if saved is None:
            raise ValueError(
                "this checkpoint has no DPO reference log-probabilities (it was not written by DPOModule); resuming "
                "DPO from it would score against the resumed policy instead of the original reference"
            )
        self.reference_logps = {k: v.float() for k, v in saved.items()}

    # ------------------------------------------------------------------------------------------------ steps
    def _policy_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return sequence_logprobs(
            self.model, batch["input_ids"], batch["labels"], batch.get("attention_mask"), batch.get("position_ids")
        )

    def _reference(self, batch: dict[str, torch.Tensor], split: str) -> torch.Tensor:
        if "reference_logps" in batch:
            return batch["reference_logps"]
        table = self.reference_logps.get(split)
        if table is None:
            raise ValueError(f"no reference log-probabilities for the {split} pairs (see DPOModule's docstring)")
        pairs = table[batch["index"].cpu()]
        return torch.cat((pairs[:, 0], pairs[:, 1]))

    def _step(self, batch: dict[str, torch.Tensor], split: str) -> torch.Tensor:
        policy = self._policy_logps(batch)
        counts = label_token_counts(batch["labels"])
        losses, chosen, rejected = dpo_loss(policy, self._reference(batch, split), counts, self.settings)
        loss = losses.mean()
        logps_chosen, logps_rejected = policy.detach().chunk(2)
        metrics = {
            "loss": loss,
            "reward_accuracy": (chosen > rejected).float().mean(),
            "reward_margin": (chosen - rejected).mean(),
            "rewards_chosen": chosen.mean(),
            "rewards_rejected": rejected.mean(),
            "logps_chosen": logps_chosen.mean(),
            "logps_rejected": logps_rejected.mean(),
        }
        self._log_metrics(split, metrics, len(chosen))
        return loss


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Per-pair ``-log sigmoid(r_chosen - r_rejected - margin)``: the Bradley-Terry likelihood of the preference."""
    return -F.logsigmoid(chosen.float() - rejected.float() - margin)


def last_token_scores(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A ``...ForSequenceClassification`` model's score at each row's last attended token, ``(B, num_labels)``.

    The decoder and the score head run as in the model's own ``forward`` (``model.model`` then ``model.score``,
    streamed under the horizon strategy); the row's end comes from ``attention_mask`` (any padding side), not from
    ``config.pad_token_id``.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model's classifier
    hidden = inner.model(
        input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), position_ids=batch.get("position_ids")
    ).last_hidden_state
    scores = inner.score(hidden)
    mask = batch.get("attention_mask")
    seq = scores.shape[1]
    if mask is None:
        last = torch.full((scores.shape[0],), seq - 1, device=scores.device)
    else:
        positions = torch.arange(seq, device=scores.device)
        last = (positions * mask.to(scores.device)).argmax(-1)
    return scores[torch.arange(scores.shape[0], device=scores.device), last]


class RewardModule(_PairModule):
    """A reward model trained on preference pairs with the Bradley-Terry loss (batches of
    :class:`~lightning_horizon.data.preference.PreferenceDataModule`).

    The model is a ``...ForSequenceClassification`` with one label; each reply's reward is its score at the reply's
    last token. Logs ``train/loss``, ``train/accuracy`` (pairs whose chosen reward is the larger), ``train/margin``,
    ``train/rewards_chosen``, ``train/rewards_rejected`` and ``train/tokens_per_s`` (``val/...`` likewise).

    Args:
        model: A ``...ForSequenceClassification`` with ``num_labels=1`` (or a PEFT model whose score head trains).
        optim: Optimizer and schedule settings.
        max_steps: Optimizer steps of the run: where the cosine schedule ends.
        margin: Subtracted from each pair's reward difference inside the loss (0 = plain Bradley-Terry).
    """

    def __init__(
        self, model: torch.nn.Module, optim: OptimConfig | None = None, max_steps: int = 1000, margin: float = 0.0
    ) -> None:
        score = getattr(model, "score", None)
        if not isinstance(score, torch.nn.Module) or getattr(model.config, "num_labels", None) != 1:
            raise ValueError(
                f"RewardModule trains a ...ForSequenceClassification with num_labels=1 (a score head); got "
                f"{type(model).__name__} with num_labels={getattr(getattr(model, 'config', None), 'num_labels', None)}"
            )
        if not any(p.requires_grad for p in score.parameters()):
            raise ValueError(
                "the reward model's score head is frozen (with LoRA, list it in modules_to_save): it would stay at "
                "its random initialisation"
            )
        super().__init__(model, optim, max_steps)
        self.margin = margin

    def _step(self, batch: dict[str, torch.Tensor], split: str) -> torch.Tensor:
        rewards = last_token_scores(self.model, batch).squeeze(-1).float()
        chosen, rejected = rewards.chunk(2)
        loss = bradley_terry_loss(chosen, rejected, self.margin).mean()
        chosen, rejected = chosen.detach(), rejected.detach()
        metrics = {
            "loss": loss,
            "accuracy": (chosen > rejected).float().mean(),
            "margin": (chosen - rejected).mean(),
            "rewards_chosen": chosen.mean(),
            "rewards_rejected": rejected.mean(),
        }
        self._log_metrics(split, metrics, len(chosen))
        return loss
