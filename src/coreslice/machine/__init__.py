"""The narrow interfaces through which coreslice changes the machine.

Each has a real implementation (/dev/mem, MSRs, sysfs) and an in-memory one for tests.  Nothing
outside this package and launch.py writes to the machine.
"""
