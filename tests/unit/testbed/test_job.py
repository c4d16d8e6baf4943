"""Slice argument completion, console assignment and the job script."""

import os
import shlex
from pathlib import Path

import pytest

from coreslice.errors import UsageError
from coreslice.testbed.job import (
    complete_slice_args,
    port_for_console,
    render_env,
    render_job_script,
    write_coreslice_wrapper,
)
from coreslice.testbed.qemu import slice_serial_ports

K = Path("/cache/kernels/v/boot/vmlinuz-r")
I = Path("/cache/initramfs/slice-r-x.cpio.gz")
PORTS = slice_serial_ports(Path("/run1"))


def _opt(args, name):
    return args[args.index(name) + 1]


def test_defaults_added_in_port_order():
    jobs = complete_slice_args(["--cpus 1-2 --memory 1G", "--cpus 3", "--cpus 4", ], K, I, PORTS)
    assert [_opt(j.args, "--console") for j in jobs] == ["io:0x2f8", "io:0x3e8", "io:0x2e8"]
    assert [j.port.name for j in jobs] == ["com2", "com3", "com4"]
    for j in jobs:
        assert _opt(j.args, "--kernel") == str(K)
        assert _opt(j.args, "--initrd") == str(I)
    assert jobs[0].args[:4] == ("--cpus", "1-2", "--memory", "1G")


def test_given_options_are_kept_and_ports_skipped():
    jobs = complete_slice_args(
        ["--cpus 1", "--cpus 2 --console=io:0x2f8 --kernel /my/bz --initrd=/my/rd"], K, I, PORTS
    )
    # Slice 1 named 0x2f8 itself, so slice 0 gets the next free port.
    assert _opt(jobs[0].args, "--console") == "io:0x3e8"
    assert jobs[1].args == ("--cpus", "2", "--console=io:0x2f8", "--kernel", "/my/bz", "--initrd=/my/rd")
    assert jobs[1].port.name == "com2"


def test_pci_console_maps_to_pci_log():
    jobs = complete_slice_args(["--console pci:0000:00:10.0"], K, I, PORTS)
    assert jobs[0].port.kind == "pci"
    assert jobs[0].port.log == Path("/run1/console-pci.log")


def test_pci_consoles_default_to_pxb_uarts():
    jobs = complete_slice_args(["--cpus 1", "--cpus 2 --console 0000:21:00.0", "--cpus 3"], K, I, PORTS,
                               default_kind="pxb")
    assert [_opt(j.args, "--console") for j in jobs] == ["0000:41:00.0", "0000:21:00.0", "0000:61:00.0"]
    assert [j.port.log.name for j in jobs] == ["console-pxb2.log", "console-pxb1.log", "console-pxb3.log"]
    with pytest.raises(UsageError, match=r"no free PCI root-bus console.*io:0x2f8"):
        complete_slice_args(["-a", "-b", "-c", "-d"], K, I, PORTS, default_kind="pxb")


def test_unknown_console_has_no_port():
    jobs = complete_slice_args(["--console ttyS9"], K, I, PORTS)
    assert jobs[0].port is None


def test_fourth_slice_without_console_is_an_error():
    with pytest.raises(UsageError, match="no free ISA console"):
        complete_slice_args(["-a", "-b", "-c", "-d"], K, I, PORTS)


def test_same_console_twice_is_an_error():
    with pytest.raises(UsageError, match="two slices"):
        complete_slice_args(["--console io:0x2f8", "--console io:760"], K, I, PORTS)


def test_bad_quoting_is_a_usage_error():
    with pytest.raises(UsageError):
        complete_slice_args(["--cmdline 'unterminated"], K, I, PORTS)


def test_port_for_console_forms():
    assert port_for_console("io:0x3E8", PORTS).name == "com3"
    assert port_for_console("io:1000", PORTS).name == "com3"
    assert port_for_console("io:0x3f8", PORTS) is None  # the host's COM1 is not a slice port
    assert port_for_console("00:10.0", PORTS).kind == "pci"
    assert port_for_console("0000:41:00.0", PORTS).name == "pxb2"
    assert port_for_console("pci:61:00.0", PORTS).name == "pxb3"
    assert port_for_console("0000:20:00.0", PORTS) is None  # the root port, not a UART


