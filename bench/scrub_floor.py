"""The scrub against its floor, run inside the emulated host as root on free slice RAM.

Per round, in alternating order so that neither always runs on the cache the other warmed:

  floor  open /dev/mem, one write-back mmap of the whole range, one libc memset (ctypes) over it;
  scrub  coreslice.launch.scrub.scrub(DevMem(), ...): the code `coreslice stop` and every launch
         run (one mapping, memset in ZERO_CHUNK pieces with progress between them).

The range must be free RAM above the host's mem= (no slice there: stop it first).

usage: python3 scrub_floor.py --base 0x40000000 --size 512M [--rounds N]
prints one JSON object (times in seconds, ratio = best scrub / best floor; the target is <= 1.25,
i.e. the scrub runs at >= 0.8x the floor's speed).
"""

import argparse
import ctypes
import json
import mmap
import os
import statistics
import time

from coreslice.launch import scrub
from coreslice.machine.physmem import DevMem
from coreslice.units import parse_size


def floor(base: int, size: int) -> float:
    fd = os.open("/dev/mem", os.O_RDWR)
    try:
        t0 = time.perf_counter()
        m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=base)
        view = ctypes.c_char.from_buffer(m)
        ctypes.memset(ctypes.addressof(view), 0, size)
        t = time.perf_counter() - t0
        del view
        m.close()
        return t
    finally:
        os.close(fd)


def ours(base: int, size: int) -> float:
    mem = DevMem()
    try:
        t0 = time.perf_counter()
        scrub.scrub(mem, [(base, size)], lambda _m: None)
        return time.perf_counter() - t0
    finally:
        mem.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", type=lambda s: int(s, 0), required=True)
    ap.add_argument("--size", type=lambda s: parse_size(s, "size"), required=True)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    times: dict[str, list[float]] = {"floor": [], "scrub": []}
    for r in range(a.rounds):
        order = ("floor", "scrub") if r % 2 == 0 else ("scrub", "floor")
        for which in order:
            times[which].append((floor if which == "floor" else ours)(a.base, a.size))
    best = {k: min(v) for k, v in times.items()}
    print(json.dumps({
        "base": a.base, "size": a.size, "rounds": a.rounds,
        "floor": {"best": best["floor"], "median": statistics.median(times["floor"]), "all": times["floor"]},
        "scrub": {"best": best["scrub"], "median": statistics.median(times["scrub"]), "all": times["scrub"]},
        "ratio": best["scrub"] / best["floor"],
        "speed_vs_floor": best["floor"] / best["scrub"],
        "gib_per_s": {"floor": a.size / best["floor"] / (1 << 30), "scrub": a.size / best["scrub"] / (1 << 30)},
    }, indent=2))


if __name__ == "__main__":
    main()
