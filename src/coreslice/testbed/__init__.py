"""The emulated machine ("testbed") used by ``coreslice testbed run``, the demo and e2e tests.

A QEMU q35 machine under TCG boots a stock Debian 6.12 kernel as the *host* (``maxcpus=1
mem=1G``), with the build machine's root shared read-only over 9p so that the working tree's
``coreslice`` runs inside it; the remaining CPUs and RAM are free for slices.

Modules, each holding one concern:

- :mod:`.paths`     the cache directory (``$CORESLICE_CACHE`` or ``~/.cache/coreslice``)
- :mod:`.tools`     progress lines on stderr; the one helper that runs (and logs) external tools
- :mod:`.kernels`   fetch + unpack the stock kernel into a cache (``ensure_kernel``)
- :mod:`.cpio`      a tiny newc archive writer (no root or ``mknod`` needed for device nodes)
- :mod:`.initramfs` the host and slice busybox initramfs images
- :mod:`.report`    the slice's report line and the files of its data path
- :mod:`.topology`  the machine as data: UARTs, root buses, NUMA, the QEMU command line (pure)
- :mod:`.qemu`      one class owning one QEMU process; whole-machine boot timing helper
- :mod:`.hostview`  what of this machine the emulated host sees, at which paths (9p shares)
- :mod:`.interrupts` ``/proc/interrupts`` parser
- :mod:`.job`       the job script run inside the emulated host, and slice argument completion
- :mod:`.datapath`  the slices' NVMe disks and NICs (``--storage --network``)
- :mod:`.sriov`     SR-IOV physical functions for the host (``--sriov``)
- :mod:`.run`       ``coreslice testbed run``: the run watcher
- :mod:`.demo`      the demo's scenario, console tail and table

The argparse front end is :mod:`coreslice.cli.testbed` (``coreslice testbed run --help``).
"""
