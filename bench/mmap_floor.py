"""The floor for writing a boot image: the same bytes into the same physical range, by the
simplest means that works, run inside the emulated host.

`dd` to /dev/mem cannot be the floor: on a stock kernel, read()/write() of /dev/mem above the
host's mem= limit fail (dd copies 0 records), so we try it, report what it did, and then time the
plain alternative, as dd would do it: read each file and copy it into one mmap of the whole range
(write-back, as coreslice maps RAM), then one read-back compare.  coreslice does the same in
chunks, with its bookkeeping (segments, per-chunk mappings).

usage: python3 mmap_floor.py ADDR FILE [FILE ...]   (files are laid out back to back from ADDR)
prints one JSON object.
"""

import json
import mmap
import os
import subprocess
import sys
import time

PAGE = 4096


def main() -> int:
    addr = int(sys.argv[1], 0)
    files = sys.argv[2:]
    total = sum(os.path.getsize(f) for f in files)
    dd = subprocess.run(["dd", f"if={files[0]}", "of=/dev/mem", "bs=1M", f"seek={addr}",
                         "oflag=seek_bytes", "conv=notrunc", "count=1"],
                        capture_output=True, text=True)
    fd = os.open("/dev/mem", os.O_RDWR)
    length = (total + PAGE - 1) // PAGE * PAGE
    m = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=addr)
    t0 = time.perf_counter()
    pos = 0
    blobs = []
    for f in files:
        with open(f, "rb") as fh:
            b = fh.read()
        m[pos:pos + len(b)] = b
        pos += len(b)
        blobs.append(b)
    t1 = time.perf_counter()
    pos = 0
    same = True
    for b in blobs:
        same &= m[pos:pos + len(b)] == b
        pos += len(b)
    t2 = time.perf_counter()
    m.close()
    os.close(fd)
    print(json.dumps({"bytes": total, "write_s": t1 - t0, "write_readback_s": t2 - t0, "same": same,
                      "dd_rc": dd.returncode, "dd_stderr": dd.stderr.strip().splitlines()[-1:]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
