"""A reply's weights are copied once on arrival: Array.numpy() makes the arrays an update holds."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from flwr.app import Array, RecordDict

from medfed.envelope import (
    RoundReply,
    RoundRequest,
    read_reply,
    read_request,
    reply_content,
    request_content,
)
from medfed.types import SiteUpdate

WEIGHTS = {f"layer{i}.weight": np.full((64, 128), i, dtype=np.float32) for i in range(8)}


def _content() -> RecordDict:
    return reply_content(
        RoundReply(site_id="s", round=2, weights=WEIGHTS, ledger_first_seq=0, ledger_lines=())
    )


def test_the_update_holds_the_arrays_array_numpy_made(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[np.ndarray] = []
    numpy_of = Array.numpy

    def recording(self: Array) -> np.ndarray:
        array = numpy_of(self)
        made.append(array)
        return array

    content = _content()
    monkeypatch.setattr(Array, "numpy", recording)
    reply = read_reply(content)
    update = SiteUpdate(site_id="s", round=reply.round, weights=reply.weights, num_patients=3)
    assert len(made) == len(WEIGHTS)
    for name, array in zip(WEIGHTS, made, strict=True):
        held = update.weights[name]
        assert held is array and np.shares_memory(held, array)
        np.testing.assert_array_equal(held, WEIGHTS[name])
        owner: object = held
        while isinstance(owner, np.ndarray):  # not writable through anything it views either
            assert not owner.flags.writeable
            owner = owner.base
        with pytest.raises(ValueError, match="read-only"):
            held[0, 0] = 1.0
        with pytest.raises(ValueError):
            held.setflags(write=True)
    with pytest.raises(TypeError):
        update.weights["extra"] = WEIGHTS["layer0.weight"]  # type: ignore[index]


def test_each_reading_makes_its_own_arrays() -> None:
    content = _content()
    first, second = read_reply(content), read_reply(content)
    for name in WEIGHTS:
        assert not np.shares_memory(first.weights[name], second.weights[name])


def test_arrival_allocates_one_copy_of_the_weights() -> None:
    content = _content()
    payload = sum(array.nbytes for array in WEIGHTS.values())
    tracemalloc.start()
    try:
        reply = read_reply(content)
        update = SiteUpdate(site_id="s", round=2, weights=reply.weights, num_patients=3)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(update.weights) == len(WEIGHTS)
    # numpy reports its buffers to tracemalloc: one copy is the payload, two would be twice it.
    assert payload <= peak < 1.5 * payload


def test_a_site_gets_writable_global_weights_to_load_into_its_network() -> None:
    request = RoundRequest(
        run_name="r",
        project="p",
        round=1,
        planned_rounds=1,
        model={},
        local_epochs=1,
        learning_rate=None,
        noise_multiplier=None,
        max_grad_norm=None,
        proximal_mu=0.0,
        seed=0,
        ledger_known=0,
        weights=WEIGHTS,
    )
    weights = read_request(request_content(request)).weights
    assert weights is not None
    assert all(array.flags.writeable for array in weights.values())
