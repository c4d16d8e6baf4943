"""Slices that run a real OS from their own NVMe: ``coreslice testbed run --guest-os debian|DIR``.

Each slice of such a run gets (on its pxb root bus, as in datapath.py) an NVMe disk holding
a disk made by ``coreslice image build``: with ``debian`` the testbed builds one per slice
from Debian packages (systemd, cloud-init, openssh-server and the testbed's own slice kernel
.deb; the mmdebstrap root is cached by its inputs, so only the first run pays for it), with
the run's cloud-config, SSH key and the slice's static address on its link; with DIR (an
image out-dir holding image.json) the slice boots that image through a qcow2 overlay, so the
image itself is never changed.  The slice is booted with ``coreslice boot --image``.

A slice running Debian writes no testbed report on its console (and with ``noapic`` its UART
has no interrupt, so user space output would not be seen anyway): the emulated host instead
logs in over SSH through the slice's NIC, as a user would, retrying until ``--slice-timeout``,
and runs ``hostname; nproc; findmnt -n -o SOURCE /; cloud-init status --wait``.  What it saw
becomes the slice's ``"os"`` JSON.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

from coreslice.errors import UsageError
from coreslice.testbed.tools import ToolError, progress, read_or_none, run_tool

SUITE = "bookworm"
DEFAULT_USER = "slicer"
# What the guest OS needs on the command line besides root=LABEL=...: its journal on the kernel
# log, which the slice's UART shows (user-space console output is not seen without an IRQ).
GUEST_CMDLINE = "systemd.journald.forward_to_kmsg=1 systemd.journald.max_level_kmsg=info systemd.show_status=1"


@dataclass(frozen=True)
class Guest:
    """One slice's OS disk."""

    k: int  # the link number (pxbK)
    image_dir: Path  # holds image.json, vmlinuz, initrd.img
    disk: Path  # what QEMU's drive opens
    disk_format: str  # "raw" | "qcow2"
    user: str
    hostname: str | None  # expected, when the testbed chose or read it

    def describe(self) -> dict:
        return {"image_dir": str(self.image_dir), "disk": str(self.disk), "format": self.disk_format,
                "user": self.user}


def check_choice(value: str, key: Path | None = None, slices: int = 1) -> str:
    """``debian``, or an image out-dir.  A ready image carries its own seed: the host can log in
    only with the key it holds, and only one slice can have its address (build it with
    --network 10.99.1.2/24,10.99.1.1 --nic-mac 52:54:00:99:01:02, the first link's)."""
    if value == "debian":
        return value
    if not (Path(value) / "image.json").is_file():
        raise UsageError(f"--guest-os {value}: give 'debian' or an image out-dir holding image.json "
                         "(made by coreslice image build --out-dir DIR)")
    if key is None:
        raise UsageError(f"--guest-os {value}: its seed holds its own SSH key; give the matching private key "
                         "with --guest-ssh-key")
    if slices != 1:
        raise UsageError(f"--guest-os {value}: one image has one address; boot one slice with it, or use "
                         "--guest-os debian")
    return value


def ensure_keypair(run_dir: Path, given: Path | None) -> Path:
    """The private key the host logs in with; a new ed25519 pair in the run dir when none was given."""
    if given is not None:
        if not given.is_file() or not Path(str(given) + ".pub").is_file():
            raise UsageError(f"--guest-ssh-key {given}: give a private key file with its .pub beside it")
        # Into the run dir: the emulated host sees that share, not the caller's /tmp.
        key = run_dir / "guest-key"
        shutil.copyfile(given, key)
        shutil.copyfile(str(given) + ".pub", str(key) + ".pub")
        key.chmod(0o600)
        return key
    key = run_dir / "guest-key"
    run_tool(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "coreslice-testbed", "-f", str(key)])
    return key


def default_cloud_config(run_dir: Path, key: Path, k: int) -> Path:
    """A cloud-config with one sudo user holding the run's key, hostname slice<k>."""
    pub = Path(str(key) + ".pub").read_text().strip()
    path = run_dir / f"guest-{k}-user-data.yaml"
    path.write_text("#cloud-config\n" + json.dumps({
        "hostname": f"slice{k}",
        "users": [{"name": DEFAULT_USER, "shell": "/bin/bash", "sudo": "ALL=(ALL) NOPASSWD:ALL",
                   "ssh_authorized_keys": [pub]}],
    }, indent=1) + "\n")
    return path


def user_and_host(cloud_config: Path) -> tuple[str, str | None]:
    """The first named user of a cloud-config (else Debian's default user) and its hostname."""
    from coreslice.image.cloudinit import load_cloud_config
    cfg = load_cloud_config(cloud_config)
    users = [u for u in cfg.get("users") or [] if isinstance(u, dict)]
    return (users[0]["name"] if users else "debian"), cfg.get("hostname")


def kernel_deb(kernel) -> Path:
    """The testbed kernel's own .deb (the slice runs the same kernel, now installed in its
    image), downloaded once into the cache next to the unpacked kernel."""
    d = kernel.root.parent / f"{kernel.root.name}.deb"
    d.mkdir(exist_ok=True)
    debs = list(d.glob("*.deb"))
    if not debs:
        progress(f"downloading {kernel.package} {kernel.version} as a package for the guest image")
        run_tool(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root",
                  f"{kernel.package}={kernel.version}"], cwd=str(d))
        debs = list(d.glob("*.deb"))
    if len(debs) != 1:
        raise ToolError(f"{d}: expected one kernel .deb, found {[p.name for p in debs]}")
    return debs[0]


