"""Every shipped config composes, and its keys are exactly the ones the code reads."""

import dataclasses
import inspect
from pathlib import Path

import lightning
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from lightning_horizon.data import DataConfig
from lightning_horizon.engine import EngineConfig
from lightning_horizon.hardware import HardwareProfile, load_profile
from lightning_horizon.lora import PeftSettings
from lightning_horizon.models import ModelConfig, from_mapping

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
HARDWARE = sorted(p.stem for p in (CONF_DIR / "hardware").glob("*.yaml"))

OPTIM_KEYS = {
    "name", "lr", "weight_decay", "betas", "eps", "warmup_steps", "schedule", "min_lr_ratio",
    "no_decay_norms_and_biases", "implementation",
}  # fmt: skip
STRATEGY_KEYS = {f.name for f in EngineConfig.settings()}
ROOT_KEYS = {"model", "data", "hardware", "trainer", "optim", "peft", "plan", "resume", "output_dir", "strategy"}


def _compose(overrides: list[str] | None = None, return_hydra_config: bool = False):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("sft", overrides=overrides or [], return_hydra_config=return_hydra_config)


def _resolved(cfg) -> dict:
    """Everything resolved except output_dir (a Hydra runtime value, set only inside a real run)."""
    cfg = OmegaConf.to_container(cfg, resolve=False)
    del cfg["output_dir"]
    return OmegaConf.to_container(OmegaConf.create(cfg), resolve=True)


def test_expected_files_shipped():
    assert set(MODELS) >= {  # the model-family work adds more
        "tiny", "qwen2_0_5b", "qwen2_1_5b", "qwen2_3b", "qwen2_7b", "qwen2_14b", "qwen2_32b", "qwen2_72b",
        "llama3_8b", "llama3_70b",
    }  # fmt: skip
    assert set(HARDWARE) == {"auto", "h100", "h200", "a100_80g", "gh200", "rtx4090"}


def test_default_run():
    cfg = _compose()
    assert set(cfg) == ROOT_KEYS
    assert cfg.model.name == "tiny" and cfg.model.vocab_size is None
    assert cfg.hardware.name == "auto"
    assert cfg.data.path is None and set(cfg.data) == {f.name for f in dataclasses.fields(DataConfig)}
    assert set(cfg.optim) == OPTIM_KEYS and cfg.optim.name == "adamw" and cfg.optim.implementation == "torch"
    assert set(cfg.strategy) == STRATEGY_KEYS
    assert cfg.plan is False and cfg.resume is None
    assert cfg.peft.method == "none"
    assert cfg.optim.lr == pytest.approx(1e-3)  # tiny trains from scratch
    resolved = _resolved(cfg)
    assert resolved["data"]["seed"] == resolved["trainer"]["seed"]
    assert OmegaConf.to_container(cfg)["output_dir"] == "${hydra:runtime.output_dir}"


def test_hydra_run_and_sweep_dirs():
    hydra_cfg = OmegaConf.to_container(_compose(return_hydra_config=True).hydra, resolve=False)
    assert hydra_cfg["run"]["dir"].startswith("outputs/${now:")
    assert hydra_cfg["sweep"]["dir"].startswith("multirun/${now:")
    assert hydra_cfg["job"]["chdir"] is False


def test_trainer_keys_are_trainer_arguments():
    cfg = _compose()
    accepted = set(inspect.signature(lightning.Trainer.__init__).parameters)
    trainer_args = set(cfg.trainer) - {"seed"}
    assert trainer_args <= accepted, trainer_args - accepted
    assert cfg.trainer.accelerator == "auto"


def test_real_models_keep_fine_tuning_lr():
    assert _compose(["model=qwen2_7b"]).optim.lr == pytest.approx(2e-5)
    assert _compose(["optim.lr=3e-4"]).optim.lr == pytest.approx(3e-4)  # the CLI beats model=tiny's value


@pytest.mark.parametrize("hardware", HARDWARE)
@pytest.mark.parametrize("model", MODELS)
def test_compose_every_model_and_hardware(model, hardware):
    cfg = _compose([f"model={model}", f"hardware={hardware}"])
    assert set(cfg) == ROOT_KEYS
    model_cfg = ModelConfig.from_dict(cfg.model)
    assert model_cfg.name == model
    _resolved(cfg)
    if hardware != "auto":  # auto is detected: covered (once) in test_hardware.py
        profile = load_profile(cfg.hardware)
        assert profile.name == hardware and profile.has_gpu


@pytest.mark.parametrize("model", MODELS)
def test_model_files_hold_every_field(model):
    # Every field present in every file, so `model.<field>=...` overrides work without `+`.
    cfg = _compose([f"model={model}"])
    assert set(cfg.model) == {f.name for f in dataclasses.fields(ModelConfig)}


@pytest.mark.parametrize("hardware", HARDWARE)
def test_hardware_files_hold_every_field(hardware):
    raw = OmegaConf.load(CONF_DIR / "hardware" / f"{hardware}.yaml")
    assert set(raw) == {f.name for f in dataclasses.fields(HardwareProfile)}


def test_unknown_override_is_rejected_naming_the_key():
    with pytest.raises(ConfigCompositionException, match="hiden_size"):
        _compose(["model.hiden_size=3"])
    with pytest.raises(ConfigCompositionException, match="checkpoint_evry"):
        _compose(["strategy.checkpoint_evry=4"])


def test_unknown_key_added_with_plus_is_rejected_by_the_dataclass():
    cfg = _compose(["+model.hiden_size=3"])
    with pytest.raises(ValueError, match=r"model\.hiden_size \(did you mean model\.hidden_size\?\)"):
        ModelConfig.from_dict(cfg.model)
    cfg = _compose(["hardware=h200", "+hardware.gpu_mem=3"])
    with pytest.raises(ValueError, match=r"hardware\.gpu_mem"):
        load_profile(cfg.hardware)


