"""SR-IOV side effects: sysfs attributes, netlink (VF MACs) and NVMe admin commands.

:class:`SriovOps` is what plan/vfs.py reads and launch/vfprep.py changes; :class:`RealOps`
does it on the host (sysfs under a root, pyroute2, nvme-cli), :class:`FakeOps` in memory.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from coreslice.errors import LaunchError, UsageError

# Virtualization Management (NVMe Base Spec 2.0 §5.22, Figure 419/420).
RT_VQ, RT_VI = 0, 1
ACT_OFFLINE, ACT_ASSIGN, ACT_ONLINE = 7, 8, 9


# ---------------------------------------------------------------------------------------------
# The side-effect interface

@dataclass
class Secondary:
    """One entry of the Secondary Controller List (NVMe Base Spec 2.0 Figure 287)."""

    scid: int      # secondary controller identifier (its CNTLID)
    vfn: int       # virtual function number, 1-based
    online: bool
    vq: int        # flexible queue resources assigned
    vi: int        # flexible interrupt resources assigned


@dataclass
class PrimaryCaps:
    """Primary Controller Capabilities (NVMe Base Spec 2.0 Figure 286), the fields used here."""

    vqfrt: int      # VQ flexible resources total
    vqrfap: int     # VQ flexible resources allocated to the primary
    vqfrsm: int     # VQ flexible resources maximum per secondary
    vqgran: int     # VQ granularity
    vifrt: int
    virfap: int
    vifrsm: int
    vigran: int


class SriovOps(Protocol):
    def attr(self, address: str, name: str) -> str | None: ...           # sysfs attribute, stripped
    def write_attr(self, address: str, name: str, value: str) -> None: ...
    def virtfn(self, pf: str, index: int) -> str | None: ...             # VF address (virtfnN link)
    def driver(self, address: str) -> str | None: ...
    def unbind(self, address: str) -> None: ...
    def bind(self, address: str, driver: str) -> None: ...
    def netdev(self, pf: str) -> str | None: ...                         # the PF's interface name
    def vf_mac(self, ifname: str, index: int) -> str | None: ...
    def set_vf_mac(self, ifname: str, index: int, mac: str) -> None: ...
    def nvme_dev(self, pf: str) -> str | None: ...                       # /dev/nvmeN of the PF
    def primary_caps(self, dev: str) -> PrimaryCaps: ...
    def secondaries(self, dev: str) -> list[Secondary]: ...
    def virt_mgmt(self, dev: str, cntlid: int, rt: int, act: int, nr: int) -> None: ...
    # What native-setup adds: a VF given to the host's own drivers and network stack.
    def probe(self, address: str) -> None: ...                           # drivers_probe: its host driver
    def block_devices(self, address: str) -> list[str]: ...              # NVMe function: nvmeXnY names
    def addresses(self, ifname: str) -> list[str]: ...                   # IPv4 "ADDR/LEN" of an interface
    def add_address(self, ifname: str, cidr: str) -> None: ...
    def del_address(self, ifname: str, cidr: str) -> None: ...
    def is_up(self, ifname: str) -> bool: ...
    def set_up(self, ifname: str, up: bool) -> None: ...


# ---------------------------------------------------------------------------------------------
# Real implementation

class RealOps:
    """sysfs under ``root``, netlink through pyroute2, nvme-cli for the admin commands."""

    def __init__(self, root: Path = Path("/"), run: Callable[..., subprocess.CompletedProcess] = subprocess.run):
        self.root = root
        self._run = run

    def _dev(self, address: str) -> Path:
        return self.root / "sys/bus/pci/devices" / address

    def attr(self, address: str, name: str) -> str | None:
        p = self._dev(address) / name
        if name == "physfn":
            return p.resolve().name if p.exists() else None
        try:
            return p.read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def write_attr(self, address: str, name: str, value: str) -> None:
        try:
            (self._dev(address) / name).write_text(value)
        except OSError as e:
            raise LaunchError(f"writing {value} to {self._dev(address) / name} failed: {e.strerror}") from e

    def virtfn(self, pf: str, index: int) -> str | None:
        p = self._dev(pf) / f"virtfn{index}"
        return p.resolve().name if p.exists() else None

    def driver(self, address: str) -> str | None:
        p = self._dev(address) / "driver"
        return p.resolve().name if p.exists() else None

    def unbind(self, address: str) -> None:
        self.write_attr(address, "driver/unbind", address)

    def bind(self, address: str, driver: str) -> None:
        (self.root / "sys/bus/pci/drivers" / driver / "bind").write_text(address)

    def netdev(self, pf: str) -> str | None:
        d = self._dev(pf) / "net"
        names = sorted(os.listdir(d)) if d.is_dir() else []
        return names[0] if names else None

    def vf_mac(self, ifname: str, index: int) -> str | None:
        try:
            from pyroute2 import IPRoute
            with IPRoute() as ipr:
                (msg,) = ipr.link("get", ifname=ifname, ext_mask=1)
                vfs = msg.get_attr("IFLA_VFINFO_LIST")
                for info in vfs.get_attrs("IFLA_VF_INFO") if vfs else []:
                    m = info.get_attr("IFLA_VF_MAC")
                    if m and m.get("vf") == index:
                        return str(m.get("mac")).lower()
        except Exception:
            return None
        return None

    def set_vf_mac(self, ifname: str, index: int, mac: str) -> None:
        try:
            from pyroute2 import IPRoute
        except ImportError as e:
            raise LaunchError("pyroute2 is not installed; pip install pyroute2 (a coreslice dependency)") from e
        try:
            with IPRoute() as ipr:
                idx = ipr.link_lookup(ifname=ifname)
                if not idx:
                    raise LaunchError(f"network interface {ifname} has gone")
                ipr.link("set", index=idx[0], vf={"vf": index, "mac": mac})
        except LaunchError:
            raise
        except Exception as e:
            raise LaunchError(f"setting the MAC of VF {index} on {ifname} through netlink failed: {e}") from e

    def nvme_dev(self, pf: str) -> str | None:
        d = self._dev(pf) / "nvme"
        names = sorted(n for n in os.listdir(d) if n.startswith("nvme")) if d.is_dir() else []
        return f"/dev/{names[0]}" if names else None

    def _nvme(self, *args: str) -> str:
        cmd = ["nvme", *args]
        try:
            p = self._run(cmd, capture_output=True, text=True, timeout=30)
        except FileNotFoundError as e:
            raise LaunchError("nvme-cli is not installed; apt-get install nvme-cli") from e
        if p.returncode != 0:
            raise LaunchError(f"{' '.join(cmd)} failed (exit {p.returncode}): {(p.stderr or p.stdout).strip()}")
        return p.stdout

    def primary_caps(self, dev: str) -> PrimaryCaps:
        try:
            d = json.loads(self._nvme("primary-ctrl-caps", dev, "--output-format=json"))
        except LaunchError as e:
            raise UsageError(f"{e}; the PF must support Virtualization Management (primary controller)") from None
        return parse_primary_caps(d)

    def secondaries(self, dev: str) -> list[Secondary]:
        return parse_secondaries(json.loads(self._nvme("list-secondary", dev, "--output-format=json")))

    def virt_mgmt(self, dev: str, cntlid: int, rt: int, act: int, nr: int) -> None:
        self._nvme("virt-mgmt", dev, f"--cntlid={cntlid}", f"--rt={rt}", f"--act={act}", f"--nr={nr}")

    def probe(self, address: str) -> None:
        # Documentation/ABI/testing/sysfs-bus-pci, drivers_probe: bind the driver that matches.
        try:
            (self.root / "sys/bus/pci/drivers_probe").write_text(address)
        except OSError as e:
            raise LaunchError(f"probing a host driver for {address} failed: {e.strerror}") from e

    def block_devices(self, address: str) -> list[str]:
        d = self._dev(address) / "nvme"
        out: list[str] = []
        for ctrl in sorted(os.listdir(d)) if d.is_dir() else []:
            for n in sorted(os.listdir(d / ctrl)):
                # With native multipath the controller holds the hidden path nvmeAcBnC; its disk
                # (the one with a /dev node) is the subsystem's head nvmeAnC.
                m = re.fullmatch(r"nvme(\d+)(?:c\d+)?n(\d+)", n)
                if m and f"nvme{m[1]}n{m[2]}" not in out:
                    out.append(f"nvme{m[1]}n{m[2]}")
        return out

    def _ipr(self, what: str, fn):
        try:
            from pyroute2 import IPRoute
        except ImportError as e:
            raise LaunchError("pyroute2 is not installed; pip install pyroute2 (a coreslice dependency)") from e
        try:
            with IPRoute() as ipr:
                return fn(ipr)
        except LaunchError:
            raise
        except Exception as e:
            raise LaunchError(f"{what} through netlink failed: {e}") from e

    def _index(self, ipr, ifname: str) -> int:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            raise LaunchError(f"network interface {ifname} has gone")
        return idx[0]

    def addresses(self, ifname: str) -> list[str]:
        return self._ipr(f"reading the addresses of {ifname}", lambda ipr: [
            f"{m.get_attr('IFA_ADDRESS')}/{m['prefixlen']}"
            for m in ipr.get_addr(family=2, index=self._index(ipr, ifname))])

    def add_address(self, ifname: str, cidr: str) -> None:
        ip, _, plen = cidr.partition("/")
        self._ipr(f"adding {cidr} to {ifname}",
                  lambda ipr: ipr.addr("add", index=self._index(ipr, ifname), address=ip, prefixlen=int(plen)))

    def del_address(self, ifname: str, cidr: str) -> None:
        ip, _, plen = cidr.partition("/")
        self._ipr(f"removing {cidr} from {ifname}",
                  lambda ipr: ipr.addr("del", index=self._index(ipr, ifname), address=ip, prefixlen=int(plen)))

    def is_up(self, ifname: str) -> bool:
        # IFF_UP, include/uapi/linux/if.h.
        return self._ipr(f"reading the state of {ifname}",
                         lambda ipr: bool(ipr.link("get", index=self._index(ipr, ifname))[0]["flags"] & 1))

    def set_up(self, ifname: str, up: bool) -> None:
        self._ipr(f"setting {ifname} {'up' if up else 'down'}",
                  lambda ipr: ipr.link("set", index=self._index(ipr, ifname), state="up" if up else "down"))


def _num(v) -> int:
    return int(v, 0) if isinstance(v, str) else int(v)


def parse_primary_caps(d: dict) -> PrimaryCaps:
    return PrimaryCaps(**{k: _num(d.get(k, 0)) for k in
                          ("vqfrt", "vqrfap", "vqfrsm", "vqgran", "vifrt", "virfap", "vifrsm", "vigran")})


def parse_secondaries(d: dict) -> list[Secondary]:
    """nvme-cli's list-secondary JSON (key names differ between versions)."""
    rows = d.get("secondary-controllers") or d.get("secondary_controllers") or d.get("sc-entry") or []
    out = []
    for e in rows:
        def get(*names):
            for n in names:
                if n in e:
                    return _num(e[n])
            return 0
        out.append(Secondary(scid=get("secondary-controller-identifier", "scid"),
                             vfn=get("virtual-function-number", "vfn"),
                             online=bool(get("secondary-controller-state", "scs") & 1),
                             vq=get("num-virtual-queues", "nvq"),
                             vi=get("num-virtual-interrupts", "nvi")))
    return out



