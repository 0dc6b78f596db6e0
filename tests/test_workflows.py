"""Lightning and Hugging Face workflows a fine-tuner uses, under ``strategy="horizon"`` beside ``strategy="auto"``.

Each test trains (or evaluates) the same small LightningModule both ways on the CPU in FP32 and compares losses and
weights, or checks that what is not supported stops with a message that names the reason and the alternative:
torchmetrics, PEFT/LoRA, manual optimization with two optimizers and ``zero_grad``, ``requires_grad`` changed during
training, a second Trainer on the same module, hidden states and the decoder called directly, generation,
DeepSpeedCPUAdam's native state, logits with labels, optimizers that need a closure.
"""

from __future__ import annotations

import gc
import threading

import lightning as L
import pytest
import torch

import lightning_horizon  # noqa: F401  (registers "horizon")
from lightning_horizon import HorizonEngine
from tests.helpers import EngineProbe, LMModule, clone, loader, make_batch, rel_err, tiny_model
from tests.test_strategy import NOISE_ONLY

QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


def trainer(strategy, steps=4, **kw):
    return L.Trainer(
        strategy=strategy, accelerator="cpu", devices=1, max_steps=steps, precision="32-true", **QUIET, **kw
    )


def both(make_module, steps=4, fit_kw=None, **kw):
    """Fits ``make_module()`` with horizon and with auto: ``{strategy: (module, trainer)}``."""
    out = {}
    for strategy in ("horizon", "auto"):
        module = make_module()
        t = trainer(strategy, steps, **kw)
        t.fit(module, **(fit_kw or {"train_dataloaders": loader(8)}))
        out[strategy] = module, t
    return out


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, tol: float = 1e-5) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        # (a key-projection bias has a zero true gradient: rounding noise that Adam scales up, as in test_strategy)
        assert rel_err(p, q) < (max(tol, 2e-4) if name.endswith(NOISE_ONLY) else tol), name


def horizon_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("horizon-") and t.is_alive()]


# ------------------------------------------------------------------------------------------------------ torchmetrics
def test_torchmetrics_in_the_module_work_like_auto():
    torchmetrics = pytest.importorskip("torchmetrics")

    class WithMetrics(LMModule):
        def __init__(self, model):
            super().__init__(model, total=4)
            self.mean_loss = torchmetrics.MeanMetric()
            self.collection = torchmetrics.MetricCollection({"max": torchmetrics.MaxMetric()})
            self.per_split = torch.nn.ModuleDict({"fit": torchmetrics.SumMetric()})
            self.seen: list[float] = []

        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.mean_loss.update(loss.detach())
            self.collection.update(loss.detach())
            self.per_split["fit"].update(batch["attention_mask"].sum())
            self.seen.append(float(self.mean_loss.compute()))
            return loss

    ref = tiny_model("qwen2")
    runs = both(lambda: WithMetrics(clone(ref)))
    (got, _), (want, _) = runs["horizon"], runs["auto"]
    assert got.losses == pytest.approx(want.losses, rel=1e-5)
    assert got.seen == pytest.approx(want.seen, rel=1e-5)
    assert float(got.collection.compute()["max"]) == pytest.approx(float(want.collection.compute()["max"]), rel=1e-5)
    assert float(got.per_split["fit"].compute()) == float(want.per_split["fit"].compute())
    assert_same_weights(got.model, want.model)


