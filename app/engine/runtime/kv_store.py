"""The disk tier's files: KV snapshots of threads, checked before any byte of them is reused.

    <dir>/blocks/<content key hex>.kvb    one block's KV, stored once however many threads hold it
    <dir>/threads/<thread key hex>.snap   a thread's snapshot: what it holds and which blocks

A block file is the block's raw KV ([num_layers, 2, block_size, heads, head_dim] in the KV dtype,
native byte order) followed by BLAKE2b-128(content key | data). Blocks are named by content key
(app/kvcache/tiers.py), so a block that several threads hold (a shared prefix) is one file.

A snapshot file:

    b"KVTSNAP1" | u32 header length | header (JSON) | u32 token ids | 16-byte block keys
                | BLAKE2b-128 of everything before it

    header: {"version", "thread", "model" (the model's identity hash), "dtype", "block_shape",
             "block_size", "root" (the hash chain's seed), "num_tokens", "num_blocks"}

`load` trusts nothing: the checksum, the model identity, the dtype and layout, the block size,
that the block keys are the hash chain of the token ids, that the token ids are a prefix of the
thread's log (from Postgres), and every block file's size and checksum. Any failure raises
`SnapshotInvalid(reason)`; the caller deletes the snapshot and recomputes.

Every file is written to a temporary name, flushed (fsync) and renamed, blocks before the
snapshot that names them, so a process killed at any moment leaves complete files or temporary
ones (removed at the next start, with block files no snapshot names). Writes and deletes run in
order on one writer thread, never in the engine step; `flush()` waits for what was queued.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import struct
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from app.kvcache.block_hash import DIGEST_SIZE, BlockHash
from app.kvcache.tiers import content_keys

log = logging.getLogger(__name__)

MAGIC = b"KVTSNAP1"
VERSION = 1
SNAPSHOT_SUFFIX = ".snap"
BLOCK_SUFFIX = ".kvb"
TMP_MARK = ".tmp"


class SnapshotInvalid(Exception):
    """A snapshot failed a check; `reason` is one of the REASONS."""

    REASONS = ("missing", "truncated", "corrupt", "model", "block_size", "layout", "tokens")

    def __init__(self, reason: str, detail: str, bad_blocks: Sequence[BlockHash] = ()) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.bad_blocks = list(bad_blocks)  # block files found damaged (deleted by the caller)


@dataclass(frozen=True)
class SnapshotLayout:
    """What a snapshot must match to be reused: the model and how its KV is laid out."""

    model: str  # hex identity hash of the model (model_identity)
    dtype: str  # e.g. "torch.float32"
    block_shape: tuple[int, ...]  # [num_layers, 2, block_size, heads, head_dim]
    block_size: int

    @property
    def block_bytes(self) -> int:
        n = 1
        for d in self.block_shape:
            n *= d
        return n * torch.empty((), dtype=_dtype(self.dtype)).element_size()


@dataclass(frozen=True)
class LoadedSnapshot:
    key: Hashable
    token_ids: list[int]
    rows: torch.Tensor  # [num_blocks, *block_shape], CPU
    seconds: float = 0.0  # reading and checking


@dataclass(frozen=True)
class SnapshotInfo:
    """What a start-up scan found for one thread (token_ids None: unreadable, refused at use)."""

    key: str
    token_ids: list[int] | None
    block_keys: list[BlockHash]
    root: bytes
    mtime: float


def model_identity(model: torch.nn.Module, model_name: str) -> str:
    """A hash naming the model: its name, config, every tensor's name, shape and dtype, and a
    sample of each tensor's values (so two checkpoints of one architecture differ)."""
    h = hashlib.blake2b(b"kvthreads-model\0", digest_size=16)
    h.update(model_name.encode())
    h.update(repr(getattr(model, "config", None)).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(f"|{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        sample = tensor.detach().reshape(-1)[:16].to("cpu", torch.float32)
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"not a torch dtype: {name!r}")
    return dtype


def _digest(*parts: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=DIGEST_SIZE)
    for part in parts:
        h.update(part)
    return h.digest()


def thread_file_name(key: Hashable) -> str:
    return str(key).encode().hex() + SNAPSHOT_SUFFIX


def _write_atomic(path: Path, chunks: Sequence[bytes]) -> None:
    """Temp file, fsync, rename: a reader sees the whole file or none of it."""
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    with open(tmp, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def encode_snapshot(
    layout: SnapshotLayout,
    key: Hashable,
    root: bytes,
    token_ids: Sequence[int],
    block_keys: Sequence[BlockHash],
) -> bytes:
    header = json.dumps(
        {
            "version": VERSION,
            "thread": str(key),
            "model": layout.model,
            "dtype": layout.dtype,
            "block_shape": list(layout.block_shape),
            "block_size": layout.block_size,
            "root": root.hex(),
            "num_tokens": len(token_ids),
            "num_blocks": len(block_keys),
        },
        sort_keys=True,
    ).encode()
    body = b"".join(
        [
            MAGIC,
            struct.pack("<I", len(header)),
            header,
            struct.pack(f"<{len(token_ids)}I", *token_ids),
            *block_keys,
        ]
    )
    return body + _digest(body)


def decode_snapshot(data: bytes) -> tuple[dict, list[int], list[BlockHash]]:
    """Parse and checksum a snapshot file; SnapshotInvalid (truncated or corrupt) otherwise."""
    fixed = len(MAGIC) + 4
    if len(data) < fixed + DIGEST_SIZE:
        raise SnapshotInvalid("truncated", f"{len(data)} bytes")
    if data[: len(MAGIC)] != MAGIC:
        raise SnapshotInvalid("corrupt", "not a kvthreads snapshot")
    (header_len,) = struct.unpack_from("<I", data, len(MAGIC))
    if fixed + header_len + DIGEST_SIZE > len(data):
        raise SnapshotInvalid("truncated", "shorter than its header")
    try:
        header = json.loads(data[fixed : fixed + header_len])
        num_tokens, num_blocks = int(header["num_tokens"]), int(header["num_blocks"])
    except (ValueError, KeyError, TypeError) as exc:
        raise SnapshotInvalid("corrupt", f"unreadable header ({exc})") from None
    start = fixed + header_len
    size = start + 4 * num_tokens + DIGEST_SIZE * num_blocks + DIGEST_SIZE
    if len(data) < size:
        raise SnapshotInvalid("truncated", f"{len(data)} of {size} bytes")
    if len(data) > size or _digest(data[: size - DIGEST_SIZE]) != data[size - DIGEST_SIZE :]:
        raise SnapshotInvalid("corrupt", "checksum mismatch")
    token_ids = list(struct.unpack_from(f"<{num_tokens}I", data, start))
    at = start + 4 * num_tokens
    keys = [data[at + i * DIGEST_SIZE : at + (i + 1) * DIGEST_SIZE] for i in range(num_blocks)]
    return header, token_ids, keys


class DiskStore:
    """A folder of snapshots and block files, and the writer thread that changes it."""

    def __init__(self, folder: Path, layout: SnapshotLayout) -> None:
        self.folder = Path(folder)
        self.layout = layout
        self.threads_dir = self.folder / "threads"
        self.blocks_dir = self.folder / "blocks"
        self.threads_dir.mkdir(parents=True, exist_ok=True)
        self.blocks_dir.mkdir(parents=True, exist_ok=True)
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._cond = threading.Condition()
        self._submitted = 0
        self._completed = 0
        self.bytes_written = 0
        self.bytes_read = 0
        self.write_seconds = 0.0
        self._writer = threading.Thread(target=self._write_loop, name="kv-disk", daemon=True)
        self._writer.start()

    # ---- paths -------------------------------------------------------------------------------

    def snapshot_path(self, key: Hashable) -> Path:
        return self.threads_dir / thread_file_name(key)

    def block_path(self, block_key: BlockHash) -> Path:
        return self.blocks_dir / (block_key.hex() + BLOCK_SUFFIX)

    # ---- start-up ----------------------------------------------------------------------------

    def scan(self) -> list[SnapshotInfo]:
        """Remove temporary files (a killed writer's) and block files no snapshot names; list
        the snapshots, least recently written first. Only the snapshot files are parsed here;
        everything else is checked when a turn wants the KV."""
        for folder in (self.threads_dir, self.blocks_dir):
            for path in folder.iterdir():
                if TMP_MARK in path.name:
                    path.unlink(missing_ok=True)
        found = []
        for path in self.threads_dir.iterdir():
            if not path.name.endswith(SNAPSHOT_SUFFIX):
                continue
            try:
                key = bytes.fromhex(path.name.removesuffix(SNAPSHOT_SUFFIX)).decode()
            except ValueError:
                path.unlink(missing_ok=True)
                continue
            mtime = path.stat().st_mtime
            try:
                header, token_ids, block_keys = decode_snapshot(path.read_bytes())
                root = bytes.fromhex(str(header.get("root", "")))
            except (SnapshotInvalid, ValueError):
                found.append(SnapshotInfo(key, None, [], b"", mtime))
                continue
            found.append(SnapshotInfo(key, token_ids, block_keys, root, mtime))
        named = {k for info in found for k in info.block_keys}
        for path in self.blocks_dir.iterdir():
            try:
                block_key = bytes.fromhex(path.name.removesuffix(BLOCK_SUFFIX))
            except ValueError:
                block_key = b""
            if block_key not in named:
                path.unlink(missing_ok=True)
        found.sort(key=lambda info: info.mtime)
        return found

    # ---- writes (queued) ---------------------------------------------------------------------

    def write(
        self,
        key: Hashable,
        root: bytes,
        token_ids: Sequence[int],
        block_keys: Sequence[BlockHash],
        new_blocks: dict[BlockHash, torch.Tensor],
    ) -> None:
        """Queue a thread's snapshot: the block files it adds (new_blocks: content key -> CPU
        row), then its snapshot file."""
        snapshot = encode_snapshot(self.layout, key, root, token_ids, block_keys)
        rows = {k: v.contiguous() for k, v in new_blocks.items()}

        def job() -> None:
            start = time.perf_counter()
            for block_key, row in rows.items():
                data = row.view(torch.uint8).numpy().tobytes()
                _write_atomic(self.block_path(block_key), [data, _digest(block_key, data)])
                self.bytes_written += len(data) + DIGEST_SIZE
            _write_atomic(self.snapshot_path(key), [snapshot])
            _fsync_dir(self.blocks_dir)
            _fsync_dir(self.threads_dir)
            self.bytes_written += len(snapshot)
            self.write_seconds += time.perf_counter() - start

        self._submit(job)

    def delete(self, key: Hashable | None, block_keys: Sequence[BlockHash]) -> None:
        """Queue the removal of a thread's snapshot file (key None: none) and of block files."""
        paths = [self.block_path(k) for k in block_keys]
        if key is not None:
            paths.insert(0, self.snapshot_path(key))  # the snapshot first: never one without blocks

        def job() -> None:
            for path in paths:
                path.unlink(missing_ok=True)

        self._submit(job)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every job queued before this call is done; False on timeout."""
        with self._cond:
            target = self._submitted
            return self._cond.wait_for(lambda: self._completed >= target, timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Finish the queued jobs (at most `timeout` seconds) and stop the writer."""
        done = self.flush(timeout)
        self._jobs.put(None)
        return done

    def _submit(self, job: Callable[[], None]) -> None:
        with self._cond:
            self._submitted += 1
        self._jobs.put(job)

    def _write_loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except Exception:  # a full disk: the snapshot is missing, refused when wanted
                log.exception("KV disk tier: a write failed")
            with self._cond:
                self._completed += 1
                self._cond.notify_all()

    # ---- reads (a worker thread's) -----------------------------------------------------------

    def load(self, key: Hashable, history_ids: Sequence[int]) -> LoadedSnapshot:
        """Read a thread's snapshot and its blocks, checking everything (module docstring).
        Call after `flush()` (the writes of this thread's snapshot done). Raises
        SnapshotInvalid."""
        start = time.perf_counter()
        layout = self.layout
        try:
            data = self.snapshot_path(key).read_bytes()
        except FileNotFoundError:
            raise SnapshotInvalid("missing", "no snapshot file") from None
        header, token_ids, block_keys = decode_snapshot(data)
        if header.get("version") != VERSION or header.get("thread") != str(key):
            raise SnapshotInvalid("corrupt", "version or thread does not match")
        if header.get("model") != layout.model:
            raise SnapshotInvalid("model", f"written by model {header.get('model')}")
        if header.get("block_size") != layout.block_size:
            raise SnapshotInvalid("block_size", f"block size {header.get('block_size')}")
        if header.get("dtype") != layout.dtype or tuple(header.get("block_shape", ())) != tuple(
            layout.block_shape
        ):
            raise SnapshotInvalid("layout", f"{header.get('dtype')} {header.get('block_shape')}")
        try:
            root = bytes.fromhex(str(header.get("root")))
        except ValueError:
            raise SnapshotInvalid("corrupt", "unreadable root") from None
        if content_keys(root, token_ids, layout.block_size) != block_keys:
            raise SnapshotInvalid("corrupt", "block keys are not those of its tokens")
        if list(history_ids[: len(token_ids)]) != token_ids:
            raise SnapshotInvalid("tokens", "its tokens are not a prefix of the thread's log")
        nbytes = layout.block_bytes
        rows = torch.empty((len(block_keys), *layout.block_shape), dtype=_dtype(layout.dtype))
        flat = rows.view(len(block_keys), -1).view(torch.uint8) if len(block_keys) else None
        for i, block_key in enumerate(block_keys):
            assert flat is not None
            target = flat[i].numpy()  # read straight into the rows, no intermediate copy
            try:
                with open(self.block_path(block_key), "rb") as f:
                    num_read = f.readinto(memoryview(target))
                    tail = f.read(DIGEST_SIZE + 1)
            except FileNotFoundError:
                raise SnapshotInvalid("missing", f"block {block_key.hex()}") from None
            if num_read != nbytes or len(tail) < DIGEST_SIZE:
                raise SnapshotInvalid("truncated", f"block {block_key.hex()}", [block_key])
            if len(tail) > DIGEST_SIZE or _digest(block_key, target) != tail:
                raise SnapshotInvalid("corrupt", f"block {block_key.hex()}", [block_key])
            self.bytes_read += nbytes + DIGEST_SIZE
        self.bytes_read += len(data)
        return LoadedSnapshot(key, token_ids, rows, time.perf_counter() - start)
