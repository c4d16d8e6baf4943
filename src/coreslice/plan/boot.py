"""Resolve a BootSpec against the host into a Plan, checking everything first.

A plan is what will be done, with every address decided: no check may happen after it, because
launching starts writing.  Each failure is a UsageError with one line that names the resource,
the problem and the fix.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from coreslice.boot import efi, lowmem
from coreslice.boot.bzimage import BzImage, ENTRY_64_OFFSET, parse_bzimage
from coreslice.boot.errors import BootFormatError
from coreslice.boot.layout import DATA_ALIGN, MIB, PAGE, RUN_HEADROOM, align_down, align_up
from coreslice.boot.pagetables import page_tables_size, widen_within
from coreslice.boot.zeropage import E820Entry, E820Type, ZERO_PAGE_SIZE
from coreslice.errors import UsageError
from coreslice.acpi.dsdt import build_dsdt
from coreslice.acpi.tables import SliceTables, prepare_slice_tables
from coreslice.plan.pci import PciPlan, plan_pci
from coreslice.host import consoles
from coreslice.host.snapshot import Host
from coreslice.host.sysfs import format_cpu_list
from coreslice.request import BootSpec
from coreslice.units import format_size, parse_size


@dataclass
class Console:
    port: int | None            # None: `--console none`, the slice has no UART (coreslice console reads its log)
    pci_address: str | None = None
    pci_driver: str | None = None

    def to_json(self) -> dict:
        return {"port": self.port, "pci_address": self.pci_address, "pci_driver": self.pci_driver}


@dataclass
class Plan:
    kernel: BzImage
    initrd: Path | None
    initrd_size: int
    cpus: list[int]
    apic_ids: list[int]
    host_bsp_apic_id: int
    apic_mode: str
    mem_base: int
    mem_size: int
    slot: int
    console: Console
    cmdline: str
    tsc_khz: int
    boot_id: str
    # layout
    load_addr: int
    initrd_addr: int
    data_addr: int
    zero_page_addr: int
    cmdline_addr: int
    acpi_addr: int
    page_tables_addr: int
    page_table_ranges: list[tuple[int, int]]
    e820: list[E820Entry]
    mcfg: list
    acpi: SliceTables       # the slice's ACPI tables, encoded and sized, laid out at acpi_addr
    dsdt_asl: str           # the DSDT as ASL (dry runs write it)
    reuse_slot: bool = False
    pci: PciPlan | None = None  # assigned PCI functions, their roots and ECAM (pciplan.py)
    warnings: tuple[str, ...] = ()  # what boots but may not work, said at boot and in --json
    # The slice's EFI runtime (boot/efi.py, efi.AREA_SIZE bytes after the ACPI tables), 0: none.
    efi_addr: int = 0

    @property
    def entry(self) -> int:
        return self.load_addr + ENTRY_64_OFFSET

    @property
    def sipi_vector(self) -> int:
        return self.slot >> 12

    def to_json(self) -> dict:
        return {
            "kernel": self.kernel.to_json(),
            "initrd": {"path": str(self.initrd) if self.initrd else None, "size": self.initrd_size},
            "cpus": [{"cpu": c, "apic_id": a} for c, a in zip(self.cpus, self.apic_ids)],
            "host_bsp_apic_id": self.host_bsp_apic_id,
            "apic_mode": self.apic_mode,
            "memory": {"base": self.mem_base, "size": self.mem_size},
            "console": self.console.to_json(),
            "cmdline": self.cmdline,
            "tsc_khz": self.tsc_khz,
            "low_slot": {"base": self.slot, "sipi_vector": self.sipi_vector, "reused": self.reuse_slot},
            "layout": {
                "load_addr": self.load_addr, "entry": self.entry, "initrd_addr": self.initrd_addr,
                "data_addr": self.data_addr, "zero_page": self.zero_page_addr,
                "cmdline": self.cmdline_addr, "acpi": self.acpi_addr,
                "page_tables": self.page_tables_addr,
                # efi_status: the record the slice's ResetSystem writes (boot/efi.py read_status).
                "efi": self.efi_addr or None,
                "efi_status": self.efi_addr + efi.STATUS_OFFSET if self.efi_addr else None,
            },
            "e820": [e.to_json() for e in self.e820],
            "pci": self.pci.to_json() if self.pci else None,
            "warnings": list(self.warnings),
        }


# With PCI functions the slice scans only the roots its DSDT lists, and keeps the host's
# assignments: no option ROMs, no BAR (re)allocation; nobios and lastbus as the prototype used
# them (a 64-bit kernel has no PCI BIOS access and logs "PCI: Unknown option `nobios'").
PCI_PARAMS = "pci=nobios,norom,nobar,realloc=off,lastbus=0x100"
PCIE_PORTS_PARAM = "pcie_ports=compat"

# A slice must never reset the machine (README "When a slice crashes, halts or reboots").  A stock
# kernel's restart loop (arch/x86/kernel/reboot.c native_machine_emergency_restart) tries methods
# that each reset the whole machine (keyboard controller, BIOS F000:FFF0, port 0xCF9, triple
# fault), except EFI: with the slice's own EFI runtime (boot/efi.py), whose ResetSystem parks the
# CPU, `reboot=efi` makes that the first method, so the loop never gets further.
REBOOT_PARAM = "reboot=efi"
# A panic then spins on the panicking CPU (kernel/panic.c) instead of restarting; explicit, not
# left to the kernel's CONFIG_PANIC_TIMEOUT.  (A restart would also end in ResetSystem.)
PANIC_PARAM = "panic=0"
# PREEMPT_RT kernels default to no EFI runtime (CONFIG_EFI_DISABLE_RUNTIME=y, e.g. Debian's -rt):
# efi=runtime turns it on (drivers/firmware/efi/efi.c parse_efi_cmdline); others accept it too.
EFI_RUNTIME_PARAM = "efi=runtime"
# reboot=b|a|k|t|p (kernel/reboot.c reboot_setup: bios, acpi, kbd, triple, pci) select another method;
# noefi / efi=noruntime drop the EFI runtime, so the restart loop reaches the BIOS jump.
_REBOOT_METHODS = "baktp"


def _check_containment(user: str) -> None:
    """Refuse user parameters that would let the slice's reboot reset the host."""
    for word in user.split():
        key, _, value = word.partition("=")
        if key == "reboot":
            # reboot=[panic_]<letter>[...][,...]: each comma-separated item, as reboot_setup reads it.
            for item in value.split(","):
                item = item.removeprefix("panic_")
                if item[:1] in _REBOOT_METHODS:
                    raise UsageError(f"--cmdline '{word}' makes the slice reset through the keyboard "
                                     "controller, BIOS, ACPI, port 0xCF9 or a triple fault, each of which "
                                     "resets the whole machine; drop it (coreslice passes reboot=efi, "
                                     "which keeps a reboot inside the slice)")
        elif word == "noefi" or (key == "efi" and "noruntime" in value.split(",")):
            raise UsageError(f"--cmdline '{word}' turns off the slice's EFI runtime, which is what keeps "
                             "its reboot and poweroff from resetting the whole machine; drop it")


