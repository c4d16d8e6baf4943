"""A watch on the emulated host's 9p queues, from outside, through QEMU's monitor.

Why: a lifecycle run hung because QEMU never took two 9p requests that the emulated host had
queued and kicked (its avail idx 63466, QEMU's last_avail_idx 63464; read with drgn from a dump
of the host's RAM).  Every task that touched the shared root then waited for ever in a killable
sleep, which the hung-task detector does not report, and the run ran into its --timeout with
nothing said.  This is QEMU's: the guest did its part.  So the run watcher compares, for each
virtio-9p queue, the guest's avail idx (read from guest memory at the ring QEMU reports) with
QEMU's last_avail_idx; a difference that stays over two looks is a lost kick.  It is then named
in the run's result and kicked again through the device's legacy I/O notify register
(virtio 1.x section 4.1.4.8, "Legacy Interfaces": QUEUE_NOTIFY at offset 16 of BAR0), so that
the test goes on and says it happened.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

QUEUE_NOTIFY = 16  # legacy virtio-pci I/O BAR0 register


@dataclass(frozen=True)
class QueueState:
    path: str              # the QOM path of the virtio backend
    last_avail_idx: int    # what QEMU has taken
    avail_addr: int        # guest-physical address of the avail ring


def backends(info_virtio: str) -> list[str]:
    """The 9p backends of `info virtio`."""
    return re.findall(r"^(\S+/virtio-backend) \[virtio-9p\]", info_virtio, re.M)


def parse_queue_status(path: str, text: str) -> QueueState | None:
    last = re.search(r"last_avail_idx:\s+(\d+)", text)
    avail = re.search(r"^\s*avail:\s+0x([0-9a-fA-F]+)", text, re.M)
    if not last or not avail:
        return None
    return QueueState(path, int(last.group(1)), int(avail.group(1), 16))


def parse_xp_u16(text: str) -> int | None:
    m = re.search(r":\s+0x([0-9a-fA-F]+)", text)
    return int(m.group(1), 16) if m else None


def io_bar0(info_pci: str, device: int, bus: int = 0) -> int | None:
    """BAR0's I/O port of PCI device ``bus:device.0`` in `info pci`."""
    blocks = re.split(r"\n(?=\s*Bus\s+\d+, device)", info_pci)
    for b in blocks:
        m = re.match(r"\s*Bus\s+(\d+), device\s+(\d+), function 0:", b)
        if m and (int(m.group(1)), int(m.group(2))) == (bus, device):
            io = re.search(r"BAR0: I/O at 0x([0-9a-fA-F]+)", b)
            return int(io.group(1), 16) if io else None
    return None


def behind(hmp: Callable[[str], str]) -> dict[str, tuple[int, int]]:
    """Each 9p backend whose guest has queued requests QEMU has not taken: path -> (guest's
    avail idx, QEMU's last_avail_idx).  Indexes are 16-bit and wrap."""
    out = {}
    for path in backends(hmp("info virtio")):
        st = parse_queue_status(path, hmp(f"info virtio-queue-status {path} 0"))
        if st is None:
            continue
        guest = parse_xp_u16(hmp(f"xp /1hx {st.avail_addr + 2}"))  # struct vring_avail: flags, idx
        if guest is not None and (guest - st.last_avail_idx) & 0xFFFF:
            out[path] = (guest, st.last_avail_idx)
    return out


def kick(hmp: Callable[[str], str], path: str) -> str:
    """Notify queue 0 of the backend's PCI function through its legacy I/O BAR; what was done."""
    dev = path.rsplit("/virtio-backend", 1)[0]
    devfn = re.search(r"^\s*(\d+)\s*$", hmp(f"qom-get {dev} addr"), re.M)  # devfn: slot << 3 | function
    if not devfn:
        return f"{path}: its PCI address is unknown, not kicked"
    port = io_bar0(hmp("info pci"), int(devfn.group(1)) >> 3)
    if port is None:
        return f"{path}: no legacy I/O BAR, not kicked"
    hmp(f"o /w {port + QUEUE_NOTIFY} 0")
    return f"{path}: queue 0 kicked at port 0x{port + QUEUE_NOTIFY:x}"


class Watch:
    """Called every ``interval`` seconds by the run watcher: a backend behind at two looks in a
    row, with the same indexes, is kicked; the events are kept for the run's result."""

    def __init__(self, interval: float = 30.0):
        self.interval = interval
        self.next_at = 0.0
        self.seen: dict[str, tuple[int, int]] = {}
        self.events: list[str] = []

    def poll(self, now: float, hmp: Callable[[str], str]) -> list[str]:
        if now < self.next_at:
            return []
        self.next_at = now + self.interval
        found = behind(hmp)
        said, kicked = [], set()
        for path, idx in found.items():
            if self.seen.get(path) == idx:  # no progress since the last look: not just in flight
                said.append(f"lost 9p kick: the guest queued up to {idx[0]}, QEMU took up to {idx[1]}; "
                            + kick(hmp, path))
                kicked.add(path)
        self.seen = {p: i for p, i in found.items() if p not in kicked}
        self.events += said
        return said
