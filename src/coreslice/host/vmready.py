"""``coreslice host check --profile vm-host``: can this host run the comparison VMs (coreslice vm)?

Items as in readiness.py (ok / warn / fail, with the fix), read under ``root`` so tests use
synthetic trees:

  kvm        /dev/kvm (the kvm_intel or kvm_amd module, VT-x/AMD-V on in the firmware)
  iommu      IOMMU groups in sysfs: the IOMMU translates, which vfio-pci needs (warn: VMs
             without --device still run)
  vfio       the vfio-pci driver, loaded or loadable (warn, as above)
  hugepages  a hugetlbfs of 2M pages mounted (fail: the default --hugepages 2M needs it), and of
             1G pages with a pool (warn: --hugepages 1G needs both)
  qemu       qemu-system-x86_64 on PATH (root "/" only)
"""

from __future__ import annotations

import shutil
from pathlib import Path

from coreslice.host.readiness import Item, Report
from coreslice.vm.hugepages import hugetlbfs_mounted
from coreslice.vm.plan import HUGEPAGE_MOUNTS, QEMU


def check_kvm(root: Path) -> Item:
    if (root / "dev/kvm").exists():
        return Item("kvm", "ok", "/dev/kvm exists")
    return Item("kvm", "fail", "no /dev/kvm: KVM is not loaded",
                "modprobe kvm_intel (or kvm_amd); if it refuses, enable VT-x/AMD-V in the firmware")


def check_iommu_groups(root: Path) -> Item:
    groups = root / "sys/kernel/iommu_groups"
    n = len(list(groups.iterdir())) if groups.is_dir() else 0
    if n:
        return Item("iommu", "ok", f"the IOMMU translates ({n} IOMMU groups)")
    return Item("iommu", "warn", "no IOMMU groups: the IOMMU does not translate, so vfio-pci cannot pass devices "
                "(VMs without --device still run)", "coreslice host configure --profile vm-host (intel_iommu=on), "
                "then reboot")


def _module_available(root: Path, release: str | None, name: str) -> bool:
    """Whether modules.dep of ``release`` lists the module (file names spell - or _ alike)."""
    want = name.replace("-", "_")
    try:
        lines = (root / "lib/modules" / str(release) / "modules.dep").read_text().splitlines()
    except OSError:
        return False
    return any(line.split(":")[0].rsplit("/", 1)[-1].split(".ko")[0].replace("-", "_") == want for line in lines)


def check_vfio(root: Path, release: str | None) -> Item:
    if (root / "sys/bus/pci/drivers/vfio-pci").is_dir():
        return Item("vfio", "ok", "the vfio-pci driver is loaded")
    if _module_available(root, release, "vfio-pci"):
        return Item("vfio", "ok", "vfio-pci is not loaded; coreslice vm --device needs it loaded", "modprobe vfio-pci")
    return Item("vfio", "warn", "no vfio-pci module for the running kernel: VMs cannot take devices",
                "install a kernel built with CONFIG_VFIO_PCI (Debian's are)")


def check_hugepages(root: Path) -> list[Item]:
    items = []
    if hugetlbfs_mounted(root, "2M"):
        items.append(Item("hugepages", "ok", f"hugetlbfs of 2M pages on {HUGEPAGE_MOUNTS['2M']}"))
    else:
        items.append(Item("hugepages", "fail", f"no hugetlbfs of 2M pages on {HUGEPAGE_MOUNTS['2M']} "
                          "(coreslice vm's default --hugepages 2M)",
                          f"mount -t hugetlbfs none {HUGEPAGE_MOUNTS['2M']} (systemd's dev-hugepages.mount does it)"))
    pools = list((root / "sys/kernel/mm/hugepages").glob("hugepages-1048576kB"))
    if pools and hugetlbfs_mounted(root, "1G"):
        items.append(Item("hugepages-1G", "ok", f"1G pages: a pool and hugetlbfs on {HUGEPAGE_MOUNTS['1G']}"))
    else:
        what = "no 1G page pool (the CPU lacks pdpe1gb?)" if not pools else \
            f"no hugetlbfs of 1G pages on {HUGEPAGE_MOUNTS['1G']}"
        items.append(Item("hugepages-1G", "warn", f"{what}: --hugepages 1G will be refused",
                          f"mkdir -p {HUGEPAGE_MOUNTS['1G']} && mount -t hugetlbfs -o pagesize=1G none "
                          f"{HUGEPAGE_MOUNTS['1G']}; reserve pages at boot (hugepagesz=1G hugepages=N)"))
    return items


def check_qemu(root: Path) -> Item:
    found = shutil.which(QEMU) if root == Path("/") else next(
        (str(p) for d in ("usr/bin", "usr/local/bin") if (p := root / d / QEMU).exists()), None)
    if found:
        return Item("qemu", "ok", f"{QEMU} at {found}")
    return Item("qemu", "fail", f"{QEMU} is not installed", "apt-get install qemu-system-x86")


def check(root: Path | str = "/") -> Report:
    root = Path(root)
    release = None
    try:
        release = (root / "proc/sys/kernel/osrelease").read_text().strip() or None
    except OSError:
        pass
    items = [check_kvm(root), check_iommu_groups(root), check_vfio(root, release), *check_hugepages(root),
             check_qemu(root)]
    return Report(items, purpose="run comparison VMs")
