"""``coreslice host show``: what discovery found on this host (or a captured tree, or a dmesg).

Thin: discovery (host/) reads, this module only prints.  ``register(host_subparsers)`` adds
``show`` to the ``coreslice host`` command.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import stat
import sys
from pathlib import Path

from coreslice.acpi.tables import McfgAllocation
from coreslice.host import profiles
from coreslice.machine import for_host as machine_for
from coreslice.machine.grub import RealGrub
from coreslice.errors import UsageError
from coreslice.host import pci as hostpci
from coreslice.host import platform
from coreslice.host.sysfs import format_cpu_list

SHOW_HELP = """\
Print what coreslice knows about this host: CPUs (APIC IDs, online or parked, boot CPU, NUMA
node), memory (the firmware map, the host's own RAM, what is free), the PCI root complexes with
their bus ranges and I/O and memory windows and the functions behind each (class, driver,
SR-IOV), the MCFG (ECAM) allocations and the TSC frequency.  Read-only.

--from-dmesg FILE reads the kernel log from FILE (plain `dmesg` output, with or without
timestamps; '-' for stdin) instead of the host's: alone it shows what that log says (PCI roots,
functions, ECAM, TSC) for a machine you are not on; with --root it replaces that tree's log.
"""

SHOW_EPILOG = """\
examples:
  coreslice host show
  sudo dmesg | coreslice host show --from-dmesg -
  coreslice host show --root tests/fixtures/hosts/qemu-q35 --json
"""


def root_arg(text: str) -> Path:
    """argparse type of --root / --host-root: a directory (host/snapshot.py says why not)."""
    from coreslice.host.snapshot import root_problem

    problem = root_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(f"{text}: {problem}; pass a captured host tree "
                                         "(scripts/capture-host.sh), or / for this host")
    return Path(text)


def _read_log(path: str) -> str:
    """A saved log, or a pipe (--from-dmesg <(dmesg)).  Opened non-blocking, so that a named
    FIFO nobody writes to reads as empty instead of waiting forever; then read blocking, so that
    a pipe's writer is waited for."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
        os.set_blocking(fd, True)
        with os.fdopen(os.dup(fd), "r", errors="replace") as f:
            return f.read()
    finally:
        os.close(fd)


def read_log_file(path: str) -> list[str]:
    """Lines of a saved kernel log ('-': stdin); /dev/kmsg-style records lose their prefix."""
    try:
        text = sys.stdin.read() if path == "-" else _read_log(path)
    except OSError as e:
        raise UsageError(f"--from-dmesg {path}: {e.strerror}; pass a file holding `dmesg` output") from None
    lines = []
    for rec in text.splitlines():
        head, sep, msg = rec.partition(";")
        lines.append(msg if sep and "," in head and head.split(",")[0].isdigit() else rec)
    return lines


@dataclasses.dataclass
class LogView:
    """What a kernel log alone tells (``--from-dmesg FILE`` without ``--root``)."""

    source: str
    pci: hostpci.PciTopology
    tsc_khz: int | None

    def to_json(self) -> dict:
        return {"source": {"kernel_log": self.source}, "tsc_khz": self.tsc_khz,
                "mcfg": [_mcfg_json(a) for a in self.pci.ecam_from_log], "mcfg_source": "kernel log",
                "pci": self.pci.to_json()}


def load(root: Path | None, from_dmesg: str | None):
    """The Host (discovered from ``root``, its log replaced by ``from_dmesg``) or a LogView."""
    from coreslice.host.snapshot import discover

    if from_dmesg is not None and root is None:
        lines = read_log_file(from_dmesg)
        return LogView(from_dmesg, hostpci.from_log(lines), platform.tsc_khz_from_log(lines))
    root = root or Path("/")
    host = discover(root)
    if from_dmesg is not None:
        lines = read_log_file(from_dmesg)
        host = dataclasses.replace(host, kernel_log=lines, pci=hostpci.read_pci(root, lines),
                                   tsc_khz=platform.tsc_khz_from_log(lines) or host.tsc_khz)
    return host


