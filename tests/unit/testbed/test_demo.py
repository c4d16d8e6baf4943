from coreslice.testbed.demo import format_table


def test_table_reports_slices_and_host_ipis():
    result = {
        "host": {"interrupts_before": {"CAL": 0, "RES": 1, "TLB": 0},
                 "interrupts_after": {"CAL": 0, "RES": 3, "TLB": 0}},
        "slices": [
            {"args": ["--name", "A", "--cpus", "1-2", "--memory", "512M@0x40000000"], "booted": True, "cpus": 2,
             "apic_ids": [1, 2], "mem_kib": 474224, "seconds_to_userspace": 13.4},
            {"args": ["--cpus", "3"], "booted": False},
        ],
    }
    text = format_table(result)
    lines = text.splitlines()
    assert lines[1].split()[:2] == ["A", "--cpus"] and "463 MiB" in lines[1] and "13.4 s" in lines[1]
    assert " NO " in lines[2]
    assert lines[-1].endswith("CAL +0, RES +2, TLB +0")