# ---------------------------------------------------------------------------------------------------------- PEFT
def lora(model, **kw):
    """``model`` with LoRA adapters (random, not zero, B matrices: the adapters change the output from the start)."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **{"target_modules": "all-linear", **kw})
    torch.manual_seed(1)
    return peft.get_peft_model(model, config)


def peft_family_params():
    from tests.test_families import FAMILIES

    return sorted(FAMILIES)


@pytest.mark.parametrize("family", peft_family_params())
def test_lora_every_family_matches_auto_and_trains_only_adapters(family):
    """``target_modules="all-linear"`` on every supported family: the same losses and weights as ``auto``, and only
    the LoRA tensors change (the frozen base stays bit for bit)."""
    from tests.test_families import family_model

    ref = family_model(family)
    # PEFT itself cannot wrap Llama 4's router (an nn.Linear that returns a tuple), with or without the engine
    options = dict(exclude_modules=r".*router") if family == "llama4" else {}
    runs = both(lambda: LMModule(lora(clone(ref), **options), lr=1e-2, total=3), steps=3)
    (got, _), (want, _) = runs["horizon"], runs["auto"]
    assert got.losses == pytest.approx(want.losses, rel=1e-5)
    assert_same_weights(
        got.model, want.model, tol=1e-4 if "moe" in family or family in ("mixtral", "gpt_oss") else 1e-5
    )
    start = {n: p for n, p in lora(clone(ref), **options).named_parameters()}
    changed = {n for n, p in got.model.named_parameters() if not torch.equal(p, start[n])}
    trainable = {n for n, p in got.model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable
    assert all("lora_" in n for n in trainable)


@pytest.mark.parametrize(
    "options",
    [
        dict(target_modules=["q_proj", "v_proj"]),
        dict(target_modules="all-linear", modules_to_save=["lm_head"]),
        dict(target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens"], lora_dropout=0.1),
    ],
    ids=["q_v", "all_linear_lm_head", "dropout_embed"],
)
@pytest.mark.parametrize("wrapped", ["peft_model", "inner_causal_lm"])
def test_lora_options_match_auto(options, wrapped):
    """The PeftModel passed whole or as the causal LM inside it, with ``modules_to_save`` (a trainable copy beside
    the frozen original) and LoRA dropout (recomputation replays its random masks)."""
    ref = tiny_model("qwen2")

    def make():
        peft_model = lora(clone(ref), **options)
        return LMModule(peft_model if wrapped == "peft_model" else peft_model.base_model.model, lr=1e-2, total=3)

    L.seed_everything(0)
    got, _ = both(make, steps=3)["horizon"]
    L.seed_everything(0)
    want, _ = both(make, steps=3)["auto"]
    assert got.losses == pytest.approx(want.losses, rel=1e-5)
    assert_same_weights(got.model, want.model)
    saved = options.get("modules_to_save") or []
    trainable = {n for n, p in got.model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or any(f"{m}.modules_to_save" in n for m in saved) for n in trainable)


def test_peft_adapter_switches_reach_the_streamed_layers():
    """``disable_adapter()`` on the model (the base model's output, e.g. a DPO reference) takes effect in the
    streamed layers, which are copies of the model's modules."""
    ref = lora(tiny_model("qwen2"), modules_to_save=["lm_head"])
    peft_model = clone(ref)
    engine = HorizonEngine(peft_model, device="cpu", compute_dtype="fp32")
    assert engine.model is peft_model.base_model.model  # the causal LM inside is streamed
    batch = make_batch(0)
    try:
        with torch.no_grad():
            got = peft_model(input_ids=batch["input_ids"]).logits
            with peft_model.disable_adapter():
                got_base = peft_model(input_ids=batch["input_ids"]).logits
    finally:
        engine.close()
    with torch.no_grad():
        want = ref(input_ids=batch["input_ids"]).logits
        with ref.disable_adapter():
            want_base = ref(input_ids=batch["input_ids"]).logits
    assert rel_err(got, want) < 1e-5 and rel_err(got_base, want_base) < 1e-5
    assert rel_err(want_base, want) > 1e-3  # the adapters do change the output


# ----------------------------------------------------------------------------------------- manual optimization
class TwoOptimizers(LMModule):
    """Manual optimization: AdamW on the decoder layers, SGD on embedding, final norm and head."""

    def __init__(self, model, pattern: str):
        super().__init__(model, total=4)
        self.automatic_optimization = False
        self.pattern = pattern

    def configure_optimizers(self):
        layers = [p for n, p in self.model.named_parameters() if ".layers." in n]
        rest = [p for n, p in self.model.named_parameters() if ".layers." not in n]
        return torch.optim.AdamW(layers, lr=1e-2), torch.optim.SGD(rest, lr=0.5)

    def training_step(self, batch, batch_idx):
        opt_layers, opt_rest = self.optimizers()
        loss = self.model(**batch).loss
        self.losses.append(loss.item())
        if self.pattern == "one_backward":  # one backward, both optimizers step on it
            opt_layers.zero_grad()
            opt_rest.zero_grad()
            self.manual_backward(loss)
            opt_layers.step()
            opt_rest.step()
        elif self.pattern == "alternate":  # each optimizer zero_grads, backwards its own loss and steps (a GAN)
            opt_layers.zero_grad()
            self.manual_backward(loss)
            opt_layers.step()
            opt_rest.zero_grad()  # discards the layers' loss's gradient of the other parameters
            self.manual_backward(self.model(**batch).loss * 2)
            opt_rest.step()
        elif self.pattern == "skip":  # a backward whose gradients zero_grad throws away before the next one
            self.manual_backward(loss * 3)
            opt_layers.zero_grad()
            opt_rest.zero_grad()
            self.manual_backward(self.model(**batch).loss)
            opt_layers.step()
            opt_rest.step()
        elif self.pattern == "accumulate":  # two backward passes summed, then one step (no zero_grad between)
            opt_layers.zero_grad()
            opt_rest.zero_grad()
            self.manual_backward(loss)
            self.manual_backward(self.model(**batch).loss)
            self.clip_gradients(opt_layers, gradient_clip_val=0.5)
            opt_layers.step()
            opt_rest.step()
        return loss


@pytest.mark.parametrize("pattern", ["one_backward", "alternate", "skip", "accumulate"])
def test_manual_optimization_with_two_optimizers_matches_auto(pattern):
    ref = tiny_model("llama", tied=False)
    runs = both(lambda: TwoOptimizers(clone(ref), pattern))
    (got, _), (want, _) = runs["horizon"], runs["auto"]
    assert got.losses == pytest.approx(want.losses, rel=1e-5)
    assert_same_weights(got.model, want.model)
    start = dict(ref.named_parameters())
    for name, p in got.model.named_parameters():  # both optimizers trained their parameters
        assert not torch.equal(p, start[name]), name


class Toggled(TwoOptimizers):
    """``toggle_optimizer``: the other optimizer's parameters are frozen (``requires_grad=False``) while one runs."""

    def training_step(self, batch, batch_idx):
        for opt in self.optimizers():
            self.toggle_optimizer(opt)
            loss = self.model(**batch).loss
            self.losses.append(loss.item())
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
            self.untoggle_optimizer(opt)


def test_requires_grad_changed_during_training_matches_auto():
    ref = tiny_model("qwen2")
    runs = both(lambda: Toggled(clone(ref), "toggle"))
    (got, _), (want, _) = runs["horizon"], runs["auto"]
    assert got.losses == pytest.approx(want.losses, rel=1e-5)
    assert_same_weights(got.model, want.model)


def test_a_parameter_in_two_optimizers_is_refused():
    class Shared(TwoOptimizers):
        def configure_optimizers(self):
            params = list(self.model.parameters())
            return torch.optim.AdamW(params, lr=1e-2), torch.optim.SGD(params[:1], lr=0.5)

    with pytest.raises(ValueError, match="in two optimizers"):
        trainer("horizon").fit(Shared(tiny_model(), "one_backward"), loader(4))


def test_optimizer_needing_a_closure_is_refused_up_front():
    class WithLBFGS(LMModule):
        def configure_optimizers(self):
            return torch.optim.LBFGS(self.model.parameters(), lr=0.1)

    with pytest.raises(ValueError, match="closure"):
        trainer("horizon").fit(WithLBFGS(tiny_model()), loader(4))


# ------------------------------------------------------------------------------------- engine lifetime, Trainers
def test_a_second_trainer_on_the_same_module_works_like_auto():
    """fit with one Trainer, then test, validate and fit again with new Trainers: each builds a fresh engine, the
    previous one is closed (no worker threads left, the model's own forward methods back)."""
    ref = tiny_model("qwen2")
    results = {}
    for strategy in ("horizon", "auto"):
        module = LMModule(clone(ref), total=4)
        trainer(strategy).fit(module, loader(8))
        if strategy == "horizon":
            assert not horizon_threads()
            assert all("forward" not in m.__dict__ for m in module.model.modules())
        test = trainer(strategy).test(module, loader(4), verbose=False)[0]["test_loss"]
        val = trainer(strategy).validate(module, loader(4), verbose=False)[0]["val_loss"]
        trainer(strategy, steps=3).fit(module, loader(8))
        results[strategy] = (test, val, module)
    assert results["horizon"][0] == pytest.approx(results["auto"][0], rel=1e-5)
    assert results["horizon"][1] == pytest.approx(results["auto"][1], rel=1e-5)
    assert_same_weights(results["horizon"][2].model, results["auto"][2].model)
    assert not horizon_threads()


def test_a_model_still_streamed_by_an_open_engine_is_refused():
    model = tiny_model()
    engine = HorizonEngine(model, device="cpu", compute_dtype="fp32")
    try:
        with pytest.raises(ValueError, match="not closed"):
            HorizonEngine(model, device="cpu", compute_dtype="fp32")
    finally:
        engine.close()
    HorizonEngine(model, device="cpu", compute_dtype="fp32").close()  # closed: a new one adopts the store


def test_failed_fit_closes_the_engine():
    class Broken(LMModule):
        def training_step(self, batch, batch_idx):
            raise RuntimeError("user error in training_step")

    module = Broken(tiny_model())
    with pytest.raises(RuntimeError, match="user error"):
        trainer("horizon").fit(module, loader(4))
    assert not horizon_threads()
    trainer("horizon", steps=2).fit(LMModule(module.model, total=2), loader(4))  # the model is usable again


# --------------------------------------------------------------------------------- hidden states, the decoder
def hidden_loss(model, batch, mode: str):
    """A loss that reads hidden states (as a value head or a feature loss would), beside or instead of the LM loss."""
    if mode == "output_hidden_states":
        out = model(**batch, output_hidden_states=True)
        hs = out.hidden_states
        return out.loss + hs[-1].pow(2).mean() + 0.5 * hs[1].mean() + 0.1 * hs[0].pow(2).mean(), out
    out = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.last_hidden_state.pow(2).mean(), out


@pytest.mark.parametrize("mode", ["output_hidden_states", "decoder"])
@pytest.mark.parametrize("tied", [False, True])
def test_hidden_states_and_the_decoder_match_hugging_face(mode, tied):
    """Hidden states (the last one after the final norm) equal Hugging Face's, and gradients flow back through
    them to every parameter (norm included) exactly as in one autograd graph."""
    ref = tiny_model("qwen2", tied=tied)
    batch = make_batch(3)
    want_loss, want_out = hidden_loss(ref, batch, mode)
    want_loss.backward()
    model = clone(ref)
    model.zero_grad()
    engine = HorizonEngine(model, device="cpu", compute_dtype="fp32", checkpoint_every=2)
    try:
        got_loss, got_out = hidden_loss(model, batch, mode)
        if mode == "output_hidden_states":
            assert len(got_out.hidden_states) == len(want_out.hidden_states) == 4
            for a, b in zip(got_out.hidden_states, want_out.hidden_states):
                assert rel_err(a, b) < 1e-5
        else:
            assert rel_err(got_out.last_hidden_state, want_out.last_hidden_state) < 1e-5
            assert got_out.past_key_values is None
        assert got_loss.item() == pytest.approx(want_loss.item(), rel=1e-5)
        got_loss.backward()
        engine.finish_backward()
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            if q.grad is None:
                assert engine.gradient(p) is None or not engine.gradient(p).any(), name
            else:
                assert rel_err(engine.gradient(p), q.grad) < 1e-5, name
    finally:
        engine.close()


class DecoderLoss(LMModule):
    """Trains through the decoder's ``last_hidden_state`` (after the final norm) plus the LM loss."""

    def training_step(self, batch, batch_idx):
        loss, _ = hidden_loss(self.model, batch, "output_hidden_states")
        hidden = self.model.model(input_ids=batch["input_ids"]).last_hidden_state
        loss = loss + 0.1 * hidden.pow(2).mean()
        self.losses.append(loss.item())
        return loss


@pytest.mark.parametrize("clip", [None, 1.0])
def test_training_through_hidden_states_matches_auto(clip):
    """Two forward passes feed one loss: without clipping, the updates must wait for the end of the whole backward
    (a layer's gradient has a part from each pass) instead of overlapping it."""
    ref = tiny_model("llama")
    runs = both(lambda: DecoderLoss(clone(ref), total=4), gradient_clip_val=clip)
    (got, _), (want, _) = runs["horizon"], runs["auto"]
    assert got.losses == pytest.approx(want.losses, rel=1e-5)
    # The two passes' gradients are summed in another order than autograd's (equal to ~1e-7, see the test above);
    # AdamW turns last-bit differences of near-zero gradients into lr-sized steps, so weights get a looser bound.
    assert_same_weights(got.model, want.model, tol=2e-4)


def test_attention_weights_and_a_training_kv_cache_are_refused():
    engine = HorizonEngine(tiny_model(), device="cpu", compute_dtype="fp32")
    batch = make_batch(0)
    try:
        with pytest.raises(ValueError, match="output_attentions"):
            engine.model(**batch, output_attentions=True)
        with pytest.raises(ValueError, match="without a KV cache"):
            engine.model.model(input_ids=batch["input_ids"], use_cache=True)
    finally:
        engine.close()


def test_generate_matches_hugging_face():
    """``model.generate`` streams the layers with a KV cache (no gradients): the same tokens as Hugging Face."""
    ref = tiny_model("qwen2")
    prompt = make_batch(5, batch=2, seq=6, pad=False)["input_ids"]
    want = ref.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    model = clone(ref)
    engine = HorizonEngine(model, device="cpu", compute_dtype="fp32")
    try:
        got = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
        uncached = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0, use_cache=False)
    finally:
        engine.close()
    assert torch.equal(got, want) and torch.equal(uncached, want)


