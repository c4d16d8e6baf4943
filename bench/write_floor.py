"""The loader's write + read-back against its floor, run inside the emulated host as root.

The image is the loader's own: the plan part of `coreslice boot` (LaunchSession.plan, nothing
written) for the given boot arguments, so both sides put exactly the bytes `coreslice boot` would
into exactly its physical addresses.  Per round, in alternating order so that neither always runs
on the cache the other warmed:

  floor   open /dev/mem, one mmap of each contiguous page range the segments cover, per segment
          one memmove from its source into the mapping and one memcmp back (libc, via ctypes);
          a file's source is the file mmapped (MAP_POPULATE: its page-cache pages, no copy), a
          generated segment's its bytes.  Nothing is allocated per byte: a floor that reads
          whole files into fresh buffers and compares through fresh copies pays page faults on
          new memory for every page, which the loader's reused 2 MiB buffer does not, and so
          the loader beat it (0.6x).  Write-back mapping (no O_SYNC), as DevMem maps RAM;
  loader  coreslice.launch.acting.write_image(DevMem(), image, ...): the code `coreslice boot`
          runs (2 MiB chunks, a mapping per chunk, read-back of each).

Files are read once before the first round (warm page cache).  The range must be free RAM: stop
any slice there first.  Afterwards the low-memory slot record the trampoline page carries is
zeroed, as `coreslice stop` does, so that no later launch takes the slot for a live slice's.

usage: python3 write_floor.py [--rounds N] -- BOOT-ARGS...   (the `coreslice boot` arguments)
prints one JSON object (times in seconds).
"""

import argparse
import ctypes
import json
import mmap
import os
import statistics
import sys
import time

# The same modules `coreslice boot` imports (coreslice.cli pulls in every subcommand): their
# import time is part of the loader process that the boot's phases leave out.
_T0 = time.perf_counter()
from coreslice.boot import lowmem
from coreslice.cli import build_parser
from coreslice.cli.boot import request_from
from coreslice.host.snapshot import discover
from coreslice.launch.acting import write_image
from coreslice.launch.session import LaunchSession, open_ledger
from coreslice.machine import for_host
from coreslice.machine.physmem import PAGE, DevMem

IMPORT_S = time.perf_counter() - _T0

DEV_MEM = "/dev/mem"


def plan_image(boot_args: list[str]):
    """The BootImage `coreslice boot BOOT-ARGS` would write, planned the same way (no effect)."""
    req = request_from(build_parser().parse_args(["boot", *boot_args]))
    host = discover(req.host_root)
    session = LaunchSession(req, for_host(req.live, req.host_root))
    return session.plan(host, open_ledger(req.ledger, host, readonly=True))


def page_ranges(segments) -> list[tuple[int, int]]:
    """[start, end) page ranges covering the segments, touching ones merged."""
    spans = sorted((s.addr & ~(PAGE - 1), (s.addr + s.size + PAGE - 1) & ~(PAGE - 1)) for s in segments)
    out: list[list[int]] = []
    for a, b in spans:
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def contents(seg) -> bytes:
    if seg.data is not None:
        return seg.data
    with open(seg.path, "rb", buffering=0) as f:
        f.seek(seg.offset)
        return f.read(seg.size)


libc = ctypes.CDLL(None, use_errno=True)
libc.memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
libc.memcmp.restype = ctypes.c_int
libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
libc.mmap.restype = ctypes.c_void_p
libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)


def map_file(path) -> tuple[int, int]:
    """(address, length) of a read-only shared mapping of the whole file, its page-cache pages
    mapped at once.  libc's mmap: Python's cannot give the address of a read-only mapping, and a
    private writable one would be copied page by page by MAP_POPULATE."""
    fd = os.open(path, os.O_RDONLY)
    try:
        n = os.fstat(fd).st_size
        addr = libc.mmap(None, n, mmap.PROT_READ, mmap.MAP_SHARED | mmap.MAP_POPULATE, fd, 0)
    finally:
        os.close(fd)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), f"mmap {path}")
    return addr, n


def floor(image, ranges) -> tuple[float, bool]:
    t0 = time.perf_counter()
    fd = os.open(DEV_MEM, os.O_RDWR)
    maps = [(a, mmap.mmap(fd, b - a, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=a))
            for a, b in ranges]
    views = [(a, len(m), ctypes.c_char.from_buffer(m)) for a, m in maps]
    files: dict = {}  # path -> (address, length)
    same = True
    for seg in image.segments:
        a, _, view = next(v for v in views if v[0] <= seg.addr < v[0] + v[1])
        dst = ctypes.addressof(view) + seg.addr - a
        if seg.data is not None:
            src = seg.data
        else:
            if seg.path not in files:
                files[seg.path] = map_file(seg.path)
            src = files[seg.path][0] + seg.offset
        ctypes.memmove(dst, src, seg.size)
        same &= libc.memcmp(dst, src, seg.size) == 0
    del view, views  # the ctypes views hold buffer exports: drop them before closing
    for addr, n in files.values():
        libc.munmap(addr, n)
    for _, m in maps:
        m.close()
    os.close(fd)
    return time.perf_counter() - t0, same


def loader(image) -> float:
    # A fresh DevMem: it opens /dev/mem inside the timing, as the floor does.  No progress
    # output (`coreslice boot --json` passes a no-op too).
    t0 = time.perf_counter()
    mem = DevMem()
    write_image(mem, image, lambda _m: None)
    mem.close()
    return time.perf_counter() - t0


def summary(xs: list[float]) -> dict:
    return {"best": min(xs), "median": statistics.median(xs), "all": xs}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("boot_args", nargs=argparse.REMAINDER)
    opts = ap.parse_args()
    boot_args = opts.boot_args[1:] if opts.boot_args[:1] == ["--"] else opts.boot_args
    planned = plan_image(boot_args)
    image = planned.image
    ranges = page_ranges(image.segments)
    for seg in image.segments:  # warm the page cache
        contents(seg)
    t_floor, t_loader, order, same = [], [], [], True
    for i in range(opts.rounds):
        for side in (("floor", "loader") if i % 2 == 0 else ("loader", "floor")):
            if side == "floor":
                t, ok = floor(image, ranges)
                t_floor.append(t)
                same &= ok
            else:
                t_loader.append(loader(image))  # raises if its read-back differs
            order.append(side)
    DevMem().write(lowmem.record_address(planned.plan.slot), bytes(lowmem.RECORD_SIZE))
    print(json.dumps({
        "bytes": image.total_bytes,
        "segments": [{"name": s.name, "addr": s.addr, "size": s.size} for s in image.segments],
        "mmaps": [list(r) for r in ranges],
        "floor": summary(t_floor), "loader": summary(t_loader),
        "floor_same": same, "order": order, "coreslice_import_s": IMPORT_S,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
