"""Derive the constructed fixtures from the QEMU 10 recordings (../qemu10): output of commands
QEMU cannot answer (it has no Namespace Management command), shaped by nvme-cli 2.3's printers
(nvme.c create_ns/delete_ns, nvme-print.c json_nvme_id_ctrl/json_nvme_id_ns/json_effects_log).
Only values change; every key comes from a recorded file or from those printers."""
import json
from pathlib import Path

here = Path(__file__).parent
rec = here.parent / "qemu10"


def dump(name: str, obj) -> None:  # json-c's JSON_C_TO_STRING_PRETTY: 2 spaces, no space after ':'
    (here / name).write_text(json.dumps(obj, indent=2, separators=(",", ":")) + "\n")


# A controller with Namespace Management (OACS bit 3) and Virtualization Management (bit 7),
# 1.6 TB total of which 400 GiB unallocated (the 128-bit fields print as strings).
ctrl = json.loads((rec / "id-ctrl.out").read_text())
ctrl.update(mn="CONSTRUCTED NS-MGMT CTRL", oacs=0x8A, tnvmcap="1600321314816",
            unvmcap=str(400 << 30), nn=32, subnqn="nqn.constructed:nsmgmt")
dump("id-ctrl.out", ctrl)

# Identify Namespace for NSID FFFFFFFFh: the formats common to all namespaces, sizes zero.
common = json.loads((rec / "id-ns-1.out").read_text())
common.update(nsze=0, ncap=0, nuse=0, flbas=0, nmic=0, eui64="0" * 16, nguid="0" * 32)
dump("id-ns-common.out", common)

# Its Commands Supported and Effects log lists Namespace Management (opcode 0Dh).
eff = json.loads((rec / "effects-log.out").read_text())
acs = eff[0]["admin_cmd_set"]
acs["ACS_13 (Namespace Management)"] = 0x19  # CSUPP, NIC, CCC: the value QEMU gives Namespace Attachment
eff[0]["admin_cmd_set"] = dict(sorted(acs.items(), key=lambda kv: int(kv[0].split()[0][4:])))
dump("effects-log.out", eff)

# create-ns and delete-ns print one line of text (no JSON output in 2.3).
(here / "create-ns.out").write_text("create-ns: Success, created nsid:3\n")
(here / "delete-ns.out").write_text("delete-ns: Success, deleted nsid:2\n")