# ---------------------------------------------------------------------------------------------
# Text

def _mcfg_json(a: McfgAllocation) -> dict:
    return {"segment": a.segment, "start_bus": a.start_bus, "end_bus": a.end_bus, "base_address": a.base_address,
            "start": a.base_address + (a.start_bus << 20), "end": a.base_address + ((a.end_bus + 1) << 20) - 1}


def _range(start: int, end_inclusive: int) -> str:
    return f"0x{start:x}-0x{end_inclusive:x}"


def _size(n: int) -> str:
    for unit, div in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= div:
            v = n / div
            return f"{v:.0f}{unit}" if v == int(v) else f"{v:.1f}{unit}"
    return f"{n}B"


def format_mcfg(allocs: list[McfgAllocation], source: str) -> list[str]:
    out = [f"MCFG (ECAM, from the {source}): {len(allocs)} allocation{'s' * (len(allocs) != 1)}"]
    for a in allocs:
        j = _mcfg_json(a)
        out.append(f"  segment {a.segment:04x} buses {a.start_bus:02x}-{a.end_bus:02x}: {_range(j['start'], j['end'])} "
                   f"(base 0x{a.base_address:x})")
    return out


def _function_line(f: hostpci.Function) -> str:
    ids = f"{f.vendor:04x}:{f.device:04x}" if f.vendor is not None and f.device is not None else "?"
    cls = f"0x{f.class_code:06x}" if f.class_code is not None else "?"
    extra = []
    if f.sriov_totalvfs is not None:
        extra.append(f"SR-IOV {f.sriov_numvfs if f.sriov_numvfs is not None else '?'}/{f.sriov_totalvfs} VFs")
    if f.physfn:
        extra.append(f"VF of {f.physfn}")
    if f.is_bridge:
        extra.append("bridge")
    return f"{f.address}  {cls}  {ids}  {f.driver or '-'}" + (f"  ({', '.join(extra)})" if extra else "")


def format_pci(topo: hostpci.PciTopology) -> list[str]:
    out = [f"PCI: {len(topo.roots)} root complex{'es' * (len(topo.roots) != 1)} (source: {topo.source})"]
    for r in topo.roots:
        name = f" [{r.acpi_name}]" if r.acpi_name else ""
        node = f", NUMA node {r.numa_node}" if r.numa_node is not None else ""
        out.append(f"  root {r.name}{name}: segment {r.segment:04x} buses {r.bus_start:02x}-{r.bus_end:02x}{node}")
        for label, ws in (("io", r.io), ("mem <4G", r.mem_below_4g), ("mem >4G", r.mem_above_4g),
                          ("consumed", r.consumed)):
            if ws:
                out.append(f"    {label:9} " + ", ".join(_range(w.start, w.end) + (" pref" if w.prefetchable else "")
                                                    + (f" {w.kind}" if label == "consumed" else "") for w in ws))
        if not (r.io or r.mem_below_4g or r.mem_above_4g):
            out.append("    no windows (a bus number only)")
        for f in topo.functions_under(r):
            out.append(f"    {_function_line(f)}")
    orphans = [f for f in topo.functions if f.root is None]
    if orphans:
        out.append("  functions under no known root:")
        out += [f"    {_function_line(f)}" for f in orphans]
    if not topo.functions_known:
        out.append("  (the log lists no functions: give the full `dmesg`, not only the root bus lines, to see them)")
    return out


