"""The slices' data path on the emulated machine: ``coreslice testbed run --storage --network``.

Each slice whose console is a UART on a pxb-pcie root bus (pxbK, root bus N = 0x20, 0x40, 0x60)
gets, on that same root bus, next to its UART (root port N:00.0 -> UART (N+1):00.0)::

    root port N:01.0 -> QEMU ``nvme`` at (N+2):00.0  (--storage), a raw image in the run dir
                        holding an ext4 file system (built with ``mkfs.ext4 -d``, no mount)
                        with the file /hello.txt
    root port N:02.0 -> QEMU ``e1000e`` at (N+3):00.0 (--network), MSI-X capable (the slice
                        runs with ``noapic``: only MSI/MSI-X work there)

and both are passed to ``coreslice boot`` as ``--device``, so the slice's DSDT root is the one
that already holds its console.  The slice NIC shares a QEMU hub (``-netdev hubport``,
hub K) with a host NIC (e1000e at 0000:00:(0x18+K).0): link K is 10.99.K.0/24, the host
is .1, the slice .2.  The slice learns what to do from its command line
(``coreslice.storage=1 coreslice.net=10.99.K.2/24,10.99.K.1``), which its init reads.

The host itself gets a small NVMe disk of its own (0000:00:17.0, ext4 labelled ``cs-host``)
and a NIC (0000:00:18.0) on QEMU user networking with ``restrict=on`` (nothing leaves the
emulated machine; the gateway 10.0.2.2 answers pings).  After the slices reported, the job
reads its disk and pings the gateway and each slice, to show that the host's own devices
still work.

Everything here is pure (command-line pieces, shell lines, parsers) except the image
helpers, which run ``mkfs.ext4`` / ``debugfs`` on the build machine.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from coreslice.errors import UsageError
from coreslice.testbed.topology import SerialPort
from coreslice.testbed.job import option_value
from coreslice.testbed.report import DATA_FILE, RESULT_FILE, RESULT_PREFIX  # noqa: F401
from coreslice.testbed.tools import ToolError, read_or_none

IMAGE_SIZE_MB = 16
HOST_DISK_SLOT = 0x17
HOST_NIC_SLOT = 0x18
HOST_LINK_SLOT_BASE = 0x18  # + K for pxbK
HOST_DISK_LABEL = "cs-host"
HOST_NET_ADDR = "10.0.2.15/24"
HOST_NET_PEER = "10.0.2.2"
NIC_MODEL = "e1000e"
# Modules (with modules.dep dependencies added) for the data path; ext4's crc32c is a softdep.
DATA_MODULES = ("nvme", "crc32c_generic", "ext4", "e1000e")


def known_content(name: str) -> str:
    """The content of /hello.txt in image ``name`` (no spaces: the report carries it)."""
    return f"coreslice-disk-{name}-ok"


@dataclass(frozen=True)
class SliceLink:
    """The data devices of one pxb root bus."""

    port: SerialPort  # the pxb UART (its root bus is the slice's DSDT root)
    k: int  # 1, 2, 3 for pxb1..3
    storage: bool
    network: bool
    image: Path | None = None
    image_format: str = "raw"
    guest_os: bool = False  # the disk holds a slice OS (guestos.py), not the hello image

    @property
    def bus(self) -> int:
        return self.port.bus_nr  # type: ignore[return-value]

    @property
    def nvme_address(self) -> str:
        return f"0000:{self.bus + 2:02x}:00.0"

    @property
    def nic_address(self) -> str:
        # The firmware numbers the buses below the pxb in root-port order: the NIC's root port
        # (slot 2) gets N+3 after the NVMe's (slot 1), N+2 when there is no NVMe.
        return f"0000:{self.bus + (3 if self.storage else 2):02x}:00.0"

    @property
    def slice_mac(self) -> str:
        return f"52:54:00:99:{self.k:02x}:02"

    @property
    def host_nic_address(self) -> str:
        return f"0000:00:{HOST_LINK_SLOT_BASE + self.k:02x}.0"

    @property
    def subnet(self) -> str:
        return f"10.99.{self.k}"

    @property
    def slice_ip(self) -> str:
        return f"{self.subnet}.2"

    @property
    def host_ip(self) -> str:
        return f"{self.subnet}.1"

    @property
    def devices(self) -> list[str]:
        """PCI functions for ``coreslice boot --device``."""
        return ([self.nvme_address] if self.storage else []) + ([self.nic_address] if self.network else [])

    @property
    def cmdline(self) -> str:
        """Kernel parameters that tell the slice's init what to do."""
        parts = []
        if self.storage:
            parts.append("coreslice.storage=1")
        if self.network:
            parts.append(f"coreslice.net={self.slice_ip}/24,{self.host_ip}")
        return " ".join(parts)

    def describe(self) -> dict:
        return {
            "root_bus": self.port.root_bus,
            "nvme": self.nvme_address if self.storage else None,
            "image": str(self.image) if self.image else None,
            "nic": self.nic_address if self.network else None,
            "slice_ip": self.slice_ip if self.network else None,
            "host_ip": self.host_ip if self.network else None,
            "host_nic": self.host_nic_address if self.network else None,
        }


