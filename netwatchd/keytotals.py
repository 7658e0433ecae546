"""Per-label totals from whole reads of a kernel map of cumulative (packets, bytes) per key, at C speed.

The drops map holds one entry per flow-ish key: 10k active keys are normal. Each read (a batched lookup: all
keys and all values as two byte buffers) must turn every key's growth since the previous read into its label
set's totals. Doing that with one dict update per key costs ~3 us a key in Python; here it is done per label
set instead, with C loops (list(map(dict.get, ...)), operator.itemgetter gathers, sum()):

- **same keys as last time** (no insert, no delete: a hash map's batch order is then stable, and that is the
  steady state): each label set's growth is the change of the summed values of a fixed set of positions;
- **keys changed**: positions are matched to the previous read through a key -> position index, and a label
  set's growth is its summed values now minus its keys' summed values then (new keys count from zero).

A key the kernel deleted and re-created (only after our own eviction, which calls `forget`) counts from zero;
a key whose labels are not known yet (`None`: over the labelling budget) is held at its last value and
counted, from there, once labelled. Totals only ever grow.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from itertools import repeat
from operator import itemgetter, lt

Labels = tuple[str, ...]


def gather(positions: list[int]):
    """A C-speed function array -> tuple of the values at `positions` (a tuple also for one position)."""
    if len(positions) == 1:
        return lambda a, i=positions[0]: (a[i],)
    return itemgetter(*positions)


def growth(now_p: tuple, now_b: tuple, then_p: tuple, then_b: tuple) -> tuple[int, int]:
    """Summed (packets, bytes) growth of a set of keys; a key whose packets went down was deleted and
    re-created by someone else since (the kernel counts it from zero): its whole value is growth."""
    if not any(map(lt, now_p, then_p)):
        return sum(now_p) - sum(then_p), sum(now_b) - sum(then_b)
    dp = db = 0
    for cp, tp, cb, tb in zip(now_p, then_p, now_b, then_b, strict=True):
        dp, db = (dp + cp - tp, db + cb - tb) if cp >= tp else (dp + cp, db + cb)
    return dp, db


def key_slices(keys: bytes, key_size: int) -> list[bytes]:
    return [keys[i:i + key_size] for i in range(0, len(keys), key_size)]


class KeyTotals:
    """See module docstring. `packets` and `bytes` are the label -> total dicts it adds to."""

    def __init__(self, packets: dict[Labels, int], nbytes: dict[Labels, int]) -> None:
        self.packets, self.bytes = packets, nbytes
        self._keys: bytes | None = None  # the previous read, as returned
        self._vals = array("Q")  # its values: packets, bytes per position
        self._key_list: list[bytes] = []
        self._index: dict[bytes, int] = {}  # key -> position in the previous read, for counted keys only
        self._held: dict[bytes, tuple[int, int]] = {}  # uncounted (unlabelled) keys: last counted values
        self._groups: list[list] | None = None  # [labels, gather packets, gather bytes, last p, last b]
        self._prev_vals: array | None = None  # the read before the previous one (idle keys)
        self._match: tuple | None = None  # how the previous read's positions matched the one before

    def same_keys(self, keys: bytes) -> bool:
        """True when `keys` are exactly the previous read's and every one of them was counted (fast path)."""
        return self._groups is not None and keys == self._keys

    def advance(self, values: bytes) -> None:
        """Fast path (see same_keys): fold a read whose keys are the previous read's."""
        vals = array("Q")
        vals.frombytes(values)
        assert self._groups is not None
        for g in self._groups:
            p = g[1](vals)
            if p != g[3]:
                b = g[2](vals)
                self._add(g[0], *growth(p, b, g[3], g[4]))
                g[3], g[4] = p, b
        self._prev_vals, self._vals = self._vals, vals

    def read(self, keys: bytes, values: bytes, key_size: int, key_list: list[bytes],
             labels: list[Labels | None]) -> None:
        """Fold a read whose keys may differ from the previous one. `labels[i]` is the label set of the key at
        position i, None when not known yet (that key is held: not counted now, counted later from here)."""
        vals = array("Q")
        vals.frombytes(values)
        n = len(key_list)
        prev = self._vals[:]
        zero = len(prev) // 2
        prev.extend((0, 0))  # position `zero`: a key not seen before counts from zero
        js = list(map(self._index.get, key_list, repeat(zero)))
        held = self._held
        if held:  # labelled keys held at old values: their own last values, through extra positions
            for i in [i for i, k in enumerate(key_list) if k in held]:
                if labels[i] is not None:
                    js[i] = len(prev) // 2
                    prev.extend(held.pop(key_list[i]))
        by_label: dict[Labels, list[int]] = {}
        for i, lab in enumerate(labels):
            if lab is not None:
                by_label.setdefault(lab, []).append(i)
        groups: list[list] = []
        for lab, idx in by_label.items():
            get_p, get_b = gather([2 * i for i in idx]), gather([2 * i + 1 for i in idx])
            now_p, now_b = get_p(vals), get_b(vals)
            dp, db = growth(now_p, now_b, gather([2 * js[i] for i in idx])(prev),
                            gather([2 * js[i] + 1 for i in idx])(prev))
            if dp:
                self._add(lab, dp, db)
            groups.append([lab, get_p, get_b, now_p, now_b])
        # Keys still unlabelled keep their last counted values (zero for new ones: nothing to keep).
        for i in [i for i, lab in enumerate(labels) if lab is None]:
            j = js[i]
            if j != zero and key_list[i] not in held:
                held[key_list[i]] = (prev[2 * j], prev[2 * j + 1])
        index = dict(zip(key_list, range(n), strict=True))
        for k in [k for k, lab in zip(key_list, labels, strict=True) if lab is None]:
            del index[k]
        self._keys, self._key_list, self._index = keys, key_list, index
        self._prev_vals = None  # positions moved: idle_keys() compares each key with its matched position
        self._match = (js, prev, zero, labels)
        self._vals = vals
        self._groups = groups if len(index) == n else None  # keys held back: no fast path until counted

    def _add(self, labels: Labels, dp: int, db: int) -> None:
        self.packets[labels] = self.packets.get(labels, 0) + dp
        self.bytes[labels] = self.bytes.get(labels, 0) + db

    def idle_keys(self) -> list[bytes]:
        """Keys whose packets did not grow between the last two reads (safe to evict: totals are kept)."""
        v = self._vals
        if self._prev_vals is None:
            if self._match is None:
                return []
            js, prev, zero, labels = self._match
            return [k for i, k in enumerate(self._key_list)
                    if labels[i] is not None and js[i] != zero and v[2 * i] == prev[2 * js[i]]]
        p = self._prev_vals
        return [k for i, k in enumerate(self._key_list) if v[2 * i] == p[2 * i]]

    def forget(self, keys: Iterable[bytes]) -> None:
        """Keys deleted from the map: if they come back, they count from zero."""
        for k in keys:
            self._index.pop(k, None)
            self._held.pop(k, None)
        self._groups = None

    def relabel(self) -> None:
        """Labels of known keys may change (identity moved, a pod's series removed): no fast path until the next
        full read has matched every key again."""
        self._groups = None

    def last(self, key: bytes) -> tuple[int, int] | None:
        """(packets, bytes) of `key` as last counted; None when never counted."""
        if key in self._held:
            return self._held[key]
        j = self._index.get(key)
        return None if j is None else (self._vals[2 * j], self._vals[2 * j + 1])
