"""Host buffers shared by the processes of a node (the storage of a per-node store): real processes, SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_horizon.engine.shared_memory import PREFIX, SHM_DIR, NodeBuffer, sweep_stale

pytestmark = pytest.mark.skipif(not SHM_DIR.is_dir(), reason="needs /dev/shm")
ROOT = Path(__file__).resolve().parents[1]


def run_child(code: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE, text=True)


def ours() -> set[str]:
    return {p.name for p in SHM_DIR.glob(f"{PREFIX}-*")}


def test_two_processes_share_one_buffer_and_nothing_is_left():
    """One process creates, another opens and writes; the creator sees the write (one copy of the memory); after
    the unlink both still use it and /dev/shm holds nothing of it."""
    buf = NodeBuffer.create("t_share", 1 << 20)
    try:
        floats = buf.view(torch.float32, 1024, offset_bytes=4096)
        floats.copy_(torch.arange(1024, dtype=torch.float32))
        child = run_child(
            "import sys, torch\n"
            "from lightning_horizon.engine.shared_memory import NodeBuffer\n"
            "b = NodeBuffer.open(sys.argv[1], 1 << 20)\n"
            "v = b.view(torch.float32, 1024, offset_bytes=4096)\n"
            "assert torch.equal(v, torch.arange(1024, dtype=torch.float32))\n"
            "v.mul_(2)\n"
            "print('ok', flush=True)\n",
            buf.name,
        )
        assert child.communicate(timeout=120)[0].strip() == "ok" and child.returncode == 0
        assert torch.equal(floats, 2 * torch.arange(1024, dtype=torch.float32))  # the child's write, seen here
        assert buf.name in ours()
        buf.unlink()
        assert buf.name not in ours()
        floats.add_(1)  # still mapped: still usable
        assert floats[3].item() == 7.0
        with pytest.raises(FileNotFoundError, match="already unlinked"):
            NodeBuffer.open(buf.name, 1 << 20)
    finally:
        del floats
        buf.unlink()
        buf.close()


def test_sigkill_leaves_nothing_after_the_unlink_and_stale_files_are_swept():
    """A process killed with SIGKILL after the unlink leaves no file; one killed before it leaves its file, which
    the next create removes (its creator no longer runs)."""
    code = (
        "import sys, time\n"
        "from lightning_horizon.engine.shared_memory import NodeBuffer\n"
        "b = NodeBuffer.create(sys.argv[1], 1 << 16)\n"
        "b.tensor.fill_(1)\n"
        "if sys.argv[2] == 'unlink': b.unlink()\n"
        "print(b.name, flush=True)\n"
        "time.sleep(600)\n"
    )
    for mode in ("unlink", "keep"):
        child = run_child(code, f"t_kill_{mode}", mode)
        name = child.stdout.readline().strip()
        assert name.startswith(f"{PREFIX}-{child.pid}-")
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
        child.stdout.close()
        if mode == "unlink":
            assert name not in ours()
        else:
            assert name in ours()  # killed before the unlink: left behind until swept
            assert name in sweep_stale()  # its creator is gone (the next NodeBuffer.create sweeps the same way)
            assert name not in ours()


def test_bad_requests_are_refused():
    with pytest.raises(ValueError, match="tag"):
        NodeBuffer.create("a/b", 16)
    with pytest.raises(ValueError, match="nbytes must be positive"):
        NodeBuffer.create("t_zero", 0)
    buf = NodeBuffer.create("t_size", 64)
    try:
        with pytest.raises(ValueError, match="holds 64 bytes, expected 128"):
            NodeBuffer.open(buf.name, 128)
        with pytest.raises(ValueError, match="does not fit"):
            buf.view(torch.float32, 17)
    finally:
        buf.unlink()
        buf.close()
