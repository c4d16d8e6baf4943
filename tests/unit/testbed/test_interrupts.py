from coreslice.testbed.interrupts import parse_interrupts, totals

ONE_CPU = """\
           CPU0       
  0:        189   IO-APIC   2-edge      timer
  4:         60   IO-APIC   4-edge      ttyS0
 24:          0  PCI-MSIX-0000:00:01.0   0-edge      virtio0-config
NMI:          0   Non-maskable interrupts
LOC:       3170   Local timer interrupts
RES:          0   Rescheduling interrupts
CAL:          0   Function call interrupts
TLB:          0   TLB shootdowns
ERR:          0
MIS:          0
"""

TWO_CPUS = """\
           CPU0       CPU1       
  0:         10          5   IO-APIC   2-edge      timer
RES:          3         52   Rescheduling interrupts
CAL:         55          1   Function call interrupts
TLB:          7          0   TLB shootdowns
ERR:          2
"""


def test_one_cpu_rows():
    rows = parse_interrupts(ONE_CPU)
    assert rows["CAL"].counts == (0,) and rows["CAL"].description == "Function call interrupts"
    assert rows["LOC"].total == 3170
    assert rows["24"].description.startswith("PCI-MSIX-0000:00:01.0")
    assert rows["ERR"].total == 0


def test_two_cpu_totals():
    t = totals(TWO_CPUS)
    assert t == {"0": 15, "RES": 55, "CAL": 56, "TLB": 7, "ERR": 2}


def test_empty():
    assert totals("") == {}
