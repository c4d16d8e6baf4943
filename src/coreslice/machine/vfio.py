"""A VFIO type1 container: the IOMMU domain that confines a slice's PCI functions to its RAM.

Written by hand over ``fcntl.ioctl``: no maintained Python library wraps the VFIO container and
group ioctls (the ones on PyPI are vfio-user clients or VM managers), and the part used here is
eight calls with fixed layouts (linux/vfio.h, Documentation/driver-api/vfio.rst):

    /dev/vfio/vfio (container) ─ GET_API_VERSION, CHECK_EXTENSION(TYPE1v2)
    /dev/vfio/GROUP ─ GROUP_GET_STATUS (viable), GROUP_SET_CONTAINER
    container ─ SET_IOMMU(TYPE1v2): the groups now sit in one IOMMU domain that maps nothing
    container ─ IOMMU_MAP_DMA(vaddr, iova, size): IOVA = the slice's physical addresses, backed
                by an mmap of /dev/mem over that range (type1 follows the PFNs of a VM_PFNMAP
                mapping; memory above the host's mem= has no struct page, so nothing is pinned
                or charged to the locked-memory limit)
    group ─ GROUP_GET_DEVICE_FD: the function is "in use", so vfio-pci keeps it in D0 (an idle
            vfio-pci function may be put in D3hot under the slice's driver) and resets it and
            turns its bus mastering off when the fd is closed

The domain lives as long as the container's fd: the process holding it (launch/dmahold.py) is
the slice's DMA domain.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from coreslice.errors import LaunchError

# linux/vfio.h: _IO(VFIO_TYPE ';', VFIO_BASE 100 + n); _IO has no size or direction bits.
_T = ord(";") << 8
VFIO_GET_API_VERSION = _T | 100
VFIO_CHECK_EXTENSION = _T | 101
VFIO_SET_IOMMU = _T | 102
VFIO_GROUP_GET_STATUS = _T | 103
VFIO_GROUP_SET_CONTAINER = _T | 104
VFIO_GROUP_GET_DEVICE_FD = _T | 106
VFIO_IOMMU_MAP_DMA = _T | 113
VFIO_IOMMU_UNMAP_DMA = _T | 114
VFIO_API_VERSION = 0
VFIO_TYPE1v2_IOMMU = 3
GROUP_FLAGS_VIABLE = 1 << 0
DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE = 1 << 0, 1 << 1
_GROUP_STATUS = struct.Struct("<II")      # argsz, flags
_DMA_MAP = struct.Struct("<IIQQQ")        # argsz, flags, vaddr, iova, size
_DMA_UNMAP = struct.Struct("<IIQQ")       # argsz, flags, iova, size
PAGE = 0x1000

Ioctl = Callable[[int, int, object], object]


def _ioctl(fd: int, request: int, arg: object = 0) -> object:
    return fcntl.ioctl(fd, request, arg)


@dataclass
class Container:
    """One container/domain.  ``dev`` is the /dev root and ``ioctl`` the call (tests pass fakes)."""

    dev: str = "/dev"
    ioctl: Ioctl = _ioctl
    fd: int | None = None
    groups: dict[int, int] = field(default_factory=dict)        # group -> fd
    devices: dict[str, int] = field(default_factory=dict)       # PCI address -> fd
    maps: list[tuple[int, int, mmap.mmap]] = field(default_factory=list)  # (iova, size, mapping)
    _iommu_set: bool = False

    def open(self) -> None:
        path = f"{self.dev}/vfio/vfio"
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise LaunchError(f"{path}: {e.strerror}; load VFIO (modprobe vfio-pci) and run as root") from e
        version = self.ioctl(self.fd, VFIO_GET_API_VERSION, 0)
        if version != VFIO_API_VERSION:
            raise LaunchError(f"{path}: VFIO API version {version}, coreslice speaks {VFIO_API_VERSION}")
        if not self.ioctl(self.fd, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU):
            raise LaunchError(f"{path}: the kernel's VFIO has no type1v2 IOMMU backend (vfio_iommu_type1)")

    def add_group(self, group: int) -> None:
        assert self.fd is not None
        path = f"{self.dev}/vfio/{group}"
        try:
            gfd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise LaunchError(f"{path}: {e.strerror}; every function of IOMMU group {group} must be bound "
                              "to vfio-pci (or to no driver)") from e
        self.groups[group] = gfd
        status = bytearray(_GROUP_STATUS.pack(_GROUP_STATUS.size, 0))
        self.ioctl(gfd, VFIO_GROUP_GET_STATUS, status)
        if not _GROUP_STATUS.unpack(status)[1] & GROUP_FLAGS_VIABLE:
            raise LaunchError(f"IOMMU group {group} is not viable: a function in it is still bound to a host "
                              f"driver (ls /sys/kernel/iommu_groups/{group}/devices)")
        self.ioctl(gfd, VFIO_GROUP_SET_CONTAINER, bytearray(struct.pack("<i", self.fd)))

    def set_iommu(self) -> None:
        """After the first group: the domain exists, and maps nothing yet (every DMA faults)."""
        assert self.fd is not None
        try:
            self.ioctl(self.fd, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)
        except OSError as e:
            raise LaunchError(
                f"VFIO_SET_IOMMU: {e.strerror}; with interrupt remapping off (the slices' MSIs need it off) "
                "vfio_iommu_type1 refuses unless allow_unsafe_interrupts=1") from e
        self._iommu_set = True

    def map_physical(self, base: int, size: int, devmem: str = "/dev/mem") -> None:
        """Map physical [base, base+size) at IOVA = base, readable and writable by the devices."""
        assert self.fd is not None and self._iommu_set
        if base % PAGE or size % PAGE or size <= 0:
            raise LaunchError(f"DMA range 0x{base:x}+0x{size:x}: not page-aligned")
        mfd = os.open(devmem, os.O_RDWR | os.O_CLOEXEC)
        try:
            m = mmap.mmap(mfd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=base)
        except OSError as e:
            raise LaunchError(f"mmap of {devmem} at 0x{base:x}+0x{size:x}: {e.strerror}") from e
        finally:
            os.close(mfd)
        vaddr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        arg = _DMA_MAP.pack(_DMA_MAP.size, DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE, vaddr, base, size)
        try:
            self.ioctl(self.fd, VFIO_IOMMU_MAP_DMA, arg)
        except OSError as e:
            m.close()
            raise LaunchError(f"VFIO_IOMMU_MAP_DMA of 0x{base:x}+0x{size:x}: {e.strerror}") from e
        self.maps.append((base, size, m))

    def open_device(self, group: int, address: str) -> None:
        # A mutable buffer: fcntl.ioctl then returns the call's result (the fd), not the buffer.
        fd = self.ioctl(self.groups[group], VFIO_GROUP_GET_DEVICE_FD, bytearray(address.encode() + b"\0"))
        self.devices[address] = int(fd)  # type: ignore[arg-type]

    def close(self) -> None:
        """Devices first (vfio-pci resets them), then the mappings and the domain."""
        for fd in self.devices.values():
            _close(fd)
        self.devices.clear()
        if self.fd is not None:
            for iova, size, _m in self.maps:
                try:
                    self.ioctl(self.fd, VFIO_IOMMU_UNMAP_DMA, _DMA_UNMAP.pack(_DMA_UNMAP.size, 0, iova, size))
                except OSError:
                    pass  # closing the container unmaps everything anyway
        for _iova, _size, m in self.maps:
            try:
                m.close()
            except BufferError:
                pass  # a ctypes view still refers to it; the process exit unmaps it
        self.maps.clear()
        for fd in self.groups.values():
            _close(fd)
        self.groups.clear()
        if self.fd is not None:
            _close(self.fd)
            self.fd = None


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