def link_for_port(port: SerialPort | None, storage: bool, network: bool, run_dir: Path) -> SliceLink:
    if port is None or port.kind != "pxb":
        where = port.console_arg if port else "not a testbed UART"
        raise UsageError(
            f"--storage/--network: each slice needs a console on a pxb root bus of its own "
            f"(0000:21:00.0, 0000:41:00.0, 0000:61:00.0), where its NVMe and NIC are placed; "
            f"this slice's console is {where} (drop --isa-consoles / --console)"
        )
    k = int(port.name.removeprefix("pxb"))
    image = run_dir / f"disk-{port.name}.img" if storage else None
    return SliceLink(port, k, storage, network, image)


def machine_args(links: Sequence[SliceLink], run_dir: Path, host_devices: bool = True) -> list[str]:
    """QEMU arguments (appended after the UARTs, so the pxbs exist) for the data devices."""
    args: list[str] = []
    if host_devices:
        args += ["-drive", f"if=none,id=hostdisk,format=raw,file={run_dir / 'disk-host.img'}",
                 "-device", f"nvme,drive=hostdisk,serial=cs-host,bus=pcie.0,addr={HOST_DISK_SLOT:#x}",
                 "-netdev", "user,id=hostnet,restrict=on",
                 "-device", f"{NIC_MODEL},netdev=hostnet,mac=52:54:00:99:00:01,bus=pcie.0,"
                            f"addr={HOST_NIC_SLOT:#x}"]
    for link in links:
        pxb, bus = link.port.name, link.bus
        if link.storage:
            rp = f"{pxb}rp1"
            args += ["-device", f"pcie-root-port,id={rp},bus={pxb},chassis={bus:#x},slot=1,addr=0x1",
                     "-drive", f"if=none,id={pxb}disk,format={link.image_format},file={link.image}",
                     "-device", f"nvme,drive={pxb}disk,serial=cs-{pxb},bus={rp},addr=0x0"]
        if link.network:
            rp = f"{pxb}rp2"
            args += ["-device", f"pcie-root-port,id={rp},bus={pxb},chassis={bus:#x},slot=2,addr=0x2",
                     "-netdev", f"hubport,id={pxb}net,hubid={link.k}",
                     "-device", f"{NIC_MODEL},netdev={pxb}net,mac={link.slice_mac},"
                                f"bus={rp},addr=0x0",
                     "-netdev", f"hubport,id={pxb}hostnet,hubid={link.k}",
                     "-device", f"{NIC_MODEL},netdev={pxb}hostnet,mac=52:54:00:99:{link.k:02x}:01,"
                                f"bus=pcie.0,addr={HOST_LINK_SLOT_BASE + link.k:#x}"]
    return args