# ------------------------------------------------------------------------------------------------ logits, errors
def test_logits_with_labels_name_the_reason_and_the_alternative():
    engine = HorizonEngine(tiny_model(), device="cpu", compute_dtype="fp32")
    batch = make_batch(0)
    try:
        out = engine.model(**batch)
        with pytest.raises(AttributeError, match="call the model without labels"):
            out.logits.argmax(-1)
        assert out.loss is not None and "logits" not in out.keys()
        plain = engine.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss = engine.model.loss_function(logits=plain.logits, labels=batch["labels"], vocab_size=128)
        assert loss.item() == pytest.approx(out.loss.item(), rel=1e-5)
        as_tuple = engine.model(**batch, return_dict=False)
        assert as_tuple[0].item() == pytest.approx(out.loss.item(), rel=1e-6)
    finally:
        engine.close()


# --------------------------------------------------------------------------------- optimizers with native state
class NativeStateOptimizer(torch.optim.SGD):
    """Like DeepSpeedCPUAdam: native state keyed by an id, freed in ``__del__`` (here: a registry entry)."""

    registry: dict[int, bool] = {}

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.opt_id = len(NativeStateOptimizer.registry)
        NativeStateOptimizer.registry[self.opt_id] = True

    def step(self, closure=None):
        if not NativeStateOptimizer.registry.get(self.opt_id):
            raise RuntimeError(f"native state {self.opt_id} was freed while the optimizer is in use")
        return super().step(closure)

    def __del__(self):
        NativeStateOptimizer.registry[self.opt_id] = False


