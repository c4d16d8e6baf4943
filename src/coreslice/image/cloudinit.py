"""The cloud-init NoCloud seed that configures a slice on its first boot.

NoCloud is cloud-init's data source for machines without a metadata service: cloud-init reads
``user-data`` (here: cloud-config YAML), ``meta-data`` (``instance-id``, ``local-hostname``) and an
optional ``network-config`` from a local seed, either a vfat/iso9660 volume labelled ``cidata`` or
the directory ``/var/lib/cloud/seed/nocloud/`` in the root file system
(https://cloudinit.readthedocs.io/en/22.4/topics/datasources/nocloud.html). The network config is
cloud-init's version 2 format, a subset of netplan's
(https://cloudinit.readthedocs.io/en/22.4/topics/network-config-format-v2.html).

The seed lives in the root file system because a slice gets exactly one disk (one NVMe function):
there is no second device to carry a ``cidata`` volume. The drop-in
``/etc/cloud/cloud.cfg.d/90-coreslice.cfg`` pins ``datasource_list`` to NoCloud so cloud-init does
not spend the boot probing for cloud metadata services that cannot answer, and generates only an
ed25519 host key because RSA key generation is slow when the slice runs under emulation.

Validation is light on purpose: cloud-init's JSON schema ships only inside cloud-init, which is not
on PyPI, so we check the shape of the few keys we rely on or that are commonly mistyped (hostname,
users, ssh_authorized_keys, write_files, runcmd) and leave the rest to cloud-init on the slice.
Everything is checked before anything is written; errors are one-line UsageErrors.
"""

import base64
import binascii
import hashlib
import ipaddress
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from coreslice.config import format_mac, parse_mac
from coreslice.errors import UsageError

SEED_DIR = "var/lib/cloud/seed/nocloud"
DROPIN = "etc/cloud/cloud.cfg.d/90-coreslice.cfg"
MAX_FILE = 1 << 20          # cloud-config or key files bigger than this are a wrong path, not config
HEADER = "#cloud-config"
KEY_TYPES = ("ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521")
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$", re.I)   # RFC 1123 §2.1
# PEM/OpenSSH ("-----BEGIN OPENSSH PRIVATE KEY-----", "... RSA PRIVATE KEY-----") and PuTTY .ppk.
_PRIVATE = re.compile(r"^(-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----|PuTTY-User-Key-File-)", re.M)
_NET_EXAMPLE = "dhcp or 10.99.1.2/24,10.99.1.1,10.99.1.1;9.9.9.9"

DROPIN_TEXT = f"""\
# Written by coreslice (coreslice image build); rebuilding the image replaces it.
# The slice's only data source is the NoCloud seed in /{SEED_DIR}/:
# probing for cloud metadata services would only add timeouts to the boot.
datasource_list: [ NoCloud, None ]
# Slices may boot under emulation, where RSA/ECDSA host-key generation costs minutes.
ssh_genkeytypes: [ed25519]
# A minimal root generates no en_US.UTF-8, so cloud-init's default locale step fails (and
# cloud-init reports an error); leave the locale alone unless user-data sets one.
locale: false
"""


@dataclass(frozen=True)
class NetSpec:
    mode: str                       # "dhcp" or "static"
    address: str | None = None      # "10.99.1.2/24" when static
    gateway: str | None = None
    dns: tuple[str, ...] = ()
    mac: str | None = None          # lowercase xx:xx:xx:xx:xx:xx; None: match any en* NIC


