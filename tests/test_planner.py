"""The planner: the engine's memory formulas, step-time terms, refusals with suggestions, no allocation."""

import dataclasses
import math
import resource
import tracemalloc
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lightning_horizon.hardware import HardwareProfile, load_profile
from lightning_horizon.models import ModelConfig, build_hf_config
from lightning_horizon.plan_report import PlanError, check_fits, format_plan
from lightning_horizon.planner import GiB, model_shape, plan, plan_from_config

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def hf_config(name: str, vocab_size: int | None = None):
    raw = OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml")
    return build_hf_config(ModelConfig.from_dict(raw.model if "model" in raw else raw), vocab_size=vocab_size)


def hardware(name: str) -> HardwareProfile:
    return load_profile(OmegaConf.load(CONF_DIR / "hardware" / f"{name}.yaml"))


def test_72b_on_h200_fits():
    p = plan(
        hf_config("qwen2_72b"), hardware("h200"), batch_size=1, max_seq_len=4096, checkpoint_every=1, weight_copy=False,
        gradient_clip_val=1.0,
    )  # fmt: skip
    n = p.shape.num_params
    assert n / 1e9 == pytest.approx(72.7, rel=0.005)
    # 4 (masters) + 8 (moments) + 2 (BF16 gradients, kept for clipping; the embedding's in FP32) + staging + overhead
    assert 14.0 < p.host_total_bytes / n < 14.2
    assert 1.0e12 < p.host_total_bytes < 1.05e12 < 1.5e12
    # without clipping the updates run during the backward: four pooled buffers (the lm_head, 1.25 B params, is the
    # largest group) instead of the 2-byte/param gradients (the h200 profile's 2 TiB host holds the whole model's
    # gradients: the automatic rule keeps them whole there, so the pool is asked for)
    pooled = plan(
        hf_config("qwen2_72b"), hardware("h200"), batch_size=1, max_seq_len=4096, checkpoint_every=1, weight_copy=False,
        grad_pool_buffers=4,
    )  # fmt: skip
    auto = plan(
        hf_config("qwen2_72b"), hardware("h200"), batch_size=1, max_seq_len=4096, checkpoint_every=1, weight_copy=False
    )
    assert not any("pool" in key for key in auto.host_bytes)
    pool = 4 * p.shape.store.grad_group_numel * 2
    assert pooled.host_bytes["pinned gradient pool (4 x 2.32 GiB)"] == pool
    saved = p.host_total_bytes - pooled.host_total_bytes
    assert saved == 2 * (p.shape.store.store_numel - p.shape.store.embedding_numel) - pool
    assert 12.1 < pooled.host_total_bytes / n < 12.3
    assert p.gpu_total_bytes < 60e9  # of 141 GB
    check_fits(p, hardware("h200"))
    table = format_plan(p)
    for text in ("Host memory", "GPU memory", "bottleneck", "tokens/s", "fits", "1500.00"):
        assert text in table
    assert "DOES NOT FIT" not in table
    assert p.tokens_per_step == 4096 and p.tokens_per_s == pytest.approx(4096 / p.step_time_s)
    assert p.step_seconds[p.bottleneck] == p.step_time_s


@pytest.mark.parametrize("machine", ["h100", "rtx4090"])
def test_72b_refused_on_small_hosts(machine):
    p = plan(hf_config("qwen2_72b"), hardware(machine), batch_size=1, max_seq_len=4096, checkpoint_every=1)
    assert not p.host_fits
    with pytest.raises(PlanError, match="host memory: needs 89[0-9]") as err:
        check_fits(p, hardware(machine))
    assert "host RAM" in str(err.value) and "Host memory" in str(err.value)  # suggestion + the table


def test_check_fits_against_another_machine():
    p = plan(hf_config("qwen2_72b"), hardware("h200"), batch_size=1, max_seq_len=4096, checkpoint_every=1)
    with pytest.raises(PlanError, match="'h100'"):
        check_fits(p, hardware("h100"))


