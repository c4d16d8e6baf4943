"""The 9p lost-kick watch against a fake monitor: a queue behind at two looks in a row is kicked
through its legacy notify port; one that catches up, or moves, is left alone."""

from coreslice.testbed import ninep

INFO_VIRTIO = ("/machine/peripheral-anon/device[0]/virtio-backend [virtio-9p]\n"
               "/machine/peripheral-anon/device[1]/virtio-backend [virtio-9p]\n")
STATUS = """/machine/peripheral-anon/device[{d}]/virtio-backend:
  device_name:          virtio-9p
  queue_index:          0
  inuse:                0
  used_idx:             {last}
  last_avail_idx:       {last}
  shadow_avail_idx:     {last}
  VRing:
    num:          128
    avail:        0x000000002131{d}800
    used:         0x000000002131{d}940
"""
INFO_PCI = """  Bus  0, device   0, function 0:
    Host bridge: PCI device 8086:29c0
  Bus  0, device   1, function 0:
      BAR0: I/O at 0xf000 [0xf03f]
  Bus  0, device   2, function 0:
      BAR0: I/O at 0xf080 [0xf09f]
"""


class Monitor:
    def __init__(self):
        self.last = {0: 63464, 1: 100}
        self.guest = {0: 63466, 1: 100}
        self.sent = []

    def __call__(self, cmd):
        self.sent.append(cmd)
        if cmd == "info virtio":
            return INFO_VIRTIO
        if cmd.startswith("info virtio-queue-status"):
            d = int(cmd.split("device[")[1][0])
            return STATUS.format(d=d, last=self.last[d])
        if cmd.startswith("xp /1hx "):
            addr = int(cmd.split()[-1])
            d = (addr >> 12) & 0xF
            return f"00000000{addr:08x}: 0x{self.guest[d]:04x}\n"
        if cmd.startswith("qom-get"):
            d = int(cmd.split("device[")[1][0])
            return f"{(d + 1) << 3}\r\n"
        if cmd == "info pci":
            return INFO_PCI
        return ""


def test_a_queue_stuck_behind_twice_is_kicked_once():
    m, w = Monitor(), ninep.Watch(interval=30)
    assert ninep.behind(m) == {"/machine/peripheral-anon/device[0]/virtio-backend": (63466, 63464)}
    assert w.poll(0, m) == []          # first look: maybe just in flight
    assert w.poll(10, m) == []         # not yet time for the next look
    said = w.poll(30, m)
    assert len(said) == 1 and "queued up to 63466, QEMU took up to 63464" in said[0]
    assert "o /w 61456 0" in m.sent    # 0xf000 + QUEUE_NOTIFY (16), queue 0
    assert w.events == said
    m.last[0] = 63466                   # the kick worked
    assert w.poll(60, m) == [] and w.poll(90, m) == []


def test_a_queue_that_moves_is_not_kicked():
    m, w = Monitor(), ninep.Watch(interval=30)
    w.poll(0, m)
    m.last[0], m.guest[0] = 63470, 63471  # behind again, but it took requests meanwhile
    assert w.poll(30, m) == []
    assert not any(c.startswith("o ") for c in m.sent)


def test_wrapping_indexes_and_parsers():
    m = Monitor()
    m.last[0], m.guest[0] = 0xFFFF, 0xFFFF
    m.last[1], m.guest[1] = 0xFFFF, 0x0001
    assert ninep.behind(m) == {"/machine/peripheral-anon/device[1]/virtio-backend": (1, 0xFFFF)}
    assert ninep.io_bar0(INFO_PCI, 2) == 0xF080 and ninep.io_bar0(INFO_PCI, 7) is None


def test_a_host_cpu_idle_with_a_vector_in_service_is_said_once():
    from coreslice.testbed import apicwatch

    state = {"halted": True, "isr": "236 ", "irr": "41 236 "}

    def hmp(cmd):
        if cmd == "info cpus":
            return "* CPU #0: thread_id=1" + (" (halted)" if state["halted"] else "") + "\n  CPU #1: thread_id=2\n"
        assert cmd == "info lapic 0"
        return f"dumping local APIC state for CPU 0 \n\nISR\t {state['isr']}\nIRR\t {state['irr']}\n"

    w = apicwatch.Watch(interval=30)
    assert w.poll(0, hmp, [0]) == []             # first look
    said = w.poll(30, hmp, [0])
    assert len(said) == 1 and "0xec in service" in said[0] and "0x29, 0xec" in said[0]
    assert w.poll(60, hmp, [0]) == []            # said once
    state.update(isr="(none)", irr="(none)")
    w2 = apicwatch.Watch(interval=30)
    assert w2.poll(0, hmp, [0]) == [] and w2.poll(30, hmp, [0]) == []  # a healthy idle CPU
    state.update(halted=False, isr="236 ")
    assert apicwatch.stuck(hmp, [0]) == {}       # running: in a handler, not stuck