def slice_args(args: Sequence[str], link: SliceLink) -> tuple[str, ...]:
    """``coreslice boot`` arguments with the link's ``--device``s and its parameters added to
    ``--cmdline`` (merged with one the slice string gives).  Anything with ``devices`` and
    ``cmdline`` will do (dmaprobe.DmaProbe too)."""
    out: list[str] = []
    skip = False
    for i, a in enumerate(args):
        if skip:
            skip = False
            continue
        if a == "--cmdline":
            skip = True
            continue
        if a.startswith("--cmdline="):
            continue
        out.append(a)
    for dev in link.devices:
        if dev not in out:
            out += ["--device", dev]
    given = option_value(args, "--cmdline")
    out += ["--cmdline", " ".join(p for p in (given, link.cmdline) if p)]
    return tuple(out)


def _net_dev(address: str) -> str:
    """Shell: the interface name of the NIC at PCI ``address``."""
    return f'$(ls /sys/bus/pci/devices/{address}/net/ 2>/dev/null | head -n1)'


def host_setup_lines(links: Sequence[SliceLink]) -> list[str]:
    """Job-script lines run before the slices boot: the host's own NIC and each link's host
    NIC get their addresses; the host disk is read once."""
    lines = [
        "event data-setup",
        f'd={_net_dev(f"0000:00:{HOST_NIC_SLOT:02x}.0")}',
        f'[ -n "$d" ] && ip addr add {HOST_NET_ADDR} dev "$d" && ip link set "$d" up',
        'echo "hostnet $d" >data-host-setup.txt',
    ]
    for link in links:
        if link.network:
            lines += [
                f"d={_net_dev(link.host_nic_address)}",
                f'[ -n "$d" ] && ip addr add {link.host_ip}/24 dev "$d" && ip link set "$d" up',
                f'echo "link{link.k} $d" >>data-host-setup.txt',
            ]
    lines += ["ip -br addr >>data-host-setup.txt 2>&1", *_host_disk_lines("before")]
    return lines


def _host_disk_lines(when: str) -> list[str]:
    return [
        "mkdir -p /tmp/hostdisk",
        f"dev=$(blkid -c /dev/null -L {HOST_DISK_LABEL} 2>/dev/null)",
        f'if [ -n "$dev" ] && mount -o ro "$dev" /tmp/hostdisk; then'
        f' cat /tmp/hostdisk/{DATA_FILE} >host-disk-{when}.txt; umount /tmp/hostdisk;'
        f' else echo "no host disk ($dev)" >host-disk-{when}.err; fi',
    ]


def host_check_lines(links: Sequence[SliceLink]) -> list[str]:
    """Job-script lines run after the slices reported: read the host disk, ping the user-net
    gateway through the host's own NIC, and ping each slice from the host."""
    lines = ["event data-check", *_host_disk_lines("after"),
             f"busybox ping -c 3 -w 15 {HOST_NET_PEER} >host-ping-own.txt 2>&1; "
             "echo $? >host-ping-own.rc"]
    for link in links:
        if link.network:
            lines.append(f"busybox ping -c 3 -w 15 {link.slice_ip} >host-ping-link{link.k}.txt 2>&1; "
                         f"echo $? >host-ping-link{link.k}.rc")
    return lines


_RTT = re.compile(r"min/avg/max(?:/mdev)? = [0-9.]+/([0-9.]+)/")


def ping_rtt(text: str) -> float | None:
    """The average round trip (ms) from ping's summary (busybox or iputils), None if none."""
    m = _RTT.search(text or "")
    return float(m.group(1)) if m else None


# --- images -----------------------------------------------------------------------------------


def mkfs_command(image: Path, stage: Path, label: str, size_mb: int = IMAGE_SIZE_MB) -> list[str]:
    """``mkfs.ext4`` populating ``image`` from directory ``stage`` (no journal: what a slice
    writes and unmounts is in place when the machine stops)."""
    return ["mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-L", label, "-d", str(stage),
            str(image), f"{size_mb}M"]


