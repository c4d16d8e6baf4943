"""What the loader writes to boot a slice kernel: its structures and how they are built.

layout (sizes, alignment), structs (boot-protocol layouts, declared once), errors
(BootFormatError), bzimage (read a kernel's setup header), zeropage (struct boot_params),
pagetables, trampoline, lowmem (slots below 1 MiB and their records), image (the segments).
"""
