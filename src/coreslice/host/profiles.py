"""``coreslice host configure`` and ``coreslice host check``: the host's kernel command line.

The reference README ("System setup and boot options") boots the host in one of three
configurations, written as GRUB_CMDLINE_LINUX_DEFAULT lines:

- base (always): ``memory_corruption_check=0 pci=assign-busses``; alone it is the *vm-host*
  configuration (the whole machine for the host, e.g. to run VMs);
- *slice-host*: base + ``maxcpus=1 mem=6G intremap=off intel_iommu=off`` (CPUs and RAM left
  for slices);
- *native-eval*: base + ``mem=16G maxcpus=8 intremap=off intel_iommu=off`` (the native system
  restricted to a slice's resources, for fair comparisons).

``configure`` writes one of them into a GRUB drop-in, ``/etc/default/grub.d/coreslice.cfg``,
that appends to GRUB_CMDLINE_LINUX_DEFAULT (update-grub sources grub.d/*.cfg after
/etc/default/grub, which is never edited), then runs update-grub.  ``check`` (hostcheck.py)
says whether the running host is ready.

``intremap=off`` is a choice, not a constant (DESIGN.md section 3): Linux runs x2APIC mode only
with interrupt remapping, and xAPIC addresses APIC IDs 0-254 only.  See INTREMAP_HELP.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from coreslice.errors import CoresliceError, UsageError
from coreslice.host.readiness import XAPIC_MAX_ID
from coreslice.units import format_size, parse_size

DROPIN = "etc/default/grub.d/coreslice.cfg"
PROFILES = ("slice-host", "vm-host", "native-eval")
# (host CPUs, host memory) of the reference README's lines.
DEFAULTS = {"slice-host": (1, "6G"), "native-eval": (8, "16G")}

# Why each parameter is there: the reference README's "purpose of these kernel parameters".
WHY = {
    "memory_corruption_check": "slices' trampolines go in low memory, which this scan would flag",
    "pci": "the host enumerates and numbers every PCI bus itself",
    "maxcpus": "the host starts only these CPUs; the others stay parked for slices",
    "mem": "the host uses the RAM below this address; the RAM above is for slices",
    "intremap": "MSIs go straight to local APICs, so slices' devices can interrupt them",
    "intel_iommu": "no DMA translation: slices' devices DMA to physical addresses",
}

INTREMAP_HELP = """\
interrupt remapping (--intremap):
  off   write intremap=off, as the reference README does: devices' MSIs go straight to local
        APICs, so devices given to slices can interrupt their slice.  The host then runs in
        xAPIC mode (Linux enables x2APIC only with interrupt remapping), which reaches APIC IDs
        0-254 only.
  on    no intremap=off: the host keeps interrupt remapping and x2APIC mode, needed when a CPU
        has an APIC ID above 254 (large machines) or firmware locks x2APIC on.  The host's
        IOMMU then blocks compatibility-format MSIs, so devices given to slices must be polled.
  auto  (default) off, unless this host needs x2APIC: a CPU with an APIC ID above 254 in the
        MADT, or "Cannot disable locked x2apic" in the kernel log.
"""

CONFIGURE_HELP = """\
Write the kernel parameters of one of the reference configurations into the GRUB drop-in
/etc/default/grub.d/coreslice.cfg (appended to GRUB_CMDLINE_LINUX_DEFAULT; /etc/default/grub is
never edited), run update-grub, and say that a reboot is needed.

profiles:
  slice-host   memory_corruption_check=0 pci=assign-busses maxcpus=N mem=SIZE [intremap=off]
               intel_iommu=off: the host keeps N CPUs (default 1) and the RAM below SIZE
               (default 6G); the rest is for slices
  vm-host      memory_corruption_check=0 pci=assign-busses: the whole machine for the host
  native-eval  the slice-host parameters with a slice's resources (defaults 8 CPUs, 16G), to
               measure the native system under the same limits

parameters:
  memory_corruption_check=0  slices' trampolines are written in low memory, which this scan flags
  pci=assign-busses          the host numbers every PCI bus itself
  maxcpus=N mem=SIZE         limit the host to N CPUs and the RAM below address SIZE
  intremap=off               MSIs go straight to local APICs (see below)
  intel_iommu=off            no DMA translation for the devices given to slices

"""

CHECK_HELP = """\
Say whether the running host is ready to launch slices, item by item:

  cpus         parked CPUs exist (present, offline: the host booted with maxcpus=)
  memory       firmware RAM above the host's own (the host booted with mem=)
  intremap     interrupt remapping fits the APIC mode (x2APIC needs it; in xAPIC mode it blocks
               the MSIs of devices given to slices; xAPIC cannot wake APIC IDs above 254)
  msr          /dev/cpu/0/msr, or an msr module to load (x2APIC wake-up, APIC mode)
  devmem       /dev/mem opens read-write as root and maps free RAM
  tsc          the host's TSC calibration is in its kernel log (slices need it)
  lowmem-scan  memory_corruption_check=0
  iommu        no IOMMU DMA translation (intel_iommu=off)

