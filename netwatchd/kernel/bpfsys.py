"""The few bpf(2) operations the long-running daemon needs, through Debian's libbpf (`libbpf.so.1`, ctypes).

BCC compiles and loads our programs in a short-lived child (`netwatchd.probes.compiler`); the daemon only
holds file descriptors. This module is everything it does with them: map element lookup/update/delete and
key iteration, batched lookups in chunks, map metadata, attaching tracepoints (perf_event_open +
PERF_EVENT_IOC_SET_BPF) and raw tracepoints (BPF_RAW_TRACEPOINT_OPEN), and ring buffer consumption. libbpf's
low-level calls are thin syscall wrappers (no object files, no BTF) and return -errno on failure.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

LIBBPF = "libbpf.so.1"

# enum bpf_map_type (include/uapi/linux/bpf.h)
MAP_HASH, MAP_ARRAY, MAP_PERCPU_HASH, MAP_PERCPU_ARRAY = 1, 2, 5, 6
MAP_LRU_HASH, MAP_LRU_PERCPU_HASH, MAP_LPM_TRIE = 9, 10, 11
MAP_QUEUE, MAP_STACK, MAP_RINGBUF = 22, 23, 27
PERCPU_TYPES = frozenset({MAP_PERCPU_HASH, MAP_PERCPU_ARRAY, MAP_LRU_PERCPU_HASH, 21})  # 21: percpu cgroup storage
ARRAY_TYPES = frozenset({MAP_ARRAY, MAP_PERCPU_ARRAY})
# Map types whose kernel implementation has BPF_MAP_LOOKUP_BATCH (hash family and arrays).
BATCH_TYPES = frozenset({MAP_HASH, MAP_ARRAY, MAP_PERCPU_HASH, MAP_PERCPU_ARRAY, MAP_LRU_HASH, MAP_LRU_PERCPU_HASH})

BPF_ANY = 0
_SYS_PERF_EVENT_OPEN = 298  # x86_64
_PERF_TYPE_TRACEPOINT = 2
_PERF_SAMPLE_RAW = 1 << 10
_PERF_FLAG_FD_CLOEXEC = 1 << 3
_PERF_EVENT_IOC_ENABLE = 0x2400  # _IO('$', 0)
_PERF_EVENT_IOC_SET_BPF = 0x40042408  # _IOW('$', 8, __u32)
_PERF_ATTR_SIZE = 112  # PERF_ATTR_SIZE_VER5: every field we set is in it; the rest stays zero

RingBufferCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)

_lib: ctypes.CDLL | None = None
_lib_lock = threading.Lock()


class BpfError(OSError):
    """A failed bpf operation: errno plus what was attempted."""


def available() -> str | None:
    """None when libbpf can be loaded, else why not (for the start-up preflight)."""
    try:
        lib()
        return None
    except OSError as exc:
        return str(exc)


def lib() -> ctypes.CDLL:
    """libbpf with the prototypes we use (loaded once)."""
    global _lib
    with _lib_lock:
        if _lib is None:
            _lib = _load()
        return _lib


def _load() -> ctypes.CDLL:
    c = ctypes.CDLL(LIBBPF, use_errno=True)
    vp, i, u32p = ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_uint32)
    protos = {
        "bpf_map_lookup_elem": (i, [i, vp, vp]),
        "bpf_map_update_elem": (i, [i, vp, vp, ctypes.c_uint64]),
        "bpf_map_delete_elem": (i, [i, vp]),
        "bpf_map_get_next_key": (i, [i, vp, vp]),
        "bpf_map_lookup_batch": (i, [i, vp, vp, vp, vp, u32p, vp]),
        "bpf_map_delete_batch": (i, [i, vp, u32p, vp]),
        "bpf_map_update_batch": (i, [i, vp, vp, u32p, vp]),
        "bpf_obj_get_info_by_fd": (i, [i, vp, u32p]),
        "bpf_raw_tracepoint_open": (i, [ctypes.c_char_p, i]),
        "libbpf_num_possible_cpus": (i, []),
        "ring_buffer__new": (vp, [i, RingBufferCallback, vp, vp]),
        "ring_buffer__add": (i, [vp, i, RingBufferCallback, vp]),
        "ring_buffer__poll": (i, [vp, i]),
        "ring_buffer__free": (None, [vp]),
    }
    for name, (res, args) in protos.items():
        fn = getattr(c, name)
        fn.restype, fn.argtypes = res, args
    return c


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = -ret if ret < -1 else ctypes.get_errno() or errno.EIO
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return ret


_ncpus: int | None = None


def possible_cpus() -> int:
    """Number of possible CPUs: per-CPU map values hold one slot for each."""
    global _ncpus
    if _ncpus is None:
        _ncpus = _check(lib().libbpf_num_possible_cpus(), "libbpf_num_possible_cpus")
    return _ncpus


def percpu_stride(value_size: int) -> int:
    """Bytes per CPU in a per-CPU value buffer: the kernel rounds each CPU's value up to 8 bytes."""
    return (value_size + 7) & ~7