def test_units_and_tied_embeddings():
    shape = model_shape(hf_config("qwen2_0_5b"))
    vocab, hidden = 151936, 896
    assert shape.embedding_params == vocab * hidden
    assert shape.head_params == vocab * hidden + hidden  # the (tied) lm_head still streams to the GPU
    assert shape.num_params == shape.embedding_params + sum(shape.layer_params) + hidden  # stored once
    assert shape.largest_gpu_unit_params == shape.head_params
    assert len(shape.layer_params) == 24 and len(set(shape.layer_params)) == 1


def test_memory_formulas():
    shape_cfg = hf_config("qwen2_7b")
    p = plan(
        shape_cfg, hardware("h200"), batch_size=2, max_seq_len=1024, checkpoint_every=4, num_slots=3, weight_copy=False,
        grad_pool_buffers=4,
    )  # fmt: skip
    # the store's element counts: every parameter padded to 128 elements, as the engine lays them out
    n, stored, unit = p.shape.num_params, p.shape.store.store_numel, p.shape.store.unit_numel
    assert n <= stored < n * 1.001 and p.shape.largest_gpu_unit_params <= unit
    host = list(p.host_bytes.values())
    assert not p.settings.engine.weight_copy
    staging = 2 * min(64 * 2**20, unit) * 2
    embed = p.shape.store.embedding_numel
    pool = 4 * p.shape.store.grad_group_numel * 2  # no clipping: BF16 gradients in four pooled buffers, no slabs
    assert host == [4 * stored, 8 * n, 4 * embed, pool, 4 * GiB]  # cast_on_gpu: no copy; 4 GiB overhead on a GPU
    clipped = plan(
        shape_cfg, hardware("h200"), batch_size=2, max_seq_len=1024, checkpoint_every=4, num_slots=3, weight_copy=False,
        gradient_clip_val=1.0, cast_on_gpu=False,
    )  # fmt: skip
    host = list(clipped.host_bytes.values())
    # whole-model BF16 gradients; packing on the CPU (cast_on_gpu=False) goes through two pinned staging buffers
    assert host == [4 * stored, 8 * n, 2 * stored + 2 * embed, staging, 4 * GiB]
    assert "upload cast buffer (fp32)" not in clipped.gpu_bytes
    acc = plan(
        shape_cfg,
        hardware("h200"),
        batch_size=2,
        max_seq_len=1024,
        checkpoint_every=1,
        accumulate_grad_batches=4,
        weight_copy=False,
    )
    layer = acc.shape.store.layer_numel
    host = list(acc.host_bytes.values())
    slabs = acc.settings.engine.num_grad_slabs * layer * 2
    assert host == [4 * stored, 8 * n, 4 * stored, slabs, 4 * GiB]
    h, i, v, tokens = 3584, 18944, 152064, 2 * 1024
    gpu = list(p.gpu_bytes.values())
    assert gpu == [
        3 * unit * 2,
        math.ceil(28 / 4) * tokens * h * 2,
        4 * tokens * (16 * h + 6 * i),
        2 * unit * 2,
        tokens * v * 10,  # loss chunk: min(4096, B*S) tokens
        v * h * 4,
        min(32 * 2**20, unit) * 4,  # FP32 masters are copied into this buffer and cast to BF16 there
        int(1.5 * GiB),
    ]


