"""cloudinit.py: NoCloud seed contents, and every refusal is a one-line UsageError naming the file."""

import base64
import os
import shutil
import subprocess
import threading

import pytest
import yaml

from coreslice.errors import UsageError
from coreslice.image import cloudinit as ci
from coreslice.image.cloudinit import NetSpec


def refused(fn, *args, names=None, match=None) -> str:
    """Call fn, expect a UsageError with a one-line message; return it."""
    with pytest.raises(UsageError) as ei:
        fn(*args)
    msg = str(ei.value)
    assert "\n" not in msg and ";" in msg, msg      # one line, "problem; fix"
    if names is not None:
        assert str(names) in msg, msg
    if match is not None:
        assert match in msg, msg
    return msg


def pubkey(ktype="ssh-ed25519", claimed=None, comment="me@host") -> str:
    """A syntactically valid OpenSSH public key line; ``claimed`` mislabels the blob's type."""
    def sshstr(b: bytes) -> bytes:
        return len(b).to_bytes(4, "big") + b
    blob = sshstr((claimed or ktype).encode()) + sshstr(os.urandom(32))
    return f"{ktype} {base64.b64encode(blob).decode()} {comment}".rstrip()


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text) if isinstance(text, str) else p.write_bytes(text)
    return p


# --- parse_network / network_config ------------------------------------------------------------

def test_parse_dhcp_and_static():
    assert ci.parse_network("dhcp") == NetSpec("dhcp")
    assert ci.parse_network(" DHCP ", mac="02:C5:00:00:00:01").mac == "02:c5:00:00:00:01"
    n = ci.parse_network("10.99.1.2/24,10.99.1.1,10.99.1.1;9.9.9.9")
    assert n == NetSpec("static", "10.99.1.2/24", "10.99.1.1", ("10.99.1.1", "9.9.9.9"), None)
    assert ci.parse_network("10.99.1.2/24") == NetSpec("static", "10.99.1.2/24")
    assert ci.parse_network("10.99.1.2/24,,1.1.1.1") == NetSpec("static", "10.99.1.2/24", None, ("1.1.1.1",))


@pytest.mark.parametrize("value, match", [
    ("", "not dhcp or ADDR/PREFIX"),
    ("10.99.1.2", "not dhcp or ADDR/PREFIX"),             # prefix is required
    ("10.99.1.2/24,a,b,c", "not dhcp or ADDR/PREFIX"),
    ("10.99.1.300/24", "10.99.1.300/24"),
    ("10.99.1.2/33", "10.99.1.2/33"),
    ("fd00::2/64", "IPv4"),
    ("10.99.1.0/24", "network address of 10.99.1.0/24"),
    ("10.99.1.255/24", "broadcast address"),
    ("10.99.1.2/24,10.99.2.1", "outside 10.99.1.0/24"),
    ("10.99.1.2/24,10.99.1.2", "own address"),
    ("10.99.1.2/24,nope", "gateway 'nope'"),
    ("10.99.1.2/24,10.99.1.1,1.1.1.1;x", "DNS server 'x'"),
])
def test_parse_network_refusals(value, match):
    refused(ci.parse_network, value, match=match)


@pytest.mark.parametrize("mac", ["02:c5:00:00:01", "zz:c5:00:00:00:01", "01:00:5e:00:00:01"])
def test_parse_network_bad_mac(mac):
    refused(ci.parse_network, "dhcp", mac, match=mac)


def test_network_config_dhcp_by_name():
    assert ci.network_config(ci.parse_network("dhcp")) == {
        "version": 2, "ethernets": {"slice0": {"match": {"name": "en*"}, "dhcp4": True}}}


def test_network_config_static_by_mac_round_trips():
    net = ci.parse_network("10.99.1.2/24,10.99.1.1,10.99.1.1;9.9.9.9", mac="02:c5:00:00:00:07")
    seed = ci.make_seed(hostname="s1", net=net)
    assert yaml.safe_load(seed.network_config) == {"version": 2, "ethernets": {"slice0": {
        "match": {"macaddress": "02:c5:00:00:00:07"}, "set-name": "slice0", "dhcp4": False, "addresses": ["10.99.1.2/24"],
        "routes": [{"to": "0.0.0.0/0", "via": "10.99.1.1"}],
        "nameservers": {"addresses": ["10.99.1.1", "9.9.9.9"]}}}}