# ---------------------------------------------------------------------------------------------------------
# Map elements
# ---------------------------------------------------------------------------------------------------------


def lookup(fd: int, key, value) -> bool:
    """Fill `value` (a writable ctypes object/buffer) for `key`; False when the key is absent."""
    ret = lib().bpf_map_lookup_elem(fd, key, value)
    if ret < 0 and (-ret if ret < -1 else ctypes.get_errno()) == errno.ENOENT:
        return False
    _check(ret, f"lookup in map fd {fd}")
    return True


def update(fd: int, key, value, flags: int = BPF_ANY) -> None:
    _check(lib().bpf_map_update_elem(fd, key, value, flags), f"update of map fd {fd}")


def delete(fd: int, key) -> bool:
    """Delete `key`; False when it was absent."""
    ret = lib().bpf_map_delete_elem(fd, key)
    if ret < 0 and (-ret if ret < -1 else ctypes.get_errno()) == errno.ENOENT:
        return False
    _check(ret, f"delete in map fd {fd}")
    return True


def next_key(fd: int, key, out) -> bool:
    """Write the key after `key` (None: the first key) into `out`; False at the end."""
    ret = lib().bpf_map_get_next_key(fd, key, out)
    if ret < 0 and (-ret if ret < -1 else ctypes.get_errno()) == errno.ENOENT:
        return False
    _check(ret, f"get_next_key in map fd {fd}")
    return True


def update_batch(fd: int, keys: bytes, values: bytes, key_size: int) -> None:
    """Set many (key, value) pairs (concatenated, in the same order) with BPF_MAP_UPDATE_BATCH."""
    n = len(keys) // key_size
    count = ctypes.c_uint32(n)
    kbuf = ctypes.create_string_buffer(keys, len(keys))
    vbuf = ctypes.create_string_buffer(values, len(values))
    _check(lib().bpf_map_update_batch(fd, kbuf, vbuf, ctypes.byref(count), None), f"update_batch of map fd {fd}")
    if count.value != n:
        raise BpfError(errno.EIO, f"update_batch of map fd {fd}: {count.value} of {n} written")


def delete_batch(fd: int, keys: bytes, key_size: int) -> int:
    """Delete many keys (concatenated) in as few BPF_MAP_DELETE_BATCH calls as possible; a key already gone
    stops a call where it is (-ENOENT): skip it and go on. Returns how many were deleted."""
    lb = lib()
    n, done, deleted = len(keys) // key_size, 0, 0
    buf = ctypes.create_string_buffer(keys, len(keys))
    base = ctypes.addressof(buf)
    count = ctypes.c_uint32()
    while done < n:
        count.value = n - done
        ret = lb.bpf_map_delete_batch(fd, base + done * key_size, ctypes.byref(count), None)
        err = 0 if ret >= 0 else (-ret if ret < -1 else ctypes.get_errno())
        deleted += count.value
        done += count.value
        if err == errno.ENOENT:
            done += 1  # the key at `done` was not there
        elif err:
            raise BpfError(err, f"delete_batch in map fd {fd}: {os.strerror(err)}")
    return deleted