def format_host(host) -> str:
    out = [f"Host {host.root}" + (f" (boot id {host.boot_id})" if host.boot_id else "")]
    if host.cmdline:
        out.append(f"  kernel command line: {host.cmdline}")
    cpus = host.cpus
    online = [c.cpu for c in cpus if c.online]
    out.append(f"CPUs: {len(cpus)} present, online {format_cpu_list(online) or 'none'}, "
               f"APIC mode {host.apic_mode or 'unknown'} ({host.apic_mode_source})")
    has_node = any(getattr(c, "node", None) not in (None, 0) for c in cpus) or len(getattr(host, "numa", []) or []) > 1
    out.append(("  cpu  apic id  state    " + ("node" if has_node else "")).rstrip())
    for c in cpus:
        state = "boot" if c.boot else "online" if c.online else "offline"
        node = getattr(c, "node", None)
        apic = str(c.apic_id) if c.apic_id is not None else "?"
        out.append(f"  {c.cpu:<4} {apic:<8} {state:<8} {node if has_node and node is not None else ''}".rstrip())
    out.append("Memory:")
    out.append("  firmware map:")
    for r in host.firmware_map:
        out.append(f"    {_range(r.start, r.end - 1):32} {_size(r.size):>6}  {r.type}")
    out.append("  host RAM (System RAM in /proc/iomem): " +
               (", ".join(f"{_range(r.start, r.end - 1)} ({_size(r.size)})" for r in host.host_ram()) or "unknown"))
    nodes = getattr(host, "numa", None) or []
    for n in nodes:
        free = ", ".join(f"{_range(r.start, r.end - 1)} ({_size(r.size)})" for r in n.free) or "none"
        out.append(f"  free RAM on node {n.node} (CPUs {format_cpu_list(list(n.cpus)) or 'none'}): {free}")
    out += format_pci(host.pci)
    if host.mcfg:
        out += format_mcfg(host.mcfg, "host's MCFG table")
    elif host.pci.ecam_from_log:
        out += format_mcfg(host.pci.ecam_from_log, "kernel log")
    else:
        out.append("MCFG: none (no /sys/firmware/acpi/tables/MCFG, no ECAM line in the kernel log)")
    ports = [p for p in host.serial_ports if p.type]
    if ports:
        out.append("Serial ports: " + ", ".join(f"{p.tty}=0x{p.port:x}" + (" (host console)" if p.in_use_as_console else "")
                                                for p in ports))
    out.append(f"TSC: {host.tsc_khz} kHz (kernel log)" if host.tsc_khz else "TSC: unknown (not in the kernel log)")
    return "\n".join(out)


def format_log_view(view: LogView) -> str:
    out = [f"Kernel log {view.source} (CPUs, memory and sysfs not read: add --root for a host tree)"]
    out += format_pci(view.pci)
    out += (format_mcfg(view.pci.ecam_from_log, "kernel log") if view.pci.ecam_from_log
            else ["MCFG: no MMCONFIG/ECAM line in the log"])
    out.append(f"TSC: {view.tsc_khz} kHz" if view.tsc_khz else "TSC: not in the log")
    return "\n".join(out)


def host_json(host) -> dict:
    doc = host.to_json()
    doc["source"] = {"root": str(host.root)}
    doc.setdefault("pci", host.pci.to_json())
    doc["mcfg"] = [_mcfg_json(a) for a in (host.mcfg or host.pci.ecam_from_log)]
    doc["mcfg_source"] = "MCFG table" if host.mcfg else "kernel log" if host.pci.ecam_from_log else None
    doc["serial_ports"] = [dataclasses.asdict(p) for p in host.serial_ports]
    return doc


def _sriov_rows(host, config_path) -> list[dict]:
    """The host's SR-IOV PFs with their VFs and the slices (ledger) that hold them."""
    from coreslice import config as configmod
    from coreslice.plan import vfs as sriov
    from coreslice.ledger import Ledger, resolve_path

    cfg = configmod.load(config_path)
    held: dict[str, str] = {}
    if host.boot_id:
        try:
            led = Ledger(resolve_path(None), host.boot_id, readonly=True)
            held = {f: r.name for r in led.holding() for f in r.pci_functions()}
        except Exception:  # a missing or unreadable ledger: nothing is held as far as we know
            held = {}
    return sriov.pf_table(host.pci.functions, held, cfg.sriov.nic, cfg.sriov.nvme)