Each item is ok, warn (slices boot, but the reference setup differs) or fail, with the fix.
"""


@dataclass(frozen=True)
class Param:
    text: str
    why: str


def decide_intremap(choice: str, apic_ids: list[int], kernel_log: list[str]) -> tuple[bool, str]:
    """(write intremap=off?, why) for --intremap ``choice`` on a host with these APIC IDs."""
    high = sorted(i for i in apic_ids if i > XAPIC_MAX_ID)
    locked = any("Cannot disable locked x2apic" in line for line in kernel_log)
    need = (f"APIC ID {high[0]:#x} is above {XAPIC_MAX_ID}, so the host must run x2APIC, which needs "
            "interrupt remapping" if high else
            "firmware locks x2APIC on (kernel log: 'Cannot disable locked x2apic')" if locked else None)
    if choice == "off":
        if need:
            raise UsageError(f"--intremap off: {need}; use --intremap on (or auto)")
        return True, "intremap=off (--intremap off): the host will run xAPIC"
    if choice == "on":
        return False, ("no intremap=off (--intremap on): the host keeps interrupt remapping; "
                       "slices' devices must be polled")
    if need:
        return False, f"no intremap=off: {need}; slices' devices must be polled"
    return True, f"intremap=off: every APIC ID is at most {XAPIC_MAX_ID}, so the host can run xAPIC"


def profile_params(profile: str, host_cpus: int | None, host_mem: int | None,
                   intremap_off: bool) -> list[Param]:
    """The kernel parameters of ``profile`` (in the reference README's order)."""
    params = [Param("memory_corruption_check=0", WHY["memory_corruption_check"]),
              Param("pci=assign-busses", WHY["pci"])]
    if profile == "vm-host":
        return params
    params += [Param(f"maxcpus={host_cpus}", WHY["maxcpus"]),
               Param(f"mem={format_size(host_mem)}", WHY["mem"])]  # type: ignore[arg-type]
    if intremap_off:
        params.append(Param("intremap=off", WHY["intremap"]))
    params.append(Param("intel_iommu=off", WHY["intel_iommu"]))
    return params


def render_dropin(profile: str, params: list[Param], command: str, notes: list[str]) -> str:
    """The drop-in's text: a POSIX shell fragment that update-grub sources."""
    width = max(len(p.text) for p in params)
    lines = [
        f"# Written by `{command}`:",
        f"# the {profile} configuration of the reference README (\"System setup and boot",
        "# options\").  update-grub sources this after /etc/default/grub; to undo it, remove",
        "# this file, run update-grub and reboot.",
        "#",
        *(f"#   {p.text:<{width}}  {p.why}" for p in params),
        *(f"# note: {n}" for n in notes),
        f'GRUB_CMDLINE_LINUX_DEFAULT="${{GRUB_CMDLINE_LINUX_DEFAULT}} {" ".join(p.text for p in params)}"',
        "",
    ]
    return "\n".join(lines)


def conflicting_settings(root: Path, params: list[Param]) -> list[str]:
    """Where other GRUB settings also set our parameters (ours come last, so ours win)."""
    keys = {p.text.split("=", 1)[0] for p in params}
    files = [root / "etc/default/grub",
             *sorted((root / "etc/default/grub.d").glob("*.cfg"))]
    out = []
    for f in files:
        if f == root / DROPIN or not f.is_file():
            continue
        for line in f.read_text(errors="replace").splitlines():
            if line.lstrip().startswith("#") or "GRUB_CMDLINE_LINUX" not in line:
                continue
            for word in line.replace('"', " ").replace("'", " ").split():
                if word.split("=", 1)[0] in keys and "=" in word and word not in {p.text for p in params}:
                    out.append(f"/{f.relative_to(root)} also sets {word}; the drop-in's parameters "
                               "come later on the command line (for maxcpus= and mem= the last wins)")
    return out


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".coreslice-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_update_grub() -> str:
    exe = shutil.which("update-grub")
    if exe is None:
        raise CoresliceError("update-grub not found: install grub2-common (Debian, Ubuntu) or run "
                             "grub-mkconfig -o /boot/grub/grub.cfg yourself; the drop-in is written")
    print(f"$ {exe}", file=sys.stderr, flush=True)
    r = subprocess.run([exe], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        last = (r.stderr or r.stdout).strip().splitlines()[-1:] or [""]
        raise CoresliceError(f"update-grub exited with {r.returncode} ({last[0]}); fix that, "
                             "then run update-grub again (the drop-in is written)")
    return (r.stdout + r.stderr).strip()


def _check_limits(profile: str, cpus: int, mem: int, host) -> None:
    """Refuse a slice-host configuration that would leave nothing for slices."""
    if profile != "slice-host":
        return
    if host.cpus and cpus >= len(host.cpus):
        raise UsageError(f"--host-cpus {cpus} leaves no CPU for slices: this host has {len(host.cpus)}; "
                         "give fewer")
    ram = host.firmware_ram()
    if ram and mem >= ram[-1].end:
        raise UsageError(f"--host-mem {format_size(mem)} leaves no RAM for slices: RAM ends at "
                         f"{ram[-1].end:#x}; give less")


def configure(args: argparse.Namespace) -> dict:
    from coreslice.host.snapshot import discover

    root = Path(args.root)
    profile = args.profile
    if profile == "vm-host" and (args.host_cpus is not None or args.host_mem is not None):
        raise UsageError("--host-cpus/--host-mem: the vm-host profile gives the host the whole "
                         "machine; use them with slice-host or native-eval")
    if profile == "vm-host" and args.intremap != "auto":
        raise UsageError("--intremap: the vm-host profile leaves interrupt remapping alone; "
                         "use it with slice-host or native-eval")
    if not args.dry_run and not (root / "etc/default/grub").is_file():
        raise UsageError(f"no {root / 'etc/default/grub'}: this host does not boot through GRUB; "
                         "add the parameters to its boot loader yourself (see --dry-run)")
    host = discover(root)
    cpus, mem, remap_why = None, None, None
    intremap_off = False
    if profile != "vm-host":
        d_cpus, d_mem = DEFAULTS[profile]
        cpus = d_cpus if args.host_cpus is None else args.host_cpus
        if cpus < 1:
            raise UsageError(f"--host-cpus {cpus}: the host needs at least 1 CPU")
        mem = parse_size(args.host_mem or d_mem, "--host-mem")
        if mem < 256 << 20 or mem % (1 << 20):
            raise UsageError(f"--host-mem {args.host_mem}: give a whole number of MiB, at least 256M")
        _check_limits(profile, cpus, mem, host)
        apic_ids = sorted({c.apic_id for c in host.cpus if c.apic_id is not None} |
                          {e.apic_id for e in (host.madt.processors if host.madt else [])
                           if e.enabled or e.online_capable})
        intremap_off, remap_why = decide_intremap(args.intremap, apic_ids, host.kernel_log)
    params = profile_params(profile, cpus, mem, intremap_off)
    command = " ".join(["coreslice host configure", f"--profile {profile}",
                        *([f"--host-cpus {cpus}"] if cpus is not None else []),
                        *([f"--host-mem {format_size(mem)}"] if mem is not None else []),
                        *([f"--intremap {args.intremap}"] if args.intremap != "auto" else [])])
    notes = ([remap_why] if remap_why else []) + conflicting_settings(root, params)
    text = render_dropin(profile, params, command, notes)
    path = root / DROPIN
    result = {"profile": profile, "parameters": [p.text for p in params], "file": str(path),
              "content": text, "notes": notes, "written": False, "update_grub": None,
              "reboot_needed": False}
    if args.dry_run:
        return result
    try:
        write_atomic(path, text)
    except PermissionError:
        raise CoresliceError(f"cannot write {path}: permission denied; run as root (sudo)") from None
    result["written"] = True
    result["update_grub"] = run_update_grub()
    result["reboot_needed"] = True
    return result


def cmd_configure(args: argparse.Namespace) -> int:
    r = configure(args)
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
    from coreslice.host import readiness as hostcheck

    report = hostcheck.check(Path(args.root))
    print(json.dumps(report.to_json(), indent=2) if args.json else report.format())
    return 0 if report.ready else 1


def register(host_subparsers) -> None:
    """Add ``configure`` and ``check`` to the subparsers of ``coreslice host``."""
    p = host_subparsers.add_parser(
        "configure", help="write the host's kernel parameters (GRUB drop-in) for a configuration",
        description=CONFIGURE_HELP + INTREMAP_HELP,
        epilog="examples:\n  coreslice host configure --profile slice-host --host-cpus 2 --host-mem 8G --dry-run\n"
               "  sudo coreslice host configure --profile slice-host && sudo reboot\n"
               "exit status: 0 written (or dry run printed), 1 update-grub failed, 2 bad input",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", required=True, choices=PROFILES,
                   help="slice-host, vm-host or native-eval (see above)")
    p.add_argument("--host-cpus", type=int, metavar="N",
                   help="maxcpus=N: CPUs the host keeps (default: 1 for slice-host, 8 for native-eval)")
    p.add_argument("--host-mem", metavar="SIZE",
                   help="mem=SIZE: the host uses RAM below this address (default: 6G for slice-host, "
                        "16G for native-eval)")
    p.add_argument("--intremap", choices=("auto", "off", "on"), default="auto",
                   help="write intremap=off (off), keep interrupt remapping (on), or decide from "
                        "this host's APIC IDs (auto, default); see above")
    p.add_argument("--dry-run", action="store_true",
                   help="print the drop-in and change nothing")
    p.add_argument("--root", type=Path, default=Path("/"), metavar="DIR",
                   help="file system root to read the host from and write under (for tests; default /)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: parameters, file, content, notes, update-grub output")
    p.set_defaults(func=cmd_configure)

    c = host_subparsers.add_parser(
        "check", help="say whether this host is ready to launch slices, and what to change",
        description=CHECK_HELP,
        epilog="exit status: 0 ready (no item failed), 1 not ready",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--root", type=Path, default=Path("/"), metavar="DIR",
                   help="read a captured tree of the host's /sys, /proc and /dev instead of the "
                        "live host (for tests)")
    c.add_argument("--json", action="store_true", help="print one JSON object with every item")
    c.set_defaults(func=cmd_check)
