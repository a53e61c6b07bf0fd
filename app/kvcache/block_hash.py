"""Content addresses of full KV blocks: a chain hash, stable across processes and machines.

    root      = H("kvthreads-kv" | identity | scope)        identity: model + KV layout
    hash[0]   = H(root    | ids of block 0)
    hash[i]   = H(hash[i-1] | ids of block i)              so a hash names the whole prefix

Two blocks with the same hash hold the KV of the same tokens after the same prefix, computed by
the same model into the same layout, within the same sharing scope (an account, or everyone when
the operator allows sharing across accounts): their KV is interchangeable. Token ids are packed
as little-endian uint32 and hashed with BLAKE2b (never Python's `hash()`, which is salted per
process).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Hashable, Sequence

DIGEST_SIZE = 16  # 128 bits: a collision among the pool's blocks is not a practical concern

BlockHash = bytes


def root_hash(identity: bytes, scope: Hashable) -> BlockHash:
    """The chain's seed: what must match, besides the tokens, for KV to be interchangeable."""
    h = hashlib.blake2b(b"kvthreads-kv\0", digest_size=DIGEST_SIZE)
    h.update(struct.pack("<I", len(identity)))
    h.update(identity)
    h.update(repr(scope).encode())
    return h.digest()


def chain_hash(prev: BlockHash, token_ids: Sequence[int]) -> BlockHash:
    """The hash of a full block: its predecessor's hash and its own token ids."""
    h = hashlib.blake2b(prev, digest_size=DIGEST_SIZE)
    h.update(struct.pack(f"<{len(token_ids)}I", *token_ids))
    return h.digest()


def extend_hashes(
    hashes: list[BlockHash], root: BlockHash, token_ids: Sequence[int], block_size: int
) -> None:
    """Append the hashes of the full blocks of token_ids that `hashes` does not cover yet."""
    for i in range(len(hashes), len(token_ids) // block_size):
        prev = hashes[i - 1] if i else root
        hashes.append(chain_hash(prev, token_ids[i * block_size : (i + 1) * block_size]))
