"""A plain LightningModule, as a user writes it, timed under ``Trainer(strategy="horizon")`` with default arguments.

The Hugging Face model is built in ``configure_model`` (``AutoModelForCausalLM.from_config``, Hugging Face's own
initialisation), the optimizer is ``torch.optim.AdamW`` from ``configure_optimizers``, the strategy is the string
``"horizon"``: nothing of the recipe's tuning. Metrics as in ``recipes.bench`` (design.md: real tokens, optimizer
included, median step after warm-up, host bytes/param = peak RSS / N)::

    python benchmarks/plain_module.py --model qwen2_3b --batch 8 --seq 1024 --steps 8 --out plain.json

``--dpo`` trains DPO instead (sigmoid loss, beta 0.1) with ``lightning_horizon.preference.sequence_logprobs``: each
batch is ``--batch`` pairs, ``2 x --batch`` rows (chosen rows, then rejected), the first half of every row the prompt
(no label) and the rejected reply the chosen one reversed; the reference log-probabilities come with the batch (computed once before training in real runs, so not
part of the step). Tokens per step count every real token of both rows: ``--dpo --batch 4`` has the tokens of SFT's
``--batch 8``.

``--lora RANK`` builds the model in BF16 and wraps it with PEFT's LoRA on every linear layer (only the adapters train).
``--fast-init`` draws the same initial distributions as Hugging Face's initialisation of these models (linear and
embedding weights normal(0, initializer_range), biases zero, norms one) on all cores, one generator per thread:
Hugging Face draws them serially from one generator (~60-100 M params/s, over five minutes for the Qwen2.5-32B shape
before the first step). It changes nothing the run measures, only how long the process takes to reach the first step.
Progress goes to stderr as it happens (``plain: <seconds since start> s, rss <GiB>: <event>``, and one line per
step); ``--stack-dump-after S`` also dumps every thread's stack to stderr every S seconds (where a slow run is).
``--state-dtype`` and ``--strategy key=value`` pass settings to ``HorizonStrategy`` (the only departure from the
default strategy); ``--clip`` sets ``Trainer(gradient_clip_val=...)``. Besides speed and memory it reports the bytes
that crossed PCIe per step (the engine's counters) and the host-memory bytes moved per step: the optimizer's
per-parameter traffic (its kernel's reads and writes of gradient, master, moments and weight copy) times N, plus the
PCIe bytes (each read or written once on the host), plus the FP32 -> BF16 packing of uploads when there is no
weight copy (4 bytes read, 2 written per uploaded element).

``--devices N`` runs N processes (Lightning's launcher, one GPU each; data parallel, ``--batch`` rows per process):
the processes other than local rank 0 build their model on the meta device (what the README advises), tokens per
step count every process's rows, and rank 0 alone prints and writes the result, with its own engine counters and
peak RSS (which counts the node's shared store in full: the node's host memory is measured by
``benchmarks/dp_host_memory.py``, so ``host_bytes_per_param`` is left out). With ``--strategy
sharded_streaming=true grad_reduce=device`` the node's collectives run on the GPUs.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lightning as L
import torch
import yaml
from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

import lightning_horizon  # noqa: F401  (registers strategy="horizon")
from lightning_horizon import HorizonStrategy
from lightning_horizon.benchmark import RssSampler, SyntheticTokens, current_rss_bytes
from lightning_horizon.engine.config import STATE_DTYPES
from lightning_horizon.engine.footprint import adamw_traffic_bytes
from lightning_horizon.models import ModelConfig, build_hf_config
from lightning_horizon.preference import DPOSettings, dpo_loss, label_token_counts, sequence_logprobs

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
START = time.perf_counter()


def progress(event: str) -> None:
    """One line on stderr, flushed: seconds since the start, resident memory (and what it is made of), the event."""
    elapsed, rss = time.perf_counter() - START, current_rss_bytes() / 2**30
    print(f"plain: {elapsed:.1f} s, rss {rss:.1f} GiB{memory_detail()}: {event}", file=sys.stderr, flush=True)


def largest_mappings(count: int = 6) -> str:
    """The named memory mappings (files, shared memory) with the most resident memory, from ``/proc/self/smaps``."""
    sizes: dict[str, int] = {}
    name = None
    try:
        for line in Path("/proc/self/smaps").read_text().splitlines():
            fields = line.split()
            if fields and "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
                name = fields[5] if len(fields) > 5 else None
            elif name and fields and fields[0] == "Rss:":
                sizes[name] = sizes.get(name, 0) + int(fields[1])
    except (OSError, ValueError, IndexError):
        return "unreadable"
    top = sorted(sizes.items(), key=lambda kv: -kv[1])[:count]
    return ", ".join(f"{path} {kib / 2**10:.0f} MiB" for path, kib in top)


def memory_detail() -> str:
    """Where the resident memory is (Linux, glibc): anonymous, file-backed (libraries) and shared pages, and the
    freed heap memory that the C allocator holds without giving it back (``mallinfo2().fordblks``)."""
    parts = []
    try:
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        for key in ("RssAnon", "RssFile", "RssShmem"):
            parts.append(f"{key[3:].lower()} {int(status[key].split()[0]) / 2**20:.1f}")
    except (OSError, KeyError, ValueError):
        return ""
    try:
        import ctypes

        class MallInfo2(ctypes.Structure):
            _fields_ = [
                (name, ctypes.c_size_t)
                for name in (
                    "arena",
                    "ordblks",
                    "smblks",
                    "hblks",
                    "hblkhd",
                    "usmblks",
                    "fsmblks",
                    "uordblks",
                    "fordblks",
                    "keepcost",
                )
            ]

        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
        info = libc.mallinfo2()
        parts.append(f"heap {info.arena / 2**30:.2f} (free {info.fordblks / 2**30:.2f}) mmap {info.hblkhd / 2**30:.1f}")
    except (OSError, AttributeError):
        pass
    return " (" + ", ".join(parts) + ")"


class Plain(L.LightningModule):
    def __init__(self, config, lora_rank: int = 0, fast_init: bool = False, dpo: bool = False) -> None:
        super().__init__()
        self.config = config
        self.lora_rank = lora_rank
        self.fast_init = fast_init
        self.dpo = dpo
        self.model = None
        self.losses: list[float] = []

    def configure_model(self) -> None:
        progress("configure_model: building the model" + (" (--fast-init)" if self.fast_init else ""))
        start = time.perf_counter()
        self._build()
        print(f"model built in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)

    def _build(self) -> None:
        if self.model is None and self.trainer.local_rank > 0:  # one model per node: the store is the node's
            with torch.device("meta"):
                self.model = AutoModelForCausalLM.from_config(self.config, dtype=torch.float32)
            if self.lora_rank:
                raise SystemExit("--lora with --devices > 1 is not timed by this script")
        elif self.model is None and not self.lora_rank:
            self.model = self._from_config(torch.float32)
        elif self.model is None:  # LoRA as users write it: the base in BF16, PEFT's adapters (FP32) on every linear
            import peft

            base = self._from_config(torch.bfloat16)
            lora = peft.LoraConfig(r=self.lora_rank, lora_alpha=2 * self.lora_rank, target_modules="all-linear")
            self.model = peft.get_peft_model(base, lora)

    def _from_config(self, dtype: torch.dtype):
        if not self.fast_init:
            return AutoModelForCausalLM.from_config(self.config, dtype=dtype)
        try:
            from transformers.initialization import no_init_weights
        except ImportError:  # before transformers 5
            from transformers.modeling_utils import no_init_weights

        with no_init_weights():  # allocated, not drawn: drawn below, in parallel
            model = AutoModelForCausalLM.from_config(self.config, dtype=dtype)
        # transformers 5 leaves tied weights untied under no_init_weights (checked with 5.17 and 5.25): tie them as
        # from_config does, or a tied model (Qwen2.5-3B) trains a separate lm_head (3.40 B parameters, not 3.09 B)
        model.tie_weights()
        progress("model allocated (no initialisation yet)")
        std = self.config.initializer_range
        work = []
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                work.append((module.weight, std))
                if getattr(module, "bias", None) is not None:
                    work.append((module.bias, 0.0))
        seen, unique = set(), []
        for p, s in work:  # tied weights once
            if id(p) not in seen:
                seen.add(id(p))
                unique.append((p, s))

        def draw(item) -> None:
            index, (p, s) = item
            with torch.no_grad():
                if s == 0.0:
                    p.zero_()
                else:  # a generator per tensor: the default one is locked for the whole draw
                    p.normal_(0.0, s, generator=torch.Generator().manual_seed(index))

        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            list(pool.map(draw, enumerate(unique)))
        return model

    def training_step(self, batch, batch_idx):
        if self.dpo:  # 2B rows: the chosen replies, then the rejected ones
            ids = batch["input_ids"].clone()
            pairs, half = ids.shape[0] // 2, ids.shape[1] // 2
            ids[pairs:] = ids[:pairs]  # the same prompts; the rejected reply is the chosen one reversed
            ids[pairs:, half:] = ids[:pairs, half:].flip(-1)
            labels = ids.clone()
            labels[:, :half] = -100  # the prompt half carries no label
            policy = sequence_logprobs(self.model, ids, labels)
            reference = torch.zeros_like(policy)  # computed once before training in a real run
            losses, _, _ = dpo_loss(policy, reference, label_token_counts(labels), DPOSettings(beta=0.1))
            loss = losses.mean()
        else:
            loss = self.model(**batch).loss
        self.losses.append(loss.detach())
        return loss

    def configure_optimizers(self):
        lr = 1e-4 if self.lora_rank else 1e-5
        return torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=lr)


class StepEnds(L.Callback):
    def __init__(self) -> None:
        self.ends: list[float] = []
        self.engine: dict = {}
        self.seconds: list[dict[str, float]] = []  # the engine's time counters at each step end

    def on_fit_start(self, trainer, *args) -> None:
        progress("setup done (engine built, optimizer set up)")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            progress("first step starts (compiles the layers by default on CUDA)")

    def on_train_end(self, trainer, *args) -> None:
        engine = getattr(trainer.strategy, "engine", None)  # closed at teardown: read its counters before
        if engine is not None:
            self.engine = dict(
                engine.stats, weight_copy=bool(engine.config.weight_copy), cast_on_gpu=bool(engine.config.cast_on_gpu)
            )

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == 1:
            print(f"largest named mappings after step 1: {largest_mappings()}", file=sys.stderr, flush=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # between steps only: timing, not part of the step
        self.ends.append(time.perf_counter())
        engine = getattr(trainer.strategy, "engine", None)
        if engine is not None:
            self.seconds.append({k: v for k, v in engine.stats.items() if k.endswith("_s")})
        took = f", {self.ends[-1] - self.ends[-2]:.2f} s" if len(self.ends) > 1 else ""
        at = f" (at {self.ends[-1] - START:.1f} s, rss {current_rss_bytes() / 2**30:.1f} GiB{memory_detail()})"
        print(f"step {trainer.global_step} done{took}{at}", file=sys.stderr, flush=True)  # progress, if a run is cut


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2_3b", help="a conf/model/ name")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    parser.add_argument("--state-dtype", default=None, choices=list(STATE_DTYPES), help="optimizer_state_dtype")
    parser.add_argument("--clip", type=float, default=None, help="Trainer(gradient_clip_val=...)")
    parser.add_argument("--lora", type=int, default=0, metavar="RANK", help="train LoRA adapters of this rank")
    parser.add_argument("--dpo", action="store_true", help="DPO on --batch pairs (2 x --batch rows) instead of SFT")
    parser.add_argument("--strategy", nargs="*", default=[], metavar="KEY=VALUE", help="other HorizonStrategy args")
    parser.add_argument("--fast-init", action="store_true", help="draw the initial weights on all cores")
    parser.add_argument("--devices", type=int, default=1, help="processes (GPUs), data parallel")
    parser.add_argument(
        "--switch-interval", type=float, default=None, metavar="S", help="sys.setswitchinterval(S) (GIL hand-over)"
    )
    parser.add_argument("--stack-dump-after", type=float, default=0, metavar="S", help="dump stacks every S s")
    args = parser.parse_args()
    progress(f"started: {' '.join(sys.argv[1:])}")
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    if args.stack_dump_after:
        faulthandler.dump_traceback_later(args.stack_dump_after, repeat=True, file=sys.stderr)
    settings = dict(_setting(kv) for kv in args.strategy)
    if args.state_dtype:
        settings["optimizer_state_dtype"] = args.state_dtype
    raw = OmegaConf.to_container(OmegaConf.load(CONF / f"{args.model}.yaml"), resolve=True)
    hf_config = build_hf_config(
        ModelConfig.from_dict(raw.get("model", raw)), vocab_size=2048
    )  # when the model says null
    module = Plain(hf_config, args.lora, args.fast_init, args.dpo)
    rows = 2 * args.batch if args.dpo else args.batch
    data = SyntheticTokens(hf_config.vocab_size, args.seq, rows * (args.steps + 1) * args.devices)
    timer = StepEnds()
    trainer = L.Trainer(
        strategy=HorizonStrategy(**settings) if settings else "horizon",
        precision="bf16-mixed",
        gradient_clip_val=args.clip,
        devices=args.devices,
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    with RssSampler() as rss:
        trainer.fit(module, DataLoader(data, batch_size=rows))
    if args.stack_dump_after:
        faulthandler.cancel_dump_traceback_later()
    progress("fit done")
    num_params = sum(p.numel() for p in module.model.parameters())  # each Parameter once: tied weights once
    trained = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
    step_s = statistics.median([b - a for a, b in zip(timer.ends, timer.ends[1:])][args.warmup :])
    if trainer.global_rank > 0:
        return
    tokens = rows * args.seq * args.devices
    engine = timer.engine
    steps_run = max(1, args.steps)
    pcie = (engine.get("bytes_h2d", 0) + engine.get("bytes_d2h", 0)) / steps_run
    optimizer_traffic = adamw_traffic_bytes(STATE_DTYPES[args.state_dtype or "fp32"])
    copy = engine.get("weight_copy", True)
    # packing on the CPU reads FP32 (2x the BF16 bytes) and writes BF16 staging; cast_on_gpu's uploads read the
    # FP32 masters themselves (already in bytes_h2d)
    cast = engine.get("cast_on_gpu", False)
    packing = 0 if copy or cast else 3 * engine.get("bytes_h2d", 0) / steps_run
    if not copy:
        optimizer_traffic -= 2  # no weight copy written
    if args.lora:  # the optimizer's traffic covers only the adapters; gradients go down only for them
        optimizer_traffic = optimizer_traffic * trained / num_params
    result = {
        "system": "horizon, plain LightningModule (configure_model, torch AdamW, default strategy)"
        + (f", LoRA r={args.lora} on every linear layer, base built in BF16" if args.lora else "")
        + (f", DPO on {args.batch} pairs per step" if args.dpo else "")
        + (f", {args.devices} processes (data parallel; counters and RSS of rank 0)" if args.devices > 1 else ""),
        "model": args.model,
        "num_params": num_params,
        "trained_params": trained,
        "tokens_per_step": tokens,
        "step_s": step_s,
        "tokens_per_s": tokens / step_s,
        "model_tflops": 6 * num_params * tokens / step_s / 1e12,
        "devices": args.devices,
        "host_peak_gib": rss.peak / 2**30,
        "host_bytes_per_param": rss.peak / num_params if args.devices == 1 else None,
        "gpu_peak_gib": torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else 0.0,
        "settings": settings | {"gradient_clip_val": args.clip},
        "fast_init": args.fast_init,
        "pcie_bytes_per_step": pcie,
        # every process moves about rank 0's PCIe bytes (and packs its uploads); the optimizer steps each group once
        "host_bytes_moved_per_step": optimizer_traffic * num_params + (pcie + packing) * args.devices,
        "engine": engine,
        # the engine's seconds between consecutive step ends (step 2 on): steady state without the first steps. A
        # worker's busy seconds count when its job ends, the kernel's when each call ends: a job that runs across a
        # step end puts part of one step's figures in the next (sums over several steps agree)
        "engine_per_step": [{k: b[k] - a[k] for k in b} for a, b in zip(timer.seconds, timer.seconds[1:])],
        "losses": [float(x) for x in module.losses],
    }
    print(json.dumps({k: v for k, v in result.items() if k != "losses"}))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


def _setting(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    return key, yaml.safe_load(value) if value else None


if __name__ == "__main__":
    main()