def parse_network(value: str, mac: str | None = None) -> NetSpec:
    """``dhcp`` or ``ADDR/PREFIX[,GATEWAY[,DNS1[;DNS2...]]]`` (IPv4), plus an optional NIC MAC."""
    if mac is not None:
        mac = format_mac(parse_mac(mac.strip(), "slice NIC MAC"))
    text = value.strip()
    if text.lower() == "dhcp":
        return NetSpec("dhcp", mac=mac)
    parts = [p.strip() for p in text.split(",")]
    if len(parts) > 3 or "/" not in parts[0]:
        raise UsageError(f"network {value!r} is not dhcp or ADDR/PREFIX[,GATEWAY[,DNS1;DNS2]]; write e.g. {_NET_EXAMPLE}")
    try:
        iface = ipaddress.IPv4Interface(parts[0])
    except ValueError as e:
        raise UsageError(f"network address {parts[0]!r}: {e}; write an IPv4 address with prefix, e.g. 10.99.1.2/24") from None
    net = iface.network
    if net.prefixlen < 31 and iface.ip in (net.network_address, net.broadcast_address):
        raise UsageError(f"network address {iface} is the {'network' if iface.ip == net.network_address else 'broadcast'} "
                         f"address of {net}; pick a host address inside it, e.g. {next(net.hosts())}/{net.prefixlen}")
    gateway = None
    if len(parts) > 1 and parts[1]:
        gw = _ipv4(parts[1], "gateway")
        if gw not in net or gw == iface.ip:
            why = "is the slice's own address" if gw == iface.ip else f"is outside {net}"
            raise UsageError(f"gateway {gw} {why}; give a router inside {net} or leave the gateway out")
        gateway = str(gw)
    dns = tuple(str(_ipv4(d, "DNS server")) for d in parts[2].split(";") if d.strip()) if len(parts) > 2 else ()
    return NetSpec("static", str(iface), gateway, dns, mac)


def _ipv4(text: str, what: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(text.strip())
    except ValueError:
        raise UsageError(f"{what} {text.strip()!r} is not an IPv4 address; write e.g. 10.99.1.1") from None


def network_config(net: NetSpec) -> dict:
    """cloud-init network config v2 for the slice's one NIC."""
    # The NIC is a PCIe function named enpXsY by udev; without a MAC match any en* device.
    # set-name: cloud-init's ENI renderer (ifupdown images) names the interface after the key,
    # so the NIC is renamed to it; it cannot render a name glob (netplan and networkd can).
    eth: dict = {"match": {"macaddress": net.mac}, "set-name": "slice0"} if net.mac else {"match": {"name": "en*"}}
    if net.mode == "dhcp":
        eth["dhcp4"] = True
    else:
        eth["dhcp4"] = False
        eth["addresses"] = [net.address]
        if net.gateway:
            # The v2 ``routes`` form: ``gateway4`` is deprecated in netplan.
            eth["routes"] = [{"to": "0.0.0.0/0", "via": net.gateway}]
        if net.dns:
            eth["nameservers"] = {"addresses": list(net.dns)}
    return {"version": 2, "ethernets": {"slice0": eth}}


def _read_small(path: Path, what: str, fix: str) -> bytes:
    """A regular file's bytes; never blocks on a FIFO or device and never reads more than MAX_FILE."""
    try:
        st = os.stat(path)      # before open: opening a FIFO for reading waits for a writer forever
    except FileNotFoundError:
        raise UsageError(f"{what} {path} does not exist; {fix}") from None
    except OSError as e:
        raise UsageError(f"{what} {path}: {e.strerror}; {fix}") from None
    if stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{what} {path} is a directory; {fix}")
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{what} {path} is not a regular file (a FIFO, socket or device); {fix}")
    if st.st_size > MAX_FILE:
        raise UsageError(f"{what} {path} is {st.st_size} bytes, more than 1 MiB; {fix}")
    try:
        # O_NONBLOCK and fstat again: the path may have been swapped for a FIFO since the stat.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise UsageError(f"{what} {path} is not a regular file; {fix}")
            data = f.read(MAX_FILE + 1)
    except OSError as e:
        raise UsageError(f"{what} {path}: {e.strerror}; {fix}") from None
    if len(data) > MAX_FILE:
        raise UsageError(f"{what} {path} is more than 1 MiB; {fix}")
    return data


def _decode(data: bytes, what: str, path: Path) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError as e:
        raise UsageError(f"{what} {path}: byte {e.start} is not UTF-8; save it as UTF-8 text") from None


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def load_cloud_config(path: Path) -> dict:
    """A ``#cloud-config`` file as a dict, with the keys coreslice relies on shape-checked."""
    path = Path(path)
    fix = "pass --cloud-config the path of a #cloud-config YAML file"
    text = _decode(_read_small(path, "cloud-config", fix), "cloud-config", path)
    if not text.strip():
        raise UsageError(f"cloud-config {path} is empty; start it with a '{HEADER}' line followed by YAML")
    first = text.splitlines()[0]
    if first.rstrip() != HEADER:
        raise UsageError(f"cloud-config {path}: first line {first[:40]!r} is not the '{HEADER}' header "
                         f"(shell scripts, #include and MIME multipart user-data are not supported); "
                         f"make it a cloud-config file whose first line is {HEADER}")
    try:
        cfg = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise UsageError(f"cloud-config {where}: not valid YAML ({_one_line(e.problem or e.context or 'syntax error')}); "
                         "fix the syntax") from None
    except yaml.YAMLError as e:
        raise UsageError(f"cloud-config {path}: not valid YAML ({_one_line(e)}); fix the syntax") from None
    except RecursionError:
        raise UsageError(f"cloud-config {path}: YAML nested too deep; flatten it") from None
    if cfg is None:     # only the header and comments: a valid, empty cloud-config
        cfg = {}
    if not isinstance(cfg, dict):
        raise UsageError(f"cloud-config {path}: the top level is a {_kind(cfg)}, not a mapping; "
                         "write keys such as 'users:' and 'runcmd:' at the top level")
    check_cloud_config(cfg, f"cloud-config {path}")
    return cfg


def _kind(value: object) -> str:
    return {dict: "mapping", list: "list", str: "string", bool: "boolean", int: "number",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)


def _string_list(value: object, where: str, key: str, example: str) -> None:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"{where}: {key} must be a list of strings, not a {_kind(value)}"
                         f"{'' if not isinstance(value, list) else ' with non-strings'}; write e.g. {example}")