def test_static_without_gateway_has_no_routes():
    eth = ci.network_config(ci.parse_network("10.99.1.2/24"))["ethernets"]["slice0"]
    assert eth["addresses"] == ["10.99.1.2/24"] and "routes" not in eth and "nameservers" not in eth


# --- load_cloud_config -------------------------------------------------------------------------

GOOD = """#cloud-config
hostname: web1
users:
  - default
  - name: ops
    ssh_authorized_keys: ["ssh-ed25519 AAAA ops"]
write_files:
  - {path: /etc/motd, content: hello}
runcmd: [[touch, /tmp/x], "echo hi"]
packages: [htop]
"""


def test_load_cloud_config(tmp_path):
    cfg = ci.load_cloud_config(write(tmp_path, "user.yaml", GOOD))
    assert cfg["hostname"] == "web1" and cfg["users"][1]["name"] == "ops" and cfg["packages"] == ["htop"]


def test_header_only_is_empty_config(tmp_path):
    assert ci.load_cloud_config(write(tmp_path, "u", "#cloud-config\n# nothing yet\n")) == {}


@pytest.mark.parametrize("text, match", [
    ("", "is empty"),
    ("hostname: a\n", "'#cloud-config' header"),
    ("#!/bin/sh\necho hi\n", "shell scripts"),
    ('Content-Type: multipart/mixed; boundary="x"\nMIME-Version: 1.0\n', "MIME multipart"),
    ("#cloud-config\n- a\n- b\n", "top level is a list"),
    ("#cloud-config\nhostname: [a]\n", "hostname must be a string"),
    ("#cloud-config\nfqdn: 3\n", "fqdn must be a string"),
    ("#cloud-config\nusers: ops\n", "users must be a list"),
    ("#cloud-config\nusers: [root]\n", "users[0] must be \"default\""),
    ("#cloud-config\nusers: [{groups: wheel}]\n", "users[0] must be"),
    ("#cloud-config\nusers: [{name: 7}]\n", "users[0] must be"),
    ("#cloud-config\nssh_authorized_keys: ssh-ed25519 AAAA\n", "ssh_authorized_keys must be a list of strings"),
    ("#cloud-config\nssh_authorized_keys: [1]\n", "with non-strings"),
    ("#cloud-config\nusers: [{name: a, ssh_authorized_keys: k}]\n", "users[0].ssh_authorized_keys"),
    ("#cloud-config\nwrite_files: {path: /x}\n", "write_files must be a list"),
    ("#cloud-config\nwrite_files: [{content: x}]\n", "write_files[0] must be a mapping with a string path"),
    ("#cloud-config\nruncmd: echo hi\n", "runcmd must be a list"),
    ("#cloud-config\nfoo: !!python/object:os.system x\n", "not valid YAML"),
    (b"#cloud-config\nhostname: \xff\n", "not UTF-8"),
])
def test_cloud_config_refusals(tmp_path, text, match):
    refused(ci.load_cloud_config, write(tmp_path, "user-data.yaml", text), names=tmp_path / "user-data.yaml",
            match=match)


def test_yaml_error_names_line_and_column(tmp_path):
    p = write(tmp_path, "u.yaml", "#cloud-config\nusers:\n  - name: a\n  bad: [\n")
    msg = refused(ci.load_cloud_config, p, names=p)
    assert f"{p}:4:3:" in msg, msg


def test_yaml_error_position_exact(tmp_path):
    p = write(tmp_path, "u.yaml", "#cloud-config\nhostname: a\n  runcmd: x\n")
    assert f"{p}:3:9:" in refused(ci.load_cloud_config, p)


def test_cloud_config_missing_dir_and_big(tmp_path):
    refused(ci.load_cloud_config, tmp_path / "nope", names=tmp_path / "nope", match="does not exist")
    refused(ci.load_cloud_config, tmp_path, names=tmp_path, match="is a directory")
    big = write(tmp_path, "big", "#cloud-config\n" + "#" * (1 << 20))
    refused(ci.load_cloud_config, big, names=big, match="more than 1 MiB")
    inside_file = write(tmp_path, "f", "x") / "child"           # ENOTDIR from stat
    refused(ci.load_cloud_config, inside_file, names=inside_file)


