"""Shamir sharing of 32-byte secrets: a threshold of shares recovers them; fewer or wrong do not."""

from __future__ import annotations

import itertools

import pytest
from secagg_support import seeded_bytes

from medfed.errors import SecureAggregationError
from medfed.secagg import threshold_for
from medfed.secagg.shamir import PRIME, _interpolate, combine, split

SECRET = bytes(range(1, 33))


@pytest.mark.parametrize(("sites", "threshold"), [(2, 2), (3, 2), (4, 3), (5, 3), (10, 6), (11, 6)])
def test_the_threshold_is_a_majority_and_at_least_two(sites: int, threshold: int) -> None:
    assert threshold_for(sites) == threshold


def test_every_threshold_subset_recovers_the_secret() -> None:
    xs = [1, 2, 3, 4, 5]
    shares = split(SECRET, threshold=3, xs=xs, random_bytes=seeded_bytes(0))
    assert all(0 <= value < PRIME for value in shares.values())
    for size in (3, 4, 5):
        for subset in itertools.combinations(xs, size):
            recovered = combine({x: shares[x] for x in subset}, threshold=3, what="secret")
            assert recovered == SECRET


def test_extreme_secrets_survive() -> None:
    for secret in (bytes(32), b"\xff" * 32):
        shares = split(secret, threshold=2, xs=[1, 2, 3], random_bytes=seeded_bytes(1))
        assert combine(shares, threshold=2, what="secret") == secret


def test_fewer_shares_than_the_threshold_are_refused_and_say_nothing() -> None:
    shares = split(SECRET, threshold=3, xs=[1, 2, 3, 4], random_bytes=seeded_bytes(2))
    two = {1: shares[1], 2: shares[2]}
    with pytest.raises(SecureAggregationError, match="2 share\\(s\\) received, 3 needed"):
        combine(two, threshold=3, what="secret")
    # Two points and any value at 0 lie on some polynomial of degree 2: every secret is as likely.
    for guess in (0, int.from_bytes(SECRET, "big"), 12345):
        points = [(0, guess), *two.items()]
        assert _interpolate(points, 1) == shares[1] and _interpolate(points, 2) == shares[2]


def test_a_share_that_disagrees_with_the_others_is_found() -> None:
    shares = split(SECRET, threshold=2, xs=[1, 2, 3], random_bytes=seeded_bytes(3))
    shares[3] = (shares[3] + 1) % PRIME
    with pytest.raises(SecureAggregationError, match="share at point 3 disagrees"):
        combine(shares, threshold=2, what="secret")


def test_two_splits_of_one_secret_give_unrelated_shares() -> None:
    random_bytes = seeded_bytes(4)
    first = split(SECRET, threshold=2, xs=[1, 2], random_bytes=random_bytes)
    second = split(SECRET, threshold=2, xs=[1, 2], random_bytes=random_bytes)
    assert first[1] != second[1] and first[2] != second[2]


@pytest.mark.parametrize(
    ("secret", "threshold", "xs"),
    [(b"short", 2, [1, 2]), (SECRET, 1, [1, 2]), (SECRET, 3, [1, 2]), (SECRET, 2, [1, 1])],
)
def test_bad_split_arguments_are_refused(secret: bytes, threshold: int, xs: list[int]) -> None:
    with pytest.raises(ValueError):
        split(secret, threshold=threshold, xs=xs, random_bytes=seeded_bytes(5))
