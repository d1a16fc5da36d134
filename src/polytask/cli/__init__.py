"""The ``polytask`` command line (a leaf: no other polytask module imports it)."""

from polytask.cli.main import main

__all__ = ["main"]