def test_cloud_config_unreadable(tmp_path, monkeypatch):
    p = write(tmp_path, "u", GOOD)
    real_open = os.open

    def deny(path, *a, **k):
        if str(path) == str(p):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *a, **k)
    monkeypatch.setattr(os, "open", deny)      # root ignores chmod 000, so fake EACCES
    refused(ci.load_cloud_config, p, names=p, match="Permission denied")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads mode-000 files")
def test_cloud_config_mode_000(tmp_path):
    p = write(tmp_path, "u", GOOD)
    p.chmod(0)
    refused(ci.load_cloud_config, p, names=p, match="Permission denied")


@pytest.mark.parametrize("loader", [ci.load_cloud_config, ci.load_ssh_key])
def test_fifo_refused_without_blocking(tmp_path, loader):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    result = []

    def run():
        try:
            loader(fifo)
        except UsageError as e:
            result.append(str(e))
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(5)
    if t.is_alive():    # unblock the stuck open() so the thread can finish, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("reading a FIFO blocked")
    assert result and "not a regular file" in result[0] and str(fifo) in result[0] and "\n" not in result[0]


# --- load_ssh_key ------------------------------------------------------------------------------

@pytest.mark.parametrize("ktype", ["ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp521",
                                   "sk-ssh-ed25519@openssh.com"])
def test_load_ssh_key_types(tmp_path, ktype):
    line = pubkey(ktype)
    assert ci.load_ssh_key(write(tmp_path, "k.pub", f"\n{line}\n")) == line


def test_load_ssh_key_several_lines_and_comments(tmp_path):
    a, b = pubkey(), pubkey("ssh-rsa", comment="")
    assert ci.load_ssh_key(write(tmp_path, "k.pub", f"# mine\n{a}\n\n{b}\n")) == f"{a}\n{b}"


@pytest.mark.skipif(not shutil.which("ssh-keygen"), reason="no ssh-keygen")
def test_real_key_and_its_private_half(tmp_path):
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "t@h", "-f", str(key)], check=True)
    assert ci.load_ssh_key(key.with_suffix(".pub")) == key.with_suffix(".pub").read_text().strip()
    refused(ci.load_ssh_key, key, names=key, match="that is a private key; pass the .pub file")


@pytest.mark.parametrize("text, match", [
    ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjE=\n-----END OPENSSH PRIVATE KEY-----\n",
     "that is a private key; pass the .pub file"),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----\n", "that is a private key"),
    ("PuTTY-User-Key-File-3: ssh-ed25519\n", "that is a private key"),
    ("---- BEGIN SSH2 PUBLIC KEY ----\nAAAA\n---- END SSH2 PUBLIC KEY ----\n", "RFC 4716"),
    ("", "holds no public key"),
    ("# only a comment\n\n", "holds no public key"),
    ("ssh-dss AAAAB3NzaC1kc3M= me\n", "'ssh-dss' is not an OpenSSH key type"),
    ('command="x" ' + pubkey() + "\n", "is not an OpenSSH key type"),
    ("ssh-ed25519\n", "has no key data"),
    ("ssh-ed25519 not*base64 me\n", "not base64"),
    (pubkey("ssh-ed25519", claimed="ssh-rsa") + "\n", "does not encode a ssh-ed25519 key"),
    ("ssh-ed25519 AAAA me\n", "does not encode"),                   # truncated blob
    (b"ssh-ed25519 \xff\n", "not UTF-8"),
])
def test_ssh_key_refusals(tmp_path, text, match):
    p = write(tmp_path, "id", text)
    refused(ci.load_ssh_key, p, names=p, match=match)


def test_ssh_key_second_line_bad_names_line(tmp_path):
    p = write(tmp_path, "k.pub", pubkey() + "\nssh-ed25519 AAAA\n")
    refused(ci.load_ssh_key, p, names=f"{p}:2", match="does not encode")


def test_ssh_key_missing_and_directory(tmp_path):
    refused(ci.load_ssh_key, tmp_path / "none.pub", names=tmp_path / "none.pub", match="does not exist")
    refused(ci.load_ssh_key, tmp_path, names=tmp_path, match="is a directory")


