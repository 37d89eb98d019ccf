"""Cross-peer checks on integer prefixes, maintained as peers come and go (pure).

A prefix is a :data:`Span` ``(version, first address as int, prefix length)``.
Two prefixes overlap exactly when one contains the other (prefixes nest or are
disjoint), so for a prefix P the index finds

* the prefixes containing P (or equal to it) by probing P's address masked to
  each prefix length in use — a handful of dict lookups, not 32 or 128;
* the prefixes inside P by bisecting a sorted list of (start, length) pairs:
  every entry whose start falls within P and whose length is longer is inside.

Adding or removing an owner costs time proportional to its prefixes and to the
overlaps it takes part in, not to the size of the index. Many owners at once
(a first map) are loaded in bulk: link everything, then one sorted sweep.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable, Mapping

__all__ = ["OverlapIndex", "Span"]

Span = tuple[int, int, int]  # (IP version, first address, prefix length)
_BITS = {4: 32, 6: 128}


class OverlapIndex:
    """Owners of prefixes and, for each owner, the other owners its prefixes overlap."""

    def __init__(self) -> None:
        self._owners: dict[Span, set[str]] = {}
        self._lengths: dict[int, dict[int, int]] = {4: {}, 6: {}}  # version -> {length: uses}
        self._starts: dict[int, list[tuple[int, int]]] = {4: [], 6: []}  # sorted, distinct
        self._spans: dict[str, tuple[Span, ...]] = {}
        self.clashes: dict[str, set[str]] = {}  # symmetric; owners without clashes are absent

    def __contains__(self, owner: str) -> bool:
        return owner in self._spans

    def assign(self, owner: str, spans: Iterable[Span]) -> set[str]:
        """Give ``owner`` exactly ``spans``; return every owner whose clashes may have changed."""
        affected = self.remove(owner)
        affected |= self._add(owner, tuple(dict.fromkeys(spans)))
        return affected

    def assign_many(self, spans: Mapping[str, Iterable[Span]]) -> set[str]:
        """:meth:`assign` for many owners; in bulk when they are many compared to the index."""
        if len(spans) * 4 < len(self._spans) + 4:
            affected: set[str] = set()
            for owner, owned in spans.items():
                affected |= self.assign(owner, owned)
            return affected
        before = self.clashes
        for owner in spans:
            self.remove(owner)
        for owner, owned in spans.items():
            self._spans[owner] = unique = tuple(dict.fromkeys(owned))
            for span in unique:
                self._link(span, owner, keep_sorted=False)
        for starts in self._starts.values():
            starts.sort()
        self.clashes = self._sweep()
        changed = {
            o for o in before.keys() | self.clashes.keys() if before.get(o) != self.clashes.get(o)
        }
        return changed | set(spans)

    def _sweep(self) -> dict[str, set[str]]:
        """Every clash in the index: sorted prefixes, a stack of the ones still open."""
        clashes: dict[str, set[str]] = {}
        for version, starts in self._starts.items():
            stack: list[tuple[int, set[str]]] = []  # (last address, owners)
            for start, length in starts:
                while stack and stack[-1][0] < start:
                    stack.pop()
                owners = self._owners[(version, start, length)]
                if len(owners) > 1:
                    _connect(clashes, owners, owners)
                for _, outer in stack:
                    _connect(clashes, owners, outer)
                stack.append((start + (1 << (_BITS[version] - length)) - 1, owners))
        return clashes

    def remove(self, owner: str) -> set[str]:
        """Forget ``owner``; return it and the owners it clashed with."""
        for span in self._spans.pop(owner, ()):
            self._unlink(span, owner)
        others = self.clashes.pop(owner, set())
        for other in others:
            mine = self.clashes[other]
            mine.discard(owner)
            if not mine:
                del self.clashes[other]
        return others | {owner}

    def _add(self, owner: str, spans: tuple[Span, ...]) -> set[str]:
        found: set[str] = set()
        for span in spans:
            found |= self._overlapping(span)
        found.discard(owner)
        for other in found:
            self.clashes.setdefault(owner, set()).add(other)
            self.clashes.setdefault(other, set()).add(owner)
        for span in spans:
            self._link(span, owner)
        self._spans[owner] = spans
        return found | {owner}

    def _overlapping(self, span: Span) -> set[str]:
        version, start, length = span
        bits = _BITS[version]
        result: set[str] = set()
        for used in self._lengths[version]:
            if used <= length:
                shift = bits - used
                result.update(self._owners.get((version, start >> shift << shift, used), ()))
        starts = self._starts[version]
        end = start + (1 << (bits - length)) - 1
        i = bisect_left(starts, (start, length + 1))
        while i < len(starts) and starts[i][0] <= end:
            result.update(self._owners[(version, *starts[i])])
            i += 1
        return result

    def _link(self, span: Span, owner: str, *, keep_sorted: bool = True) -> None:
        owners = self._owners.get(span)
        if owners is None:
            owners = self._owners[span] = set()
            version, start, length = span
            lengths = self._lengths[version]
            lengths[length] = lengths.get(length, 0) + 1
            if keep_sorted:
                insort(self._starts[version], (start, length))
            else:
                self._starts[version].append((start, length))
        owners.add(owner)

    def _unlink(self, span: Span, owner: str) -> None:
        owners = self._owners[span]
        owners.discard(owner)
        if owners:
            return
        del self._owners[span]
        version, start, length = span
        lengths = self._lengths[version]
        lengths[length] -= 1
        if not lengths[length]:
            del lengths[length]
        starts = self._starts[version]
        del starts[bisect_left(starts, (start, length))]


def _connect(clashes: dict[str, set[str]], these: set[str], those: set[str]) -> None:
    for a in these:
        for b in those:
            if a != b:
                clashes.setdefault(a, set()).add(b)
                clashes.setdefault(b, set()).add(a)
