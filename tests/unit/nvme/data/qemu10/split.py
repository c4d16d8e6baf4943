"""Split transcript.txt (record.sh) into NAME.out (stdout) and NAME.err (stderr) for each nvme
command the guest ran, and index.json: name -> {"argv": [...], "rc": exit status}."""
import json
import re
import sys
from pathlib import Path

text, out = Path(sys.argv[1]).read_text(), Path(sys.argv[2])
index = {}
for m in re.finditer(r"^=== BEGIN ([\w-]+): (.*?)\n(.*?)^--- STDERR\n(.*?)^=== END \1 rc=(\d+)$", text, re.S | re.M):
    name, cmd, stdout, stderr, rc = m.groups()
    if not cmd.startswith("nvme "):
        continue  # sysfs listings and dmesg stay in transcript.txt
    index[name] = {"argv": cmd.split(), "rc": int(rc)}
    for ext, data in (("out", stdout), ("err", stderr)):
        if data:
            (out / f"{name}.{ext}").write_text(data)
(out / "index.json").write_text("{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in index.items()) + "\n}\n")
