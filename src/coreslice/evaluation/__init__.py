"""``coreslice eval``: one workload measured in a slice, a VM and natively on the same resources
(issue 13 section 3).

- workloads.py: what each built-in workload runs (Debian packages, their command lines) and how
  its figures are read from the tools' output: pure.
- targets.py: where a command runs: this host, or a slice or VM over ssh (the one side effect).
- modes.py: whether the running host boot suits a mode (host profiles), and ``eval plan``'s
  sequence of host boots.
- results.py: the result files ``eval run`` writes (one per workload and mode, N repeats, the
  environment it ran in).
- report.py: ``eval report``: medians, spread, relative to native, the prototype's hardware
  figures alongside; text, JSON, HTML, and a matplotlib plot.
"""
