"""Host CPUs: logical numbers, APIC IDs and their state.

A CPU that the host never brought up (``maxcpus=``) is *present* but not *online*.  Its APIC ID is
not in /proc/cpuinfo, so it comes from the host MADT: through the ACPI processor UID that the
kernel links under cpuN/firmware_node when it has one, otherwise by the kernel's numbering rule
(the boot CPU is 0, the other usable MADT entries follow in table order).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from coreslice.acpi.tables import Madt
from coreslice.host.sysfs import host_file_error, parse_int, read_cpu_list, read_text


@dataclass(frozen=True)
class HostCpu:
    cpu: int
    apic_id: int | None
    online: bool
    boot: bool
    node: int | None = 0  # NUMA node (host/numa.py); None when the SRAT does not list its APIC ID

    def to_json(self) -> dict:
        return {"cpu": self.cpu, "apic_id": self.apic_id, "online": self.online, "boot": self.boot,
                "node": self.node}


def parse_cpuinfo_apic_ids(text: str) -> dict[int, int]:
    """processor -> apicid for the online CPUs; ValueError for a value that is not a number."""
    out: dict[int, int] = {}
    proc = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "processor":
            proc = parse_int(value)
        elif key == "apicid" and proc is not None:
            out[proc] = parse_int(value)
    return out


def linux_madt_cpus(madt: Madt | None) -> list:
    """The MADT's processor entries as Linux registers them (arch/x86/kernel/acpi/boot.c), in
    table order: enabled or online-capable ones; x2APIC entries with an APIC ID below 0xFF are
    ignored when the table has Local APIC entries (ACPI 6.5 §5.2.12.12 gives those IDs to type
    0 entries); an APIC ID seen twice counts once."""
    entries = [e for e in (madt.processors if madt else []) if e.enabled or e.online_capable]
    has_lapic = any(e.kind == "lapic" for e in entries)
    out, seen = [], set()
    for e in entries:
        if e.kind == "x2apic" and e.apic_id < 0xFF and has_lapic:
            continue
        if e.apic_id in seen:
            continue
        seen.add(e.apic_id)
        out.append(e)
    return out


def read_cpus(root: Path, madt: Madt | None, apic_nodes: dict[int, int] | None = None) -> list[HostCpu]:
    """``apic_nodes`` maps APIC IDs to NUMA nodes (numa.apic_nodes); None: one node, 0."""
    present = read_cpu_list(root, "sys/devices/system/cpu/present", "0")
    online = set(read_cpu_list(root, "sys/devices/system/cpu/online", "0"))
    try:
        online_ids = parse_cpuinfo_apic_ids(read_text(root, "proc/cpuinfo", "") or "")
    except ValueError as e:
        raise host_file_error(root, "proc/cpuinfo", f"a processor or apicid line is not a number ({e})") from None

    usable = linux_madt_cpus(madt)
    by_uid = {e.uid: e.apic_id for e in usable}
    boot_apic = online_ids.get(0)
    order = [e.apic_id for e in usable if e.apic_id != boot_apic]
    if boot_apic is not None:
        order.insert(0, boot_apic)

    cpus = []
    for n in present:
        apic = online_ids.get(n)
        if apic is None:
            uid = read_text(root, f"sys/devices/system/cpu/cpu{n}/firmware_node/uid")
            if uid is not None and uid.isdigit() and int(uid) in by_uid:
                apic = by_uid[int(uid)]
            elif n < len(order):
                apic = order[n]
        node = 0 if apic_nodes is None else apic_nodes.get(apic) if apic is not None else None
        cpus.append(HostCpu(cpu=n, apic_id=apic, online=n in online, boot=n == 0, node=node))
    return cpus