def prepare(choice: str, run_dir: Path, k: int, kernel, key: Path, cloud_config: Path | None,
            address: str, gateway: str, mac: str, packages: tuple[str, ...] = ()) -> Guest:
    """Build (debian) or overlay (DIR) the slice's disk."""
    if choice != "debian":
        src = Path(choice).resolve()
        manifest = json.loads((src / "image.json").read_text())
        overlay = run_dir / f"guest-{k}.qcow2"
        run_tool(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", manifest["target"]["path"],
                  str(overlay)])
        user, host = user_and_host(cloud_config) if cloud_config else ("debian", manifest.get("seed", {}).get("hostname"))
        return Guest(k, src, overlay, "qcow2", user, host)
    from coreslice.image.build import BuildRequest, build
    cfg = cloud_config or default_cloud_config(run_dir, key, k)
    user, host = user_and_host(cfg)
    out = run_dir / f"guest-{k}"
    req = BuildRequest(target=run_dir / f"guest-{k}.img", out_dir=out, debian=SUITE, packages=packages,
                       kernel_debs=(kernel_deb(kernel),), cloud_config=cfg,
                       ssh_keys=(Path(str(key) + ".pub"),), network=f"{address}/24,{gateway}", nic_mac=mac,
                       hostname=None if host else f"slice{k}")
    build(req, lambda m: progress(f"guest {k}: {m}"))
    return Guest(k, out, run_dir / f"guest-{k}.img", "raw", user, host or f"slice{k}")


def slice_args(args: tuple[str, ...], guest: Guest) -> tuple[str, ...]:
    """``coreslice boot`` arguments that boot the guest image: --image instead of the testbed's
    --kernel/--initrd, and GUEST_CMDLINE added to --cmdline."""
    out: list[str] = []
    it = iter(range(len(args)))
    for i in it:
        a = args[i]
        if a in ("--kernel", "--initrd"):
            next(it, None)
            continue
        if a.startswith(("--kernel=", "--initrd=")):
            continue
        out.append(a)
    out += ["--image", str(guest.image_dir)]
    if "--cmdline" in out:
        j = out.index("--cmdline") + 1
        out[j] = f"{out[j]} {GUEST_CMDLINE}".strip()
    else:
        out += ["--cmdline", GUEST_CMDLINE]
    return tuple(out)


SSH_COMMAND = "hostname; nproc; findmnt -n -o SOURCE /; timeout 300 cloud-init status --wait"


def host_check_lines(guests: list[tuple[int, Guest, str]], key: Path, timeout: float) -> list[str]:
    """Job-script lines: for each (slice index, guest, address), log in over SSH until it works
    or ``timeout`` seconds passed since that slice's boot ended; write os-<i>.txt/.rc."""
    q = shlex.quote
    lines = ["event guest-os-check",
             # ssh refuses a key others can read: the run share's modes are not ours to set.
             f"cp {q(str(key))} /tmp/guest-key && chmod 600 /tmp/guest-key"]
    opts = ("-i /tmp/guest-key -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
            "-o ConnectTimeout=10 -o LogLevel=ERROR")
    for i, g, addr in guests:
        lines += [
            f'ok=1; start=$(up); end=$(( ${{start%.*}} + {int(timeout)} )); n=0',
            # ssh exits 255 when it could not log in; anything else is the command's own status
            # (cloud-init status exits 1 on an error: logged in, and the error is in the output).
            f'while :; do n=$((n+1)); ssh {opts} {q(g.user)}@{addr} {q(SSH_COMMAND)} >os-{i}.txt 2>os-{i}.err;'
            ' [ $? -ne 255 ] && { ok=0; break; }; now=$(up); [ ${now%.*} -ge $end ] && break; sleep 3; done',
            f'echo "$ok $start $(up) $n" >os-{i}.rc',
            f"event guest-os {i} $ok",
        ]
    return lines


def result(run_dir: Path, i: int, guest: Guest, boot_end_uptime: float | None) -> dict:
    """The slice's ``"os"`` JSON from what the host saw over SSH."""
    rc = (read_or_none(run_dir / f"os-{i}.rc") or "").split()
    out = (read_or_none(run_dir / f"os-{i}.txt") or "").splitlines()
    ok = bool(rc) and rc[0] == "0"
    seconds = None
    if ok and len(rc) >= 3 and boot_end_uptime is not None:
        seconds = round(float(rc[2]) - boot_end_uptime, 1)
    status = next((m.group(1) for line in reversed(out) for m in [re.search(r"status: (\w+)", line)] if m), None)
    err = (read_or_none(run_dir / f"os-{i}.err") or "").strip().splitlines()
    return {
        "hostname": out[0].strip() if ok and out else None,
        "nproc": int(out[1]) if ok and len(out) > 1 and out[1].strip().isdigit() else None,
        "root_source": out[2].strip() if ok and len(out) > 2 else None,
        "cloud_init": status,
        "ssh_ok": ok,
        "seconds_to_ssh": seconds,
        "ssh_attempts": int(rc[3]) if len(rc) > 3 else None,
        "ssh_error": err[-1] if err and not ok else None,
        "user": guest.user,
        "expected_hostname": guest.hostname,
        "disk": guest.describe(),
    }


def discard_disk(guest: Guest) -> None:
    """Guest disks are large: a run keeps its logs, not its disk (unless the caller asked)."""
    guest.disk.unlink(missing_ok=True)
