"""A fake nvme-cli that answers from recorded output (data/), and the sysfs tree of the QEMU
machine the recordings came from (data/qemu10/transcript.txt: its sysfs listings)."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path

from coreslice.nvme import ops

DATA = Path(__file__).parent / "data"
QEMU, BUILT = DATA / "qemu10", DATA / "constructed"
INDEX = json.loads((QEMU / "index.json").read_text())
NQN = "nqn.2019-08.org.qemu:coreslice-test"
PF = "0000:00:02.0"


def recorded(name: str) -> tuple[tuple[str, ...], tuple[int, str, str]]:
    """(argv after 'nvme', (rc, stdout, stderr)) of the recording ``name``."""
    e = INDEX[name]
    read = lambda ext: (QEMU / f"{name}.{ext}").read_text() if (QEMU / f"{name}.{ext}").exists() else ""
    return tuple(e["argv"][1:]), (e["rc"], read("out"), read("err"))


class FakeRun:
    """subprocess.run for NvmeCli: answers argv from ``responses``; records every call."""

    def __init__(self, *names: str):
        self.responses: dict[tuple[str, ...], object] = dict(recorded(n) for n in names)
        self.calls: list[tuple[str, ...]] = []

    def use(self, *names: str) -> "FakeRun":
        """Answer with these recordings instead (a later state of the same command)."""
        self.responses.update(recorded(n) for n in names)
        return self

    def add(self, argv: str, out: str = "", rc: int = 0, err: str = "") -> None:
        self.responses[tuple(argv.split())] = (rc, out, err)

    def add_file(self, argv: str, path: Path, edit=None) -> None:
        text = path.read_text()
        if edit:
            text = json.dumps(edit(json.loads(text)))
        self.add(argv, text)

    def __call__(self, cmd, capture_output=True, text=True, timeout=None):
        argv = tuple(cmd[1:])
        self.calls.append(argv)
        if argv not in self.responses:
            raise AssertionError(f"unexpected nvme command: {' '.join(argv)}")
        r = self.responses[argv]
        rc, out, err = r() if callable(r) else r
        return subprocess.CompletedProcess(cmd, rc, out, err)

    def mutations(self) -> list[tuple[str, ...]]:
        return [c for c in self.calls if c[0] in ops.MUTATING]


# QEMU's state at the start of the recording: nsid 1 attached to the host (cntlid 0), nsid 2
# allocated and detached, SR-IOV VFs not enabled, secondaries 1 and 2 offline.
QEMU_START = ("id-ctrl", "effects-log", "list-ns-all", "list-ctrl", "list-ctrl-n1", "list-ctrl-n2",
              "id-ns-1-force", "id-ns-2-force", "list-secondary")


def constructed(run: FakeRun, edit_ctrl=None) -> FakeRun:
    """Swap in the constructed controller with Namespace Management (data/constructed)."""
    run.add_file("id-ctrl /dev/nvme0 -o json", BUILT / "id-ctrl.out", edit_ctrl)
    run.add_file("effects-log /dev/nvme0 --csi=0 -o json", BUILT / "effects-log.out")
    run.add_file("id-ns /dev/nvme0 -n 0xffffffff -o json", BUILT / "id-ns-common.out")
    return run


def host_tree(root: Path, numvfs: int = 0) -> Path:
    """The recorded machine's sysfs: nvme0 at 0000:00:02.0 (2 VFs possible), nvme0n1 (nsid 1)
    through native multipath under nvme-subsys0."""
    sys = root / "sys"
    pci = sys / "devices/pci0000:00" / PF
    (pci / "nvme/nvme0").mkdir(parents=True)
    for k, v in {"sriov_numvfs": numvfs, "sriov_totalvfs": 2, "sriov_offset": 1, "sriov_stride": 1}.items():
        (pci / k).write_text(f"{v}\n")
    ctrl = pci / "nvme/nvme0"
    (ctrl / "subsysnqn").write_text(NQN + "\n")
    (ctrl / "cntlid").write_text("0\n")
    os.symlink(f"../../../{PF}", ctrl / "device")
    (sys / "class/nvme").mkdir(parents=True)
    os.symlink(f"../../devices/pci0000:00/{PF}/nvme/nvme0", sys / "class/nvme/nvme0")
    (sys / "bus/pci/devices").mkdir(parents=True)
    os.symlink(f"../../../devices/pci0000:00/{PF}", sys / "bus/pci/devices" / PF)
    subsys = sys / "devices/virtual/nvme-subsystem/nvme-subsys0"
    subsys.mkdir(parents=True)
    (subsys / "subsysnqn").write_text(NQN + "\n")
    (sys / "block").mkdir()
    add_block(root, "nvme0n1", 1)
    (root / "proc").mkdir()
    (root / "proc/mounts").write_text("proc /proc proc rw 0 0\n")
    return root


def add_block(root: Path, name: str, nsid: int) -> None:
    """A namespace's block device as native multipath shows it (recorded: /sys/block/nvme0n2 ->
    nvme-subsys0/nvme0n2, its device -> ../../nvme-subsys0, and the hidden path nvme0c0n2)."""
    sys = root / "sys"
    d = sys / "devices/virtual/nvme-subsystem/nvme-subsys0" / name
    d.mkdir()
    os.symlink("../../nvme-subsys0", d / "device")
    (d / "nsid").write_text(f"{nsid}\n")
    hidden = sys / f"devices/pci0000:00/{PF}/nvme/nvme0" / f"nvme0c0n{nsid}"
    hidden.mkdir()
    (hidden / "nsid").write_text(f"{nsid}\n")
    os.symlink(f"../devices/virtual/nvme-subsystem/nvme-subsys0/{name}", sys / "block" / name)
    os.symlink(os.path.relpath(hidden, sys / "block"), sys / "block" / hidden.name)


def later(seconds: float, fn) -> threading.Timer:
    t = threading.Timer(seconds, fn)
    t.start()
    return t


def controller(run: FakeRun, root: Path) -> ops.Controller:
    return ops.open_controller("/dev/nvme0", cli=ops.NvmeCli(run=run), root=root, settle=lambda: None)