def test_lightning_wrappers_never_free_an_optimizers_native_state():
    class Native(LMModule):
        def configure_optimizers(self):
            return NativeStateOptimizer(self.model.parameters(), lr=0.1)

    class Rewrap(L.Callback):
        def on_train_batch_start(self, trainer, *args):  # what a second setup or a pickled strategy does
            trainer.strategy.optimizers = trainer.strategy.optimizers
            gc.collect()

    module = Native(tiny_model(), total=3)
    t = trainer("horizon", steps=3, callbacks=[Rewrap()])
    t.fit(module, loader(8))
    assert all(NativeStateOptimizer.registry.values())


def test_deepspeed_cpu_adam_trains_like_torch_adamw():
    adam = pytest.importorskip("deepspeed.ops.adam")

    class WithDeepSpeed(LMModule):
        def configure_optimizers(self):
            return adam.DeepSpeedCPUAdam(self.model.parameters(), lr=1e-2, weight_decay=0.0, adamw_mode=True)

    class WithTorch(LMModule):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.model.parameters(), lr=1e-2, weight_decay=0.0)

    ref = tiny_model()
    got, want = WithDeepSpeed(clone(ref), total=3), WithTorch(clone(ref), total=3)
    trainer("horizon", steps=3).fit(got, loader(8))
    trainer("horizon", steps=3).fit(want, loader(8))
    assert got.losses == pytest.approx(want.losses, rel=1e-4)
    assert_same_weights(got.model, want.model, tol=1e-4)


