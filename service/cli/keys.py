"""`neuroserve hash-key`: print the sha256 digest under which an API key is configured."""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "hash-key",
        help="print the digest of an API key for NEUROSERVE_API_KEYS",
        description=(
            "Print the sha256 hex digest of an API key, the form in which NEUROSERVE_API_KEYS "
            "and NEUROSERVE_ADMIN_API_KEYS hold it (optionally as name:digest). The key is "
            "read from standard input, or prompted for, so it stays out of the shell history."
        ),
    )
    parser.add_argument("--name", help="print name:digest (the name owns the key's sessions)")
    parser.set_defaults(func=hash_key_command)


def hash_key_command(args: argparse.Namespace) -> int:
    # Imported here, not at the top, so that `neuroserve --help` starts fast.
    from service.api.auth import hash_key, parse_key_entry

    if sys.stdin.isatty():
        key = getpass.getpass("API key: ")
    else:
        key = sys.stdin.readline().rstrip("\r\n")
    if not key:
        print("neuroserve hash-key: the key is empty", file=sys.stderr)
        return 2
    entry = hash_key(key) if args.name is None else f"{args.name}:{hash_key(key)}"
    try:
        parse_key_entry(entry, admin=False)
    except ValueError as error:
        print(f"neuroserve hash-key: {error}", file=sys.stderr)
        return 2
    print(entry)
    return 0