# ---------------------------------------------------------------------------------------------
# In-memory fake (unit tests; CORESLICE_FAKE_MACHINE)

class FakeOps:
    """A host with SR-IOV PFs in memory.  ``add_pf`` creates one; VFs appear at bus+0x10 when
    sriov_numvfs is written.  ``fail_online`` makes secondary controllers stay offline."""

    def __init__(self):
        self.devs: dict[str, dict] = {}
        self.macs: dict[tuple[str, int], str] = {}
        self.secs: dict[str, list[Secondary]] = {}
        self.caps: dict[str, PrimaryCaps] = {}
        self.log: list[str] = []
        self.fail_online = False
        self.links: dict[str, dict] = {}                      # interface -> {"up", "addrs"}
        self.ns_of: dict[tuple[str, int], list[int]] = {}     # (NVMe PF, VF index) -> attached nsids
        self.no_vf_driver = False                             # probe finds no driver for a VF

    def add_pf(self, addr: str, cls: int, total: int, driver: str | None = "drv", ifname: str | None = None,
               nvme: str | None = None, caps: PrimaryCaps | None = None, offset: int | None = None,
               stride: int = 1) -> None:
        """A PF whose VF i appears at Routing ID = PF's + ``offset`` + i * ``stride`` (SR-IOV
        First VF Offset and VF Stride); by default at bus+0x10, device (i >> 3) + 1, function i & 7."""
        if offset is None:
            pf_rid = int(addr[5:7], 16) << 8 | int(addr[8:10], 16) << 3 | int(addr[11], 16)
            offset = ((int(addr[5:7], 16) + 0x10) << 8 | 1 << 3) - pf_rid
        self.devs[addr] = {"class": f"0x{cls:06x}", "sriov_totalvfs": str(total), "sriov_numvfs": "0",
                           "sriov_offset": str(offset), "sriov_stride": str(stride),
                           "sriov_drivers_autoprobe": "1", "driver": driver, "net": ifname, "nvme": nvme}
        if nvme:
            self.caps[nvme] = caps or PrimaryCaps(2 * total, 0, 2, 1, total, 0, 1, 1)
            self.secs[nvme] = [Secondary(i + 1, i + 1, False, 0, 0) for i in range(total)]

    def _vf_addr(self, pf: str, i: int) -> str:
        d = self.devs[pf]
        rid = (int(pf[5:7], 16) << 8 | int(pf[8:10], 16) << 3 | int(pf[11], 16)) + \
            int(d["sriov_offset"]) + i * int(d["sriov_stride"])
        return f"{pf[:4]}:{rid >> 8:02x}:{(rid >> 3) & 0x1F:02x}.{rid & 7}"

    def attr(self, address, name):
        d = self.devs.get(address)
        if d is None:
            return None
        v = d.get(name)
        return None if v is None else str(v)

    def write_attr(self, address, name, value):
        self.log.append(f"write {address} {name}={value}")
        d = self.devs[address]
        d[name] = value
        if name == "sriov_numvfs":
            for i in range(int(d["sriov_totalvfs"])):
                self.devs.pop(self._vf_addr(address, i), None)
            for i in range(int(value)):
                self.devs[self._vf_addr(address, i)] = {
                    "class": d["class"], "physfn": address,
                    "driver": None if d["sriov_drivers_autoprobe"] == "0" else "vfdrv"}

    def virtfn(self, pf, index):
        n = int(self.devs.get(pf, {}).get("sriov_numvfs", 0))
        return self._vf_addr(pf, index) if index < n else None

    def driver(self, address):
        return self.devs.get(address, {}).get("driver")

    def unbind(self, address):
        self.log.append(f"unbind {address}")
        d = self.devs[address]
        d["driver"] = None
        if d.get("physfn"):  # a VF's interface goes with its driver
            self.links.pop(d.pop("net", None) or "", None)

    def bind(self, address, driver):
        self.log.append(f"bind {address} {driver}")
        self.devs[address]["driver"] = driver

    def netdev(self, pf):
        return self.devs.get(pf, {}).get("net")

    def vf_mac(self, ifname, index):
        return self.macs.get((ifname, index), "00:00:00:00:00:00")

    def set_vf_mac(self, ifname, index, mac):
        self.log.append(f"mac {ifname} vf {index} {mac}")
        self.macs[(ifname, index)] = mac

    def nvme_dev(self, pf):
        n = self.devs.get(pf, {}).get("nvme")
        return f"/dev/{n}" if n else None

    def primary_caps(self, dev):
        return self.caps[dev.removeprefix("/dev/")]

    def secondaries(self, dev):
        return [Secondary(**vars(s)) for s in self.secs[dev.removeprefix("/dev/")]]

    # A VF probed by its host driver gets an interface (NIC: vfethN) or a controller whose
    # namespaces ``ns_of[(pf, index)]`` lists show as block devices (NVMe).
    def probe(self, address):
        self.log.append(f"probe {address}")
        d = self.devs[address]
        pf = d.get("physfn")
        # As the kernel: a VF is probed only while its PF allows driver autoprobe.
        if d.get("driver") is None and not self.no_vf_driver and (
                pf is None or self.devs[pf]["sriov_drivers_autoprobe"] != "0"):
            d["driver"] = "vfdrv"
            if pf and self.devs[pf].get("net"):
                d["net"] = f"vfeth{len([x for x in self.devs.values() if x.get('net')])}"
                self.links[d["net"]] = {"up": False, "addrs": []}

    def block_devices(self, address):
        d = self.devs.get(address, {})
        pf = d.get("physfn")
        if d.get("driver") is None or pf is None or not self.devs[pf].get("nvme"):
            return []
        idx = next(i for i in range(int(self.devs[pf]["sriov_numvfs"])) if self._vf_addr(pf, i) == address)
        return [f"nvme9{idx}n{ns}" for ns in self.ns_of.get((pf, idx), [])]

    def addresses(self, ifname):
        return list(self.links[ifname]["addrs"])

    def add_address(self, ifname, cidr):
        self.log.append(f"addr add {cidr} dev {ifname}")
        self.links[ifname]["addrs"].append(cidr)

    def del_address(self, ifname, cidr):
        self.log.append(f"addr del {cidr} dev {ifname}")
        self.links[ifname]["addrs"].remove(cidr)

    def is_up(self, ifname):
        return self.links[ifname]["up"]

    def set_up(self, ifname, up):
        self.log.append(f"link {ifname} {'up' if up else 'down'}")
        self.links[ifname]["up"] = up

    def virt_mgmt(self, dev, cntlid, rt, act, nr):
        self.log.append(f"virt-mgmt {dev} c{cntlid} rt{rt} act{act} nr{nr}")
        s = next(x for x in self.secs[dev.removeprefix("/dev/")] if x.scid == cntlid)
        if act == ACT_ASSIGN:
            if s.online:
                raise LaunchError("secondary controller is online")
            setattr(s, "vq" if rt == RT_VQ else "vi", nr)
        elif act == ACT_ONLINE and not self.fail_online:
            s.online = True
        elif act == ACT_OFFLINE:
            s.online = False