def test_uploads_and_recompute_grow_with_k():
    cfg, hw = hf_config("qwen2_3b"), hardware("h200")
    k1 = plan(cfg, hw, batch_size=8, max_seq_len=1024, checkpoint_every=1, weight_copy=True)  # BF16 uploads
    k4 = plan(cfg, hw, batch_size=8, max_seq_len=1024, checkpoint_every=4, weight_copy=True)
    layers, head = sum(k1.shape.layer_params), k1.shape.head_params
    assert k1.step_seconds["h2d upload"] == pytest.approx(2 * (2 * layers + head) / hw.h2d_bytes_per_s)
    # 36 layers, K=4: 9 segments, 27 layers recomputed without a graph
    assert k4.step_seconds["h2d upload"] == pytest.approx(
        2 * (2 * layers + 27 / 36 * layers + head) / hw.h2d_bytes_per_s
    )
    assert k4.step_seconds["gpu compute"] > k1.step_seconds["gpu compute"]
    assert k4.step_seconds["d2h gradients"] == k1.step_seconds["d2h gradients"]
    assert list(k4.gpu_bytes.values())[1] < list(k1.gpu_bytes.values())[1]  # fewer checkpoints


def test_3b_matches_the_design_ceilings():
    # design.md: Qwen2.5-3B at 8192 tokens/step on the H200: compute 0.37 s, PCIe 0.22 s, host traffic ~1.0 s.
    # (its figures assume the BF16 weight copy)
    p = plan(hf_config("qwen2_3b"), hardware("h200"), batch_size=8, max_seq_len=1024, checkpoint_every=1,
             weight_copy=True)  # fmt: skip
    assert p.step_seconds["gpu compute"] == pytest.approx(0.37, rel=0.1)
    assert p.step_seconds["h2d upload"] == pytest.approx(0.22, rel=0.1)
    assert p.step_seconds["host memory traffic"] == pytest.approx(1.0, rel=0.1)
    assert p.bottleneck == "host memory traffic"
    # the default uploads the FP32 masters (cast_on_gpu): twice the PCIe bytes, about the same host-memory traffic
    # (uploads read 2 more bytes per parameter, the optimizer writes no copy), still the bound
    cast = plan(hf_config("qwen2_3b"), hardware("h200"), batch_size=8, max_seq_len=1024, checkpoint_every=1)
    assert not cast.settings.engine.weight_copy
    assert cast.step_seconds["h2d upload"] == pytest.approx(2 * p.step_seconds["h2d upload"])
    assert cast.step_seconds["host memory traffic"] == pytest.approx(p.step_seconds["host memory traffic"], rel=0.1)
    assert cast.bottleneck == "host memory traffic"


def test_accumulation_scales_per_micro_batch_terms_only():
    cfg, hw = hf_config("qwen2_3b"), hardware("h200")
    one = plan(cfg, hw, batch_size=8, max_seq_len=1024, checkpoint_every=1)
    four = plan(cfg, hw, batch_size=8, max_seq_len=1024, checkpoint_every=1, accumulate_grad_batches=4)
    assert four.step_seconds["gpu compute"] == pytest.approx(4 * one.step_seconds["gpu compute"])
    assert four.step_seconds["cpu optimizer"] == one.step_seconds["cpu optimizer"]
    assert four.tokens_per_step == 4 * one.tokens_per_step


def test_gpu_overflow_suggests_settings_that_fit():
    cfg, hw = hf_config("qwen2_72b"), hardware("h200")
    p = plan(cfg, hw, batch_size=64, max_seq_len=4096, checkpoint_every=1)
    assert p.host_fits and not p.gpu_fits
    with pytest.raises(PlanError, match="GPU memory: needs") as err:
        check_fits(p)
    message = str(err.value)
    assert "data.batch_size=" in message
    suggested = int(message.split("data.batch_size=")[1].split(",")[0].split(".")[0])
    check_fits(plan(cfg, hw, batch_size=suggested, max_seq_len=4096, checkpoint_every=1))


