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


_ADDER = (
    "import sys, time, torch\n"
    "from lightning_horizon.engine.shared_memory import NodeBuffer\n"
    "b = NodeBuffer.open(sys.argv[1], 4096)\n"
    "v = b.view(torch.int64, 2)\n"
    "print('ready', flush=True)\n"
    "while int(v[1]) == 0:  # every adder starts together\n"
    "    time.sleep(0.001)\n"
    "for _ in range(int(sys.argv[2])):\n"
    "    with b.lock(int(sys.argv[3])):\n"
    "        x = int(v[0])\n"
    "        time.sleep(0.0005)  # a read-modify-write that loses updates unless the mutex excludes the others\n"
    "        v[0] = x + 1\n"
    "print('ok', flush=True)\n"
)


@pytest.mark.parametrize("same_mutex", [True, False], ids=["one-mutex", "two-mutexes"])
def test_lock_excludes_the_other_processes(same_mutex):
    """Three processes add 1 to one shared counter 100 times each with a read-modify-write: under the same mutex
    no update is lost; under different mutexes (the control) updates are lost, so the test sees exclusion."""
    buf = NodeBuffer.create("t_lock", 4096)
    try:
        children = [run_child(_ADDER, buf.name, "100", "7" if same_mutex else str(i)) for i in range(3)]
        assert all(child.stdout.readline().strip() == "ready" for child in children)
        buf.view(torch.int64, 2)[1] = 1
        for child in children:
            assert child.communicate(timeout=120)[0].strip() == "ok" and child.returncode == 0
        count = int(buf.view(torch.int64, 2)[0])
        assert count == 300 if same_mutex else count < 300
    finally:
        buf.unlink()
        buf.close()


def test_lock_of_a_killed_process_is_released():
    """A process killed (SIGKILL) while it holds a mutex does not leave the others waiting forever."""
    buf = NodeBuffer.create("t_lock_kill", 4096)
    try:
        holder = run_child(
            "import sys, time\n"
            "from lightning_horizon.engine.shared_memory import NodeBuffer\n"
            "b = NodeBuffer.open(sys.argv[1], 4096)\n"
            "with b.lock(3):\n"
            "    print('held', flush=True)\n"
            "    time.sleep(600)\n",
            buf.name,
        )
        assert holder.stdout.readline().strip() == "held"
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
        buf.view(torch.int64, 2)[1] = 1
        waiter = run_child(_ADDER, buf.name, "1", "3")
        assert waiter.communicate(timeout=60)[0].split() == ["ready", "ok"] and waiter.returncode == 0
        assert int(buf.view(torch.int64, 2)[0]) == 1
    finally:
        buf.unlink()
        buf.close()
