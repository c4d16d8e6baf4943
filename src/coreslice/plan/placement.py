"""Placement: choose CPUs and one memory range, on one NUMA node, that no slice holds.  Pure.

Rules, in order:
- CPUs a slice may get: present, offline in the host, not its boot CPU, with a known APIC ID,
  not held by a slice of this host boot; the lowest numbers first.
- Memory: the node's free RAM (firmware RAM minus the host's System RAM minus the low 1 MiB,
  see host/numa.py) minus what slices hold; the lowest base aligned to 1 GiB that fits (so the
  slice kernel can map it with 1 GiB pages), else the lowest aligned to 2 MiB.
- CPUs and memory come from the same node: the one asked for, else the node of what was given
  explicitly, else the lowest node where both fit.
- A request that names a slice that exists (``name``) with the same shape gets that slice's
  resources back: that is a relaunch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from coreslice.boot.layout import align_up
from coreslice.errors import UsageError
from coreslice.host.memory import Range, subtract
from coreslice.host.snapshot import Host
from coreslice.host.sysfs import format_cpu_list
from coreslice.units import format_size

PAGE = 0x1000
MIB2 = 2 << 20
GIB = 1 << 30
ALIGNMENTS = (GIB, MIB2)


@dataclass(frozen=True)
class Held:
    """Resources a slice of this host boot holds (from the ledger or a low-memory slot record)."""

    name: str
    cpus: frozenset[int]
    mem: Range


@dataclass(frozen=True)
class Request:
    mem_size: int
    ncpus: int | None = None          # either a count ...
    cpus: tuple[int, ...] | None = None  # ... or explicit CPUs
    mem_base: int | None = None       # None: the planner picks
    node: int | None = None
    name: str | None = None
    # The slice gets PCI devices: prefer CPUs whose APIC ID an MSI can name (below 256).
    low_apic_ids: bool = False


@dataclass(frozen=True)
class Placement:
    node: int | None
    cpus: list[int]
    apic_ids: list[int]
    mem_base: int
    mem_size: int
    relaunch: str | None = None       # the name of the slice whose resources these are

    def to_json(self) -> dict:
        return {"node": self.node, "cpus": self.cpus, "apic_ids": self.apic_ids,
                "memory": {"base": self.mem_base, "size": self.mem_size},
                "relaunch_of": self.relaunch}


@dataclass(frozen=True)
class NodeFree:
    node: int
    cpus: list[int]
    memory: list[Range] = field(default_factory=list)

    @property
    def largest(self) -> Range | None:
        return max(self.memory, key=lambda r: (r.size, -r.start), default=None)

    def describe(self) -> str:
        big = self.largest
        mem = f"{_size(big.size)} at 0x{big.start:x}" if big else "none"
        return f"node {self.node}: CPUs {format_cpu_list(self.cpus) or 'none'}, largest memory range {mem}"

    def to_json(self) -> dict:
        big = self.largest
        return {"node": self.node, "cpus": self.cpus, "memory": [r.to_json() for r in self.memory],
                "memory_bytes": sum(r.size for r in self.memory),
                "largest": big.to_json() if big else None}


def _size(n: int) -> str:
    """format_size, rounded down to MiB when it does not divide evenly (for messages)."""
    text = format_size(n)
    return text if not text.isdigit() else f"{n >> 20}M"


def held_resources(host: Host, rows: Sequence = (), slot_records: Sequence = ()) -> list[Held]:
    """Held resources from ledger rows (name, cpus, mem_base, mem_size) and from low-memory slot
    records of this boot (apic_ids, mem_base, mem_size) that no ledger row accounts for."""
    held = [Held(r.name, frozenset(r.cpus), Range(r.mem_base, r.mem_base + r.mem_size)) for r in rows]
    by_apic = {c.apic_id: c.cpu for c in host.cpus if c.apic_id is not None}
    for rec in slot_records:
        mem = Range(rec.mem_base, rec.mem_base + rec.mem_size)
        if not any(h.mem == mem for h in held):
            cpus = frozenset(by_apic[a] for a in rec.apic_ids if a in by_apic)
            held.append(Held(f"(unrecorded slice on CPUs {format_cpu_list(list(cpus))})", cpus, mem))
    return held


def free_resources(host: Host, held: Sequence[Held]) -> list[NodeFree]:
    """What each node still has for slices."""
    taken_cpus = set().union(*(h.cpus for h in held)) if held else set()
    taken_mem = [h.mem for h in held]
    out = []
    for n in host.numa:
        cpus = [c.cpu for c in host.cpus if c.node == n.node and not c.online and not c.boot
                and c.apic_id is not None and c.cpu not in taken_cpus]
        out.append(NodeFree(n.node, sorted(cpus), subtract(list(n.free), taken_mem)))
    return out


def fit_memory(free: Sequence[Range], size: int) -> int | None:
    """Lowest base of ``size`` bytes inside one free range, 1 GiB aligned if any, else 2 MiB."""
    for align in ALIGNMENTS:
        for r in free:
            base = align_up(r.start, align)
            if base + size <= r.end:
                return base
    return None


def _node_of_memory(host: Host, base: int, size: int) -> int | None:
    return next((n.node for n in host.numa if any(r.contains(base, base + size) for r in n.memory)), None)


def _relaunch(host: Host, req: Request, held: Sequence[Held]) -> Placement | None:
    mine = next((h for h in held if req.name is not None and h.name == req.name), None)
    if mine is None:
        return None
    count = len(req.cpus) if req.cpus is not None else req.ncpus
    same = (count == len(mine.cpus) and req.mem_size == mine.mem.size
            and (req.cpus is None or set(req.cpus) == mine.cpus)
            and (req.mem_base is None or req.mem_base == mine.mem.start))
    if not same:
        raise UsageError(
            f"slice '{mine.name}' already holds CPUs {format_cpu_list(list(mine.cpus))} and "
            f"{_size(mine.mem.size)}@0x{mine.mem.start:x}; relaunch it with {len(mine.cpus)} CPUs and "
            f"--memory {_size(mine.mem.size)}, stop it first (coreslice stop {mine.name}), or choose another --name")
    cpus = sorted(mine.cpus)
    by_num = {c.cpu: c for c in host.cpus}
    return Placement(by_num[cpus[0]].node if cpus[0] in by_num else None, cpus,
                     [by_num[c].apic_id for c in cpus if c in by_num], mine.mem.start, mine.mem.size, mine.name)


def place(host: Host, req: Request, held: Sequence[Held] = ()) -> Placement:
    """Choose the request's CPUs and memory.  Raises UsageError saying what is free."""
    if req.mem_size <= 0 or req.mem_size % PAGE:
        raise UsageError(f"memory size {req.mem_size} is not a positive multiple of 4K; write e.g. 512M or 1G")
    if req.cpus is None and (req.ncpus is None or req.ncpus < 1):
        raise UsageError("a slice needs at least one CPU; pass --ncpus N with N >= 1")
    again = _relaunch(host, req, held)
    if again is not None:
        return again

    nodes = [n.node for n in host.numa]
    by_num = {c.cpu: c for c in host.cpus}
    if req.node is not None and req.node not in nodes:
        raise UsageError(f"NUMA node {req.node} does not exist on this host (nodes: "
                         f"{', '.join(map(str, nodes)) or 'none'}); pass one of those to --numa-node")
    # Nodes that what was given explicitly pins the choice to.
    pinned: set[int] = set()
    if req.cpus is not None:
        pinned |= {by_num[c].node for c in req.cpus if c in by_num and by_num[c].node is not None}
    if req.mem_base is not None:
        node = _node_of_memory(host, req.mem_base, req.mem_size)
        if node is not None:
            pinned.add(node)
    if req.node is not None:
        if pinned - {req.node}:
            raise UsageError(f"the CPUs or memory given are on node(s) {', '.join(map(str, sorted(pinned)))}, "
                             f"not on --numa-node {req.node}; drop --numa-node or give resources of that node")
        candidates = [req.node]
    elif len(pinned) == 1:
        candidates = sorted(pinned)
    else:
        candidates = nodes

    free = {f.node: f for f in free_resources(host, held)}
    for node in candidates:
        f = free[node]
        if req.cpus is not None:
            cpus = list(req.cpus)
        elif len(f.cpus) >= req.ncpus:  # type: ignore[operator]
            order = sorted(f.cpus, key=lambda c: (by_num[c].apic_id > 0xFF, c)) if req.low_apic_ids else f.cpus
            cpus = sorted(order[:req.ncpus])
        else:
            continue
        base = req.mem_base if req.mem_base is not None else fit_memory(f.memory, req.mem_size)
        if base is None:
            continue
        return Placement(node, cpus, [by_num[c].apic_id for c in cpus if c in by_num], base, req.mem_size)

    want = (f"CPUs {format_cpu_list(list(req.cpus))}" if req.cpus is not None
            else f"{req.ncpus} CPU{'s' if req.ncpus != 1 else ''}")
    want += f" and {_size(req.mem_size)} of memory" if req.mem_base is None else ""
    where = f"NUMA node {candidates[0]} has no" if len(candidates) == 1 else "no NUMA node has"
    have = "; ".join(free[n].describe() for n in candidates) or "no nodes"
    raise UsageError(f"{where} room for {want} (free: {have}); "
                     "ask for fewer CPUs or less memory, or stop a slice (coreslice list shows them)")
