"""The DMA probe (testbed/dmaprobe.py, initramfs.SLICE_DMA): the edu on each slice's root bus,
the IOMMU pieces of the host, the report fields, DMAR fault lines, and the slice's probe script
run under busybox against a fake devmem (an edu, memory words and an IOMMU window)."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest

from coreslice.errors import UsageError
from coreslice.testbed import datapath, dmaprobe, initramfs, report
from coreslice.testbed.qemu import MachineConfig, build_command, host_append, slice_serial_ports

RUN = Path("/cache/runs/r1")
PXB = {p.name: p for p in slice_serial_ports(RUN)}


def _devices(cmd):
    return [cmd[i + 1] for i, a in enumerate(cmd) if a == "-device"]


# --- command-line pieces ------------------------------------------------------------------------


def test_iommu_device_comes_before_every_pci_device():
    cfg = MachineConfig(kernel=Path("/k"), append="", iommu=True)
    cmd = build_command(cfg, Path("/c.log"), slice_serial_ports(RUN))
    devs = _devices(cmd)
    assert devs[0] == "intel-iommu,intremap=off"
    assert sum("intel-iommu" in d for d in devs) == 1
    assert cmd.index("-device") == cmd.index("intel-iommu,intremap=off") - 1
    assert not any("intel-iommu" in d for d in _devices(build_command(
        MachineConfig(kernel=Path("/k"), append=""), Path("/c.log"), [])))


def test_iommu_and_x2apic_refused_in_one_line():
    with pytest.raises(UsageError, match="--iommu with --x2apic") as e:
        build_command(MachineConfig(kernel=Path("/k"), append="", iommu=True, x2apic=True), Path("/c"), [])
    assert "\n" not in str(e.value)
    with pytest.raises(UsageError, match="--iommu with --x2apic"):
        host_append("1G", x2apic=True, iommu=True)


def test_host_append_with_iommu():
    parts = host_append("1G", iommu=True).split()
    assert "intel_iommu=on" in parts and "intremap=off" in parts
    assert "intel_iommu=off" not in parts
    assert not {"intel_iommu=on", "intremap=off"} & set(host_append("1G").split())


@pytest.mark.parametrize("storage,network,bus", [(True, True, 0x44), (True, False, 0x43),
                                                 (False, True, 0x43), (False, False, 0x42)])
def test_edu_bus_follows_the_root_ports_before_it(storage, network, bus):
    p = dmaprobe.probe_for_port(PXB["pxb2"], storage, network)
    assert p.edu_address == f"0000:{bus:02x}:00.0"
    assert p.devices == [p.edu_address] and p.cmdline == "coreslice.dmaprobe=1"


def test_edu_behind_root_port_3_of_the_pxb_with_a_full_dma_mask():
    p = dmaprobe.probe_for_port(PXB["pxb1"], True, True)
    assert _devices(p.machine_args()) == [
        "pcie-root-port,id=pxb1rp3,bus=pxb1,chassis=0x20,slot=3,addr=0x3",
        "edu,bus=pxb1rp3,addr=0x0,dma_mask=0xffffffffffffffff",
    ]
    both = dmaprobe.machine_args([p, dmaprobe.probe_for_port(PXB["pxb3"], False, False)])
    assert "edu,bus=pxb3rp3,addr=0x0,dma_mask=0xffffffffffffffff" in both


@pytest.mark.parametrize("name", ["com2", "pci"])
def test_dma_probe_needs_a_pxb_console(name):
    with pytest.raises(UsageError, match="--dma-probe: .*pxb root bus"):
        dmaprobe.probe_for_port(PXB[name], False, False)
    with pytest.raises(UsageError, match="--dma-probe"):
        dmaprobe.probe_for_port(None, True, True)


def test_slice_args_add_the_edu_and_merge_the_cmdline():
    link = datapath.link_for_port(PXB["pxb1"], True, True, RUN)
    probe = dmaprobe.probe_for_port(PXB["pxb1"], True, True)
    args = datapath.slice_args(("--cpus", "1-2", "--cmdline", "quiet"), link)
    args = datapath.slice_args(args, probe)
    assert [args[i + 1] for i, a in enumerate(args) if a == "--device"] == [
        "0000:22:00.0", "0000:23:00.0", "0000:24:00.0"]
    assert args.count("--cmdline") == 1
    assert args[-1] == ("quiet coreslice.storage=1 coreslice.net=10.99.1.2/24,10.99.1.1 "
                        "coreslice.dmaprobe=1")
    alone = datapath.slice_args(("--cpus", "1"), dmaprobe.probe_for_port(PXB["pxb1"], False, False))
    assert alone == ("--cpus", "1", "--device", "0000:22:00.0", "--cmdline", "coreslice.dmaprobe=1")


def test_host_init_loads_vfio_with_unsafe_interrupts_allowed():
    mods = initramfs.HOST_MODULES + ("vfio", "vfio_iommu_type1", "irqbypass", "vfio-pci-core", "vfio-pci")
    text = initramfs.host_init_text(mods)
    assert "for m in netfs 9pnet 9pnet_virtio 9p msr vfio vfio_iommu_type1 irqbypass vfio-pci-core vfio-pci; do" in text
    assert '[ "$m" = vfio_iommu_type1 ] && p="allow_unsafe_interrupts=1"' in text
    assert 'insmod "/lib/modules/$m.ko" $p || fail "insmod $m"' in text
    assert "allow_unsafe" not in initramfs.host_init_text()


def test_host_init_passes_the_parameter_to_insmod(tmp_path):
    """The loop as the host runs it, with insmod recording its arguments."""
    text = initramfs.host_init_text(("msr", "vfio", "vfio_iommu_type1"))
    loop = text[text.index("for m in"):text.index("done\n") + 5]
    # A function: busybox sh prefers its own applets to $PATH.
    fake = f'insmod() {{ echo "$*" >>{tmp_path}/calls; }}\n'
    subprocess.run([str(initramfs.BUSYBOX), "sh", "-c", fake + loop], check=True)
    assert (tmp_path / "calls").read_text().splitlines() == [
        "/lib/modules/msr.ko", "/lib/modules/vfio.ko",
        "/lib/modules/vfio_iommu_type1.ko allow_unsafe_interrupts=1"]


def test_vfio_modules_resolve_in_load_order():
    dep = ("kernel/drivers/vfio/vfio.ko.xz:\n"
           "kernel/drivers/vfio/vfio_iommu_type1.ko.xz: kernel/drivers/vfio/vfio.ko.xz\n"
           "kernel/drivers/vfio/pci/vfio-pci-core.ko.xz: kernel/drivers/vfio/vfio.ko.xz kernel/virt/lib/irqbypass.ko.xz\n"
           "kernel/drivers/vfio/pci/vfio-pci.ko.xz: kernel/drivers/vfio/pci/vfio-pci-core.ko.xz "
           "kernel/drivers/vfio/vfio.ko.xz kernel/virt/lib/irqbypass.ko.xz\n"
           "kernel/virt/lib/irqbypass.ko.xz:\n")
    order = initramfs.module_load_order(dep, dmaprobe.VFIO_MODULES)
    assert [initramfs._stem(p) for p in order] == ["vfio", "vfio_iommu_type1", "irqbypass", "vfio-pci-core",
                                                   "vfio-pci"]


# --- report and host log ------------------------------------------------------------------------


def test_report_with_dma_fields_after_the_data_path():
    r = report.parse_report("CORESLICE-REPORT cpus=2 mem_kib=5 apic_ids=1,2 pci=0000:24:00.0 kcode=1000000 "
                            "storage_read=x storage_written=1 ping_ok=1 rtt_ms=3.5 dma_own=1 dma_host=blocked "
                            "cmdline=a coreslice.dmaprobe=1")
    assert r["dma"] == {"own": True, "host": "blocked"}
    assert r["storage"]["written"] and r["network"]["rtt_ms"] == 3.5
    assert r["cmdline"] == "a coreslice.dmaprobe=1"
    r = report.parse_report("CORESLICE-REPORT cpus=1 mem_kib=5 apic_ids=1 dma_own=0 dma_host=leaked cmdline=x")
    assert r["dma"] == {"own": False, "host": "leaked"} and "storage" not in r
    assert report.parse_report("CORESLICE-REPORT cpus=1 mem_kib=5 apic_ids=1 dma_own=- dma_host=- "
                               "cmdline=x")["dma"] == {"own": None, "host": None}
    old = report.parse_report("CORESLICE-REPORT cpus=1 mem_kib=5 apic_ids=1 ping_ok=1 rtt_ms=2 cmdline=x")
    assert "dma" not in old and old["network"]["ping_ok"]


# What the 6.12 host logged (format of drivers/iommu/intel/dmar.c dmar_fault_do_one).
DMESG = """\
[    0.412345] DMAR: Host address width 39
[    0.412400] DMAR: DRHD base: 0x000000fed90000 flags: 0x1
[    0.913000] DMAR: Intel(R) Virtualization Technology for Directed I/O
[   61.201345] DMAR: DRHD: handling fault status reg 2
[   61.201890] DMAR: [DMA Read NO_PASID] Request device [24:00.0] fault addr 0x17fff0000 [fault reason 0x06] PTE Read access is not set
[   61.402000] DMAR: DRHD: handling fault status reg 2
[   61.402511] DMAR: [DMA Write NO_PASID] Request device [24:00.0] fault addr 0x17fff0000 [fault reason 0x05] PTE Write access is not set
[   62.001000] DMAR: [DMA Read NO_PASID] Request device [24:00.0] fault addr 0x0 [fault reason 0x06] PTE Read access is not set
[   62.101000] DMAR: [DMA Read PASID 0x3] Request device [44:00.0] fault addr 0x1000 [fault reason 0x06] PTE Read access is not set
[   62.201000] DMAR: [INTR-REMAP] Request device [00:1f.0] fault index 0x0 [fault reason 0x25] Blocked a compatibility format interrupt request
"""


def test_dmar_fault_lines_parsed():
    faults = dmaprobe.dmar_faults(DMESG)
    assert [(f["kind"], f["device"], f["addr"], f["reason"]) for f in faults] == [
        ("DMA Read", "24:00.0", 0x17FFF0000, "06"), ("DMA Write", "24:00.0", 0x17FFF0000, "05"),
        ("DMA Read", "24:00.0", 0x0, "06"), ("DMA Read", "44:00.0", 0x1000, "06")]
    assert faults[2]["text"] == "PTE Read access is not set"
    assert [f["addr"] for f in dmaprobe.faults_of(DMESG, "0000:44:00.0")] == [0x1000]
    assert dmaprobe.faults_of(DMESG, "0000:64:00.0") == []


def test_slice_result_matches_the_fault_to_its_edu_and_the_host_address():
    p1 = dmaprobe.probe_for_port(PXB["pxb1"], True, True)
    rep = {"dma": {"own": True, "host": "blocked"}}
    d = dmaprobe.slice_result(p1, rep, DMESG)
    assert {k: d[k] for k in ("own_ok", "host_blocked", "fault_logged", "edu", "host_addr")} == {
        "own_ok": True, "host_blocked": True, "fault_logged": True, "edu": "0000:24:00.0", "host_addr": "0x0"}
    assert dmaprobe.dma_ok(d, iommu=True)
    # pxb2's edu faulted only at 0x1000, not at the host address: no fault logged for the probe.
    p2 = dmaprobe.probe_for_port(PXB["pxb2"], True, True)
    d2 = dmaprobe.slice_result(p2, rep, DMESG)
    assert d2["fault_logged"] is False and not dmaprobe.dma_ok(d2, iommu=True)
    # Without an IOMMU a leak is the expected answer; no answer is never ok.
    leak = dmaprobe.slice_result(p1, {"dma": {"own": True, "host": "leaked"}}, "")
    assert leak["host_blocked"] is False and leak["fault_logged"] is False
    assert dmaprobe.dma_ok(leak, iommu=False) and not dmaprobe.dma_ok(leak, iommu=True)
    none = dmaprobe.slice_result(p1, None, "")
    assert none["own_ok"] is None and none["host_blocked"] is None
    assert not dmaprobe.dma_ok(none, iommu=False)
    assert "own RAM ok; host 0x0 blocked; DMAR fault logged" in dmaprobe.describe(d)


# --- the probe script, under busybox, against a fake devmem --------------------------------------

FAKE_DEVMEM = r"""#!@BUSYBOX@ sh
# Test double for busybox devmem: 64-bit words of physical memory as files $M/m<addr>, an edu
# at $BAR (registers $M/r<offset>, buffer $M/b<offset>), and an IOMMU that lets DMA reach only
# [$DMA_LO, $DMA_HI) when $DMA_LO is set (a blocked read fills zeros, a blocked write is lost).
a=$(($1)); v=$3
[ "$2" = 64 ] || { echo "fake devmem: width $2" >&2; exit 1; }
ok() { [ -z "$DMA_LO" ] || { [ $1 -ge $((DMA_LO)) ] && [ $1 -lt $((DMA_HI)) ]; }; }
get() { cat "$M/$1" 2>/dev/null || echo 0; }
transfer() {
    src=$(get r128); dst=$(get r136); cnt=$(get r144); i=0
    [ "$(get mem_on)" = 1 ] || return 0
    while [ $i -lt $cnt ]; do
        if [ $((($1 >> 1) & 1)) = 0 ]; then
            w=0; ok $((src + i)) && w=$(get m$((src + i)))
            echo $w >"$M/b$((dst - 0x40000 + i))"
        else
            ok $((dst + i)) && get b$((src - 0x40000 + i)) >"$M/m$((dst + i))"
        fi
        i=$((i + 8))
    done
}
if [ $a -ge $((BAR)) ] && [ $a -lt $((BAR + 0x100000)) ]; then
    r=$((a - BAR))
    if [ -n "$v" ]; then
        echo $((v)) >"$M/r$r"
        [ $r = 152 ] && echo 1 >"$M/busy"   # the first poll sees it running
    elif [ $r = 152 ] && [ -e "$M/busy" ]; then
        rm "$M/busy"; c=$(get r152); transfer $c; echo $((c & ~1)) >"$M/r152"
        printf '0x%016X\n' $c
    else
        printf '0x%016X\n' $(get r$r)
    fi
    exit 0
