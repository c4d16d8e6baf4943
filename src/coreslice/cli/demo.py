"""``coreslice demo``: the emulated machine boots a host and two slices (testbed/demo.py)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from coreslice.testbed import demo as _demo

demo_doc = _demo.__doc__


def cmd_demo(args: argparse.Namespace) -> int:
    from coreslice.testbed.paths import cache_dir
    from coreslice.testbed.run import RunOptions, run
    from coreslice.testbed.demo import SLICES, ConsoleTail, format_table

    run_dir = args.workdir or cache_dir() / "runs" / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    print("coreslice demo: an emulated 4-CPU machine boots a host on CPU 0 (mem=1G), which then "
          "boots two slices:", file=sys.stderr)
    for name, spec, _ in SLICES:
        print(f"  slice {name}: coreslice boot {spec}", file=sys.stderr)
    print("Slow steps under software emulation: first run fetches a Debian kernel (apt-get download); "
          "each boot takes 10-30 s.\n", file=sys.stderr)
    opts = RunOptions(slices=[spec for _, spec, _ in SLICES], x2apic=args.x2apic, workdir=run_dir,
                      host_cmds=["grep -E 'CAL|RES|TLB' /proc/interrupts", "coreslice list"])
    tail = None
    if not args.quiet_consoles:
        tail = ConsoleTail(run_dir)
        tail.start()
    try:
        result = run(opts)
    finally:
        if tail:
            tail.stop.set()
            tail.join(timeout=2)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print("\n" + format_table(result))
        listing = (result.get("host_cmds") or [{}, {}])[1].get("output", "").rstrip()
        if listing:
            print("\n$ coreslice list   (in the emulated host)\n" + listing)
        print(f"\nconsole logs and the full result: {result['host'].get('run_dir', run_dir)}")
    return 0 if result.get("ok") else 1


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="boot an emulated host and two slices at once, showing their consoles",
        description=demo_doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--x2apic", action="store_true", help="run the emulated host in x2APIC mode")
    p.add_argument("--quiet-consoles", action="store_true", help="do not stream the slice consoles")
    p.add_argument("--workdir", type=Path, default=None, metavar="DIR",
                   help="run directory (default: under the cache, ~/.cache/coreslice/runs)")
    p.add_argument("--json", action="store_true", help="print the testbed's JSON result instead of the table")
    p.set_defaults(func=cmd_demo)
