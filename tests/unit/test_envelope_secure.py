"""Secure aggregation's messages: the stage payload, the masked vector, and what is refused."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from site_support import round_request

from medfed.envelope import (
    SecureReply,
    read_request,
    read_secure,
    request_content,
    secure_content,
)
from medfed.errors import EnvelopeError


def test_a_request_carries_its_stage_payload_and_a_plain_one_none() -> None:
    payload = {"epoch": 3, "round": 2, "bound": 0.5, "sites": 3, "max_weight": 100}
    request = read_request(request_content(round_request(secure_aggregation=payload)))
    assert request.secure_aggregation == payload
    assert read_request(request_content(round_request())).secure_aggregation is None


def test_a_masked_upload_round_trips() -> None:
    vector = np.arange(7, dtype=np.uint32) * np.uint32(600_000_007)
    reply = SecureReply(
        site_id="site-a",
        payload={"epoch": 1, "round": 1},
        masked=vector,
        ledger_first_seq=4,
        ledger_lines=("{}", "{}"),
    )
    back = read_secure(secure_content(reply))
    assert back.site_id == "site-a" and back.payload == {"epoch": 1, "round": 1}
    assert back.masked is not None and back.masked.dtype == np.uint32
    np.testing.assert_array_equal(back.masked, vector)
    assert (back.ledger_first_seq, back.ledger_lines) == (4, ("{}", "{}"))
    stage = read_secure(secure_content(SecureReply(site_id="site-b", payload={"members": []})))
    assert stage.masked is None and stage.ledger_lines == ()


@pytest.mark.parametrize(
    "arrays",
    [
        {"masked": np.zeros(4, dtype=np.float32)},
        {"masked": np.zeros(4, dtype=np.uint32), "extra": np.zeros(1, dtype=np.uint32)},
    ],
)
def test_anything_but_one_uint32_vector_is_refused(arrays: dict[str, np.ndarray]) -> None:
    content = secure_content(SecureReply(site_id="site-a", payload={}))
    content["masked"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    with pytest.raises(EnvelopeError, match="one uint32 vector"):
        read_secure(content)