def test_engine_probe_sees_the_closed_engine():
    probe = EngineProbe()
    trainer("horizon", steps=1, callbacks=[probe]).fit(LMModule(tiny_model(), total=1), loader(2))
    assert probe.engine is not None and probe.engine._closed


def test_hooks_that_read_gradients_see_param_grad_in_bf16():
    """With BF16 compute the engine keeps gradients in BF16 on the host unless something reads ``param.grad``: a
    hook that does (gradient-norm logging) gets FP32 gradients there, as under ``auto``."""
    from lightning.pytorch.utilities import grad_norm

    class Logged(LMModule):
        norms: list[dict] = []

        def on_before_optimizer_step(self, optimizer):
            self.norms.append(grad_norm(self.model, norm_type=2))

    module = Logged(tiny_model(), total=2)
    L.Trainer(strategy="horizon", accelerator="cpu", devices=1, max_steps=2, precision="bf16-mixed", **QUIET).fit(
        module, loader(4)
    )
    trainable = sum(1 for p in module.model.parameters() if p.requires_grad)
    assert len(module.norms) == 2
    for norms in module.norms:
        assert len(norms) == trainable + 1  # one per parameter, and the total
        assert all(torch.isfinite(torch.as_tensor(v)) and v > 0 for v in norms.values())


