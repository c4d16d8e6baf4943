"""``coreslice host configure`` and ``coreslice host check``: the host's kernel command line.

The reference README ("System setup and boot options") boots the host in one of three
configurations, written as GRUB_CMDLINE_LINUX_DEFAULT lines:

- base (always): ``memory_corruption_check=0 pci=assign-busses``; with ``intel_iommu=on
  iommu=pt`` it is the *vm-host* configuration (the whole machine for the host, to run the
  comparison VMs: vfio-pci needs the IOMMU, which Debian's kernels leave off by default; pt keeps
  the host's own devices on identity mappings, as the reference's VM runs had no IOMMU cost for
  them);
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

from dataclasses import dataclass
from pathlib import Path

from coreslice.errors import UsageError
from coreslice.machine.grub import DROPIN, Grub, check_dropin
from coreslice.host.readiness import XAPIC_MAX_ID
from coreslice.units import format_size, parse_size

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
    "intel_iommu_on": "DMA translation, which vfio-pci needs to pass devices to a VM",
    "iommu_pt": "the host's own devices keep identity mappings (no translation cost for them)",
    "intel_iommu_confine": "DMA translation: each slice's functions get a domain that maps only its RAM",
    "unsafe_interrupts": "VFIO accepts an IOMMU without interrupt remapping (remapping stays off for the slices' MSIs)",
}

IOMMU_HELP = """the IOMMU (--iommu, slice-host only):
  off   (default) intel_iommu=off, as the reference README does: slices' devices DMA to
        physical addresses untranslated, so a slice's device can read and write any memory
        of the machine, the host's included.
  on    intel_iommu=on with intremap=off, and vfio_iommu_type1.allow_unsafe_interrupts=1: the
        IOMMU translates, and coreslice boot gives each slice's PCI functions a VFIO domain
        that maps exactly the slice's RAM at IOVA = physical address (held by a coreslice
        dma-hold process for the slice's life); a DMA anywhere else faults and the host logs
        it.  Interrupt remapping stays off (it would block the slices' compatibility-format
        MSIs), so the IOMMU confines DMA, not interrupts.  Not with --intremap on.
"""

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
  vm-host      memory_corruption_check=0 pci=assign-busses intel_iommu=on iommu=pt: the whole
               machine for the host, with the IOMMU on for vfio-pci (coreslice vm)
  native-eval  the slice-host parameters with a slice's resources (defaults 8 CPUs, 16G), to
               measure the native system under the same limits

parameters:
  memory_corruption_check=0  slices' trampolines are written in low memory, which this scan flags
  pci=assign-busses          the host numbers every PCI bus itself
  maxcpus=N mem=SIZE         limit the host to N CPUs and the RAM below address SIZE
  intremap=off               MSIs go straight to local APICs (see below)
  intel_iommu=off            no DMA translation for the devices given to slices (--iommu on:
                             intel_iommu=on, each slice's DMA confined to its RAM; see below)

"""