def test_cpu_compute_counts_the_working_set_in_host_memory():
    values = dataclasses.asdict(hardware("h200"))
    cpu = HardwareProfile(**{**values, "gpu_memory_bytes": 0, "h2d_bytes_per_s": 0, "d2h_bytes_per_s": 0,
                             "gpu_bf16_tflops": 0, "host_memory_bytes": 8 * GiB})  # fmt: skip
    p = plan(hf_config("tiny", vocab_size=512), cpu, batch_size=8, max_seq_len=256, checkpoint_every=1)
    assert not any("CUDA" in name for name in p.gpu_bytes)  # no row that does not apply
    assert p.host_total_bytes == sum(p.host_bytes.values()) + p.gpu_total_bytes
    assert set(p.step_seconds) == {"cpu compute", "cpu optimizer", "host memory traffic"}
    assert p.gpu_fits
    check_fits(p)
    big = plan(hf_config("tiny", vocab_size=512), cpu, batch_size=4096, max_seq_len=2048, checkpoint_every=1)
    with pytest.raises(PlanError, match="host memory"):
        check_fits(big)


def test_settings_are_validated():
    with pytest.raises(ValueError, match="checkpoint_every must be an integer >= 1"):
        plan(hf_config("qwen2_0_5b"), hardware("h200"), batch_size=1, max_seq_len=8, checkpoint_every=0)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        plan(hf_config("qwen2_0_5b"), hardware("h200"), batch_size=1, max_seq_len=8, checkpoint_every=1, optimizer="x")
    with pytest.raises(ValueError, match="unknown dtype"):
        plan(
            hf_config("qwen2_0_5b"),
            hardware("h200"),
            batch_size=1,
            max_seq_len=8,
            checkpoint_every=1,
            compute_dtype="bf8",
        )


def test_plan_allocates_nothing():
    cfg, hw = hf_config("qwen2_72b"), hardware("h200")
    plan(cfg, hw, batch_size=1, max_seq_len=4096, checkpoint_every=1)  # warm imports and caches
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    tracemalloc.start()
    plan(cfg, hw, batch_size=1, max_seq_len=4096, checkpoint_every=1)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 100 * 2**20
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 300 * 2**10  # < 300 MiB (model: 290 GB)
    assert not torch.empty(0).is_meta  # the meta device did not leak out of the planner


def test_plan_from_composed_config():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("sft", overrides=["model=qwen2_72b", "hardware=h200", "data.batch_size=1",
                                        "data.max_seq_len=4096", "strategy.checkpoint_every=2"])  # fmt: skip
    p = plan_from_config(cfg)
    assert p.shape.name == "qwen2_72b" and p.settings.engine.checkpoint_every == 2 and p.settings.batch_size == 1
    assert p.settings.compute_dtype == torch.bfloat16
    check_fits(p)


@pytest.mark.parametrize(
    "host_gib,expected",
    [(1400, True), (125, False)],  # 7B, accumulating: 16 B/param fits 125 GiB only without the BF16 weight copy
)
def test_weight_copy_auto_follows_host_memory(host_gib, expected):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "sft",
            overrides=[
                "model=qwen2_7b",
                "hardware=h200",
                f"hardware.host_memory_bytes={host_gib * 2**30}",
                "data.batch_size=8",
                "data.max_seq_len=2048",
                "trainer.accumulate_grad_batches=4",
                "strategy.cast_on_gpu=false",  # the copy is only ever chosen for uploads packed on the CPU
            ],  # fmt: skip
        )
    assert cfg.strategy.weight_copy is None
    p = plan_from_config(cfg)
    assert p.settings.engine.weight_copy is expected
    assert p.host_fits
    cfg.strategy.cast_on_gpu = None  # the default: uploads read the FP32 masters, no copy whatever the host holds
    assert plan_from_config(cfg).settings.engine.weight_copy is False


def _cpu(host_gib: int = 1400) -> HardwareProfile:
    values = dataclasses.asdict(hardware("h200"))
    return HardwareProfile(**{**values, "gpu_memory_bytes": 0, "h2d_bytes_per_s": 0, "d2h_bytes_per_s": 0,
                              "gpu_bf16_tflops": 0, "host_memory_bytes": host_gib * GiB})  # fmt: skip