fi
[ $((a % 8)) = 0 ] || { echo "fake devmem: unaligned $1" >&2; exit 1; }
if [ -n "$v" ]; then echo $((v)) >"$M/m$a"; else printf '0x%016X\n' $(get m$a); fi
"""
APPLETS = ("cat", "dd", "grep", "od", "rm", "sleep", "tr", "printf", "head")
BAR = 0xFE800000
CMD = 0x15FFF1000  # above 4 GiB: ext_cmd_line_ptr matters
SCRATCH = CMD - 0x1000 + 0xF00
IVT = [0xF000FF53F000E2C3 + i for i in range(8)]


def _probe(tmp_path, *, edu=True, window=None, ivt=IVT, enable_works=True):
    root, mem, bindir = tmp_path / "root", tmp_path / "mem", tmp_path / "bin"
    for d in (mem, bindir, root / "proc", root / "kernel/boot_params", root / "devices"):
        d.mkdir(parents=True)
    other = root / "devices/0000:22:00.0"
    other.mkdir()
    (other / "vendor").write_text("0x1b36\n")
    (other / "device").write_text("0x0010\n")
    if edu:
        e = root / "devices/0000:24:00.0"
        e.mkdir()
        (e / "vendor").write_text("0x1234\n")
        (e / "device").write_text("0x11e8\n")
        (e / "resource").write_text(f"0x{BAR:016x} 0x{BAR + 0xFFFFF:016x} 0x0000000000040200\n"
                                    + "0x0000000000000000 0x0000000000000000 0x0000000000000000\n" * 5)
        (e / "config").write_bytes(bytes(64))
    bp = bytearray(4096)
    struct.pack_into("<I", bp, 0x228, CMD & 0xFFFFFFFF)
    struct.pack_into("<I", bp, 0xC8, CMD >> 32)
    (root / "kernel/boot_params/data").write_bytes(bytes(bp))
    (root / "proc/cmdline").write_text("console=uart,io,0xe000 coreslice.dmaprobe=1\n")
    cmdline = b"console=uart,io,0xe000 noapic coreslice.dmaprobe=1 and the rest of it....."[:64]
    for i in range(8):
        (mem / f"m{CMD + 8 * i}").write_text(f"{struct.unpack_from('<Q', cmdline, 8 * i)[0]}\n")
        (mem / f"m{8 * i}").write_text(f"{ivt[i]}\n")
        (mem / f"m{SCRATCH + 8 * i}").write_text("7\n")  # stale bytes: the probe zeroes first
    bb = str(initramfs.BUSYBOX)
    (tmp_path / "devmem.sh").write_text(FAKE_DEVMEM.replace("@BUSYBOX@", bb))
    for a in APPLETS:
        (bindir / a).symlink_to(bb)
    script = (initramfs.slice_dma_text()
              .replace("/sys/bus/pci/devices", str(root / "devices"))
              .replace("/sys/kernel/boot_params", str(root / "kernel/boot_params"))
              .replace("/proc/cmdline", str(root / "proc/cmdline"))
              .replace(">/dev/kmsg", ">>" + str(tmp_path / "kmsg")))  # a file: append
    # The edu decodes memory only once the command register says so.
    enable = f'c=$(od -An -tx1 -j4 -N2 "{root}/devices/0000:24:00.0/config" | tr -d " ")\n' \
             f'[ "$c" = 0600 ] && echo 1 >"{mem}/mem_on"\n'
    script = script.replace('        scratch=$((cmd', enable + '        scratch=$((cmd', 1) if enable_works else script
    env = {"PATH": str(bindir), "M": str(mem), "BAR": hex(BAR)}
    if window:
        env.update(DMA_LO=hex(window[0]), DMA_HI=hex(window[1]))
    # A function: busybox sh runs its own devmem applet before anything on $PATH.
    fake = f'devmem() {{ {bb} sh {tmp_path / "devmem.sh"} "$@"; }}\n'
    proc = subprocess.run([bb, "sh", "-c", fake + 'extra=""\n' + script + 'echo "EXTRA:$extra"\n'],
                          env=env, capture_output=True, text=True, timeout=120)
    kmsg = (tmp_path / "kmsg").read_text() if (tmp_path / "kmsg").exists() else ""
    assert proc.returncode == 0, proc.stderr + kmsg
    assert "fake devmem" not in proc.stderr, proc.stderr
    extra = proc.stdout.split("EXTRA:", 1)[1].strip()
    return extra, kmsg


def test_probe_without_iommu_reads_own_ram_and_leaks_the_host(tmp_path):
    extra, kmsg = _probe(tmp_path)
    assert extra == "dma_own=1 dma_host=leaked", kmsg
    assert "coreslice-dma: edu 0000:24:00.0 bar0 0xfe800000 command line 0x15fff1000 scratch 0x15fff0f00" in kmsg
    parsed = report.parse_report(f"CORESLICE-REPORT cpus=1 mem_kib=1 apic_ids=1 {extra} cmdline=x")
    assert parsed["dma"] == {"own": True, "host": "leaked"}


def test_probe_with_iommu_mapping_the_slice_ram_blocks_the_host(tmp_path):
    extra, kmsg = _probe(tmp_path, window=(0x140000000, 0x160000000))
    assert extra == "dma_own=1 dma_host=blocked", kmsg


def test_probe_with_iommu_mapping_nothing(tmp_path):
    extra, kmsg = _probe(tmp_path, window=(0x1000, 0x1001))
    assert extra == "dma_own=0 dma_host=blocked", kmsg


def test_probe_without_memory_space_enabled_finds_nothing_copied(tmp_path):
    extra, _ = _probe(tmp_path, enable_works=False)
    assert extra == "dma_own=0 dma_host=blocked"


def test_probe_cannot_tell_when_the_host_bytes_are_zero(tmp_path):
    extra, kmsg = _probe(tmp_path, ivt=[0] * 8)
    assert extra == "dma_own=1 dma_host=-" and "reads all zero: cannot tell" in kmsg


def test_probe_without_edu_answers_nothing(tmp_path):
    extra, kmsg = _probe(tmp_path, edu=False)
    assert extra == "dma_own=- dma_host=-" and "no edu (vendor 0x1234 device 0x11e8)" in kmsg


# --- the run's refusals and options --------------------------------------------------------------


@pytest.mark.parametrize("opts,match", [
    (dict(iommu=True, x2apic=True), "--iommu with --x2apic"),
    (dict(dma_probe=True, pci_consoles=False), "--dma-probe: .*pxb root bus.*--isa-consoles"),
    (dict(dma_probe=True, guest_os="debian", network=True), "--dma-probe with --guest-os"),
])
def test_run_refuses_before_fetching_anything(opts, match, monkeypatch):
    from coreslice.testbed import kernels, run

    def no_kernel(*a, **k):
        raise AssertionError("refused too late: the kernel was asked for")

    monkeypatch.setattr(kernels, "ensure_kernel", no_kernel)
    with pytest.raises(UsageError, match=match):
        run.run(run.RunOptions(slices=["--cpus 1"], **opts))


def test_cli_iommu_and_dma_probe(monkeypatch):
    import argparse

    from coreslice.cli import testbed as cli
    from coreslice.testbed import run

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    a = parser.parse_args(["testbed", "run", "--iommu", "--dma-probe", "--slice", "--cpus 1"])
    assert a.iommu and a.dma_probe
    seen = {}
    monkeypatch.setattr(run, "main_run", lambda opts, as_json: seen.setdefault("o", opts) and 0)
    cli.cmd_run(a)
    assert seen["o"].iommu and seen["o"].dma_probe
    b = parser.parse_args(["testbed", "run", "--slice", "--cpus 1"])
    assert not b.iommu and not b.dma_probe


def test_summary_shows_the_iommu_and_each_dma_answer():
    from coreslice.testbed.run import format_summary

    dma = {"own_ok": True, "host_blocked": False, "fault_logged": False, "edu": "0000:24:00.0",
           "host_addr": "0x0", "faults": []}
    result = {"ok": True, "host_cmds": [], "host": {
        "kernel_release": "6.12", "apic_mode": "xapic", "iommu": True, "timings": {},
        "pci_serial": {"address": None, "in_host": None}, "run_dir": "/r"},
        "slices": [{"booted": True, "exit_code": 0, "cpus": 2, "mem_kib": 1, "apic_ids": [1, 2],
                    "seconds_to_userspace": 9.0, "console_log": "/r/c.log", "dma": dma}]}
    text = format_summary(result)
    assert "xapic mode, IOMMU on (DMA remapping)" in text
    assert "dma (0000:24:00.0): own RAM ok; host 0x0 LEAKED; DMAR fault not logged" in text


def test_collect_dma_reads_the_faults_from_one_host_log(tmp_path):
    """dmesg-end.txt when it has faults (each fault once), else the console log."""
    from types import SimpleNamespace

    from coreslice.testbed import run

    probe = dmaprobe.probe_for_port(PXB["pxb1"], True, True)
    state = SimpleNamespace(report={"dma": {"own": True, "host": "blocked"}})
    console = tmp_path / "console-host.log"
    console.write_text(DMESG)
    machine = SimpleNamespace(console_log=console)
    (tmp_path / "dmesg-end.txt").write_text(DMESG)
    result = {"ok": True, "slices": [{}]}
    run._collect_dma(tmp_path, machine, result, [state], [probe], iommu=True)
    assert result["slices"][0]["dma"]["faults"] == ["DMA Read 0x17fff0000 reason 06",
                                                    "DMA Write 0x17fff0000 reason 05", "DMA Read 0x0 reason 06"]
    assert result["dma_ok"] and result["ok"]
    (tmp_path / "dmesg-end.txt").write_text("[ 1.0] no faults yet\n")
    result = {"ok": True, "slices": [{}]}
    run._collect_dma(tmp_path, machine, result, [state], [probe], iommu=True)
    assert result["slices"][0]["dma"]["fault_logged"] and len(result["slices"][0]["dma"]["faults"]) == 3
