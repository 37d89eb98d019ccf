"""The path matrix's pure parts: the report gate, which entries are kept, MTU bands,
the grouped matrix, and the figures the metrics export."""

from __future__ import annotations

import dataclasses

from gateway.pathmatrix import (
    BURST,
    MTU_BUCKETS,
    STALE_AFTER,
    Matrix,
    Node,
    ReportGate,
    Summary,
    admitted,
    band,
    pair_view,
)
from wiregate.pathwire import PathEntry, PathsReport

T0 = 1_800_000_000.0
E = PathEntry("b", 1420, False, 0, 0, "direct", None, "", 1.0, 0.5)
A, B, C, D = (Node("a", "alpha", ("tag:web",)), Node("b", "bravo", ("tag:db",)),
              Node("c", "charlie", ()), Node("d", "delta", ("tag:web", "tag:x")))  # fmt: skip


def test_the_gate_admits_a_burst_then_the_rate() -> None:
    gate = ReportGate(burst=BURST, rate=0.1)
    assert all(gate.admit("a", T0) for _ in range(BURST))
    assert not gate.admit("a", T0) and not gate.admit("a", T0 + 5)
    assert gate.admit("b", T0)  # another device has its own bucket
    assert gate.admit("a", T0 + 10.1) and not gate.admit("a", T0 + 10.2)


def test_only_entries_about_own_peers_are_kept() -> None:
    report = PathsReport((E, dataclasses.replace(E, peer="z"), dataclasses.replace(E, peer="a")))
    kept, refused = admitted("a", report, lambda x, y: {x, y} == {"a", "b"})
    assert kept == [E] and refused == 2  # a stranger, and itself


def test_bands() -> None:
    assert band(None, False) == "unknown" and band(1280, True) == "black-hole"
    assert band(1420, False) == "mtu-1420" and band(1421, False) == "mtu-1440"
    assert band(100, False) == f"mtu-{MTU_BUCKETS[0]}" and band(9001, False) == "mtu-inf"


def test_the_matrix_groups_by_first_tag_untagged_last() -> None:
    pairs = [pair_view(A, B, E, T0, T0 + 1)]
    matrix = Matrix.build([C, B, D, A], pairs)
    assert [(g, [n.id for n in m]) for g, m in matrix.groups] == [
        ("tag:db", ["b"]), ("tag:web", ["a", "d"]), ("untagged", ["c"])]  # fmt: skip
    assert [n.id for n in matrix.nodes] == ["b", "a", "d", "c"]
    cell = matrix.cell("a", "b")
    assert cell is not None and cell.band == "mtu-1420" and not cell.stale and cell.age == 1
    assert matrix.cell("b", "a") is None


def test_the_summary_counts_fresh_pairs_into_buckets() -> None:
    pairs = [
        pair_view(A, B, E, T0, T0),
        pair_view(B, A, dataclasses.replace(E, peer="a", path_mtu=1280, black_hole=True,
                                            frag_needed=2, probe_failures=5), T0, T0),
        pair_view(A, C, dataclasses.replace(E, peer="c", path_mtu=None, path="relayed"), T0, T0),
        pair_view(C, A, dataclasses.replace(E, peer="a"), T0, T0 + STALE_AFTER + 1),
    ]  # fmt: skip
    s = Summary.of(pairs)
    assert (s.pairs, s.stale, s.unprobed, s.black_holes) == (3, 1, 1, 1)
    assert (s.frag_needed, s.probe_failures, s.mtu_sum) == (2, 5, 1420 + 1280)
    assert s.by_path == {"direct": 2, "failed": 0, "probing": 0, "relayed": 1}
    buckets = dict(s.buckets)
    assert buckets["1200"] == 0 and buckets["1280"] == 1 and buckets["1420"] == 2
    assert buckets["+Inf"] == 2 and list(buckets)[-1] == "+Inf"
