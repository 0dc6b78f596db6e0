"""The wheel: ``pip install lightning-horizon`` (no clone) runs ``python -m recipes.sft``, ``recipes.dpo`` and
``recipes.bench``.

The wheel is built from a copy of the sources (the working tree is left alone) and installed with ``--no-deps`` into a
fresh virtual environment that sees this environment's packages (torch, lightning, ...) through a ``.pth`` line but
not its editable install of this project, and the recipes run from a directory outside any clone: offline.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # ~40 s: a wheel build and two short recipe runs


def _copy_sources(dst: Path) -> None:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True
    )
    if listed.returncode == 0:
        for rel in filter(None, listed.stdout.splitlines()):
            if (ROOT / rel).is_file():
                (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, dst / rel)
    else:  # not a git checkout
        ignore = shutil.ignore_patterns(".venv", "build", "dist", "*.egg-info", "__pycache__", "outputs", "multirun")
        shutil.copytree(ROOT, dst, ignore=ignore, dirs_exist_ok=True)


def _run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    return result


def test_the_wheel_runs_both_recipes_without_a_clone(tmp_path):
    src, wheels, venv, work = (tmp_path / name for name in ("src", "wheels", "venv", "work"))
    for path in (src, wheels, work):
        path.mkdir()
    _copy_sources(src)
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", src, "-w", wheels, cwd=src)
    (wheel,) = wheels.glob("lightning_horizon-*.whl")
    import zipfile

    assert "lightning_horizon/csrc/host_kernels.cpp" in zipfile.ZipFile(wheel).namelist()  # built on first use
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    _run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel, cwd=tmp_path)
    site = Path(
        _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=work).stdout.strip()
    )
    # this environment's packages, appended after the wheel's; its .pth files (the editable install) are not run
    paths = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "_dependencies.pth").write_text("\n".join(sorted(paths)) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    where = _run(python, "-c", "import recipes, lightning_horizon; print(recipes.__file__, lightning_horizon.__file__)",
                 cwd=work, env=env).stdout  # fmt: skip
    assert all(Path(p).is_relative_to(site) for p in where.split()), where  # the installed copy, not the clone

    short = ["trainer.max_steps=2", "trainer.log_every_n_steps=1", "data.max_seq_len=64", "data.batch_size=2"]
    sft = _run(python, "-m", "recipes.sft", *short, "+trainer.enable_progress_bar=false", "hydra.run.dir=sft",
               cwd=work, env=env)  # fmt: skip
    assert "first logged" in sft.stdout and (work / "sft" / "hf_export" / "config.json").is_file()
    dpo = _run(
        python,
        "-m",
        "recipes.dpo",
        *short,
        "+trainer.enable_progress_bar=false",
        "hydra.run.dir=dpo",
        cwd=work,
        env=env,
    )  # fmt: skip  (the bundled preference pairs ship in the wheel)
    assert "train/reward_margin: first logged" in dpo.stdout and (work / "dpo" / "hf_export" / "config.json").is_file()
    bench = _run(python, "-m", "recipes.bench", "model=tiny", "model.vocab_size=512", "trainer.precision=32-true",
                 "data.batch_size=2", "data.max_seq_len=32", "steps=3", "warmup=1", "hydra.run.dir=bench",
                 cwd=work, env=env)  # fmt: skip
    assert "horizon" in bench.stdout and (work / "bench" / "bench.json").is_file()