class BatchBuffers:
    """Scratch buffers for lookup_batch, kept by the caller between reads (no allocation and zeroing of a few
    hundred KiB on every read of a big map)."""

    def __init__(self) -> None:
        self.keys: ctypes.Array | None = None
        self.values: ctypes.Array | None = None

    def get(self, key_bytes: int, value_bytes: int) -> tuple[ctypes.Array, ctypes.Array]:
        if self.keys is None or len(self.keys) < key_bytes:
            self.keys = ctypes.create_string_buffer(key_bytes)
        if self.values is None or len(self.values) < value_bytes:
            self.values = ctypes.create_string_buffer(value_bytes)
        return self.keys, self.values


def lookup_batch(fd: int, key_size: int, value_size: int, chunk: int = 4096,
                 scratch: BatchBuffers | None = None) -> tuple[bytes, bytes, int]:
    """Every (key, value) of a map through BPF_MAP_LOOKUP_BATCH, `chunk` entries per call.

    Returns (concatenated keys, concatenated values, count). `value_size` is the size of one element's value
    as the kernel copies it (for per-CPU maps: stride x possible CPUs). The kernel hands back a resume token
    in `out_batch` that goes into the next call's `in_batch` (a bucket number for hashes, a key for arrays:
    key_size bytes are always enough); -ENOENT marks the last chunk. A hash bucket larger than the chunk
    gives -ENOSPC without progress: retry with a bigger chunk.
    """
    lb = lib()
    tok_size = max(key_size, 8)
    tokens = (ctypes.create_string_buffer(tok_size), ctypes.create_string_buffer(tok_size))
    key_parts: list[bytes] = []
    value_parts: list[bytes] = []
    total, first = 0, True
    scratch = scratch or BatchBuffers()
    count = ctypes.c_uint32()
    while True:
        kbuf, vbuf = scratch.get(chunk * key_size, chunk * value_size)
        count.value = chunk
        in_batch = None if first else tokens[0]
        ret = lb.bpf_map_lookup_batch(fd, in_batch, tokens[1], kbuf, vbuf, ctypes.byref(count), None)
        err = 0 if ret >= 0 else (-ret if ret < -1 else ctypes.get_errno())
        if err not in (0, errno.ENOENT):
            if err == errno.ENOSPC and count.value == 0 and chunk < 1 << 20:
                chunk *= 4
                continue
            raise BpfError(err, f"lookup_batch of map fd {fd}: {os.strerror(err)}")
        n = count.value
        if n:  # copy out only what the kernel wrote
            key_parts.append(ctypes.string_at(kbuf, n * key_size))
            value_parts.append(ctypes.string_at(vbuf, n * value_size))
        total += n
        if err == errno.ENOENT:
            if len(key_parts) == 1:
                return key_parts[0], value_parts[0], total
            return b"".join(key_parts), b"".join(value_parts), total
        tokens = (tokens[1], tokens[0])
        first = False


@dataclass(frozen=True)
class MapInfo:
    """What the kernel says about a map (BPF_OBJ_GET_INFO_BY_FD, struct bpf_map_info)."""

    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str


def map_info(fd: int) -> MapInfo:
    buf = ctypes.create_string_buffer(128)
    size = ctypes.c_uint32(len(buf))
    _check(lib().bpf_obj_get_info_by_fd(fd, buf, ctypes.byref(size)), f"info of map fd {fd}")
    mtype, mid, ks, vs, me, flags = struct.unpack_from("=6I", buf.raw)
    name = buf.raw[24:40].split(b"\0", 1)[0].decode(errors="replace")
    return MapInfo(mtype, mid, ks, vs, me, flags, name)


