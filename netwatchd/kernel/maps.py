"""BPF maps by file descriptor, with the subset of BCC's table API netwatchd's probes use.

`Map` wraps one map fd plus the ctypes `Key`/`Leaf` types rebuilt from the compiler child's description
(`kernel.ctlayout`): `table[key]`, `table[key] = leaf`, `del table[key]`, `clearitem`, `items()`, `keys()`,
`len()`, iteration; arrays take plain ints as keys, per-CPU maps return one Leaf per possible CPU. Differences
from BCC, on purpose: `items()` reads the whole map with batched lookups in chunks (BCC 0.26's batch call is
only right when one call returns everything), and `items_raw()` returns raw bytes without building a ctypes
object per entry — what the 10k-key refresh path wants. `RingBuf` consumes a BPF ring buffer.
"""

from __future__ import annotations

import ctypes
import errno
import sys
from collections.abc import Callable, Iterator

from netwatchd.kernel import bpfsys

BATCH_CHUNK = 4096  # entries per BPF_MAP_LOOKUP_BATCH call


class Map:
    """One BPF map (see module docstring). Leaf is the per-CPU element type for per-CPU maps."""

    def __init__(self, name: str, fd: int, info: bpfsys.MapInfo, key_type: type | None, leaf_type: type | None):
        self.name, self.fd, self.info = name, fd, info
        self.map_type, self.max_entries = info.type, info.max_entries
        self.key_size, self.value_size = info.key_size, info.value_size
        self.Key, self.Leaf = key_type, leaf_type
        self.percpu = info.type in bpfsys.PERCPU_TYPES
        self.is_array = info.type in bpfsys.ARRAY_TYPES
        self.ncpus = bpfsys.possible_cpus() if self.percpu else 1
        self.stride = bpfsys.percpu_stride(self.value_size) if self.percpu else self.value_size
        self._batch = info.type in bpfsys.BATCH_TYPES
        self._scratch = bpfsys.BatchBuffers()
        self._last_count = 0
        for what, t, size in (("key", key_type, self.key_size), ("value", leaf_type, self.value_size)):
            if t is not None and size and ctypes.sizeof(t) != size:
                raise ValueError(f"map {name}: {what} type is {ctypes.sizeof(t)} bytes, the kernel says {size}")

    def __repr__(self) -> str:
        return f"<Map {self.name} fd={self.fd} type={self.map_type} max_entries={self.max_entries}>"

    # -- buffers ----------------------------------------------------------------------------------------
    def _key_buf(self, key) -> ctypes.Array:
        """A key as a C buffer: a Key instance, raw bytes, or an int index for arrays."""
        if isinstance(key, int):
            if not self.is_array:
                raise TypeError(f"map {self.name}: int keys are for arrays")
            if not 0 <= key < self.max_entries:
                raise IndexError(f"map {self.name}: index {key} out of range")
            return ctypes.create_string_buffer(key.to_bytes(self.key_size, sys.byteorder), self.key_size)
        raw = bytes(key)
        if len(raw) != self.key_size:
            raise ValueError(f"map {self.name}: key of {len(raw)} bytes, expected {self.key_size}")
        return ctypes.create_string_buffer(raw, self.key_size)

    def _value_bytes(self, leaf) -> bytes:
        if not self.percpu:
            raw = bytes(leaf)
            if len(raw) != self.value_size:
                raise ValueError(f"map {self.name}: value of {len(raw)} bytes, expected {self.value_size}")
            return raw
        values = list(leaf)
        if len(values) != self.ncpus:
            raise ValueError(f"map {self.name}: {len(values)} per-CPU values, expected {self.ncpus}")
        return b"".join(bytes(v).ljust(self.stride, b"\0") for v in values)

    def decode_value(self, raw: bytes, offset: int = 0):
        """A Leaf (or, per-CPU, a list of one Leaf per CPU) from raw value bytes."""
        if not self.percpu:
            return self.Leaf.from_buffer_copy(raw, offset)
        return [self.Leaf.from_buffer_copy(raw, offset + i * self.stride) for i in range(self.ncpus)]

    # -- elements ---------------------------------------------------------------------------------------
    def lookup_raw(self, key) -> bytes | None:
        """Raw value bytes of `key` (per-CPU: every CPU's slot), None when absent."""
        val = ctypes.create_string_buffer(self.stride * self.ncpus)
        if not bpfsys.lookup(self.fd, self._key_buf(key), val):
            return None
        return val.raw

    def __getitem__(self, key):
        raw = self.lookup_raw(key)
        if raw is None:
            raise KeyError(key)
        return self.decode_value(raw)

    def get(self, key, default=None):
        raw = self.lookup_raw(key)
        return default if raw is None else self.decode_value(raw)

    def __setitem__(self, key, leaf) -> None:
        val = self._value_bytes(leaf)
        bpfsys.update(self.fd, self._key_buf(key), ctypes.create_string_buffer(val, len(val)))

    def __delitem__(self, key) -> None:
        if self.is_array:  # array elements cannot be deleted: like BCC, zero them
            self.clearitem(key)
            return
        if not bpfsys.delete(self.fd, self._key_buf(key)):
            raise KeyError(key)

    def update_many(self, pairs: list[tuple]) -> None:
        """Set many (key, leaf) pairs: one batched update where the map type has it, else one by one."""
        if not pairs:
            return
        if self._batch and not self.percpu:
            size, order = self.key_size, sys.byteorder
            keys = b"".join(k.to_bytes(size, order) if isinstance(k, int) else bytes(k) for k, _v in pairs)
            if len(keys) != size * len(pairs):
                raise ValueError(f"map {self.name}: keys are not all {size} bytes")
            values = b"".join(self._value_bytes(v) for _k, v in pairs)
            try:
                bpfsys.update_batch(self.fd, keys, values, self.key_size)
                return
            except bpfsys.BpfError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
        for k, v in pairs:
            self[k] = v

    def delete_many(self, raw_keys: list[bytes]) -> int:
        """Delete raw keys (absent ones are skipped) with batched deletes where the map type has them;
        returns how many were deleted."""
        if not raw_keys or self.is_array:
            return 0
        if self._batch:
            try:
                return bpfsys.delete_batch(self.fd, b"".join(raw_keys), self.key_size)
            except bpfsys.BpfError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
        return sum(bpfsys.delete(self.fd, self._key_buf(raw)) for raw in raw_keys)

    def clearitem(self, key) -> None:
        """Zero one element (every CPU's slot for per-CPU maps)."""
        size = self.stride * self.ncpus
        bpfsys.update(self.fd, self._key_buf(key), ctypes.create_string_buffer(size))

    def __contains__(self, key) -> bool:
        return self.lookup_raw(key) is not None

    # -- whole map --------------------------------------------------------------------------------------
    def raw_keys(self) -> list[bytes]:
        """Every key (raw bytes), by get_next_key iteration (bounded by max_entries + 1 steps)."""
        if self.is_array:
            return [i.to_bytes(self.key_size, sys.byteorder) for i in range(self.max_entries)]
        out: list[bytes] = []
        prev = None
        cur = ctypes.create_string_buffer(self.key_size)
        for _ in range(self.max_entries + 1):  # a key deleted under us restarts from the first: stay bounded
            if not bpfsys.next_key(self.fd, prev, cur):
                break
            out.append(cur.raw)
            prev, cur = cur, ctypes.create_string_buffer(self.key_size)
        return out

    def items_raw(self) -> tuple[bytes, bytes, int]:
        """(keys, values, count): every entry as concatenated raw keys and values (value stride:
        `self.stride * self.ncpus`). Batched where the map type has it, else key by key."""
        vsize = self.stride * self.ncpus
        if self._batch:
            try:
                # Chunks sized to what the map held last time: a mostly empty map keeps small buffers.
                chunk = max(1, min(BATCH_CHUNK, self.max_entries, 64 + self._last_count + self._last_count // 4))
                out = bpfsys.lookup_batch(self.fd, self.key_size, vsize, chunk, self._scratch)
                self._last_count = out[2]
                return out
            except bpfsys.BpfError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                self._batch = False  # an old kernel: iterate from now on
        keys, values, n = bytearray(), bytearray(), 0
        for raw in self.raw_keys():
            val = self.lookup_raw(raw)
            if val is not None:  # deleted since we saw the key
                keys += raw
                values += val
                n += 1
        return bytes(keys), bytes(values), n

    def items(self) -> list[tuple]:
        """(Key, Leaf) of every entry (per-CPU: (Key, [Leaf per CPU]))."""
        keys, values, n = self.items_raw()
        ks, vs = self.key_size, self.stride * self.ncpus
        return [(self.Key.from_buffer_copy(keys, i * ks), self.decode_value(values, i * vs)) for i in range(n)]

    items_lookup_batch = items  # BCC's name for the batched read

    def keys(self) -> list:
        return [self.Key.from_buffer_copy(raw) for raw in self.raw_keys()]

    def values(self) -> list:
        return [v for _k, v in self.items()]

    def __iter__(self) -> Iterator:
        return iter(self.keys())

    def __len__(self) -> int:
        """max_entries for arrays (like BCC), else the number of entries now (one batched read if possible)."""
        if self.is_array:
            return self.max_entries
        return self.items_raw()[2] if self._batch else len(self.raw_keys())


class RingBuf(Map):
    """A BPF_MAP_TYPE_RINGBUF: records are decoded with `event()` (the layout of what the C code outputs)."""

    def __init__(self, *args, event_type: type | None = None, poller: bpfsys.RingBufferPoller | None = None):
        super().__init__(*args)
        self.event_type = event_type
        self._poller = poller

    def event(self, data: int):
        """The record at address `data` (as passed to a ring buffer callback) as an event struct."""
        if self.event_type is None:
            raise TypeError(f"ring buffer {self.name}: the compiler reported no event layout")
        return ctypes.cast(data, ctypes.POINTER(self.event_type)).contents

    def open_ring_buffer(self, callback: Callable[[object, int, int], object]) -> None:
        """Deliver every record to `callback(ctx, data, size)` from the module's ring_buffer_poll()."""
        if self._poller is None:
            raise RuntimeError(f"ring buffer {self.name} has no poller")
        self._poller.add(self.fd, callback)

    def __len__(self) -> int:
        return 0


def map_for(name: str, fd: int, key_type: type | None, leaf_type: type | None, event_type: type | None = None,
            poller: bpfsys.RingBufferPoller | None = None) -> Map:
    """The right wrapper for the map behind `fd` (its type asked from the kernel)."""
    info = bpfsys.map_info(fd)
    if info.type == bpfsys.MAP_RINGBUF:
        return RingBuf(name, fd, info, None, None, event_type=event_type, poller=poller)
    return Map(name, fd, info, key_type, leaf_type)