def test_hooks_inside_decoder_layers_are_warned_about_and_hooks_on_layers_fire():
    model = tiny_model()
    seen = []
    model.model.layers[1].register_forward_hook(lambda m, a, out: seen.append("layer"))
    model.model.layers[0].mlp.register_forward_hook(lambda m, a, out: seen.append("mlp"))
    with pytest.warns(UserWarning, match="will not fire"):
        engine = HorizonEngine(model, device="cpu", compute_dtype="fp32")
    try:
        model(**make_batch(0)).loss.backward()
    finally:
        engine.close()
    assert seen == ["layer"]


class Saved(LMModule):
    """A module that saves its hyper-parameters, as ``load_from_checkpoint`` needs."""

    def __init__(self, layers: int = 3, lr: float = 1e-2):
        super().__init__(tiny_model(layers=layers), lr=lr, total=2)
        self.save_hyperparameters()


def test_a_checkpoint_directory_loads_into_a_new_module(tmp_path):
    """``torch.load`` (and so Lightning's own ``load_from_checkpoint``) cannot open a checkpoint directory:
    ``lightning_horizon.load_from_checkpoint`` (and ``SFTModule.load_from_checkpoint``) build the module from it."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_horizon.lightning_module import SFTModule

    module = Saved(layers=2, lr=3e-3)
    saver = ModelCheckpoint(dirpath=tmp_path, filename="last")
    L.Trainer(
        strategy="horizon", accelerator="cpu", devices=1, max_steps=2, precision="32-true", logger=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[saver],
    ).fit(module, loader(4))  # fmt: skip
    path = tmp_path / "last.ckpt"
    with pytest.raises(IsADirectoryError):
        Saved.load_from_checkpoint(path)
    loaded = lightning_horizon.load_from_checkpoint(Saved, path)
    assert loaded.hparams.layers == 2 and loaded.lr == 3e-3
    want = module.state_dict()
    assert loaded.state_dict().keys() == want.keys()
    assert all(torch.equal(loaded.state_dict()[k], want[k]) for k in want)
    sft = SFTModule.load_from_checkpoint(path, model=tiny_model(layers=2))
    assert torch.equal(sft.model.lm_head.weight, module.model.lm_head.weight)