# Shared legacy I/O a stock kernel probes unless the ports are taken: `reserve=` (kernel/resource.c
# reserve_setup) marks them busy before any driver runs, so request_region fails and the code
# that would touch them gives up first.  At most 4 ranges (MAXRESERVE), in this order:
#  - 0xCF8-0xCFF, PCI configuration mechanism #1 (and 0xCF9, the reset control register):
#    pci_direct_probe (arch/x86/pci/direct.c) then sets up neither type 1 nor type 2, so every
#    configuration access goes through ECAM, and port 0xCF9 is no reboot method (port_cf9_safe);
#  - 0x2E8-0x3FF, the four legacy UARTs (serial8250_config_port requests them before autoconfig),
#    minus the slice's own console port there;
#  - 0x2E and 0x4E, the Super I/O index ports the Fintek probe of every 16550A writes its
#    enter key to (8250_fintek.c request_muxed_region).
CONF1_PORTS = (0xCF8, 8)
LEGACY_UART_PORTS = (0x2E8, 0x400)
UART_SPAN = 8
SUPERIO_PORTS = ((0x2E, 2), (0x4E, 2))
MAX_RESERVE = 4
# The early quirks scan bus 0 through port 0xCF8 directly (arch/x86/kernel/early-quirks.c,
# early_pci_allowed); "noearly" skips them and the early MCFG parse, so the MCFG is read from
# ACPI later, vouched for by the EFI map (boot/efi.py).
PCI_NOEARLY = "noearly"