def test_weight_copy_auto_is_never_chosen_for_cpu_compute():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("sft", overrides=["model=qwen2_0_5b", "data.batch_size=1", "data.max_seq_len=256",
                                        "strategy.cast_on_gpu=false"])  # fmt: skip
    assert cfg.strategy.weight_copy is None
    assert plan_from_config(cfg, hardware=_cpu()).settings.engine.weight_copy is False  # room for it: still no copy
    assert plan_from_config(cfg, hardware=hardware("h200")).settings.engine.weight_copy is True  # a GPU with room


def _memory_rows(table: str) -> list[tuple[str, float]]:
    rows = []
    for line in table.split("Step time")[0].splitlines():  # the memory sections
        parts = line.rsplit(maxsplit=1)
        if line.startswith("  ") and len(parts) == 2 and "total" not in line:
            try:
                rows.append((parts[0].strip(), float(parts[1])))
            except ValueError:
                pass
    return rows


def test_plan_table_prints_only_what_applies():
    cpu = plan(hf_config("tiny", vocab_size=2048), _cpu(), batch_size=8, max_seq_len=256, checkpoint_every=1)
    table = format_plan(cpu)
    rows = _memory_rows(table)
    assert rows and all(value > 0 for _, value in rows), rows  # no zero-sized row
    assert "CUDA" not in table and "pinned" not in table and "gradient slabs" not in table
    assert "largest GPU unit" not in table and "expect +-50%" in table  # the CPU prediction says what it is
    assert "upload staging" not in table  # CPU compute uses the layers in place: nothing is packed for an upload
    gpu = plan(hf_config("qwen2_7b"), hardware("h200"), batch_size=2, max_seq_len=1024, checkpoint_every=1,
               accumulate_grad_batches=4, weight_copy=False, cast_on_gpu=False)  # fmt: skip
    table = format_plan(gpu)
    assert "pinned gradient slabs (3 x 445 MiB)" in table and "CUDA context" in table and "+-50%" not in table
    staging = gpu.shape.store.staging_numel * 2 / 2**20
    assert f"pinned upload staging (2 x {staging:.3g} MiB)" in table  # its real size
    assert "upload cast buffer" not in table
    cast = format_plan(plan(hf_config("qwen2_7b"), hardware("h200"), batch_size=2, max_seq_len=1024, weight_copy=False))
    assert "upload staging" not in cast and "upload cast buffer (fp32)" in cast  # uploads read the pinned masters


@pytest.mark.parametrize("mode", ["direct", "pooled", "fold"])
@pytest.mark.parametrize("tied", [False, True])
def test_planner_predicts_what_the_engine_allocates(mode, tied):
    """The planner counts with the engine's own layout and footprint: a real tiny engine's host buffers (masters,
    gradients, the gradient pool, weight copy, optimizer state after a step) and slot sizes equal the plan's rows,
    byte for byte. ``direct``: clipping keeps whole-model compute-dtype gradients; ``pooled``: without it the
    updates run during the backward, from a pool of two buffers; ``fold``: accumulation, FP32 gradients."""
    from lightning_horizon import HorizonEngine
    from lightning_horizon.engine.footprint import StoreShape
    from tests.helpers import make_batch, tiny_config, tiny_model

    accumulate = 2 if mode == "fold" else 1
    model = tiny_model("qwen2", tied=tied, layers=3)
    p = plan(tiny_config("qwen2", tied=tied, layers=3), _cpu(), batch_size=2, max_seq_len=12, checkpoint_every=1,
             accumulate_grad_batches=accumulate, gradient_clip_val=1.0 if mode == "direct" else None,
             weight_copy=True, compute_dtype="fp32", grad_pool_buffers=2)  # fmt: skip
    engine = HorizonEngine(model, device="cpu", compute_dtype="fp32", weight_copy=True, accumulate_grads=accumulate > 1,
                           updates_in_backward=mode == "pooled", grad_pool_buffers=2)  # fmt: skip
    try:
        assert p.shape.store == StoreShape.of(engine.parts)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        if mode == "pooled":
            engine.begin_step(opt)
        for micro in range(accumulate):
            model(**make_batch(micro)).loss.backward()
        if mode == "direct":
            engine.clip_grad_norm_(1.0)
        engine.step(opt)
        engine.synchronize()
        groups = engine.store.groups
        pool = engine.sink.pool
        assert (pool is not None) == (mode == "pooled")
        leased = {b.data_ptr() for b in pool.buffers} if pool is not None else set()
        allocated = {
            "master weights": sum(g.master.numel() * 4 for g in groups),
            "optimizer state": sum(t.numel() * 4 for s in opt.state.values() for k, t in s.items() if k != "step"),
            "gradients": sum(
                t.numel() * t.element_size()
                for g in groups
                for t in (g.grad, g.grad_lp)
                if t is not None and t.data_ptr() not in leased
            ),
            "weight copy": sum(g.copy.numel() * g.copy.element_size() for g in groups),
        }
        if pool is not None:
            allocated["gradient pool"] = pool.nbytes
        predicted = {name.split(" (")[0]: value for name, value in p.host_bytes.items()}
        assert {k: predicted[k] for k in allocated} == allocated
        assert ("gradient pool" in predicted) == (mode == "pooled")
        assert sum(s.buf.numel() for s in engine.streamer.slots) * 4 == next(
            v for k, v in p.gpu_bytes.items() if k.startswith("weight slots")
        )
    finally:
        engine.close()