def test_overrides_reach_the_dataclasses():
    cfg = _compose(["model=qwen2_7b", "model.num_hidden_layers=2", "hardware=h200", "hardware.cpu_cores=8"])
    assert ModelConfig.from_dict(cfg.model).num_hidden_layers == 2
    assert load_profile(cfg.hardware).cpu_cores == 8


def _undocumented_keys(path: Path, section: str | None = None) -> list[str]:
    """Keys of a YAML file (or of one of its top-level sections) without a comment line right above them."""
    lines = path.read_text().splitlines()
    indent = "" if section is None else "  "
    missing, inside = [], section is None
    for i, line in enumerate(lines):
        if section is not None and not line.startswith((" ", "#")) and line.strip():
            inside = line.startswith(f"{section}:")
            continue
        if not inside or not line.startswith(indent) or line.startswith(indent + " ") or line.lstrip().startswith("#"):
            continue
        if ":" in line and line.strip() and not lines[i - 1].strip().startswith("#"):
            missing.append(line.split(":")[0].strip())
    return missing


@pytest.mark.parametrize(
    "file,section",
    [
        ("data/default.yaml", None),
        ("trainer/default.yaml", None),
        ("optim/adamw.yaml", None),
        ("peft/none.yaml", None),
        ("peft/lora.yaml", None),
    ],
)
def test_every_option_is_documented_in_its_yaml_file(file, section):
    # The README promises it: a comment right above every option (model and hardware fields are documented once,
    # under ModelConfig and HardwareProfile, and named the same in every file).
    assert _undocumented_keys(CONF_DIR / file, section) == []


def test_documentation_check_sees_a_missing_comment(tmp_path):
    (tmp_path / "x.yaml").write_text("# documented\na: 1\nb: 2\n")
    assert _undocumented_keys(tmp_path / "x.yaml") == ["b"]


def test_engine_settings_are_declared_once_with_a_docstring_each():
    """The strategy group has no YAML copy: its keys and defaults are EngineConfig's settings (each documented under
    its field, once), in sft and bench alike; unknown keys and run fields are refused."""
    import ast

    tree = ast.parse(inspect.getsource(EngineConfig))
    body = tree.body[0].body
    documented = {
        node.target.id
        for node, after in zip(body, body[1:])
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
    }
    assert documented == {f.name for f in dataclasses.fields(EngineConfig)}
    want = {f.name: f.default for f in EngineConfig.settings()}
    assert OmegaConf.to_container(_compose().strategy) == want
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        assert OmegaConf.to_container(compose("bench").strategy) == want
    with pytest.raises(ConfigCompositionException, match="checkpoint_evry"):
        _compose(["strategy.checkpoint_evry=2"])
    with pytest.raises(ConfigCompositionException):
        _compose(["strategy.num_slots=two"])  # typed from EngineConfig
    with pytest.raises(ConfigCompositionException, match="device"):
        _compose(["strategy.device=cuda"])  # the Trainer's (accelerator), not a strategy setting


def test_the_peft_group_is_peft_settings():
    """``peft=lora`` lists every field of PeftSettings with its default; ``peft=none`` turns LoRA off."""
    lora = _compose(["peft=lora"]).peft
    assert set(lora) == {f.name for f in dataclasses.fields(PeftSettings)}
    assert from_mapping(PeftSettings, lora, prefix="peft") == PeftSettings(method="lora")
    assert not from_mapping(PeftSettings, _compose().peft, prefix="peft").enabled
    with pytest.raises(ValueError, match="peft.rank"):
        from_mapping(PeftSettings, {**lora, "rank": 8}, prefix="peft")
    for bad, match in (
        ({"r": 0}, "peft.r must"),
        ({"export": "both"}, "peft.export must"),
        ({"method": "qlora"}, "method"),
    ):
        with pytest.raises(ValueError, match=match):
            from_mapping(PeftSettings, {**lora, **bad}, prefix="peft")


def test_the_dpo_config_is_sft_plus_the_dpo_group():
    """``dpo.yaml`` composes the same groups as ``sft.yaml`` (same defaults except unpacked data), and its ``dpo``
    section is DPOSettings, every field with its default."""
    from lightning_horizon.preference import DPOSettings

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        dpo = compose("dpo")
    sft = _compose()
    assert set(dpo) == ROOT_KEYS | {"dpo"}
    dpo_values, sft_values = OmegaConf.to_container(dpo), OmegaConf.to_container(sft)
    for key in ROOT_KEYS - {"data"}:
        assert dpo_values[key] == sft_values[key], key
    assert dpo.data.pack is False and dpo.data.path is None
    assert {**dpo_values["data"], "pack": True} == sft_values["data"]
    assert from_mapping(DPOSettings, dpo.dpo, prefix="dpo") == DPOSettings()
    assert set(dpo.dpo) == {f.name for f in dataclasses.fields(DPOSettings)}
    assert _undocumented_keys(CONF_DIR / "dpo.yaml", "dpo") == []


def test_the_reward_config_is_sft_plus_the_reward_group():
    from lightning_horizon.preference import RewardSettings

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        reward = compose("reward")
    assert set(reward) == ROOT_KEYS | {"reward"} and reward.data.pack is False
    assert from_mapping(RewardSettings, reward.reward, prefix="reward") == RewardSettings()
    assert set(reward.reward) == {f.name for f in dataclasses.fields(RewardSettings)}
    assert _undocumented_keys(CONF_DIR / "reward.yaml", "reward") == []
    with pytest.raises(ValueError, match="reward.margin must be a finite number"):
        RewardSettings(margin="big")