# ---------------------------------------------------------------------------------------------------------
# Attaching programs
# ---------------------------------------------------------------------------------------------------------


def tracepoint_id(tracefs: Path, target: str) -> int:
    """The id of tracepoint `category:event` (tracefs events/<category>/<event>/id)."""
    category, _, event = target.partition(":")
    try:
        return int((Path(tracefs) / "events" / category / event / "id").read_text())
    except (OSError, ValueError) as exc:
        raise BpfError(errno.ENOENT, f"tracepoint {target} not found under {tracefs}: {exc}") from None


def attach_tracepoint(prog_fd: int, tracefs: Path, target: str) -> int:
    """Attach a BPF_PROG_TYPE_TRACEPOINT program; returns the perf event fd (closing it detaches).

    One perf event (any pid, CPU 0) is enough: a tracepoint's BPF program runs on every CPU.
    """
    attr = bytearray(_PERF_ATTR_SIZE)
    struct.pack_into("=IIQQQ", attr, 0, _PERF_TYPE_TRACEPOINT, _PERF_ATTR_SIZE, tracepoint_id(tracefs, target),
                     1, _PERF_SAMPLE_RAW)  # type, size, config, sample_period, sample_type
    struct.pack_into("=I", attr, 48, 1)  # wakeup_events
    buf = (ctypes.c_char * len(attr)).from_buffer(attr)
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(_SYS_PERF_EVENT_OPEN, buf, -1, 0, -1, _PERF_FLAG_FD_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"perf_event_open of tracepoint {target}: {os.strerror(err)}")
    try:
        fcntl.ioctl(fd, _PERF_EVENT_IOC_SET_BPF, prog_fd)
        fcntl.ioctl(fd, _PERF_EVENT_IOC_ENABLE, 0)
    except OSError as exc:
        os.close(fd)
        raise BpfError(exc.errno, f"attaching to tracepoint {target}: {exc.strerror}") from None
    return fd


def attach_raw_tracepoint(prog_fd: int, target: str) -> int:
    """Attach a BPF_PROG_TYPE_RAW_TRACEPOINT program; returns the attachment fd (closing it detaches)."""
    return _check(lib().bpf_raw_tracepoint_open(target.encode(), prog_fd), f"raw tracepoint {target}")


# ---------------------------------------------------------------------------------------------------------
# Ring buffers
# ---------------------------------------------------------------------------------------------------------


class RingBufferPoller:
    """libbpf's ring_buffer manager over one or more BPF_MAP_TYPE_RINGBUF maps; callbacks run in poll()."""

    def __init__(self) -> None:
        self._rb: int | None = None
        self._callbacks: list = []  # ctypes callbacks must outlive the manager

    def add(self, map_fd: int, callback) -> None:
        """`callback(ctx, data, size)`: data is the address of one record; return 0 to go on."""
        cb = RingBufferCallback(lambda ctx, data, size: int(callback(ctx, data, size) or 0))
        self._callbacks.append(cb)
        if self._rb is None:
            rb = lib().ring_buffer__new(map_fd, cb, None, None)
            if not rb:
                err = ctypes.get_errno() or errno.EINVAL
                raise BpfError(err, f"ring_buffer__new on map fd {map_fd}: {os.strerror(err)}")
            self._rb = rb
        else:
            _check(lib().ring_buffer__add(self._rb, map_fd, cb, None), f"ring_buffer__add of map fd {map_fd}")

    def poll(self, timeout_ms: int) -> int:
        """Consume available records (waiting up to timeout_ms); returns how many, or 0 when closed."""
        if self._rb is None:
            return 0
        ret = lib().ring_buffer__poll(self._rb, timeout_ms)
        if ret < 0 and -ret != errno.EINTR:
            _check(ret, "ring_buffer__poll")
        return max(ret, 0)

    def close(self) -> None:
        """Free the manager; call only when no thread is inside poll()."""
        if self._rb is not None:
            lib().ring_buffer__free(self._rb)
            self._rb = None
        self._callbacks.clear()
