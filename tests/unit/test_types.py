"""freeze_arrays and SiteUpdate: held arrays are read-only and nobody else can write them."""

from __future__ import annotations

from types import MappingProxyType

import numpy as np
import pytest

from medfed.types import SiteUpdate, freeze_arrays


def _sealed(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


def test_a_callers_writable_array_is_copied_by_site_update() -> None:
    source = np.arange(4, dtype=np.float32)
    update = SiteUpdate(site_id="a", round=1, weights={"w": source}, num_patients=1)
    held = update.weights["w"]
    assert not np.shares_memory(held, source)
    assert not held.flags.writeable and source.flags.writeable
    source[0] = 9.0
    assert held[0] == 0.0


def test_read_only_arrays_from_outside_are_still_copied_by_default() -> None:
    # Read-only now, but whoever made them can make them writable again: not ours to keep.
    source = _sealed(np.ones(3, dtype=np.float32))
    for given in ({"w": source}, MappingProxyType({"w": source})):
        update = SiteUpdate(site_id="a", round=1, weights=given, num_patients=1)
        assert not np.shares_memory(update.weights["w"], source)


def test_handed_over_arrays_are_kept_only_when_nobody_can_write_them() -> None:
    kept = _sealed(np.arange(6, dtype=np.float32))
    writable = np.arange(6, dtype=np.float32)
    view_of_writable = _sealed(writable.reshape(2, 3))  # the base stays writable
    base = _sealed(np.arange(6, dtype=np.float32))
    sealed_view = _sealed(base.reshape(2, 3))
    not_contiguous = _sealed(np.arange(6, dtype=np.float32).reshape(2, 3)).T
    from_bytes = np.frombuffer(b"\x00" * 16, dtype=np.float32)
    from_bytearray = np.frombuffer(bytearray(16), dtype=np.float32)
    from_bytearray.setflags(write=False)
    frozen = freeze_arrays(
        {
            "kept": kept,
            "writable": writable,
            "view_of_writable": view_of_writable,
            "sealed_view": sealed_view,
            "not_contiguous": not_contiguous,
            "from_bytes": from_bytes,
            "from_bytearray": from_bytearray,
            "listed": [1.0, 2.0],
        },
        copy=False,
    )
    assert frozen["kept"] is kept and frozen["sealed_view"] is sealed_view
    assert frozen["from_bytes"] is from_bytes
    for name, source in [
        ("writable", writable),
        ("view_of_writable", view_of_writable),
        ("not_contiguous", not_contiguous),
        ("from_bytearray", from_bytearray),
    ]:
        assert not np.shares_memory(frozen[name], source), name
    assert writable.flags.writeable  # the caller's array was not changed
    for name, array in frozen.items():
        assert not array.flags.writeable, name
    np.testing.assert_array_equal(frozen["not_contiguous"], not_contiguous)
    np.testing.assert_array_equal(frozen["listed"], [1.0, 2.0])


def test_freezing_what_is_frozen_copies_nothing() -> None:
    frozen = freeze_arrays({"w": np.ones((2, 2), dtype=np.float32)})
    assert freeze_arrays(frozen) is frozen
    update = SiteUpdate(site_id="a", round=1, weights=frozen, num_patients=1)
    assert update.weights is frozen
    again = SiteUpdate(site_id="b", round=1, weights=update.weights, num_patients=1)
    assert again.weights["w"] is frozen["w"]


def test_frozen_arrays_cannot_be_changed() -> None:
    frozen = freeze_arrays({"w": np.zeros(2, dtype=np.float32)})
    with pytest.raises(ValueError, match="read-only"):
        frozen["w"][0] = 1.0
    with pytest.raises(TypeError):
        frozen["v"] = np.zeros(2)  # type: ignore[index]
    assert list(frozen) == ["w"] and len(frozen) == 1 and "w" in frozen
    assert "frozen_arrays" in repr(frozen)
