"""`coreslice image build` from a cached root tarball against its floor on the same target.

  floor   mkfs.ext4 -d TARBALL of the same tree, on a new file of the same size (sparse, made
          with truncate), no partition table, nothing else: the least any builder must do;
  build   `coreslice image build --rootfs TARBALL --target FILE --out-dir DIR` as users run it
          (a new process: imports, reading the tarball through, GPT, mkfs, fstab and seed,
          e2fsck -fn, kernel and initrd copied out, image.json).

Rounds alternate the order so that neither always runs on the page cache the other warmed.
The tarball should be a real root (e.g. the testbed's cached Debian root under
~/.cache/coreslice/images/rootfs/); target <= 1.5x the floor (issue 10 section 6).

usage: python3 bench/image_build.py TARBALL [--rounds N] [--dir DIR]   prints one JSON object
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def _time(argv, **kw) -> float:
    t = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tarball")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where the images go (default: a temporary directory)")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="bench-image-", dir=a.dir)
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
    env = {**os.environ, "PYTHONPATH": os.path.abspath(src)}
    floors, builds, size = [], [], None
    try:
        for r in range(a.rounds):
            img, out = os.path.join(work, "b.img"), os.path.join(work, "out")
            order = ("build", "floor") if r % 2 == 0 else ("floor", "build")
            for what in order:
                if what == "build":
                    for p in (img,):
                        if os.path.exists(p):
                            os.unlink(p)
                    shutil.rmtree(out, ignore_errors=True)
                    t = time.perf_counter()
                    proc = subprocess.run([sys.executable, "-m", "coreslice", "image", "build", "--rootfs", a.tarball,
                                           "--target", img, "--out-dir", out, "--json", "--quiet"],
                                          capture_output=True, text=True, env=env)
                    builds.append(time.perf_counter() - t)
                    if proc.returncode != 0:
                        sys.exit(proc.stderr)
                    res = json.loads(proc.stdout)["image"]
                    size = res["partition"]["partition_bytes"]
                else:
                    if size is None:  # the floor needs the build's partition size: run the build first
                        continue
                    fimg = os.path.join(work, "f.img")
                    with open(fimg, "wb") as f:
                        f.truncate(size)
                    floors.append(_time(["mkfs.ext4", "-q", "-F", "-b", "4096", "-d", a.tarball, fimg]))
                    os.unlink(fimg)
        floor, build = statistics.median(floors), statistics.median(builds)
        print(json.dumps({"tarball": a.tarball, "tarball_bytes": os.path.getsize(a.tarball), "partition_bytes": size,
                          "rounds": a.rounds, "floor_s": [round(x, 3) for x in floors],
                          "build_s": [round(x, 3) for x in builds], "floor_median_s": round(floor, 3),
                          "build_median_s": round(build, 3), "ratio": round(build / floor, 3), "target_ratio": 1.5,
                          "met": build / floor <= 1.5}, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
