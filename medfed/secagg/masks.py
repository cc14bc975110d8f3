"""Masks: pairwise seeds agreed once per key epoch, one mask stream per pair and round.

Two sites agree a pairwise seed with X25519 and HKDF (bound to the run, the epoch and the ordered
pair of sites and their keys). Each round derives a round key from the seed (HKDF again, bound to
the round), and the round key drives ChaCha20 whose keystream, read as little-endian 32-bit
words, is the mask. The site with the smaller id adds the pair's mask and the other subtracts
it, so that the masks of two sites who both send an input cancel in the sum modulo 2^32. The
self-mask of a site's round comes from its own random seed for that round the same way.
"""

from __future__ import annotations

from typing import Final

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from medfed.secagg.derive import derive_key

WORD: Final = np.dtype("<u4")
_NONCE: Final = bytes(16)  # every stream key is used for one stream only, so a fixed nonce is safe
_CHUNK_WORDS: Final = 1 << 18
_ZEROS: Final = bytes(4 * _CHUNK_WORDS)


def pairwise_seed(
    *,
    own_key: X25519PrivateKey,
    own_site: str,
    own_public: bytes,
    peer_site: str,
    peer_public: bytes,
    run_id: str,
    epoch: int,
) -> bytes:
    """The seed two sites share for the whole key epoch (both sides compute the same bytes)."""
    shared = own_key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    (low, low_key), (high, high_key) = sorted([(own_site, own_public), (peer_site, peer_public)])
    return derive_key(
        shared,
        purpose="pairwise mask seed",
        run_id=run_id,
        epoch=epoch,
        low_site=low,
        high_site=high,
        low_public=low_key,
        high_public=high_key,
    )


def pair_round_key(seed: bytes, *, round_id: int) -> bytes:
    """The key of one pair's mask in one round: what a site reveals for a dropped peer."""
    return derive_key(seed, purpose="pairwise round mask", round=round_id)


def self_round_key(seed: bytes, *, run_id: str, epoch: int, site_id: str, round_id: int) -> bytes:
    """The key of a site's self-mask in the round its seed ``seed`` was drawn for."""
    return derive_key(
        seed, purpose="self mask", run_id=run_id, epoch=epoch, site=site_id, round=round_id
    )


def mask_words(key: bytes, length: int) -> np.ndarray:
    """``length`` uniformly random 32-bit words: ChaCha20's keystream under ``key``."""
    out = np.empty(length, dtype=WORD)
    encryptor = Cipher(algorithms.ChaCha20(key, _NONCE), mode=None).encryptor()
    view = out.data.cast("B")
    for start in range(0, length, _CHUNK_WORDS):
        stop = min(start + _CHUNK_WORDS, length)
        size = 4 * (stop - start)
        encryptor.update_into(memoryview(_ZEROS)[:size], view[4 * start : 4 * stop])
    return out


def add_mask(vector: np.ndarray, key: bytes, *, sign: int) -> None:
    """Add (``sign`` +1) or subtract (-1) the mask of ``key`` to ``vector`` in place, mod 2^32."""
    words = mask_words(key, vector.shape[0])
    if sign > 0:
        np.add(vector, words, out=vector)
    else:
        np.subtract(vector, words, out=vector)


def pair_sign(own_site: str, peer_site: str) -> int:
    """+1 when ``own_site`` adds the pair's mask, -1 when it subtracts it."""
    return 1 if own_site < peer_site else -1
