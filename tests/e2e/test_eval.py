"""End to end (issue 13 sections 3-4): `coreslice eval run` in a slice over SSH and natively on
the emulated host, on the same emulated CPU count and memory, then `eval report`.

The slice boots Debian with sysbench from its own NVMe (`--guest-os debian`, the image built with
the package added); the emulated host boots `maxcpus=1 mem=1G`, which is the native-eval boot of
this 1-CPU, 1G slice.  On hardware the native baseline is another host boot, without the slice;
here both run side by side in one boot, so `--mode native` is refused for the running slice
alone (and `--mode vm` for the missing IOMMU), and runs with --any-profile, which records that one
difference.  sysbench cpu on one emulated CPU in the slice and on
one natively: under TCG both are the same emulated CPU model on the same real cores, so their
ratio is reported, and a slice CPU far slower or faster than the host's fails the test (on this
machine's shared CPUs the two agree only to within about 20%, not the few percent hardware would
give).  The figures are labelled as no performance claims.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from coreslice.testbed.run import RunOptions, run

pytestmark = pytest.mark.e2e

SECONDS, REPEAT = 10, 3

# The two modes take turns (--append), one run each: this machine's CPUs are shared with others
# (steal time), and a slow spell then falls on both rather than on a block of one mode's runs.
SCRIPT = f"""
ev() {{ coreslice eval "$@"; }}
ev run --mode native --like ev --workload cpu --seconds {SECONDS} --out res/native \\
  > native-refused.json 2> native-refused.err; echo $? > native-refused.rc
: > slice.rc; : > native.rc
for i in $(seq {REPEAT}); do
  ev run --mode slice --like ev --workload cpu --seconds {SECONDS} --repeat 1 --append --ssh tester@10.99.1.2 \\
    --ssh-key /tmp/guest-key --out res/slice --json > slice.json 2>> slice.err; echo $? >> slice.rc
  ev run --mode native --like ev --workload cpu --seconds {SECONDS} --repeat 1 --append --any-profile \\
    --out res/native --json > native.json 2>> native.err; echo $? >> native.rc
done
ev run --mode vm --like ev --workload cpu --ssh root@10.0.0.9 --out res/vm > vm.out 2> vm.err; echo $? > vm.rc
ev report res --json --out report.json --plot report.png --html report.html > report.out 2> report.err; echo $? > report.rc
ev plan --like ev > plan.txt 2>&1
"""


def test_eval_cpu_in_a_slice_and_natively_agree(testbed_ready, tmp_path):
    from coreslice.testbed.paths import cache_dir
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "e2e", "-f", str(key)], check=True)
    cfg = tmp_path / "user-data.yaml"
    cfg.write_text("#cloud-config\n" + json.dumps({
        "hostname": "ev", "users": [{"name": "tester", "shell": "/bin/bash",
                                     "ssh_authorized_keys": [(tmp_path / "id_ed25519.pub").read_text().strip()]}],
    }) + "\n")
    work = cache_dir() / "test-runs" / f"eval-{time.strftime('%H%M%S')}-{os.getpid()}"
    result = run(RunOptions(slices=["--cpus 1 --memory 1G@0x100000000 --name ev"], guest_os="debian", network=True,
                            guest_cloud_config=cfg, guest_ssh_key=key, guest_packages=("sysbench",),
                            host_cmds=[SCRIPT], workdir=work, slice_timeout=420, timeout=1200))
    assert result["host"].get("error") is None, result["host"]
    s = result["slices"][0]
    assert s["os"]["ssh_ok"], (s["os"], s["console_log"])
    d = work

    def text(name: str) -> str:
        return (d / name).read_text()

    assert text("slice.rc").split() == ["0"] * REPEAT, text("slice.err")[-2000:]
    assert text("native.rc").split() == ["0"] * REPEAT, text("native.err")[-2000:]
    slice_doc, native_doc = json.loads(text("slice.json")), json.loads(text("native.json"))
    # Each ran where it should: the slice's own kernel on its one CPU, over SSH; the host itself.
    assert slice_doc["environment"]["target"] == "tester@10.99.1.2" and slice_doc["environment"]["cpus"] == 1
    assert native_doc["environment"]["target"] == "this host" and native_doc["environment"]["cpus"] == 1
    # maxcpus=1 mem=1G is this slice's native-eval boot: the running slice is the one difference.
    assert text("native-refused.rc").strip() == "2" and "slice 'ev' is running" in text("native-refused.err")
    assert native_doc["environment"]["host_profile_gaps"] == [
        "slice 'ev' is running: the native baseline is a host boot without it"]
    assert slice_doc["environment"]["emulated"] and native_doc["environment"]["emulated"]
    assert len(slice_doc["runs"]) == REPEAT and len(native_doc["runs"]) == REPEAT
    # No VM here: the host has no IOMMU, and the mode's boot check says so before running anything.
    assert text("vm.rc").strip() == "2" and "intel_iommu=on" in text("vm.err")
    assert text("report.rc").strip() == "0", text("report.err")
    rep = json.loads(text("report.json"))
    cell, native = rep["report"]["cpu"]["slice"], rep["report"]["cpu"]["native"]
    ratio = cell["relative_to_native"]
    # Best runs, as noise only ever slows a CPU-bound run down.  The band is wide: on this 2-core
    # machine, whose CPUs are shared (50% steal seen), runs of the two modes in blocks gave
    # best-run ratios of 1.04 and 0.80 under TCG; the modes now take turns.  A slice CPU that ran
    # at half speed (a wrong TSC or timer) still fails it.  Both ratios are kept in the run dir.
    best = cell["max"] / native["max"]
    print(f"sysbench cpu, slice / native on one emulated CPU: medians {ratio:.3f}, best runs {best:.3f} "
          f"(slice {cell['median']:.1f} [{cell['min']:.1f}-{cell['max']:.1f}], native {native['median']:.1f} "
          f"[{native['min']:.1f}-{native['max']:.1f}] events/s)")
    (d / "cpu-ratio.txt").write_text(f"median {ratio}\nbest {best}\n")
    assert rep["emulated"] and "not performance claims" in rep["note"]
    assert 0.75 < best < 1.33, (best, ratio, cell, native)
    assert (d / "report.png").read_bytes()[:4] == b"\x89PNG"
    # The running slice makes this boot the slice step of the plan.
    assert [line for line in text("plan.txt").splitlines() if "<- this host boot" in line] == ["1. slice   <- this host boot"]