def test_compact_optimizer_state_halves_its_row():
    fp32 = plan(hf_config("qwen2_7b"), hardware("h200"), batch_size=1, max_seq_len=1024, weight_copy=False)
    bf16 = plan(hf_config("qwen2_7b"), hardware("h200"), batch_size=1, max_seq_len=1024, weight_copy=False,
                optimizer_state_dtype="bf16")  # fmt: skip
    n = fp32.shape.num_params
    assert fp32.host_bytes["optimizer state (adamw, 8 B/param)"] == 8 * n
    assert bf16.host_bytes["optimizer state (adamw, 4 B/param)"] == 4 * n
    assert fp32.host_total_bytes - bf16.host_total_bytes == 4 * n
    assert bf16.step_seconds["host memory traffic"] < fp32.step_seconds["host memory traffic"]


# ------------------------------------------------------------------------------- several GPUs and nodes (planned)
def test_several_gpus_per_node_share_one_host_store():
    """N GPUs on one node: the store is counted once (per-process parts N times), each GPU's PCIe bytes fall as 1/N,
    the node's host traffic and optimizer time stay flat, the GPU links carry (N-1)/N of every layer both ways."""
    cfg, hw = hf_config("qwen2_7b"), hardware("h200")
    one = plan(cfg, hw, batch_size=16, max_seq_len=2048, gradient_clip_val=1.0)
    eight = plan(cfg, hw, batch_size=16, max_seq_len=2048, gradient_clip_val=1.0, devices=8)
    assert eight.tokens_per_step == 8 * one.tokens_per_step and eight.num_gpus == 8
    per_process = {k: v for k, v in one.host_bytes.items() if k.startswith(("process", "pinned upload"))}
    assert per_process and eight.host_total_bytes == one.host_total_bytes + 7 * sum(per_process.values())
    assert eight.gpu_bytes == one.gpu_bytes
    for term in ("h2d upload", "d2h gradients"):
        assert eight.step_seconds[term] == pytest.approx(one.step_seconds[term] / 8)
    for term in ("gpu compute", "cpu optimizer", "host memory traffic"):
        assert eight.step_seconds[term] == pytest.approx(one.step_seconds[term])
    layer_bytes = (
        one.step_seconds["h2d upload"] * hw.h2d_bytes_per_s + one.step_seconds["d2h gradients"] * hw.d2h_bytes_per_s
    )
    links = eight.step_seconds["gpu links (all-gather, reduce-scatter)"]
    assert links == pytest.approx(layer_bytes * 7 / 8 / hw.gpu_link_bytes_per_s)
    assert "network" not in eight.step_seconds
    assert eight.tokens_per_s == pytest.approx(8 * one.tokens_per_s)  # compute-bound at this batch: linear


