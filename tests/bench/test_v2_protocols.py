"""bench/v2_protocols.py, shortened: one round of one second per row against a real
`neuroserve serve`, every row answered without errors; and the binary row's body is the
stock client's own."""

from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import pytest

from bench.v2_protocols import PROTOCOLS, Server, one_digit, run, v2_binary_body

pytestmark = pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")


def test_one_short_round_of_every_protocol_has_no_errors() -> None:
    args = argparse.Namespace(seconds=1, warmup=0, rounds=1, concurrency=[1], model="digits-lru")
    table = run(args)
    rows = [line for line in table.splitlines() if line.startswith("| v")]
    assert [row.split(" | ")[:2] for row in rows] == [
        [f"| {p.name}", p.encoding] for p in PROTOCOLS
    ]
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert float(cells[3].replace(",", "")) > 0 and cells[6] == "0", row


def test_the_binary_body_is_json_then_raw_fp32() -> None:
    server = Server("127.0.0.1", 0, "digits-lru", one_digit())
    path, body, headers = v2_binary_body(server)
    length = int(headers["Inference-Header-Content-Length"])
    head = json.loads(body[:length])
    assert path == "/v2/models/digits-lru/infer"
    assert head["inputs"][0]["parameters"] == {"binary_data_size": 8 * 8 * 4}
    assert head["parameters"] == {"binary_data_output": True}  # no outputs named
    np.testing.assert_array_equal(np.frombuffer(body[length:], "<f4"), server.digit.reshape(-1))
