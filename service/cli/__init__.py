"""The `neuroserve` command line (`main` is the console script's entry point)."""

from service.cli.main import main

__all__ = ["main"]
