"""``coreslice dma-hold``: the process that holds one slice's IOMMU domain (launch/dmahold.py).

Started by ``coreslice boot`` when the host's IOMMU translates, ended by ``coreslice stop``;
not meant to be run by hand, so it is left out of the command list.
"""

from __future__ import annotations

import argparse

from coreslice.launch.dmahold import Range, hold_main

HELP = """\
Hold the IOMMU domain of slice NAME: bind each --function to vfio-pci, put them in one VFIO
type1 domain that maps each --range (the slice's RAM) at IOVA = physical address, write
/run/coreslice/dma/NAME.json, and hold the domain until SIGTERM; then reset and unbind the
functions.  coreslice boot starts this and coreslice stop ends it.
"""


def register(sub) -> None:
    p = sub.add_parser("dma-hold", description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="the slice's name")
    p.add_argument("--function", action="append", required=True, metavar="ADDR",
                   help="a PCI function of the slice (repeat)")
    p.add_argument("--range", action="append", required=True, type=Range.parse, metavar="BASE:SIZE",
                   help="physical range to map at IOVA = BASE (repeat)")
    p.set_defaults(func=lambda a: hold_main(a.name, a.function, a.range))
