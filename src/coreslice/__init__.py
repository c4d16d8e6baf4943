"""coreslice: run Linux kernels on slices of one x86 machine, with no hypervisor."""

__version__ = "0.1.0"