def build_image(image: Path, label: str, files: dict[str, str], size_mb: int = IMAGE_SIZE_MB) -> Path:
    """A raw image holding an ext4 file system with ``files`` (name -> text); no mount."""
    stage = image.with_name(image.name + ".d")
    stage.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (stage / name).write_text(text)
    image.unlink(missing_ok=True)
    try:
        proc = subprocess.run(mkfs_command(image, stage, label, size_mb), capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise ToolError("mkfs.ext4 not found: apt-get install e2fsprogs") from exc
    if proc.returncode != 0:
        raise ToolError(f"mkfs.ext4 {image}: {proc.stderr.strip()}")
    return image


def read_image_file(image: Path, name: str) -> str | None:
    """The text of /``name`` in the ext4 ``image`` (debugfs, read-only), None if absent."""
    try:
        proc = subprocess.run(["debugfs", "-R", f"cat /{name}", str(image)],
                              capture_output=True, text=True)
    except (FileNotFoundError, OSError):
        return None
    if proc.returncode != 0 or "File not found" in proc.stderr:
        return None
    return proc.stdout


def build_images(links: Sequence[SliceLink], run_dir: Path) -> None:
    build_image(run_dir / "disk-host.img", HOST_DISK_LABEL, {DATA_FILE: known_content("host") + "\n"})
    for link in links:
        if link.storage and link.image is not None and not link.guest_os:
            build_image(link.image, f"cs-{link.port.name}", {DATA_FILE: known_content(link.port.name) + "\n"})


# --- results ----------------------------------------------------------------------------------


def slice_result(link: SliceLink, report: dict | None) -> dict:
    """``storage`` / ``network`` of a slice's JSON result (after the machine stopped)."""
    rep = report or {}
    out: dict = {"devices": link.describe()}
    if link.storage and not link.guest_os:
        st = rep.get("storage") or {}
        text = read_image_file(link.image, RESULT_FILE) if link.image else None
        out["storage"] = {
            "read": st.get("read"),
            "expected": known_content(link.port.name),
            "written": bool(text and text.startswith(RESULT_PREFIX)),
            "written_reported": st.get("written"),
            "result_file": text.strip() if text else None,
        }
    if link.network and not link.guest_os:
        nt = rep.get("network") or {}
        out["network"] = {"ping_ok": bool(nt.get("ping_ok")), "rtt_ms": nt.get("rtt_ms"),
                          "address": link.slice_ip, "peer": link.host_ip}
    return out


def host_result(run_dir: Path, links: Sequence[SliceLink]) -> dict:
    """The host's own disk and network, checked before and after the slices."""
    before = (read_or_none(run_dir / "host-disk-before.txt") or "").strip() or None
    after = (read_or_none(run_dir / "host-disk-after.txt") or "").strip() or None
    own = read_or_none(run_dir / "host-ping-own.txt") or ""
    pings = {}
    for link in links:
        if link.network:
            t = read_or_none(run_dir / f"host-ping-link{link.k}.txt") or ""
            pings[link.slice_ip] = {"ok": ping_rtt(t) is not None, "rtt_ms": ping_rtt(t)}
    expected = known_content("host")
    return {
        "disk": {"read_before": before, "read_after": after, "expected": expected,
                 "ok": after == expected},
        "network": {"peer": HOST_NET_PEER, "ping_ok": ping_rtt(own) is not None,
                    "rtt_ms": ping_rtt(own), "slices": pings},
        "setup": read_or_none(run_dir / "data-host-setup.txt"),
    }


# x2APIC mode (--x2apic: intel-iommu with intremap=on, the host in x2APIC with interrupt
# remapping) works too on the emulated machine: QEMU's VT-d delivers the slice devices'
# compatibility-format MSIs.  Real VT-d hardware blocks them once the host enables remapping in
# x2APIC mode without compatibility-format interrupts (GSTS.CFIS clear), as Linux does; there a
# slice device needs an IRTE of its own, or the host must run without interrupt remapping.

