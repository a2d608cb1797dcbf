"""One check of alpha (`calibration.checks.check_alpha`) and one message, wherever the server
meets an alpha that its wire schemas did not already refuse."""

from __future__ import annotations

import math

import pytest

from calibration.checks import ALPHA_MESSAGE, check_alpha
from service.api.v2_codec import V2BadRequestError
from service.dataplane.predictions import ConformalOptions
from service.errors import BadInputError, value_errors_as

BAD_ALPHAS = [0, 0.0, 1, 1.5, -0.1, math.nan, math.inf, True, "0.1", None]


@pytest.mark.parametrize("alpha", BAD_ALPHAS)
def test_bad_alphas_get_the_one_message(alpha: object) -> None:
    with pytest.raises(ValueError) as refused:
        check_alpha(alpha)  # type: ignore[arg-type]
    assert str(refused.value) == f"{ALPHA_MESSAGE}, got {alpha!r}"
    with pytest.raises(BadInputError) as answered:
        ConformalOptions(alpha=alpha)  # type: ignore[arg-type]
    assert answered.value.status_code == 422
    assert answered.value.message == str(refused.value)


def test_good_alphas_pass() -> None:
    assert check_alpha(0.1) == 0.1 and check_alpha(1e-9) == 1e-9
    assert ConformalOptions(alpha=0.05).alpha == 0.05


def test_value_errors_become_the_requested_client_error() -> None:
    with pytest.raises(V2BadRequestError) as answered, value_errors_as(V2BadRequestError, "p."):
        check_alpha(2)
    assert answered.value.status_code == 400
    assert answered.value.message == f"p.{ALPHA_MESSAGE}, got 2"
    with value_errors_as():  # nothing raised: nothing happens
        pass