def reserved_ports(console_port: int | None) -> list[tuple[int, int]]:
    """(start, length) of each I/O range ``reserve=`` takes, most important first."""
    out = [CONF1_PORTS]
    lo, hi = LEGACY_UART_PORTS
    if console_port is not None and lo <= console_port < hi:
        out += [(a, b - a) for a, b in ((lo, console_port), (console_port + UART_SPAN, hi)) if b > a]
    else:
        out.append((lo, hi - lo))
    return (out + list(SUPERIO_PORTS))[:MAX_RESERVE]


def reserve_param(console_port: int | None) -> str:
    return "reserve=" + ",".join(f"{a:#x},{n:#x}" for a, n in reserved_ports(console_port))


def slice_cmdline(console_port: int | None, tsc_khz: int, user: str, earlyprintk: bool, pci: bool = False,
                  pci_extra: str = "") -> str:
    """The parameters a stock kernel needs to live in a slice (DESIGN.md §3), then the user's."""
    # No console=: the kernel logs to its ring buffer only (and a dummy VT: the zero page's
    # screen_info is zero, so vgacon stays off); `coreslice console` reads that ring.
    params = [f"console=uart,io,0x{console_port:x},115200n8"] if console_port is not None else []
    params += [
        "noapic",               # never program the IOAPIC, which the host owns
        "no_ipi_broadcast=1",   # "all but self" IPIs would reach the host's CPUs too
        f"tsc_early_khz={tsc_khz}",  # no PIT/HPET/PM timer to calibrate against
        "tsc=reliable",
        "no5lvl",
        REBOOT_PARAM,           # reboot/poweroff end in the slice's own ResetSystem (boot/efi.py)
        PANIC_PARAM,            # a panic spins on its CPU
        EFI_RUNTIME_PARAM,      # ... also on kernels built without EFI runtime by default
        # pci_extra: the slice kernel's ",permit_probe_only=..." (sriov.slice_kernel_params)
        f"{PCI_PARAMS},{PCI_NOEARLY}{pci_extra}" if pci else "pci=off",  # without functions, don't scan the host's buses
        reserve_param(console_port),  # the shared legacy ports above stay untouched
    ]
    if pci:
        # No PCIe port services (AER, PME, hotplug, bandwidth) on the root ports of the slice's
        # roots: the host owns those, and the port driver would enable MSI-X on them, whose
        # 8-bit destination misroutes on CPUs with APIC IDs above 255 (seen on a 260-CPU
        # emulated machine: __irq_msi_compose_msg warned for pcieport).
        params.append(PCIE_PORTS_PARAM)
    if earlyprintk and console_port is not None:
        params.append(f"earlyprintk=serial,0x{console_port:x},115200")
    if user.strip():
        _check_containment(user)
        params.append(user.strip())
    return " ".join(params)


SlotReader = Callable[[int], "lowmem.SlotRecord | None"]


# Linux 5.13 reserves all memory below 1 MiB (arch/x86/realmode: memblock_reserve(0, SZ_1M));
# older hosts may allocate there, i.e. in the low-memory slots, unless reservelow= covers them.
LOW_MEMORY_RESERVED_SINCE = (5, 13)


def _check_root(host: Host) -> None:
    if host.live and os.geteuid() != 0:
        raise UsageError("coreslice boot must run as root (it writes physical memory and wakes CPUs); use sudo")
    check_host_kernel(host)


