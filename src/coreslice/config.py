"""The host's coreslice configuration: one TOML file, read once into a typed object.

Replaces the prototype's run_config.sh.  Found at ``--config PATH``, else ``$CORESLICE_CONFIG``,
else ``/etc/coreslice/config.toml``; a missing default file means all defaults (a file named
explicitly must exist).  Example::

    [slice]                       # defaults for `coreslice boot` / `plan` without --ncpus/--memory
    ncpus = 2
    memory = "4G"

    [sriov]
    nic = ["0000:99:00.0"]        # SR-IOV NIC physical functions (class 0x02xxxx)
    nvme = ["0000:8d:00.0"]       # SR-IOV NVMe physical functions (class 0x010802)
    mac_base = "02:00:00:00:10:00"  # VF i of the k-th NIC PF gets mac_base + k*0x100 + i
    nvme_vq_per_vf = 2            # optional: flexible queues (VQ) per secondary controller
    nvme_vi_per_vf = 1            # optional: flexible interrupts (VI) per secondary controller

Every error names the file, the key and the fix (exit status 2, nothing touched).
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from coreslice.errors import UsageError
from coreslice.host import consoles
from coreslice.units import parse_size

ENV = "CORESLICE_CONFIG"
DEFAULT_PATH = Path("/etc/coreslice/config.toml")
# A locally administered unicast MAC (IEEE 802 §8.2.2: bit 1 of the first octet set, bit 0 clear).
DEFAULT_MAC_BASE = "02:c5:00:00:00:00"
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$", re.I)
_KNOWN = {
    "slice": {"ncpus", "memory"},
    "sriov": {"nic", "nvme", "mac_base", "nvme_vq_per_vf", "nvme_vi_per_vf"},
}


def parse_mac(text: str, what: str = "MAC") -> int:
    """A MAC address as an int; UsageError unless it is six hex octets, unicast, not all zeros."""
    if not isinstance(text, str) or not _MAC.match(text):
        raise UsageError(f"{what} {text!r} is not a MAC address; write six hex octets, e.g. 02:c5:00:00:00:01")
    value = int(text.replace(":", ""), 16)
    if value >> 40 & 1:
        raise UsageError(f"{what} {text} is a multicast address (bit 0 of the first octet is set); "
                         "use a unicast one, e.g. 02:c5:00:00:00:01")
    if value == 0:
        raise UsageError(f"{what} {text} is all zeros; give a real address, e.g. 02:c5:00:00:00:01")
    return value


def format_mac(value: int) -> str:
    return ":".join(f"{(value >> s) & 0xFF:02x}" for s in range(40, -8, -8))


@dataclass(frozen=True)
class SliceDefaults:
    ncpus: int | None = None
    memory: int | None = None   # bytes

    def to_json(self) -> dict:
        return {"ncpus": self.ncpus, "memory": self.memory}


@dataclass(frozen=True)
class SriovConfig:
    nic: tuple[str, ...] = ()
    nvme: tuple[str, ...] = ()
    mac_base: int = parse_mac(DEFAULT_MAC_BASE)
    nvme_vq_per_vf: int | None = None
    nvme_vi_per_vf: int | None = None

    def default_mac(self, pf: str, index: int) -> str:
        """mac_base + k*0x100 + index for the k-th configured NIC PF (k = 0 if not configured)."""
        k = self.nic.index(pf) if pf in self.nic else 0
        return format_mac((self.mac_base + (k << 8) + index) & ((1 << 48) - 1))

    def to_json(self) -> dict:
        return {"nic": list(self.nic), "nvme": list(self.nvme), "mac_base": format_mac(self.mac_base),
                "nvme_vq_per_vf": self.nvme_vq_per_vf, "nvme_vi_per_vf": self.nvme_vi_per_vf}


@dataclass(frozen=True)
class Config:
    path: Path | None = None            # None: no file, all defaults
    slice: SliceDefaults = field(default_factory=SliceDefaults)
    sriov: SriovConfig = field(default_factory=SriovConfig)

    def to_json(self) -> dict:
        return {"path": str(self.path) if self.path else None, "slice": self.slice.to_json(),
                "sriov": self.sriov.to_json()}


def resolve_path(arg: Path | str | None = None) -> tuple[Path, bool]:
    """(path, explicit): --config, else $CORESLICE_CONFIG, else the default (may be absent)."""
    if arg:
        return Path(arg), True
    if os.environ.get(ENV):
        return Path(os.environ[ENV]), True
    return DEFAULT_PATH, False


def load(arg: Path | str | None = None) -> Config:
    path, explicit = resolve_path(arg)
    try:
        # Non-blocking: opening a FIFO for reading would wait for a writer forever.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        if explicit:
            raise UsageError(f"config file {path} does not exist; create it (see 'coreslice boot --help') "
                             f"or point --config / {ENV} at an existing one") from None
        return Config()
    except OSError as e:
        raise UsageError(f"config file {path}: {e.strerror}; make it readable or pass another --config") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UsageError(f"config file {path} is not a regular file; pass --config (or {ENV}) the path "
                             "of a TOML file")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read()
    except OSError as e:
        raise UsageError(f"config file {path}: {e.strerror}; make it readable or pass another --config") from None
    finally:
        os.close(fd)
    try:
        text = data.decode()
    except UnicodeDecodeError as e:
        raise UsageError(f"config file {path}: byte {e.start} is not UTF-8 (TOML files are UTF-8); "
                         "save it as UTF-8 text") from None
    return parse(text, path)


def parse(text: str, path: Path | None = None) -> Config:
    where = str(path) if path else "config"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{where}: not valid TOML ({e}); fix the syntax") from None
    except RecursionError:  # tomllib recurses once per nested array or inline table
        raise UsageError(f"{where}: arrays or tables nested too deep; fix the syntax") from None
    for key, value in data.items():
        if key not in _KNOWN:
            raise UsageError(f"{where}: unknown section [{key}]; known sections: "
                             f"{', '.join('[' + k + ']' for k in _KNOWN)}")
        if not isinstance(value, dict):
            raise UsageError(f"{where}: '{key}' must be a section [{key}], not a value; write it as a [{key}] table")
        for sub in value:
            if sub not in _KNOWN[key]:
                raise UsageError(f"{where}: unknown key {key}.{sub}; known keys of [{key}]: "
                                 f"{', '.join(sorted(_KNOWN[key]))}")
    return Config(path, _slice(data.get("slice", {}), where), _sriov(data.get("sriov", {}), where))


def _positive_int(value, key: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{where}: {key} = {value!r} must be a positive integer; write e.g. {key.split('.')[-1]} = 2")
    return value


def _slice(d: dict, where: str) -> SliceDefaults:
    ncpus = _positive_int(d["ncpus"], "slice.ncpus", where) if "ncpus" in d else None
    memory = None
    if "memory" in d:
        if not isinstance(d["memory"], str):
            raise UsageError(f"{where}: slice.memory = {d['memory']!r} must be a size string; write e.g. memory = \"4G\"")
        try:
            memory = parse_size(d["memory"], "slice.memory")
        except UsageError as e:
            raise UsageError(f"{where}: {e}") from None
        if memory == 0 or memory % 4096:
            raise UsageError(f"{where}: slice.memory = {d['memory']!r} must be a positive multiple of 4 KiB; write e.g. \"4G\"")
    return SliceDefaults(ncpus, memory)


def _pf_list(value, key: str, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise UsageError(f"{where}: {key} must be a list of PCI addresses; write e.g. {key.split('.')[-1]} = [\"0000:99:00.0\"]")
    out = []
    for item in value:
        addr = consoles.normalize_pci_address(item) if isinstance(item, str) else None
        if addr is None:
            raise UsageError(f"{where}: {key} entry {item!r} is not a PCI address; write SEGMENT:BUS:DEVICE.FUNCTION, "
                             "e.g. \"0000:99:00.0\"")
        if addr in out:
            raise UsageError(f"{where}: {key} lists {addr} twice; name each physical function once")
        out.append(addr)
    return tuple(out)


def _sriov(d: dict, where: str) -> SriovConfig:
    nic = _pf_list(d.get("nic", []), "sriov.nic", where)
    nvme = _pf_list(d.get("nvme", []), "sriov.nvme", where)
    both = sorted(set(nic) & set(nvme))
    if both:
        raise UsageError(f"{where}: {both[0]} is in both sriov.nic and sriov.nvme; a function is a NIC or an "
                         "NVMe controller: keep it in one list")
    try:
        base = parse_mac(d.get("mac_base", DEFAULT_MAC_BASE), "sriov.mac_base")
    except UsageError as e:
        raise UsageError(f"{where}: {e}") from None
    vq = _positive_int(d["nvme_vq_per_vf"], "sriov.nvme_vq_per_vf", where) if "nvme_vq_per_vf" in d else None
    vi = _positive_int(d["nvme_vi_per_vf"], "sriov.nvme_vi_per_vf", where) if "nvme_vi_per_vf" in d else None
    if vq is not None and vq < 2:
        raise UsageError(f"{where}: sriov.nvme_vq_per_vf = {vq}: a secondary controller needs at least 2 queues "
                         "(admin + one I/O queue, NVMe Base Spec 2.0 §8.26.4); give 2 or more")
    return SriovConfig(nic, nvme, base, vq, vi)
