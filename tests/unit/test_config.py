"""config.toml: typed, validated; errors name the key and the fix."""

from pathlib import Path

import pytest

from coreslice import config
from coreslice.errors import UsageError

GOOD = """
[slice]
ncpus = 2
memory = "4G"

[sriov]
nic = ["0000:99:00.0"]
nvme = ["8d:00.0"]
mac_base = "02:00:00:00:10:00"
nvme_vq_per_vf = 2
nvme_vi_per_vf = 1
"""


def test_parse_full():
    c = config.parse(GOOD)
    assert c.slice.ncpus == 2 and c.slice.memory == 4 << 30
    assert c.sriov.nic == ("0000:99:00.0",) and c.sriov.nvme == ("0000:8d:00.0",)
    assert c.sriov.default_mac("0000:99:00.0", 3) == "02:00:00:00:10:03"
    assert c.sriov.nvme_vq_per_vf == 2 and c.to_json()["sriov"]["mac_base"] == "02:00:00:00:10:00"


def test_empty_is_defaults():
    c = config.parse("")
    assert c.slice.ncpus is None and c.sriov.nic == ()
    assert c.sriov.default_mac("0000:01:00.0", 1) == "02:c5:00:00:00:01"


def test_second_pf_gets_its_own_mac_range():
    c = config.parse('[sriov]\nnic = ["0000:01:00.0", "0000:02:00.0"]\nmac_base = "02:00:00:00:00:00"\n')
    assert c.sriov.default_mac("0000:02:00.0", 5) == "02:00:00:00:01:05"


@pytest.mark.parametrize("text, words", [
    ("[slice\n", ["not valid TOML"]),
    ("[foo]\n", ["unknown section [foo]", "[slice]"]),
    ("[slice]\ncpus = 2\n", ["unknown key slice.cpus", "ncpus"]),
    ("slice = 3\n", ["must be a section"]),
    ("[slice]\nncpus = 0\n", ["slice.ncpus", "positive integer"]),
    ("[slice]\nncpus = true\n", ["slice.ncpus"]),
    ("[slice]\nmemory = 4\n", ["slice.memory", "size string"]),
    ("[slice]\nmemory = \"lots\"\n", ["slice.memory", "not a size"]),
    ("[slice]\nmemory = \"1000\"\n", ["multiple of 4 KiB"]),
    ("[sriov]\nnic = [\"99:00\"]\n", ["sriov.nic", "not a PCI address"]),
    ("[sriov]\nnic = 5\n", ["sriov.nic", "list of PCI addresses"]),
    ("[sriov]\nnic = [\"0000:01:00.0\", \"01:00.0\"]\n", ["twice"]),
    ("[sriov]\nnic = [\"0000:01:00.0\"]\nnvme = [\"0000:01:00.0\"]\n", ["both sriov.nic and sriov.nvme"]),
    ("[sriov]\nmac_base = \"zz\"\n", ["sriov.mac_base", "not a MAC"]),
    ("[sriov]\nmac_base = \"01:00:00:00:00:00\"\n", ["multicast"]),
    ("[sriov]\nnvme_vq_per_vf = 1\n", ["at least 2 queues"]),
])
def test_errors_name_key_and_fix(text, words):
    with pytest.raises(UsageError) as e:
        config.parse(text, None)
    for w in words:
        assert w in str(e.value)


def test_load_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv(config.ENV, raising=False)
    monkeypatch.setattr(config, "DEFAULT_PATH", tmp_path / "absent.toml")
    assert config.load().path is None  # missing default file: defaults
    f = tmp_path / "c.toml"
    f.write_text("[slice]\nncpus = 3\n")
    monkeypatch.setenv(config.ENV, str(f))
    assert config.load().slice.ncpus == 3
    g = tmp_path / "g.toml"
    g.write_text("[slice]\nncpus = 4\n")
    assert config.load(g).slice.ncpus == 4  # --config wins over the environment
    with pytest.raises(UsageError, match="does not exist"):
        config.load(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[x]\n")
    with pytest.raises(UsageError, match=str(bad)):
        config.load(bad)


def test_slice_defaults_fill_missing_flags(tmp_path, monkeypatch):
    from coreslice.request import boot_request
    f = tmp_path / "c.toml"
    f.write_text('[slice]\nncpus = 2\nmemory = "1G"\n')
    base = dict(kernel=Path("/k"), initrd=None, console="io:0x2f8")
    r = boot_request(**base, memory=None, config=config.load(f))
    assert (r.ncpus, r.cpus, r.mem_size, r.mem_base) == (2, None, 1 << 30, None)
    r = boot_request(**base, cpus=[1], memory="512M", config=config.load(f))  # flags win
    assert (r.ncpus, r.cpus, r.mem_size) == (None, (1,), 512 << 20)
    monkeypatch.delenv(config.ENV, raising=False)
    monkeypatch.setattr(config, "DEFAULT_PATH", tmp_path / "absent.toml")
    with pytest.raises(UsageError, match="--ncpus N, or set \\[slice\\] ncpus"):
        boot_request(**base, memory="1G", config=config.load(None))

def test_unreadable_config_files_are_one_line(tmp_path):
    import os
    import threading

    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes('[slice]\nmemory = "4G" # größer\n'.encode("latin-1"))
    with pytest.raises(UsageError, match=f"^config file {latin1}: byte 26 is not UTF-8 .*; save it as UTF-8"):
        config.load(latin1)
    with pytest.raises(UsageError, match=f"^config file {tmp_path} is not a regular file; pass --config"):
        config.load(tmp_path)
    deep = tmp_path / "deep.toml"
    deep.write_text("x = " + "[" * 5000)
    with pytest.raises(UsageError, match="nested too deep|not valid TOML"):
        config.load(deep)
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    unblocked = []

    def unblock():  # a blocked open gets a writer, so that a regression fails instead of hanging
        unblocked.append(True)
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    timer = threading.Timer(5, unblock)
    timer.start()
    try:
        with pytest.raises(UsageError, match=f"^config file {fifo} is not a regular file"):
            config.load(fifo)
    finally:
        timer.cancel()
    assert not unblocked