def check_host_kernel(host: Host) -> None:
    """What the host kernel must allow and do for a launch (also `host check`'s)."""
    if host.lockdown in ("integrity", "confidentiality"):
        raise UsageError(f"the host kernel is locked down ({host.lockdown}, usually Secure Boot): it refuses "
                         "/dev/mem and MSR writes; boot the host without lockdown (disable Secure Boot, or "
                         "lockdown=none where the kernel allows it)")
    v = host.kernel_version
    if v is not None and v < LOW_MEMORY_RESERVED_SINCE:
        low = cmdline_size_value(host.cmdline, "reservelow")
        if low is None or low < lowmem.SLOT_BASES[-1] + lowmem.SLOT_SIZE:
            raise UsageError(f"the host runs Linux {v[0]}.{v[1]}, which does not reserve all memory below 1 MiB "
                             f"(5.13 does): its allocations may lie in the low-memory slots; boot the host with "
                             "reservelow=640K, or a kernel 5.13 or newer")


def cmdline_size_value(cmdline: str, key: str) -> int | None:
    """A size parameter of a kernel command line (``reservelow=640K``) in bytes, or None."""
    for word in cmdline.split():
        if word.startswith(key + "="):
            try:
                return parse_size(word.split("=", 1)[1], key)
            except UsageError:
                return None
    return None


def _check_cpus(spec: BootSpec, host: Host) -> tuple[list[int], list[int], int]:
    return _check_cpu_list(spec.cpus, host)


def _check_cpu_list(cpu_list: list[int], host: Host) -> tuple[list[int], list[int], int]:
    if not cpu_list:
        raise UsageError("no CPUs given; pass --cpus LIST (offline host CPUs, e.g. 1-2)")
    seen = set()
    by_num = {c.cpu: c for c in host.cpus}
    present = format_cpu_list(list(by_num))
    bsp = host.boot_cpu
    if bsp is None or bsp.apic_id is None:
        raise UsageError("cannot find the host's boot CPU and its APIC ID in /proc/cpuinfo")
    apic_ids = []
    for n in cpu_list:
        if n in seen:
            raise UsageError(f"CPU {n} is listed twice in --cpus; list each CPU once")
        seen.add(n)
        cpu = by_num.get(n)
        if cpu is None:
            raise UsageError(f"CPU {n} is not present on this host (present: {present}); choose from those")
        if cpu.boot:
            raise UsageError(f"CPU {n} is the host's boot CPU; choose CPUs the host left offline")
        if cpu.online:
            raise UsageError(f"CPU {n} is online in the host; boot the host with maxcpus= so it stays parked, "
                             f"or choose an offline CPU")
        if cpu.apic_id is None:
            raise UsageError(f"CPU {n} has no APIC ID in the host MADT; cannot address it")
        apic_ids.append(cpu.apic_id)
    return list(cpu_list), apic_ids, bsp.apic_id


def _check_memory(spec: BootSpec, host: Host) -> None:
    _check_range(spec.mem_base, spec.mem_size, host)


# The slice runs with no5lvl: 4-level paging maps at most 2^46 bytes of physical memory
# (Linux MAX_PHYSMEM_BITS = 46 without 5-level paging, asm/sparsemem.h); RAM above is ignored.
PHYS_LIMIT_4LEVEL = 1 << 46


def _check_range(base: int, size: int, host: Host) -> None:
    end = base + size
    rng = f"{format_size(size)}@0x{base:x}"
    if end > PHYS_LIMIT_4LEVEL:
        raise UsageError(f"memory {rng} ends above 64 TiB (2^46), which a slice kernel with 4-level paging "
                         "(no5lvl) cannot use; choose memory below 0x400000000000")
    if base % PAGE or size % PAGE or size == 0:
        raise UsageError(f"memory {rng} is not page aligned; use a base and size that are multiples of 4K (e.g. 1G@0x40000000)")
    if not any(r.contains(base, end) for r in host.firmware_ram()):
        ram = ", ".join(f"0x{r.start:x}-0x{r.end - 1:x}" for r in host.firmware_ram())
        raise UsageError(f"memory {rng} is not all RAM in the firmware map (RAM: {ram}); choose a range inside one of those")
    for r in host.host_ram():
        if r.overlaps(base, end):
            raise UsageError(f"memory {rng} overlaps the host's System RAM 0x{r.start:x}-0x{r.end - 1:x}; "
                             f"choose memory above the host's mem= limit")


