"""Which host boot each eval mode needs, and ``eval plan``'s sequence of boots (pure).

On hardware the three modes cannot share one host boot (host/profiles.py):

- slice: the slice-host profile (the host on few CPUs and little RAM), the slice booted;
- vm: the vm-host profile (the whole machine for the host, intel_iommu=on for vfio-pci), the
  VM started by ``coreslice vm --like NAME``;
- native: the native-eval profile on the slice's CPU count and memory, with the slice's VFs
  given to the host by ``coreslice native-setup --like NAME``.

``eval run`` refuses a mode whose boot is not the running one and says which is needed.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from coreslice.plan.native import NativeSlice, _param, profile_fix, profile_gaps


@dataclass(frozen=True)
class HostFacts:
    cmdline: str
    online_cpus: int
    sys_vendor: str = ""
    hypervisor: bool = False      # the host's own CPUID hypervisor flag

    @property
    def emulated(self) -> bool:
        """The host itself is a virtual machine (QEMU's DMI vendor, or any hypervisor under it):
        its figures check correctness, not performance."""
        return self.hypervisor or self.sys_vendor.strip() == "QEMU"


def vm_gaps(facts: HostFacts, sl: NativeSlice) -> list[str]:
    gaps = []
    if _param(facts.cmdline, "intel_iommu") != "on" and _param(facts.cmdline, "amd_iommu") != "on":
        gaps.append("the IOMMU is off (vfio-pci needs intel_iommu=on)")
    if facts.online_cpus <= sl.ncpus:
        gaps.append(f"{facts.online_cpus} CPUs online: the VM's {sl.ncpus} vCPUs need the slice's CPUs online "
                    "besides the host's own")
    return gaps


def gaps(mode: str, facts: HostFacts, sl: NativeSlice, slice_running: bool, native_setup: bool = True) -> list[str]:
    """Why the running boot does not suit ``mode`` (empty: it does)."""
    if mode == "native":
        found = profile_gaps(facts.cmdline, facts.online_cpus, sl)
        if slice_running:
            found.append(f"slice '{sl.name}' is running: the native baseline is a host boot without it")
        if not native_setup:
            found.append(f"the host does not have the slice's VFs (coreslice native-setup --like {sl.name})")
        return found
    if mode == "vm":
        return vm_gaps(facts, sl)
    if not slice_running:
        return [f"slice '{sl.name}' is not running on this host boot"]
    return []


def fix(mode: str, sl: NativeSlice) -> str:
    if mode == "native":
        return f"{profile_fix(sl)}; then coreslice native-setup --like {sl.name}"
    if mode == "vm":
        return ("coreslice host configure --profile vm-host, and reboot; then coreslice vm --like "
                f"{sl.name}")
    return f"boot it (coreslice apply, or coreslice restart {sl.name}) on a slice-host boot"


def current(facts: HostFacts, sl: NativeSlice, slice_running: bool, native_setup: bool = True) -> str | None:
    """The mode the running boot suits, if any (a running slice first; then native, whose boot
    also has few CPUs, like a slice-host one)."""
    for mode in ("slice", "native", "vm"):
        if not gaps(mode, facts, sl, slice_running, native_setup):
            return mode
    return None


# What a workload needs besides the mode, as placeholders in the plan.
WORKLOAD_ARGS = {"storage": " --disk /dev/NVME_NAMESPACE", "network": " --peer IPERF3_SERVER",
                 "kv": " --kv-sweep 16,64,256,1024"}


def plan(sl: NativeSlice, workloads: list[str], repeat: int, out: str, here: str | None,
         extra: list[str] | None = None) -> list[dict]:
    """The whole evaluation as steps: each host boot, then what runs on it.  ``here`` marks the
    running boot's mode."""
    q = shlex.quote
    rest = " ".join(extra or [])
    tail = (" " + rest) if rest else ""

    def runs(mode: str, variant: str | None = None, ssh: str | None = None) -> list[str]:
        v = f" --variant {variant}" if variant else ""
        s = f" --ssh {ssh}" if ssh else ""
        sub = f"{mode}-{variant}" if variant else mode
        return [f"coreslice eval run --mode {mode}{v} --like {q(sl.name)} --workload {w}{WORKLOAD_ARGS.get(w, '')} "
                f"--repeat {repeat}{s} --out {q(out + '/' + sub)}{tail}" for w in workloads]

    steps = [
        {"mode": "slice", "boot": "coreslice host configure --profile slice-host, and reboot",
         "commands": [f"coreslice restart {q(sl.name)}   # or coreslice apply, for a declared slice",
                      *runs("slice")]},
        {"mode": "vm", "boot": "coreslice host configure --profile vm-host, and reboot",
         "commands": [f"coreslice vm --like {q(sl.name)} --hugepages 1G &", *runs("vm", "1G", "root@ADDR"),
                      "# stop the VM, then the same on 2 MiB pages:",
                      f"coreslice vm --like {q(sl.name)} --hugepages 2M &", *runs("vm", "2M", "root@ADDR")]},
        {"mode": "native", "boot": f"{profile_fix(sl)}",
         "commands": [f"coreslice native-setup --like {q(sl.name)}", *runs("native"),
                      f"coreslice native-setup --like {q(sl.name)} --undo"]},
        {"mode": "report", "boot": None,
         "commands": [f"coreslice eval report {q(out)} --plot {q(out + '/report.png')} --html {q(out + '/report.html')}"]},
    ]
    for s in steps:
        s["here"] = s["mode"] == here
    return steps


def render(steps: list[dict]) -> str:
    out = []
    for i, s in enumerate(steps, 1):
        mark = "   <- this host boot" if s["here"] else ""
        out.append(f"{i}. {s['mode']}{mark}")
        if s["boot"]:
            out.append(f"   host: {s['boot']}")
        out += [f"   {c}" for c in s["commands"]]
    return "\n".join(out) + "\n"
