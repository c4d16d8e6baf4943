"""Where a slice's PCI function can DMA: ``coreslice testbed run --dma-probe [--iommu]``.

Each slice whose console is a UART on a pxb-pcie root bus (pxbK, root bus N = 0x20/0x40/0x60)
gets, on that root bus, a root port N:03.0 with QEMU's ``edu`` device behind it (a DMA engine
with a 4 KiB buffer, hw/misc/edu.c).  Buses behind a pxb are numbered by the firmware in slot
order, so the edu's bus is N+2 plus one for each of the NVMe (N:01.0) and NIC (N:02.0) root
ports present: (N+4):00.0 with --storage --network.  The edu is passed to ``coreslice boot`` as
``--device`` and ``coreslice.dmaprobe=1`` to the slice, whose init (initramfs.SLICE_DMA) makes
it copy 64 bytes of its own RAM (its command line) into the buffer and back into its own RAM,
then 64 bytes from host physical address 0 (the host's real-mode IVT: non-zero, host RAM that
no slice is given), and compares both with what its CPU reads there.  The report line says
``dma_own=<0|1|-> dma_host=<blocked|leaked|->``.

With ``--iommu`` the host runs QEMU's intel-iommu (``intremap=off``: see topology.IOMMU_DEVICE)
with ``intel_iommu=on intremap=off`` and loads VFIO (VFIO_MODULES); the host kernel then logs
each blocked DMA (DMAR fault lines, :func:`dmar_faults`), which is matched to the slice's edu.

Everything here is pure: command-line pieces, the result, the fault-line parser.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from coreslice.errors import UsageError
from coreslice.testbed.topology import SerialPort

EDU_VENDOR = 0x1234  # PCI_VENDOR_ID_QEMU
EDU_DEVICE = 0x11E8  # hw/misc/edu.c edu_class_init
EDU_ROOT_PORT_SLOT = 3  # N:01.0 NVMe and N:02.0 NIC (datapath.py) come first
# edu's default dma_mask is 28 bits and it silently clamps addresses to it (edu_clamp_addr):
# a slice above 256 MiB would DMA somewhere else.
EDU_DMA_MASK = 0xFFFFFFFFFFFFFFFF
HOST_ADDR = 0x0  # what the probe tries to read of the host's memory
CMDLINE_PARAM = "coreslice.dmaprobe=1"
# Host modules for --iommu (coreslice boot's VFIO holder); CONFIG_VFIO_CONTAINER=y gives
# /dev/vfio/vfio.  Resolved with their dependencies by initramfs.host_data_modules.
VFIO_MODULES = ("vfio", "vfio_iommu_type1", "irqbypass", "vfio-pci-core", "vfio-pci")


@dataclass(frozen=True)
class DmaProbe:
    """The edu of one pxb root bus."""

    port: SerialPort  # the pxb UART
    storage: bool  # the NVMe root port N:01.0 is there (shifts the edu's bus)
    network: bool  # the NIC root port N:02.0 is there

    @property
    def bus(self) -> int:
        return self.port.bus_nr  # type: ignore[return-value]

    @property
    def edu_bus(self) -> int:
        # N+1 is the UART's; then one bus per root port before slot 3.
        return self.bus + 2 + int(self.storage) + int(self.network)

    @property
    def edu_address(self) -> str:
        return f"0000:{self.edu_bus:02x}:00.0"

    @property
    def devices(self) -> list[str]:
        """PCI functions for ``coreslice boot --device`` (datapath.slice_args takes this too)."""
        return [self.edu_address]

    @property
    def cmdline(self) -> str:
        return CMDLINE_PARAM

    def machine_args(self) -> list[str]:
        """QEMU arguments (after the UARTs, so the pxb exists): root port N:03.0 -> edu."""
        pxb = self.port.name
        rp = f"{pxb}rp{EDU_ROOT_PORT_SLOT}"
        return ["-device", f"pcie-root-port,id={rp},bus={pxb},chassis={self.bus:#x},"
                           f"slot={EDU_ROOT_PORT_SLOT},addr={EDU_ROOT_PORT_SLOT:#x}",
                "-device", f"edu,bus={rp},addr=0x0,dma_mask={EDU_DMA_MASK:#x}"]


def probe_for_port(port: SerialPort | None, storage: bool, network: bool) -> DmaProbe:
    if port is None or port.kind != "pxb":
        where = port.console_arg if port else "not a testbed UART"
        raise UsageError(
            f"--dma-probe: each slice needs a console on a pxb root bus of its own (0000:21:00.0, "
            f"0000:41:00.0, 0000:61:00.0), where its edu device is placed; this slice's console "
            f"is {where} (drop --isa-consoles / --console)")
    return DmaProbe(port, storage, network)


def machine_args(probes: Sequence[DmaProbe]) -> list[str]:
    return [a for p in probes for a in p.machine_args()]


# drivers/iommu/intel/dmar.c dmar_fault_do_one (6.12, checked in the Debian kernel's strings):
#   "DMAR: [%s NO_PASID] Request device [%02x:%02x.%d] fault addr 0x%llx [fault reason 0x%02x] %s"
#   "DMAR: [%s PASID 0x%x] Request device ..."   (%s: "DMA Read" / "DMA Write")
# The address is the fault record's page (dma_frcd_page_addr); the segment is not printed.
_FAULT = re.compile(
    r"DMAR: \[(?P<kind>DMA Read|DMA Write)(?: NO_PASID| PASID 0x[0-9a-f]+)?\] "
    r"Request device \[(?P<bus>[0-9a-f]{2}):(?P<dev>[0-9a-f]{2})\.(?P<fn>[0-7])\] "
    r"(?:PASID [0-9a-f]+ )?fault addr (?:0x)?(?P<addr>[0-9a-f]+) "
    r"\[fault reason (?:0x)?(?P<reason>[0-9a-f]+)\] ?(?P<text>[^\r\n]*)")


def dmar_faults(log: str) -> list[dict]:
    """The DMA remapping faults a host kernel log reports, in order: kind ("DMA Read"/"DMA
    Write"), device ("24:00.0"), addr (int, page), reason (hex string), text."""
    return [{"kind": m["kind"], "device": f"{m['bus']}:{m['dev']}.{m['fn']}",
             "addr": int(m["addr"], 16), "reason": m["reason"], "text": m["text"].strip()}
            for m in _FAULT.finditer(log or "")]


def faults_of(log: str, address: str) -> list[dict]:
    """The faults of the function at ``address`` ("0000:24:00.0"; segment 0 only is printed)."""
    short = address.split(":", 1)[1] if address.count(":") == 2 else address
    return [f for f in dmar_faults(log) if f["device"] == short.lower()]


def slice_result(probe: DmaProbe, report: dict | None, host_log: str) -> dict:
    """A slice's ``dma``: what its probe answered (None: no answer) and whether the host logged
    a fault of its edu at the host address's page."""
    d = (report or {}).get("dma") or {}
    host = d.get("host")
    faults = faults_of(host_log, probe.edu_address)
    return {
        "own_ok": d.get("own"),
        "host_blocked": None if host is None else host == "blocked",
        "fault_logged": any(f["addr"] == HOST_ADDR & ~0xFFF for f in faults),
        "edu": probe.edu_address,
        "host_addr": f"{HOST_ADDR:#x}",
        "faults": [f"{f['kind']} {f['addr']:#x} reason {f['reason']}" for f in faults][:8],
    }


def dma_ok(dma: dict, iommu: bool) -> bool:
    """The probe answered, own-RAM DMA worked and, with an IOMMU, the host read was blocked and
    logged.  Without one the host read leaks (what the IOMMU changes): still ok."""
    if dma["own_ok"] is not True or dma["host_blocked"] is None:
        return False
    return bool(dma["host_blocked"] and dma["fault_logged"]) if iommu else True


def describe(dma: dict) -> str:
    """One line for the text summary."""
    own = {True: "ok", False: "FAILED", None: "no answer"}[dma["own_ok"]]
    host = {True: "blocked", False: "LEAKED", None: "no answer"}[dma["host_blocked"]]
    return (f"dma ({dma['edu']}): own RAM {own}; host {dma['host_addr']} {host}; "
            f"DMAR fault {'logged' if dma['fault_logged'] else 'not logged'}")
