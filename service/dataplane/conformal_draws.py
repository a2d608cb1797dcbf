"""The uniform draws of randomised conformal scores: the server's, one per prediction.

A randomised score (APS or RAPS with U ~ Uniform[0, 1)) covers 1 - alpha only on average
over U. A client that could choose U could choose its coverage: with a fixed seed, one-digit
requests covered 0.01 of the time or 0.99 depending on the seed. So U is never a client value:
it is HMAC-SHA256(server key, prediction id) read as a number in [0, 1), which is

- independent of everything the client sends (the id is drawn by the server, 122 random bits,
  and the key is the server's), so coverage holds whatever a request carries;
- reproducible by whoever holds the key, from the id alone (an audit can rebuild any set);
- stored with the prediction record, so label feedback scores the label with the very U
  that was served, whichever replica answers it.

Replicas should share `NEUROSERVE_CONFORMAL_KEY` so that any of them reproduces any set; when
it is unset every process draws a random key at start (sets stay valid, only the
reproduction from the id is lost with the process).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence

_KEY_BYTES = 32
_MANTISSA_BITS = 53  # every double in [0, 1) with this many bits is exact


class ConformalDraws:
    """Maps prediction ids to uniform draws under one server-held key."""

    def __init__(self, key: bytes | str | None = None) -> None:
        if key is None or key == "" or key == b"":
            key = secrets.token_bytes(_KEY_BYTES)
        self._key = key.encode() if isinstance(key, str) else bytes(key)

    def uniform(self, prediction_id: str) -> float:
        """U in [0, 1) for one prediction id."""
        digest = hmac.new(self._key, prediction_id.encode(), hashlib.sha256).digest()
        return (int.from_bytes(digest[:8], "big") >> (64 - _MANTISSA_BITS)) / 2**_MANTISSA_BITS

    def uniforms(self, prediction_ids: Sequence[str]) -> list[float]:
        return [self.uniform(prediction_id) for prediction_id in prediction_ids]