# --- make_seed / seed_files --------------------------------------------------------------------

def test_user_data_round_trip_with_keys(tmp_path):
    cfg = ci.load_cloud_config(write(tmp_path, "u", GOOD + "ssh_authorized_keys: [old]\n"))
    k1, k2 = pubkey(), pubkey("ssh-rsa")
    seed = ci.make_seed(hostname="web1", cloud_config=cfg, ssh_keys=[f"{k1}\n{k2}", k1])
    assert seed.user_data.startswith(b"#cloud-config\n")
    back = yaml.safe_load(seed.user_data)
    assert back == {**cfg, "ssh_authorized_keys": ["old", k1, k2]}       # deduplicated, order kept
    assert back["users"][1]["ssh_authorized_keys"] == ["ssh-ed25519 AAAA ops"]   # users keep their own
    assert cfg["ssh_authorized_keys"] == ["old"]                            # caller's dict untouched
    assert seed.network_config is None


def test_hostname_added_only_when_absent():
    assert yaml.safe_load(ci.make_seed(hostname="s1").user_data) == {"hostname": "s1"}
    ud = yaml.safe_load(ci.make_seed(hostname="s1", cloud_config={"hostname": "mine"}).user_data)
    assert ud == {"hostname": "mine"}
    md = yaml.safe_load(ci.make_seed(hostname="s1", cloud_config={"hostname": "mine"}).meta_data)
    assert md["local-hostname"] == "s1"


def test_instance_id_tracks_the_seed():
    def iid(**kw):
        return yaml.safe_load(ci.make_seed(hostname="s1", **kw).meta_data)["instance-id"]
    base = iid(cloud_config={"runcmd": ["a"]})
    assert base == iid(cloud_config={"runcmd": ["a"]})
    assert base.startswith("coreslice-s1-") and len(base) == len("coreslice-s1-") + 12
    int(base[-12:], 16)
    others = {iid(cloud_config={"runcmd": ["b"]}), iid(cloud_config={"runcmd": ["a"]}, ssh_keys=[pubkey()]),
              iid(cloud_config={"runcmd": ["a"]}, net=ci.parse_network("dhcp")),
              iid(cloud_config={"runcmd": ["a"]}, net=ci.parse_network("10.0.0.2/8"))}
    assert base not in others and len(others) == 4
    assert iid(instance_id="fixed-1") == "fixed-1"


@pytest.mark.parametrize("hostname", ["", "-a", "a-", "a_b", "a" * 64, "a..b", "a.", "héllo", "a b"])
def test_bad_hostnames(hostname):
    refused(lambda: ci.make_seed(hostname=hostname), match=f"hostname {hostname!r}")


def test_good_hostnames():
    for h in ("a", "slice-1", "A1", "a" * 63, "web1.example.org"):
        assert yaml.safe_load(ci.make_seed(hostname=h).meta_data)["local-hostname"] == h


def test_make_seed_checks_a_given_dict_and_instance_id():
    with pytest.raises(UsageError, match="runcmd must be a list"):
        ci.make_seed(hostname="s1", cloud_config={"runcmd": "x"})
    with pytest.raises(UsageError, match="instance id"):
        ci.make_seed(hostname="s1", instance_id="a b")
    with pytest.raises(UsageError, match="cannot be written as YAML"):
        ci.make_seed(hostname="s1", cloud_config={"x": object()})


def test_seed_files():
    seed = ci.make_seed(hostname="s1", net=ci.parse_network("dhcp"))
    files = ci.seed_files(seed)
    d = "var/lib/cloud/seed/nocloud/"
    assert files[d + "user-data"] == (seed.user_data, 0o600)
    assert files[d + "meta-data"] == (seed.meta_data, 0o644)
    assert files[d + "network-config"] == (seed.network_config, 0o600)
    text, mode = files["etc/cloud/cloud.cfg.d/90-coreslice.cfg"]
    assert mode == 0o644 and b"coreslice" in text.splitlines()[0]
    assert yaml.safe_load(text) == {"datasource_list": ["NoCloud", "None"], "ssh_genkeytypes": ["ed25519"],
                                     "locale": False}
    assert not any(p.startswith("/") for p in files)
    assert d + "network-config" not in ci.seed_files(ci.make_seed(hostname="s1"))
