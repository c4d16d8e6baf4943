"""The testbed's QEMU human monitor: one command through the unix socket, and the post-mortem
of a slice that never reported."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

from coreslice.testbed.qemu import MachineConfig, QemuMachine


def fake_monitor(path: Path, replies: dict[str, str]) -> threading.Thread:
    """A QEMU-like HMP server: banner and prompt, the command echoed with escapes, its output."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def serve():
        conn, _ = srv.accept()
        with conn:
            conn.sendall(b"QEMU 10.0.2 monitor - type 'help' for more information\r\n(qemu) ")
            cmd = b""
            while not cmd.endswith(b"\n"):
                cmd += conn.recv(100)
            text = cmd.decode().strip()
            conn.sendall(f"\x1b[D{text}\r\n{replies[text]}\r\n(qemu) ".encode())
        srv.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def test_hmp_returns_the_output_without_echo_or_prompt(tmp_path):
    m = QemuMachine(MachineConfig(kernel=Path("/k"), append=""), tmp_path)
    m.monitor_path = tmp_path / "m.sock"
    t = fake_monitor(m.monitor_path, {"info lapic 2": "dumping local APIC state for CPU 2\nLVT0\t0x00010700"})
    assert m.hmp("info lapic 2") == "dumping local APIC state for CPU 2\nLVT0\t0x00010700\n"
    t.join(5)


def test_monitor_socket_path_is_short_whatever_the_run_dir(tmp_path):
    m = QemuMachine(MachineConfig(kernel=Path("/k"), append=""), tmp_path / ("x" * 150))
    assert len(str(m.monitor_path)) < 108  # sun_path


def test_a_slice_that_never_reported_gets_its_lapic_state_saved(tmp_path):
    from coreslice.testbed import run as runmod
    from coreslice.testbed.job import SliceJob

    (tmp_path / "slice-0.stdout").write_text('{"plan": {"cpus": [{"cpu": 1, "apic_id": 1}, {"cpu": 2, "apic_id": 2}]}}')

    class M:
        def hmp(self, cmd):
            return f"state of {cmd.split()[-1]}\n"

    s = runmod._SliceState(SliceJob(0, "", (), None))
    s.started = 0.0
    runmod._save_lapic_state(tmp_path, M(), s)
    assert (tmp_path / "lapic-0.txt").read_text() == "== info lapic 1\nstate of 1\n== info lapic 2\nstate of 2\n"
