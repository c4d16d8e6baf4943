"""``coreslice nvme``: NVMe namespaces (placeholder until the nvme package lands)."""


def register(sub) -> None:
    pass