def check_cloud_config(cfg: dict, where: str = "cloud-config") -> None:
    """Shape checks of the keys coreslice touches or users commonly get wrong; not cloud-init's schema."""
    key_example = "ssh_authorized_keys: [\"ssh-ed25519 AAAA... me@host\"]"
    for key in ("hostname", "fqdn"):
        if key in cfg and not isinstance(cfg[key], str):
            raise UsageError(f"{where}: {key} must be a string, not a {_kind(cfg[key])}; write e.g. {key}: slice1")
    if "ssh_authorized_keys" in cfg:
        _string_list(cfg["ssh_authorized_keys"], where, "ssh_authorized_keys", key_example)
    if "users" in cfg:
        users = cfg["users"]
        if not isinstance(users, list):
            raise UsageError(f"{where}: users must be a list, not a {_kind(users)}; write e.g. users: [default, {{name: me}}]")
        for i, user in enumerate(users):
            if user == "default":
                continue
            if not isinstance(user, dict) or not isinstance(user.get("name"), str):
                raise UsageError(f"{where}: users[{i}] must be \"default\" or a mapping with a string name; "
                                 "write e.g. - name: me")
            if "ssh_authorized_keys" in user:
                _string_list(user["ssh_authorized_keys"], where, f"users[{i}].ssh_authorized_keys", key_example)
    if "write_files" in cfg:
        files = cfg["write_files"]
        if not isinstance(files, list):
            raise UsageError(f"{where}: write_files must be a list, not a {_kind(files)}; "
                             "write e.g. write_files: [{path: /etc/motd, content: hi}]")
        for i, entry in enumerate(files):
            if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
                raise UsageError(f"{where}: write_files[{i}] must be a mapping with a string path; "
                                 "write e.g. - {path: /etc/motd, content: hi}")
    if "runcmd" in cfg and not isinstance(cfg["runcmd"], list):
        raise UsageError(f"{where}: runcmd must be a list, not a {_kind(cfg['runcmd'])}; "
                         "write e.g. runcmd: [\"systemctl enable --now foo\"]")


def load_ssh_key(path: Path) -> str:
    """The public key line(s) of an OpenSSH .pub file, newline-separated, each checked for shape."""
    path = Path(path)
    fix = "pass --ssh-key an OpenSSH public key file such as ~/.ssh/id_ed25519.pub"
    text = _decode(_read_small(path, "ssh key", fix), "ssh key", path)
    if _PRIVATE.search(text):
        hint = f" ({path.name}.pub next to it)" if path.suffix != ".pub" else ""
        raise UsageError(f"ssh key {path}: that is a private key; pass the .pub file{hint}")
    if "BEGIN SSH2 PUBLIC KEY" in text:
        raise UsageError(f"ssh key {path} is in RFC 4716 format; convert it with ssh-keygen -i -f {path} "
                         "and pass the result")
    keys = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(None, 2)
        ktype = fields[0]
        if ktype not in KEY_TYPES and not ktype.startswith("sk-"):
            raise UsageError(f"ssh key {path}:{n}: {ktype[:40]!r} is not an OpenSSH key type ({', '.join(KEY_TYPES)}, "
                             f"sk-*); {fix}")
        if len(fields) < 2:
            raise UsageError(f"ssh key {path}:{n}: {ktype} has no key data; {fix}")
        try:
            blob = base64.b64decode(fields[1], validate=True)
        except (binascii.Error, ValueError):
            raise UsageError(f"ssh key {path}:{n}: the key data is not base64; {fix}") from None
        # The blob starts with the key type as an SSH string (RFC 4251 §5: uint32 length, bytes).
        size = int.from_bytes(blob[:4], "big")
        if len(blob) < 4 + size or blob[4:4 + size] != ktype.encode():
            raise UsageError(f"ssh key {path}:{n}: the key data does not encode a {ktype} key "
                             f"(truncated or mislabelled); {fix}")
        keys.append(line)
    if not keys:
        raise UsageError(f"ssh key {path} holds no public key; {fix}")
    return "\n".join(keys)