CHECK_HELP = """\
Say whether the running host is ready to launch slices, item by item:

  kernel       no lockdown (Secure Boot lockdown refuses /dev/mem and MSR writes), and the low
               1 MiB reserved (Linux 5.13+, or reservelow=640K on older kernels)
  cpus         parked CPUs exist (present, offline: the host booted with maxcpus=)
  memory       firmware RAM above the host's own (the host booted with mem=)
  intremap     interrupt remapping fits the APIC mode (x2APIC needs it; in xAPIC mode it blocks
               the MSIs of devices given to slices; xAPIC cannot wake APIC IDs above 254)
  msr          /dev/cpu/0/msr, or an msr module to load (x2APIC wake-up, APIC mode)
  devmem       /dev/mem opens read-write as root and maps free RAM
  tsc          the host's TSC calibration is in its kernel log (slices need it)
  lowmem-scan  memory_corruption_check=0
  iommu        no IOMMU DMA translation (intel_iommu=off), or, with intel_iommu=on, translation
               with interrupt remapping off and VFIO: each slice's DMA confined to its RAM

With --profile vm-host, whether it can run coreslice vm's comparison VMs instead:

  kvm          /dev/kvm
  iommu        IOMMU groups (the IOMMU translates, as vfio-pci needs; warn without)
  vfio         the vfio-pci driver loaded or loadable
  hugepages    hugetlbfs of 2M pages on /dev/hugepages; hugepages-1G: a 1G pool and its mount
  qemu         qemu-system-x86_64

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
                   intremap_off: bool, iommu: bool = False) -> list[Param]:
    """The kernel parameters of ``profile`` (in the reference README's order)."""
    params = [Param("memory_corruption_check=0", WHY["memory_corruption_check"]),
              Param("pci=assign-busses", WHY["pci"])]
    if profile == "vm-host":
        return params + [Param("intel_iommu=on", WHY["intel_iommu_on"]), Param("iommu=pt", WHY["iommu_pt"])]
    params += [Param(f"maxcpus={host_cpus}", WHY["maxcpus"]),
               Param(f"mem={format_size(host_mem)}", WHY["mem"])]  # type: ignore[arg-type]
    if intremap_off:
        params.append(Param("intremap=off", WHY["intremap"]))
    if iommu:
        return params + [Param("intel_iommu=on", WHY["intel_iommu_confine"]),
                         Param("vfio_iommu_type1.allow_unsafe_interrupts=1", WHY["unsafe_interrupts"])]
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
        try:
            text = f.read_text(errors="replace")
        except OSError as e:
            out.append(f"/{f.relative_to(root)} cannot be read ({e.strerror}): check its settings yourself")
            continue
        for line in text.splitlines():
            if line.lstrip().startswith("#") or "GRUB_CMDLINE_LINUX" not in line:
                continue
            for word in line.replace('"', " ").replace("'", " ").split():
                if word.split("=", 1)[0] in keys and "=" in word and word not in {p.text for p in params}:
                    out.append(f"/{f.relative_to(root)} also sets {word}; the drop-in's parameters "
                               "come later on the command line (for maxcpus= and mem= the last wins)")
    return out


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


def configure(*, profile: str, host_cpus: int | None, host_mem: str | None, intremap: str, dry_run: bool,
              root: Path, grub: Grub | None, iommu: str = "off") -> dict:
    """Decide the drop-in for ``profile`` on the host under ``root``; unless ``dry_run``, write it
    and run update-grub through ``grub`` (machine/grub.py)."""
    from coreslice.host.snapshot import check_root, discover

    root = check_root(root, "--root")  # before any other check names a file under it
    if profile == "vm-host" and (host_cpus is not None or host_mem is not None):
        raise UsageError("--host-cpus/--host-mem: the vm-host profile gives the host the whole "
                         "machine; use them with slice-host or native-eval")
    if profile == "vm-host" and intremap != "auto":
        raise UsageError("--intremap: the vm-host profile leaves interrupt remapping alone; "
                         "use it with slice-host or native-eval")
    if iommu == "on" and profile != "slice-host":
        raise UsageError(f"--iommu on: only the slice-host profile confines slices' DMA (the {profile} profile "
                         "has its own IOMMU setting); drop --iommu or use --profile slice-host")
    if iommu == "on" and intremap == "on":
        raise UsageError("--iommu on with --intremap on: with remapping on the IOMMU blocks the slices' "
                         "compatibility-format MSIs; use --intremap off (or auto)")
    if not dry_run and not (root / "etc/default/grub").is_file():
        raise UsageError(f"no {root / 'etc/default/grub'}: this host does not boot through GRUB; "
                         "add the parameters to its boot loader yourself (see --dry-run)")
    host = discover(root)
    cpus, mem, remap_why = None, None, None
    intremap_off = False
    if profile != "vm-host":
        d_cpus, d_mem = DEFAULTS[profile]
        cpus = d_cpus if host_cpus is None else host_cpus
        if cpus < 1:
            raise UsageError(f"--host-cpus {cpus}: the host needs at least 1 CPU; give --host-cpus 1 or more")
        mem = parse_size(host_mem or d_mem, "--host-mem")
        if mem < 256 << 20 or mem % (1 << 20):
            raise UsageError(f"--host-mem {host_mem} is not a whole number of MiB of at least 256M; give e.g. 6G")
        _check_limits(profile, cpus, mem, host)
        apic_ids = sorted({c.apic_id for c in host.cpus if c.apic_id is not None} |
                          {e.apic_id for e in (host.madt.processors if host.madt else [])
                           if e.enabled or e.online_capable})
        intremap_off, remap_why = decide_intremap(intremap, apic_ids, host.kernel_log)
        if iommu == "on" and not intremap_off:
            raise UsageError(f"--iommu on needs interrupt remapping off, which this host cannot have ({remap_why}); "
                             "run without --iommu")
    params = profile_params(profile, cpus, mem, intremap_off, iommu == "on")
    command = " ".join(["coreslice host configure", f"--profile {profile}",
                        *([f"--host-cpus {cpus}"] if cpus is not None else []),
                        *([f"--host-mem {format_size(mem)}"] if mem is not None else []),
                        *([f"--intremap {intremap}"] if intremap != "auto" else []),
                        *(["--iommu on"] if iommu == "on" else [])])
    notes = ([remap_why] if remap_why else []) + conflicting_settings(root, params)
    text = render_dropin(profile, params, command, notes)
    path = check_dropin(root)  # a dry run says so too: the real run would be refused
    result = {"profile": profile, "parameters": [p.text for p in params], "file": str(path),
              "content": text, "notes": notes, "written": False, "update_grub": None,
              "reboot_needed": False}
    if dry_run:
        return result
    if grub is None:
        raise UsageError(f"--root {root} is not this machine; only --dry-run goes with it")
    result["file"] = str(grub.write_dropin(text))
    result["written"] = True
    result["update_grub"] = grub.update()
    result["reboot_needed"] = True
    return result


