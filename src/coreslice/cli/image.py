"""``coreslice image``: build and install slice disk images (placeholder)."""


def register(sub) -> None:
    pass
