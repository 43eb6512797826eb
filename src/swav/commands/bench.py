"""(being written)"""


def register(sub) -> None:
    """Add this module's sub-commands to ``sub`` (an argparse subparsers object)."""
