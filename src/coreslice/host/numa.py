"""NUMA nodes from the ACPI SRAT: which CPUs and which RAM belong together, and what is free.

The host kernel's own view (/sys/devices/system/node) is no use here: it lists online CPUs only
and the memory the host uses (``mem=`` cut the rest), while slices live on what the host left
out.  So the nodes come from the firmware's SRAT (ACPI 6.5 §5.2.16), read the way Linux reads it
(drivers/acpi/numa/srat.c): proximity domains become nodes 0, 1, ... in order of first
appearance, processor entries (types 0 and 2) in table order first, then memory entries;
disabled entries are ignored.  That numbering matches the node numbers the host kernel shows.

A host without an SRAT is one node 0 holding every CPU and all RAM.  Firmware RAM that no SRAT
memory entry covers belongs to no node, and nothing is placed there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from coreslice.acpi.tables import Srat, parse_srat
from coreslice.host.cpus import HostCpu
from coreslice.host.memory import Range, intersect, subtract
from coreslice.host.sysfs import read_acpi_table

# Never hand out the first MiB: real-mode structures, the BIOS, and the low-memory slots live there.
LOW_LIMIT = 1 << 20


@dataclass(frozen=True)
class NumaNode:
    node: int
    proximity_domain: int | None   # None without an SRAT
    cpus: tuple[int, ...]          # logical CPU numbers (present ones, host's included)
    apic_ids: tuple[int, ...]
    memory: tuple[Range, ...]      # firmware RAM on this node
    free: tuple[Range, ...]        # memory minus the host's System RAM and the low 1 MiB

    def to_json(self) -> dict:
        return {
            "node": self.node,
            "proximity_domain": self.proximity_domain,
            "cpus": list(self.cpus),
            "apic_ids": list(self.apic_ids),
            "memory": [r.to_json() for r in self.memory],
            "free": [r.to_json() for r in self.free],
            "memory_bytes": sum(r.size for r in self.memory),
            "free_bytes": sum(r.size for r in self.free),
        }


def read_srat(root: Path) -> Srat | None:
    return read_acpi_table(root, "SRAT", parse_srat)


def proximity_nodes(srat: Srat) -> dict[int, int]:
    """Proximity domain -> node number, as Linux assigns them (first appearance)."""
    order: dict[int, int] = {}
    for pxm in [c.proximity_domain for c in srat.cpus if c.enabled] + \
               [m.proximity_domain for m in srat.memory if m.enabled]:
        order.setdefault(pxm, len(order))
    return order


def apic_nodes(srat: Srat | None) -> dict[int, int] | None:
    """APIC ID -> node; None without an SRAT (everything on node 0)."""
    if srat is None:
        return None
    nodes = proximity_nodes(srat)
    return {c.apic_id: nodes[c.proximity_domain] for c in srat.cpus if c.enabled}


def build_nodes(srat: Srat | None, cpus: list[HostCpu], firmware_ram: list[Range],
                host_ram: list[Range]) -> list[NumaNode]:
    """The nodes, each with its CPUs, its RAM and its free RAM.  Pure."""
    taken = [*host_ram, Range(0, LOW_LIMIT)]
    if srat is None:
        domains = {0: (None, list(firmware_ram))}
    else:
        domains = {}
        for pxm, node in proximity_nodes(srat).items():
            spans = [Range(m.base, m.end) for m in srat.memory if m.enabled and m.proximity_domain == pxm]
            domains[node] = (pxm, intersect(firmware_ram, spans))
    out = []
    for node, (pxm, memory) in sorted(domains.items()):
        mine = [c for c in cpus if c.node == node]
        out.append(NumaNode(
            node=node, proximity_domain=pxm,
            cpus=tuple(c.cpu for c in mine),
            apic_ids=tuple(c.apic_id for c in mine if c.apic_id is not None),
            memory=tuple(memory),
            free=tuple(subtract(memory, taken)),
        ))
    return out
