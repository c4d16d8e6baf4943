"""ACPI for slices: table layouts that parse the host's tables and build the slice's (tables),
an AML encoder with ASL rendering (aml), the slice's DSDT (dsdt), acpica-tools checks (acpica),
and the error a malformed host table raises (errors).
"""