def _check_device_interrupts(cpus: list[int], apic_ids: list[int], host: Host, polled: bool) -> None:
    """Whether the slice's devices can interrupt it.  A slice has no interrupt remapping of its
    own, so its devices send compatibility-format MSIs, whose destination field holds 8 bits of
    APIC ID (Intel SDM Vol. 3A, "Message Address Register Format"; Linux warns in
    __irq_msi_compose_msg): an MSI meant for APIC ID 258 reaches APIC ID 2.  And a host that
    runs interrupt remapping (as x2APIC needs) blocks compatibility-format MSIs altogether
    (VT-d: the kernel clears the Compatibility Format Interrupt bit)."""
    if polled:
        return
    high = [(c, a) for c, a in zip(cpus, apic_ids) if a > 0xFF]
    if high:
        names = ", ".join(f"{c} (APIC ID {a})" for c, a in high)
        raise UsageError(f"CPUs {names} have APIC IDs above 255, which a device's MSI cannot name without "
                         f"interrupt remapping: their interrupts would reach APIC ID {high[0][1] & 0xFF}, another "
                         "CPU; give the slice CPUs with APIC IDs below 256 (--ncpus picks those first for "
                         "slices with devices), or --devices-polled if its drivers poll")
    from coreslice.host.readiness import interrupt_remapping

    if interrupt_remapping(host) == "on":
        raise UsageError("the host runs interrupt remapping, so its IOMMU blocks the compatibility-format MSIs "
                         "that the slice's devices send: they would never interrupt the slice; boot the host "
                         "with intremap=off (coreslice host configure --intremap off, xAPIC), or pass "
                         "--devices-polled if the slice's drivers poll")


def _warnings(pci: PciPlan | None, base: int) -> list[str]:
    out = []
    if pci is not None and pci.devices and base >= 1 << 32:
        # The kernel places its swiotlb bounce buffers below 4 GiB; with no RAM there it has none
        # ("swiotlb_memblock_alloc: Failed to allocate"), so a device that can only DMA to 32-bit
        # addresses cannot reach the slice's memory at all.
        out.append("the slice's RAM lies all above 4 GiB, so its kernel has no swiotlb: a device limited to "
                   "32-bit DMA cannot work there; give it memory below 4 GiB if one of its devices is")
    return out


def check_resources(cpus: list[int], base: int, size: int, host: Host) -> list[int]:
    """The checks boot makes of CPUs and memory alone (for ``coreslice plan``): their APIC IDs."""
    _, apic_ids, _ = _check_cpu_list(list(cpus), host)
    _check_range(base, size, host)
    return apic_ids


def _check_console(spec: BootSpec, host: Host) -> Console:
    text = spec.console.strip()
    if text.lower() == "none":
        if spec.earlyprintk:
            raise UsageError("--earlyprintk prints to the console, and --console none has none; drop one of them")
        return Console(None)
    if text.lower().startswith("io:"):
        try:
            port = int(text[3:], 0)
        except ValueError:
            raise UsageError(f"console '{text}' is not an I/O port; write io:0x2f8") from None
        match = [p for p in host.serial_ports if p.port == port]
        if not match or all(p.type == 0 for p in match):
            have = ", ".join(f"{p.tty}=0x{p.port:x}" for p in host.serial_ports if p.type) or "none"
            raise UsageError(f"console io:0x{port:x}: no UART at that port (host UARTs: {have}); pass a port from that list")
        if any(p.in_use_as_console for p in match):
            raise UsageError(f"console io:0x{port:x} is the host's own console ({match[0].tty}); choose another UART")
        return Console(port)
    addr = consoles.normalize_pci_address(text)
    if addr is None:
        raise UsageError(f"console '{text}' is neither io:PORT nor a PCI address; write io:0x2f8 or 0000:00:03.0")
    fn = consoles.read_pci_function(host.root, addr)
    if fn is None:
        raise UsageError(f"console {addr}: no such PCI function; see /sys/bus/pci/devices for what exists")
    if not fn.is_uart:
        raise UsageError(f"console {addr}: class 0x{fn.class_code:06x} is not a serial controller (0x0700xx); pass a PCI UART")
    if not fn.io_bars:
        raise UsageError(f"console {addr}: the UART has no I/O BAR (memory-mapped UARTs are not supported); choose a UART with an I/O port")
    port = fn.io_bars[0][0]
    ttys = set(consoles.pci_console_ttys(host.root, addr))
    if any(p.in_use_as_console and (p.tty in ttys or p.port == port) for p in host.serial_ports):
        raise UsageError(f"console {addr} is the host's own console; choose another UART")
    return Console(port, addr, fn.driver)


