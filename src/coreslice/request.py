"""What a user asks for when booting a slice: one typed request, resolved once from the command
line and the configuration file, checked for what can be checked without the host.

The CLI (cli/boot.py) builds a :class:`BootRequest` with :func:`boot_request` and hands it to
the launch session; nothing below the CLI sees argparse.  Everything here is pure: files named
by the request are opened and sized by the plan (plan/boot.py), the host is asked by discovery.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from coreslice.config import Config
from coreslice.errors import UsageError
from coreslice.plan.vfs import VfRequest, parse_vf, with_mac
from coreslice.units import format_size, parse_memory

# Linux boot protocol: the command line is NUL-terminated ASCII (boot.rst, "The kernel command
# line"); a control character in it would end up in /proc/cmdline and split log lines.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Slice names go into the ledger, a table and file names: letters, digits and - _ . only.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
# A TSC slower than 1 MHz or faster than 100 GHz is no x86 TSC: a typo.
TSC_KHZ_RANGE = (1_000, 100_000_000)


@dataclass
class BootSpec:
    """A request with its CPUs and memory decided (by the user or by placement): what the boot
    plan checks against the host."""

    kernel: Path
    initrd: Path | None
    cpus: list[int]
    mem_size: int
    mem_base: int
    console: str
    cmdline: str = ""
    tsc_khz: int | None = None
    earlyprintk: bool = False
    devices: list[str] = field(default_factory=list)  # PCI functions (--device), as given
    extra: dict = field(default_factory=dict)
    name: str | None = None  # the slice's name in the ledger; default slice-<first CPU>
    devices_polled: bool = False  # its drivers poll: blocked or misrouted MSIs do no harm
    on_crash: str = "none"        # "restart": `coreslice watch` restarts it after a panic or halt
    record_argv: tuple[str, ...] | None = None  # the boot arguments the ledger keeps for restart
    wake_timeout: float = 2.0     # seconds boot waits for the woken CPU's handshake


@dataclass(frozen=True)
class BootRequest:
    kernel: Path
    initrd: Path | None
    console: str
    mem_size: int
    mem_base: int | None = None         # None: placement picks the range
    cpus: tuple[int, ...] | None = None  # None: placement picks `ncpus`
    ncpus: int | None = None
    numa_node: int | None = None
    name: str | None = None
    cmdline: str = ""                   # the user's part, appended after coreslice's own
    devices: tuple[str, ...] = ()
    vfs: tuple[VfRequest, ...] = ()
    guest_kernel: str = "stock"         # "stock" | "slice" (the prototype's kernel)
    tsc_khz: int | None = None
    earlyprintk: bool = False
    devices_polled: bool = False
    dry_run: Path | None = None
    host_root: Path = Path("/")
    ledger: Path | None = None
    config: Config = field(default_factory=Config)
    on_crash: str = "none"
    record_argv: tuple[str, ...] | None = None
    wake_timeout: float = 2.0

    @property
    def placed_by_us(self) -> bool:
        """coreslice chooses CPUs or memory (--ncpus, or --memory without @BASE)."""
        return self.cpus is None or self.mem_base is None

    @property
    def live(self) -> bool:
        return self.host_root.resolve() == Path("/")

    def spec(self, cpus, mem_base: int, devices=(), cmdline_prefix: str = "", pci_extra: str = "") -> BootSpec:
        cmdline = f"{cmdline_prefix} {self.cmdline}".strip()
        return BootSpec(kernel=self.kernel, initrd=self.initrd, cpus=list(cpus), mem_size=self.mem_size,
                        mem_base=mem_base, console=self.console, cmdline=cmdline, tsc_khz=self.tsc_khz,
                        earlyprintk=self.earlyprintk, name=self.name, devices=[*self.devices, *devices],
                        extra={"pci_extra": pci_extra} if pci_extra else {}, devices_polled=self.devices_polled,
                        on_crash=self.on_crash, record_argv=self.record_argv, wake_timeout=self.wake_timeout)


def check_cmdline(text: str) -> str:
    if _CONTROL.search(text):
        raise UsageError("--cmdline holds a control character (newline, tab, escape ...); write the "
                         "parameters on one line, separated by spaces")
    try:
        text.encode("ascii")
    except UnicodeEncodeError:
        raise UsageError("--cmdline holds non-ASCII characters; the kernel command line is ASCII "
                         "(Linux boot protocol): write the parameters in ASCII") from None
    return text


def check_name(name: str | None) -> str | None:
    if name is not None and not _NAME.match(name):
        raise UsageError(f"--name {name!r} is not a slice name; use 1-63 letters, digits, '-', '_' "
                         "or '.', starting with a letter or digit")
    return name


def check_tsc_khz(khz: int | None) -> int | None:
    lo, hi = TSC_KHZ_RANGE
    if khz is not None and not lo <= khz <= hi:
        raise UsageError(f"--tsc-khz {khz} is not a TSC frequency; give kHz between {lo} and {hi} "
                         "(e.g. 2245780 for 2.25 GHz, from 'dmesg | grep tsc')")
    return khz


def slice_defaults(cpus, ncpus: int | None, memory: str | None, config: Config) -> tuple[int | None, str]:
    """(ncpus, memory) with the config's [slice] defaults filled in where the flags give none
    (flags always win); refused when neither says."""
    where = config.path or "the config"
    if cpus is None and ncpus is None:
        if config.slice.ncpus is None:
            raise UsageError(f"no CPUs asked for; give --cpus LIST or --ncpus N, or set [slice] ncpus in {where}")
        ncpus = config.slice.ncpus
    if memory is None:
        if config.slice.memory is None:
            raise UsageError(f"no memory asked for; give --memory SIZE[@BASE], or set [slice] memory in {where}")
        memory = format_size(config.slice.memory)
    return ncpus, memory


def boot_request(*, kernel: Path, initrd: Path | None, console: str, memory: str | None,
                 cpus: list[int] | None = None, ncpus: int | None = None, numa_node: int | None = None,
                 name: str | None = None, cmdline: str = "", devices=(), nic_vfs=(), nvme_vfs=(),
                 mac: str | None = None, guest_kernel: str = "stock", tsc_khz: int | None = None,
                 earlyprintk: bool = False, devices_polled: bool = False, dry_run: Path | None = None,
                 host_root: Path = Path("/"),
                 ledger: Path | None = None, config: Config | None = None, on_crash: str = "none",
                 record_argv: tuple[str, ...] | None = None, wake_timeout: float = 2.0) -> BootRequest:
    """Flags + config -> request.  Defaults for CPUs and memory come from the config's [slice]
    when the flags give none (flags always win)."""
    config = config or Config()
    ncpus, memory = slice_defaults(cpus, ncpus, memory, config)
    size, base = parse_memory(memory)
    vfs = with_mac([parse_vf(t, "nic") for t in nic_vfs] + [parse_vf(t, "nvme") for t in nvme_vfs], mac)
    return BootRequest(
        kernel=Path(kernel), initrd=Path(initrd) if initrd is not None else None, console=console,
        mem_size=size, mem_base=base, cpus=tuple(cpus) if cpus is not None else None, ncpus=ncpus,
        numa_node=numa_node, name=check_name(name), cmdline=check_cmdline(cmdline), devices=tuple(devices),
        vfs=tuple(vfs), guest_kernel=guest_kernel, tsc_khz=check_tsc_khz(tsc_khz), earlyprintk=earlyprintk,
        devices_polled=devices_polled,
        dry_run=dry_run, host_root=Path(host_root), ledger=ledger, config=config, on_crash=on_crash,
        record_argv=record_argv, wake_timeout=wake_timeout)