def test_several_nodes_sharded_or_replicated():
    cfg, hw = hf_config("qwen2_72b"), hardware("h200")
    kw = dict(batch_size=4, max_seq_len=2048, gradient_clip_val=1.0, devices=8)
    node = plan(cfg, hw, **kw)
    sharded = plan(cfg, hw, **kw, num_nodes=4, node_store="sharded")
    replicated = plan(cfg, hw, **kw, num_nodes=4)  # (the default)
    assert replicated.settings.node_store == "replicated"
    # each node holds a quarter of the layers, and the embedding, norm and head whole
    shape = node.shape
    layers = sum(shape.layer_params)
    held, streamed = layers / shape.num_params, layers / (layers + shape.head_params)
    assert 0.9 < held < 1 and 0.95 < streamed < 1
    store = {k: v for k, v in node.host_bytes.items() if not k.startswith(("process", "pinned upload"))}
    saved = 0.75 * held * sum(store.values())
    assert sharded.host_total_bytes == pytest.approx(node.host_total_bytes - saved, rel=1e-6)
    assert replicated.host_total_bytes == node.host_total_bytes
    for term in ("cpu optimizer", "host memory traffic"):
        assert sharded.step_seconds[term] == pytest.approx(node.step_seconds[term] * (held / 4 + 1 - held))
        assert replicated.step_seconds[term] == pytest.approx(node.step_seconds[term])
    assert sharded.step_seconds["h2d upload"] == pytest.approx(
        node.step_seconds["h2d upload"] * (streamed / 4 + 1 - streamed)
    )
    up = node.step_seconds["h2d upload"] * 8 * hw.h2d_bytes_per_s
    down = node.step_seconds["d2h gradients"] * 8 * hw.d2h_bytes_per_s
    assert sharded.step_seconds["network"] == pytest.approx((up + down) * streamed * 3 / 4 / hw.network_bytes_per_s)
    assert replicated.step_seconds["network"] == pytest.approx(2 * down * 3 / 4 / hw.network_bytes_per_s)
    # host-bound on one node; a quarter of the store per node moves the bound to the GPUs
    assert node.bottleneck == "host memory traffic" and sharded.bottleneck == "gpu compute"


def test_several_gpus_need_the_link_rates_and_are_planned_only(tmp_path):
    cfg = hf_config("qwen2_7b")
    # a profile without the rates (an `auto` one) still plans memory and runs: those terms are named as left out
    no_links = dataclasses.replace(hardware("h200"), gpu_link_bytes_per_s=0.0, network_bytes_per_s=0.0)
    blind = plan(cfg, no_links, batch_size=1, max_seq_len=128, devices=2, num_nodes=2)
    assert [t.split(":")[0] for t in blind.unpredicted] == ["gpu links", "network"]
    assert "network" not in blind.step_seconds and not any("gpu links" in t for t in blind.step_seconds)
    seen = plan(cfg, hardware("h200"), batch_size=1, max_seq_len=128, devices=2, num_nodes=2)
    assert not seen.unpredicted and seen.host_total_bytes == blind.host_total_bytes
    text = format_plan(blind)
    assert "not predicted, so the step may be longer: network: hardware" in text and "no gpu_link_bytes_per_s" in text
    with pytest.raises(ValueError, match="node_store must be"):
        plan(cfg, hardware("h200"), batch_size=1, max_seq_len=128, node_store="mirrored")
    text = format_plan(plan(cfg, hardware("h200"), batch_size=1, max_seq_len=128, devices=4, num_nodes=2))
    for fragment in ("4 GPU(s) per node x 2 node(s)", "Host memory per node", "GPU memory per GPU", "network"):
        assert fragment in text, text
