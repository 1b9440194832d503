"""The ``pyroflows`` command."""


def main() -> None:
    pass