def _choose_slot(spec_apic_ids: list[int], base: int, size: int, host: Host, read_slot: SlotReader) -> tuple[int, bool]:
    ram = host.firmware_ram()
    free = None
    for slot in lowmem.SLOT_BASES:
        if not any(r.contains(slot, slot + lowmem.SLOT_SIZE) for r in ram):
            continue
        rec = read_slot(slot)
        if rec is None or rec.boot_id != host.boot_id:
            free = slot if free is None else free
            continue
        same_cpus = set(rec.apic_ids) == set(spec_apic_ids)
        shares_cpu = set(rec.apic_ids) & set(spec_apic_ids)
        shares_mem = rec.mem_base < base + size and base < rec.mem_base + rec.mem_size
        if same_cpus and rec.mem_base == base and rec.mem_size == size:
            return slot, True  # relaunch of the same slice: reuse its slot
        if shares_cpu or shares_mem:
            what = f"APIC IDs {sorted(shares_cpu)}" if shares_cpu else \
                f"memory 0x{rec.mem_base:x}+{format_size(rec.mem_size)}"
            raise UsageError(f"{what} belong to the slice started from low-memory slot 0x{slot:x} "
                             f"(APIC IDs {list(rec.apic_ids)}, memory 0x{rec.mem_base:x}+{format_size(rec.mem_size)}); "
                             "relaunch it with exactly its CPUs and memory, or choose other resources")
    if free is None:
        raise UsageError(f"no free low-memory slot for a trampoline ({len(lowmem.SLOT_BASES)} slots between "
                         f"0x{lowmem.SLOT_BASES[0]:x} and 0x{lowmem.SLOT_BASES[-1] + lowmem.SLOT_SIZE:x} are taken "
                         "or not RAM); relaunch an existing slice instead")
    return free, False


def _ecam_entries(pci: PciPlan | None, e820_ranges: list[tuple[int, int]]) -> list[E820Entry]:
    """Reserved e820 entries for the assigned roots' ECAM (pciplan.py says why)."""
    if pci is None:
        return []
    for start, end in pci.ecam:
        for lo, hi in e820_ranges:
            if start < hi and lo < end:
                raise UsageError(f"the ECAM region 0x{start:x}-0x{end - 1:x} of the slice's PCI roots overlaps "
                                 f"its memory 0x{lo:x}-0x{hi - 1:x}; choose memory elsewhere")
    return [E820Entry(start, end - start, E820Type.RESERVED) for start, end in pci.ecam]


