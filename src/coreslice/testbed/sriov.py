"""SR-IOV devices of the emulated host (``coreslice testbed run --sriov``).

Two physical functions, each behind a PCIe root port of its own on bus 0 (a VF sits at the
PF's routing ID + First VF Offset, PCI Express Base Spec 6.0 §9.3.3.9-10; on bus 0 those devfns
would collide with the other devices, behind a root port they use ARI, which both models report):

=========  ===================================================================================
igb        Intel 82576 model: up to 7 VFs (igb VF offset 0x80, stride 2); the host's igb driver
           creates them through ``sriov_numvfs`` and sets their MACs (netlink IFLA_VF_MAC)
nvme       in an ``nvme-subsys`` (QEMU needs one for SR-IOV), ``sriov_max_vfs`` secondary
           controllers with flexible queue (VQ) and interrupt (VI) resources: the PF keeps
           ``max_ioqpairs - sriov_vq_flexible`` queues (QEMU wants at least 2) and ``msix_qsize - sriov_vi_flexible``
           vectors of its own (QEMU docs/system/devices/nvme.rst, "Virtualization Enhancements
           and SR-IOV"); each VF needs at least 2 VQ (admin + one I/O) and 1 VI to come online
=========  ===================================================================================

The host kernel loads ``igb``, ``igbvf`` and ``nvme`` (:data:`MODULES`) from its initramfs; with
``sriov_drivers_autoprobe`` 0 no host driver binds the VFs.  Bus numbers of the root ports are
given by the firmware, so tests find the PFs by vendor/device in sysfs (:data:`NIC_ID`,
:data:`NVME_ID`), never by a hard-coded address.
"""

from __future__ import annotations

# Dependencies first: the host init insmods exactly these, in order (modules.dep of the 6.12 kernel).
# igbvf drives a VF on the host itself (coreslice native-setup); autoprobe off keeps it off the rest.
MODULES = ("dca", "i2c-algo-bit", "igb", "igbvf", "nvme-auth", "nvme-core", "nvme")
NIC_ID = (0x8086, 0x10C9)    # 82576 PF, as QEMU's igb reports it
NVME_ID = (0x1B36, 0x0010)   # QEMU NVM Express controller
NIC_SLOT, NVME_SLOT = 0x05, 0x06
NVME_VFS = 4
# Per VF: 2 VQ (admin + 1 I/O queue pair) and 1 VI; the PF keeps 2 VQ and 2 VI for itself.
NVME_VQ_PER_VF, NVME_VI_PER_VF = 2, 1


# Namespaces of the nvme subsystem, created detached (QEMU's nvme has no Namespace Management,
# only Attachment): image install attaches one to the host, builds on it and hands it to a VF.
NAMESPACES = ((1, 160), (2, 8))  # (nsid, MiB): 2 is too small for an image (the undo path)


def namespace_images(run_dir) -> list:
    """Sparse backing files for NAMESPACES in the run dir."""
    out = []
    for nsid, mib in NAMESPACES:
        path = run_dir / f"sriov-ns{nsid}.img"
        with open(path, "wb") as f:
            f.truncate(mib << 20)
        out.append(path)
    return out


def device_args(nic_mac: str = "52:54:00:c5:00:00", ns_images=()) -> list[str]:
    """QEMU arguments for the two SR-IOV PFs and their root ports (and, given their backing
    files, the detached namespaces of NAMESPACES)."""
    vq, vi = NVME_VFS * NVME_VQ_PER_VF, NVME_VFS * NVME_VI_PER_VF
    devs = [
        f"pcie-root-port,id=srnicrp,bus=pcie.0,addr={NIC_SLOT:#x},chassis=0x80,slot=0",
        f"igb,id=srnic,bus=srnicrp,addr=0x0,mac={nic_mac}",
        f"pcie-root-port,id=srnvmerp,bus=pcie.0,addr={NVME_SLOT:#x},chassis=0x81,slot=0",
        "nvme-subsys,id=srsubsys,nqn=coreslice-sriov",
        f"nvme,id=srnvme,bus=srnvmerp,addr=0x0,serial=coreslice-sriov,subsys=srsubsys,"
        f"sriov_max_vfs={NVME_VFS},sriov_vq_flexible={vq},sriov_vi_flexible={vi},"
        f"sriov_max_vq_per_vf={NVME_VQ_PER_VF},sriov_max_vi_per_vf={NVME_VI_PER_VF},"
        f"max_ioqpairs={vq + 2},msix_qsize={vi + 2}",
    ]
    out: list[str] = []
    for d in devs:
        out += ["-device", d]
    for (nsid, _mib), img in zip(NAMESPACES, ns_images):
        out += ["-drive", f"if=none,id=srns{nsid},format=raw,file={img}",
                "-device", f"nvme-ns,drive=srns{nsid},bus=srnvme,nsid={nsid},detached=on,shared=on"]
    return out


def describe() -> dict:
    return {"nic": {"model": "igb", "vendor_device": "%04x:%04x" % NIC_ID, "root_port_slot": NIC_SLOT},
            "nvme": {"model": "nvme", "vendor_device": "%04x:%04x" % NVME_ID, "root_port_slot": NVME_SLOT,
                     "vfs": NVME_VFS, "vq_per_vf": NVME_VQ_PER_VF, "vi_per_vf": NVME_VI_PER_VF}}
