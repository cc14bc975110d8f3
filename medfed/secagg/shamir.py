"""Shamir secret sharing of 32-byte secrets over the prime field of 2^521 - 1.

A secret of 32 bytes is an integer below 2^256, so one field element holds it whole (a smaller
field would need the secret cut into pieces). Shares are points ``(x, f(x))`` of a random
polynomial ``f`` of degree ``threshold - 1`` with ``f(0)`` the secret; ``x`` is the holder's
1-based place in the key epoch's roster. Any ``threshold`` shares give the secret back, fewer
give no information about it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

from medfed.errors import SecureAggregationError
from medfed.secagg.derive import KEY_BYTES, RandomBytes

PRIME: Final = 2**521 - 1
"""A Mersenne prime above 2^256: every 32-byte secret is one element of its field."""

SHARE_BYTES: Final = 66
"""Bytes one share value takes on the wire (521 bits, rounded up)."""


def split(
    secret: bytes, *, threshold: int, xs: Sequence[int], random_bytes: RandomBytes
) -> dict[int, int]:
    """Shares of a 32-byte ``secret`` at the points ``xs``, any ``threshold`` of which recover it.

    Raises:
        ValueError: The secret is not 32 bytes, the threshold is below 2 or above the number of
            points, or the points repeat or fall outside 1 .. PRIME - 1.
    """
    if len(secret) != KEY_BYTES:
        raise ValueError(f"a secret is {KEY_BYTES} bytes, not {len(secret)}")
    if not 2 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} needs 2 .. {len(xs)} points")
    if len(set(xs)) != len(xs) or not all(0 < x < PRIME for x in xs):
        raise ValueError("share points must be distinct and between 1 and PRIME - 1")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [_random_element(random_bytes) for _ in range(threshold - 1)]
    return {x: _evaluate(coefficients, x) for x in xs}


def combine(shares: Mapping[int, int], *, threshold: int, what: str) -> bytes:
    """The 32-byte secret behind ``shares``, checked against every share beyond the threshold.

    ``what`` names the secret in errors (for example "site-b's mask key").

    Raises:
        SecureAggregationError: Fewer than ``threshold`` shares; the shares beyond the threshold
            do not lie on the polynomial of the first ones (a damaged or foreign share); or the
            secret they give is not a 32-byte value.
    """
    if len(shares) < threshold:
        raise SecureAggregationError(
            f"{what}: {len(shares)} share(s) received, {threshold} needed; the round is abandoned"
        )
    points = sorted(shares.items())
    basis, checks = points[:threshold], points[threshold:]
    for x, y in checks:
        if _interpolate(basis, x) != y % PRIME:
            raise SecureAggregationError(
                f"{what}: the share at point {x} disagrees with the others; the round is abandoned",
                hint="a share was damaged in transit or sent for another key epoch: start a new "
                "key epoch",
            )
    value = _interpolate(basis, 0)
    if value >= 2 ** (8 * KEY_BYTES):
        raise SecureAggregationError(
            f"{what}: the shares do not give a 32-byte secret; the round is abandoned",
            hint="a share was damaged in transit or sent for another key epoch: start a new key "
            "epoch",
        )
    return value.to_bytes(KEY_BYTES, "big")


def _random_element(random_bytes: RandomBytes) -> int:
    # 66 random bytes masked to 521 bits are uniform on 0 .. 2^521 - 1; only PRIME itself falls
    # outside the field and is drawn again, so no value is favoured.
    while True:
        value = int.from_bytes(random_bytes(SHARE_BYTES), "big") & PRIME
        if value < PRIME:
            return value


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    result = 0
    for coefficient in reversed(coefficients):
        result = (result * x + coefficient) % PRIME
    return result


def _interpolate(points: Sequence[tuple[int, int]], at: int) -> int:
    """The value at ``at`` of the polynomial through ``points`` (Lagrange)."""
    total = 0
    for i, (x_i, y_i) in enumerate(points):
        numerator, denominator = 1, 1
        for j, (x_j, _) in enumerate(points):
            if i != j:
                numerator = numerator * (at - x_j) % PRIME
                denominator = denominator * (x_i - x_j) % PRIME
        total = (total + y_i * numerator * pow(denominator, -1, PRIME)) % PRIME
    return total