def input_file_size(path: Path, what: str, flag: str) -> int:
    """The size of an input file the launch will read, found by opening it now: a file that
    cannot be read (no permission, a directory, a FIFO, a link loop) is refused before anything
    changes, not half-way through the writes.  O_NONBLOCK: opening a FIFO must not wait for a
    writer."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UsageError(f"{what} {path}: no such file; pass {flag} with an existing file") from None
    except OSError as e:
        raise UsageError(f"{what} {path}: cannot be opened ({e.strerror}); pass {flag} with a readable "
                         "regular file") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{what} {path}: not a regular file; pass {flag} with a regular file")
        try:
            os.pread(fd, 1, 0)
        except OSError as e:
            raise UsageError(f"{what} {path}: cannot be read ({e.strerror}); pass {flag} with a readable "
                             "regular file") from None
        return st.st_size
    finally:
        os.close(fd)


def make_plan(spec: BootSpec, host: Host, read_slot: SlotReader) -> Plan:
    """Check the spec against the host and decide every address.  Raises UsageError."""
    _check_root(host)
    try:
        input_file_size(spec.kernel, "kernel", "--kernel")
        kernel = parse_bzimage(spec.kernel)
    except BootFormatError as e:
        fix = e.fix or "pass a bzImage of an x86-64 Linux kernel (e.g. /boot/vmlinuz-*)"
        raise UsageError(f"kernel {spec.kernel}: {e}; {fix}") from None

    initrd_size = input_file_size(spec.initrd, "initrd", "--initrd") if spec.initrd is not None else 0

    cpus, apic_ids, bsp_apic = _check_cpus(spec, host)
    if host.apic_mode is None:
        raise UsageError("cannot tell whether the host runs x2APIC or xAPIC; run 'modprobe msr' and retry")
    if host.apic_mode == "xapic" and max(apic_ids) > 0xFE:
        raise UsageError(f"APIC ID {max(apic_ids)} needs x2APIC but the host runs xAPIC; enable x2APIC on the host")
    _check_memory(spec, host)
    console = _check_console(spec, host)

    tsc_khz = spec.tsc_khz or host.tsc_khz
    if not tsc_khz:
        raise UsageError("the host's TSC frequency is not in its kernel log; pass --tsc-khz (e.g. from 'dmesg | grep tsc')")

    pci = plan_pci(spec.devices, console.pci_address, host,
                   probe_only_permitted="permit_probe_only=" in spec.extra.get("pci_extra", ""))
    if pci is not None and pci.devices:
        _check_device_interrupts(cpus, apic_ids, host, spec.devices_polled)
    mcfg = list(pci.mcfg) if pci else list(host.mcfg)
    pci_roots = pci.dsdt_roots() if pci else []
    cmdline = slice_cmdline(console.port, tsc_khz, spec.cmdline, spec.earlyprintk, pci=pci is not None,
                            pci_extra=spec.extra.get("pci_extra", ""))
    # The tables are encoded once here, sized (their size does not depend on where they go),
    # and laid out at their address by the image (acpi/tables.py SliceTables).
    dsdt = build_dsdt(list(range(len(apic_ids))), pci_roots)
    acpi = prepare_slice_tables(apic_ids=apic_ids, host_bsp_apic_id=bsp_apic, dsdt_aml=dsdt.aml,
                                mcfg_allocations=mcfg)
    acpi_size = acpi.size
    # boot.rst, cmdline_size: "the maximum size of the command line without the terminating zero".
    cmdline_len = len(cmdline.encode())
    if cmdline_len > kernel.cmdline_size:
        raise UsageError(f"command line is {cmdline_len} bytes, the kernel accepts {kernel.cmdline_size}; shorten --cmdline")

    # Layout of the slice's range: kernel at the bottom, initrd under the loader data at the top.
    base, size = spec.mem_base, spec.mem_size
    top = base + size
    cmdline_bytes = align_up(cmdline_len + 1, PAGE)
    # Loader data: zero page, command line, ACPI tables, then the EFI runtime's two pages.
    data_size = align_up(ZERO_PAGE_SIZE + cmdline_bytes + align_up(acpi_size, PAGE) + efi.AREA_SIZE, DATA_ALIGN)
    data_addr = align_down(top - data_size, DATA_ALIGN)
    align = max(kernel.kernel_alignment, 2 * MIB)
    load_addr = align_up(base, align)
    if kernel.pref_address and load_addr < kernel.pref_address:
        # A relocatable kernel's decompressor runs it at LOAD_PHYSICAL_ADDR (the header's
        # pref_address) when loaded lower (arch/x86/boot/compressed/head_64.S): host memory.
        raise UsageError(f"memory {format_size(size)}@0x{base:x} puts the kernel at 0x{load_addr:x}, below its "
                         f"preferred load address 0x{kernel.pref_address:x}, where it would move itself (into the "
                         f"host's memory); give the slice memory at or above 0x{kernel.pref_address:x}")
    kernel_end = load_addr + max(kernel.init_size, kernel.kernel_size)
    initrd_addr = align_down(data_addr - initrd_size, PAGE) if initrd_size else data_addr
    kernel_need = (load_addr - base) + (kernel_end - load_addr) + data_size + RUN_HEADROOM
    if kernel_need > size:
        raise UsageError(
            f"memory {format_size(size)} is too small: kernel needs {align_up(kernel_end - load_addr, MIB) >> 20} MiB, "
            f"loader data {data_size >> 10} KiB, plus {RUN_HEADROOM >> 20} MiB to run; "
            f"give at least {align_up(kernel_need + initrd_size, MIB) >> 20}M")
    if initrd_size > size - kernel_need:
        raise UsageError(f"initrd {spec.initrd} ({align_up(initrd_size, MIB) >> 20} MiB) does not fit in memory "
                         f"{format_size(size)} beside the kernel; give at least "
                         f"{align_up(kernel_need + initrd_size, MIB) >> 20}M or use a smaller initrd")
    if initrd_size:
        limit = (1 << 64) if kernel.can_load_above_4g else kernel.initrd_addr_max + 1
        if initrd_addr + initrd_size > limit:
            raise UsageError(f"initrd would end at 0x{initrd_addr + initrd_size:x}, above what this kernel accepts "
                             f"(0x{kernel.initrd_addr_max:x}); place the slice's memory lower")
        assert initrd_addr >= kernel_end

    slot, reuse = _choose_slot(apic_ids, base, size, host, read_slot)
    zero_page_addr = data_addr
    cmdline_addr = data_addr + ZERO_PAGE_SIZE
    acpi_addr = cmdline_addr + cmdline_bytes
    efi_addr = acpi_addr + align_up(acpi_size, PAGE)  # page aligned, inside the reserved data range
    # The 64-bit entry needs the kernel image, zero page and command line identity-mapped (boot.rst
    # "64-bit Boot Protocol"); the trampoline's own page must stay mapped when paging turns on.
    # Edges rounded out to 2 MiB only inside the slice's own RAM (a large page there is one
    # memory type), so the tables fit the slot; the trampoline's page is mapped exactly.
    pt_ranges = [(slot, slot + PAGE), *widen_within([(load_addr, kernel_end), (data_addr, top)], [(base, top)])]
    if page_tables_size(pt_ranges) > lowmem.PAGE_TABLES_MAX:
        raise UsageError("page tables for this layout do not fit the low-memory slot; use a smaller range")

    e820 = sorted([
        E820Entry(slot, lowmem.LOW_RAM_OFFSET, E820Type.RESERVED),
        E820Entry(slot + lowmem.LOW_RAM_OFFSET, lowmem.SLOT_SIZE - lowmem.LOW_RAM_OFFSET, E820Type.RAM),
        E820Entry(base, data_addr - base, E820Type.RAM),
        E820Entry(data_addr, top - data_addr, E820Type.RESERVED),
    ] + _ecam_entries(pci, e820_ranges=[(slot, slot + lowmem.SLOT_SIZE), (base, top)]), key=lambda e: e.addr)

    return Plan(
        kernel=kernel, initrd=spec.initrd, initrd_size=initrd_size, cpus=cpus, apic_ids=apic_ids,
        host_bsp_apic_id=bsp_apic, apic_mode=host.apic_mode, mem_base=base, mem_size=size,
        slot=slot, console=console, cmdline=cmdline, tsc_khz=tsc_khz, boot_id=host.boot_id,
        load_addr=load_addr, initrd_addr=initrd_addr, data_addr=data_addr,
        zero_page_addr=zero_page_addr, cmdline_addr=cmdline_addr, acpi_addr=acpi_addr,
        page_tables_addr=slot + lowmem.PAGE_TABLES_OFFSET, page_table_ranges=pt_ranges,
        e820=e820, mcfg=mcfg, acpi=acpi, dsdt_asl=dsdt.asl, reuse_slot=reuse, pci=pci,
        warnings=tuple(_warnings(pci, base)), efi_addr=efi_addr,
    )
