"""``coreslice vm``: a QEMU/KVM VM with the resources of a slice, the baseline a slice is compared
against (issue 13).  plan.py turns a slice's resources into the QEMU command line and the vCPU
pinning; launching it is not implemented yet."""