def cmd_show(args) -> int:
    from coreslice.plan.vfs import format_pf_table

    what = load(args.root, args.from_dmesg)
    rows = None if isinstance(what, LogView) else _sriov_rows(what, getattr(args, "config", None))
    if args.json:
        doc = what.to_json() if isinstance(what, LogView) else host_json(what)
        if rows is not None:
            doc["sriov"] = {"pfs": rows}
        print(json.dumps(doc, indent=2))
    else:
        print(format_log_view(what) if isinstance(what, LogView) else format_host(what) + "\n" +
              "\n".join(format_pf_table(rows or [])))
    return 0


def add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", type=root_arg, default=None, metavar="DIR",
                   help="read a captured host tree (same paths as /sys, /proc, /dev/kmsg; see "
                        "scripts/capture-host.sh) instead of this host")
    p.add_argument("--from-dmesg", metavar="FILE",
                   help="take the kernel log (its 'root bus resource' lines) from FILE, '-' for stdin")


def register(host_subparsers) -> argparse.ArgumentParser:
    p = host_subparsers.add_parser("show", help="what coreslice finds on this host: CPUs, memory, PCI, MCFG, TSC",
                                   description=SHOW_HELP, epilog=SHOW_EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(p)
    p.add_argument("--json", action="store_true", help="print everything as one JSON object")
    p.add_argument("--config", type=Path, metavar="PATH",
                   help="coreslice configuration naming the SR-IOV PFs (default: $CORESLICE_CONFIG, else "
                        "/etc/coreslice/config.toml); PFs are listed with their VFs and the slice holding each")
    p.set_defaults(func=cmd_show)
    register_install_units(host_subparsers)
    return p


def cmd_install_units(args) -> int:
    from coreslice.host import units

    r = units.install(args.dest, dry_run=args.dry_run)
    if args.json:
        print(json.dumps(r.to_json(), indent=2))
    elif args.dry_run:
        for path, text in r.files.items():
            print(f"# {path} (dry run: nothing written)")
            print(text)
    else:
        print(f"wrote {', '.join(r.files)}")
        if r.commands:
            print(f"enabled {units.APPLY} and {units.WATCH}: the declared slices start at the next host "
                  f"boot; now: coreslice apply, systemctl start {units.WATCH}")
        else:
            print(f"not enabled ({args.dest} is not {units.DEFAULT_DEST}): copy them there, then "
                  f"systemctl daemon-reload; systemctl enable {units.APPLY} {units.WATCH}")
    return 0


def register_install_units(host_subparsers) -> None:
    from coreslice.host import units

    p = host_subparsers.add_parser(
        "install-units", help="install systemd units that start the declared slices at boot and watch them",
        description=f"Write {units.APPLY} (at host boot: coreslice apply, which boots the slices declared in "
                    f"/etc/coreslice/slices/*.toml) and {units.WATCH} (coreslice watch: restarts slices booted "
                    "with --on-crash restart when they crash), both running this coreslice "
                    f"({' '.join(units.entry_point())}); into {units.DEFAULT_DEST} they are also enabled "
                    "(systemctl daemon-reload, systemctl enable), not started.",
        epilog="exit status: 0 written (or printed), 1 systemctl failed, 2 cannot write")
    p.add_argument("--dest", type=Path, default=units.DEFAULT_DEST, metavar="DIR",
                   help=f"where to write them (default {units.DEFAULT_DEST}; elsewhere nothing is enabled)")
    p.add_argument("--dry-run", action="store_true", help="print the units, write nothing")
    p.add_argument("--json", action="store_true", help="print the files, their text and the systemctl runs as JSON")
    p.set_defaults(func=cmd_install_units)


def cmd_configure(args: argparse.Namespace) -> int:
    live = Path(args.root).resolve() == Path("/")
    machine = None if args.dry_run else machine_for(live, Path(args.root))
    # Another root (tests, an image being prepared): the drop-in goes under it, for real.
    grub = machine.grub if machine else None if args.dry_run else RealGrub(Path(args.root))
    r = profiles.configure(profile=args.profile, host_cpus=args.host_cpus, host_mem=args.host_mem,
                           intremap=args.intremap, dry_run=args.dry_run, root=Path(args.root), grub=grub,
                           iommu=args.iommu)
    if args.json:
        print(json.dumps(r, indent=2))
    elif args.dry_run:
        print(f"# {r['file']} (dry run: nothing written)")
        print(r["content"], end="")
    else:
        print(f"wrote {r['file']}: {' '.join(r['parameters'])}")
        for n in r["notes"]:
            print(f"note: {n}")
        print("update-grub done; reboot for the new kernel command line to take effect "
              "(sudo reboot), then run 'coreslice host check'")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    if args.profile == "vm-host":
        from coreslice.host import vmready as hostcheck
    else:
        from coreslice.host import readiness as hostcheck

    report = hostcheck.check(Path(args.root))
    print(json.dumps(report.to_json(), indent=2) if args.json else report.format())
    return 0 if report.ready else 1


def register_configure(host_subparsers) -> None:
    """Add ``configure`` and ``check`` to the subparsers of ``coreslice host``."""
    p = host_subparsers.add_parser(
        "configure", help="write the host's kernel parameters (GRUB drop-in) for a configuration",
        description=profiles.CONFIGURE_HELP + profiles.INTREMAP_HELP + "\n" + profiles.IOMMU_HELP,
        epilog="examples:\n  coreslice host configure --profile slice-host --host-cpus 2 --host-mem 8G --dry-run\n"
               "  sudo coreslice host configure --profile slice-host && sudo reboot\n"
               "exit status: 0 written (or dry run printed), 1 update-grub failed, 2 bad input",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", required=True, choices=profiles.PROFILES,
                   help="slice-host, vm-host or native-eval (see above)")
    p.add_argument("--host-cpus", type=int, metavar="N",
                   help="maxcpus=N: CPUs the host keeps (default: 1 for slice-host, 8 for native-eval)")
    p.add_argument("--host-mem", metavar="SIZE",
                   help="mem=SIZE: the host uses RAM below this address (default: 6G for slice-host, "
                        "16G for native-eval)")
    p.add_argument("--intremap", choices=("auto", "off", "on"), default="auto",
                   help="write intremap=off (off), keep interrupt remapping (on), or decide from "
                        "this host's APIC IDs (auto, default); see above")
    p.add_argument("--iommu", choices=("off", "on"), default="off",
                   help="slice-host: confine each slice's DMA to its RAM with the IOMMU (on), or leave DMA "
                        "untranslated as the reference does (off, default); see above")
    p.add_argument("--dry-run", action="store_true",
                   help="print the drop-in and change nothing")
    p.add_argument("--root", type=root_arg, default=Path("/"), metavar="DIR",
                   help="file system root to read the host from and write under (for tests; default /)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: parameters, file, content, notes, update-grub output")
    p.set_defaults(func=cmd_configure)

    c = host_subparsers.add_parser(
        "check", help="say whether this host is ready to launch slices (or run VMs), and what to change",
        description=profiles.CHECK_HELP,
        epilog="exit status: 0 ready (no item failed), 1 not ready",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--root", type=root_arg, default=Path("/"), metavar="DIR",
                   help="read a captured tree of the host's /sys, /proc and /dev instead of the "
                        "live host (for tests)")
    c.add_argument("--profile", choices=("slice-host", "vm-host"), default="slice-host",
                   help="what the host should be ready for: launching slices (default), or running the "
                        "comparison VMs of coreslice vm (KVM, IOMMU, vfio-pci, huge pages, QEMU)")
    c.add_argument("--json", action="store_true", help="print one JSON object with every item")
    c.set_defaults(func=cmd_check)