def test_job_script_runs_boot_with_json_in_order():
    jobs = complete_slice_args(["--cpus 1 --cmdline 'a b'", "--cpus 2"], K, I, PORTS)
    text = render_job_script(Path("/runs/r 1"), "/py/bin/python3.11", "/src", jobs, ["echo hi"])
    assert text.startswith("#!/bin/sh\n")
    assert "RUN='/runs/r 1'" in text
    assert "export PYTHONPATH=/src" in text
    # The run's own `coreslice` wrapper first, then the interpreter's directory (a venv's bin).
    assert 'export PATH="$RUN/bin":/py/bin:' in text
    lines = text.splitlines()
    boots = [ln for ln in lines if "-m coreslice boot" in ln]
    assert len(boots) == 2
    argv = shlex.split(boots[0].split(" >", 1)[0])
    assert argv[:4] == ["$PY", "-m", "coreslice", "boot"]
    assert argv[4:7] == ["--cpus", "1", "--cmdline"] and argv[7] == "a b"
    assert argv[-1] == "--json"
    order = [ln for ln in lines if ln.startswith("event ")]
    assert order == [
        "event job-start", "event python-ready $prc",
        "event boot-start 0", "event boot-end 0 $rc",
        "event boot-start 1", "event boot-end 1 $rc",
        "event slices-launched",
        "event hostcmd-start 0", "event hostcmd-end 0 $rc", "event job-end",
    ]
    assert lines.index("cat /proc/interrupts >interrupts-before.txt") < lines.index("event boot-start 0")
    wait = next(i for i, ln in enumerate(lines) if "continue" in ln)
    assert lines.index("event slices-launched") < wait < lines.index("cat /proc/interrupts >interrupts-after.txt")
    assert '/bin/sh "$RUN/hostcmd-0.sh" >hostcmd-0.out 2>&1 </dev/null' in lines


def test_coreslice_wrapper_runs_the_given_interpreter(tmp_path):
    w = write_coreslice_wrapper(tmp_path, "/a b/.venv/bin/python")
    assert w == tmp_path / "bin" / "coreslice" and os.access(w, os.X_OK)
    assert w.read_text() == "#!/bin/sh\nexec '/a b/.venv/bin/python' -m coreslice \"$@\"\n"


def test_env_file():
    assert render_env(Path("/a b/c")) == "RUN_DIR='/a b/c'\n"


def test_wait_each_allows_shared_console_and_waits_per_slice():
    jobs = complete_slice_args(["--console io:0x2f8 -a", "--console io:0x2f8 -b"], K, I, PORTS,
                               allow_shared_console=True)
    assert [j.port.name for j in jobs] == ["com2", "com2"]
    text = render_job_script(Path("/r"), "/py", "/src", jobs, [], wait_each=True)
    lines = text.splitlines()
    w0 = next(i for i, ln in enumerate(lines) if '"$RUN/continue-0"' in ln)
    assert lines.index("event boot-end 0 $rc") < w0 < lines.index("event boot-start 1")
    assert '"$RUN/continue-1"' in text
    assert "continue-" not in render_job_script(Path("/r"), "/py", "/src", jobs, [])


def test_console_none_slice_reports_through_coreslice_console(tmp_path):
    """A --console none slice has no UART log: the job reads its kernel log from its RAM into
    slice-<i>.kmsg (in the background, so the next slice boots at once)."""
    import subprocess

    jobs = complete_slice_args(["--cpus 1 --memory 256M --console none", "--cpus 2 --memory 256M"],
                               K, I, PORTS)
    assert jobs[0].no_console and not jobs[1].no_console and jobs[0].port is None
    text = render_job_script(Path("/r"), "/py", "/src", jobs, [])
    line = next(ln for ln in text.splitlines() if "coreslice console" in ln)
    assert '"$name" --wait CORESLICE-REPORT' in line and line.endswith(">slice-0.kmsg 2>&1 </dev/null &")
    assert text.count("coreslice console") == 1
    # the name comes from the boot's JSON
    (tmp_path / "slice-0.stdout").write_text('{"slice": {"name": "web"}}')
    name_line = next(ln for ln in text.splitlines() if ln.startswith("name=$("))
    out = subprocess.run(["sh", "-c", f'PY=python3; {name_line}; echo "$name"'], cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.stdout.strip() == "web", out.stderr