def check_hostname(hostname: str) -> str:
    """An RFC 1123 host name: dot-separated labels of letters, digits, inner hyphens, ≤ 63 each."""
    if not isinstance(hostname, str) or not hostname or len(hostname) > 253 \
            or not all(_LABEL.match(label) for label in hostname.split(".")):
        raise UsageError(f"hostname {hostname!r} is not a valid host name; use letters, digits and inner hyphens, "
                         "at most 63 per dot-separated label, e.g. slice1")
    return hostname


@dataclass(frozen=True)
class Seed:
    user_data: bytes
    meta_data: bytes
    network_config: bytes | None


def _dump(value: object) -> bytes:
    # sort_keys=False: keep the user's key order (and mixed-type keys cannot be sorted).
    return yaml.safe_dump(value, sort_keys=False, default_flow_style=False, allow_unicode=True).encode()


def make_seed(*, hostname: str, instance_id: str | None = None, cloud_config: dict | None = None,
              ssh_keys: Sequence[str] = (), net: NetSpec | None = None) -> Seed:
    """The NoCloud seed. ``ssh_keys`` (each may hold several newline-separated lines, as
    load_ssh_key returns) go to the top-level ``ssh_authorized_keys``, which cloud-init installs for
    the default user only; users in ``users`` keep their own key lists. ``hostname`` is added to the
    cloud-config only when it sets none itself."""
    check_hostname(hostname)
    cfg = dict(cloud_config or {})
    check_cloud_config(cfg)
    if "hostname" not in cfg:
        cfg = {"hostname": hostname, **cfg}
    keys = [line.strip() for k in ssh_keys for line in k.splitlines() if line.strip()]
    if keys:
        existing = list(cfg.get("ssh_authorized_keys", []))
        cfg["ssh_authorized_keys"] = existing + [k for k in dict.fromkeys(keys) if k not in existing]
    try:
        user_data = f"{HEADER}\n".encode() + _dump(cfg)
    except yaml.YAMLError as e:
        raise UsageError(f"cloud-config cannot be written as YAML ({_one_line(e)}); use only YAML types") from None
    net_data = _dump(network_config(net)) if net is not None else None
    if instance_id is None:
        # A hash of the seed: cloud-init runs its once-per-instance modules again only when it changes.
        digest = hashlib.sha256(user_data + b"\0" + (net_data or b"")).hexdigest()[:12]
        instance_id = f"coreslice-{hostname}-{digest}"
    elif not instance_id or not instance_id.isprintable() or any(c.isspace() for c in instance_id):
        raise UsageError(f"instance id {instance_id!r} must be non-empty printable text without spaces; "
                         f"write e.g. coreslice-{hostname}-1")
    meta_data = _dump({"instance-id": instance_id, "local-hostname": hostname})
    return Seed(user_data, meta_data, net_data)


def seed_files(seed: Seed) -> dict[str, tuple[bytes, int]]:
    """Path relative to the root file system -> (content, mode) for the seed and the drop-in."""
    files = {
        f"{SEED_DIR}/user-data": (seed.user_data, 0o600),     # may hold passwords and secrets
        f"{SEED_DIR}/meta-data": (seed.meta_data, 0o644),
    }
    if seed.network_config is not None:
        files[f"{SEED_DIR}/network-config"] = (seed.network_config, 0o600)
    files[DROPIN] = (DROPIN_TEXT.encode(), 0o644)
    return files
