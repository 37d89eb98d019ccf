"""The ``paths`` message codec: what an agent builds is read back as sent; anything
outside the format (unknown or missing fields, out-of-range numbers, duplicate peers,
too many entries) is refused with a PathReportError naming the field."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wiregate.errors import BadInput
from wiregate.mapwire import AgentEndpoints, parse_agent_frame
from wiregate.pathwire import (
    LIMITS,
    MAX_PATH_ENTRIES,
    MAX_REASON,
    PATH_KINDS,
    PathEntry,
    PathReportError,
    PathsReport,
    build_paths,
    entry_json,
    read_paths,
)

ENTRY = PathEntry("dev_0123456789abcdef", 1360, False, 1, 3, "direct", None,
                  "handshake on the direct endpoint", 12.5, 0.8)  # fmt: skip


def entries() -> st.SearchStrategy[PathEntry]:
    def num(name: str) -> st.SearchStrategy[float]:
        low, high = LIMITS[name]
        return st.floats(low, high, allow_nan=False)

    def count(name: str) -> st.SearchStrategy[int]:
        low, high = LIMITS[name]
        return st.integers(int(low), int(high))

    return st.builds(
        PathEntry,
        peer=st.from_regex(r"[A-Za-z0-9_-]{1,32}", fullmatch=True),
        path_mtu=st.none() | count("path_mtu"),
        black_hole=st.booleans(),
        frag_needed=count("frag_needed"),
        probe_failures=count("probe_failures"),
        path=st.sampled_from(sorted(PATH_KINDS)),
        relay=st.none() | st.from_regex(r"[A-Za-z0-9_.:-]{1,64}", fullmatch=True),
        reason=st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=MAX_REASON),
        handshake_age=st.none() | num("handshake_age"),
        rtt_ms=st.none() | num("rtt_ms"),
    )


@given(st.lists(entries(), max_size=8, unique_by=lambda e: e.peer))
def test_what_is_built_is_read_back(sent: list[PathEntry]) -> None:
    text = json.dumps(build_paths(sent))
    report = parse_agent_frame(text)
    assert report == PathsReport(tuple(sent))


def test_endpoints_messages_still_read_as_before() -> None:
    report = parse_agent_frame('{"type": "endpoints", "endpoints": ["192.0.2.1:51820"]}')
    assert report == AgentEndpoints(["192.0.2.1:51820"])


def _with(**changes: Any) -> dict[str, Any]:
    return {"type": "paths", "paths": [{**entry_json(ENTRY), **changes}]}


REFUSED: list[tuple[str, Any, str]] = [
    ("not an object", [], "type 'paths'"),
    ("unknown top-level field", {"type": "paths", "paths": [], "extra": 1}, "unknown fields"),
    ("paths not a list", {"type": "paths", "paths": {}}, "expected a list"),
    ("too many entries", {"type": "paths", "paths": [entry_json(ENTRY)] * (MAX_PATH_ENTRIES + 1)},
     "at most 256"),
    ("entry not an object", {"type": "paths", "paths": [1]}, r"paths\[0\]: expected an object"),
    ("unknown entry field", _with(mss=1), r"paths\[0\]: unknown fields: \"mss\""),
    ("missing field", {"type": "paths", "paths": [{k: v for k, v in entry_json(ENTRY).items()
                                                   if k != "rtt_ms"}]}, "missing: \"rtt_ms\""),
    ("duplicate peer", {"type": "paths", "paths": [entry_json(ENTRY)] * 2}, "listed twice"),
    ("peer not an id", _with(peer="../etc"), r"paths\[0\].peer"),
    ("peer too long", _with(peer="d" * 33), r"paths\[0\].peer"),
    ("path MTU too small", _with(path_mtu=67), "path_mtu: expected an integer from 68"),
    ("path MTU too large", _with(path_mtu=65536), "path_mtu"),
    ("path MTU a float", _with(path_mtu=1400.0), "path_mtu"),
    ("path MTU a bool", _with(path_mtu=True), "path_mtu"),
    ("negative count", _with(frag_needed=-1), "frag_needed"),
    ("count too large", _with(probe_failures=2**31), "probe_failures"),
    ("count null", _with(probe_failures=None), "probe_failures"),
    ("black hole as int", _with(black_hole=1), "black_hole: expected true or false"),
    ("unknown path kind", _with(path="teleport"), "path: expected one of"),
    ("relay not an id", _with(relay="relay one"), "relay"),
    ("reason too long", _with(reason="x" * (MAX_REASON + 1)), "reason"),
    ("reason with a newline", _with(reason="a\nb"), "reason"),
    ("negative handshake age", _with(handshake_age=-1), "handshake_age"),
    ("RTT a string", _with(rtt_ms="1"), "rtt_ms"),
    ("RTT a bool", _with(rtt_ms=False), "rtt_ms"),
    ("RTT infinite", _with(rtt_ms=float("inf")), "rtt_ms"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "doc", "match"), REFUSED, ids=[c[0] for c in REFUSED])
def test_refused(case: str, doc: Any, match: str) -> None:
    with pytest.raises(PathReportError, match=match) as info:
        read_paths(doc)
    assert isinstance(info.value, BadInput) and info.value.code == "bad_path_report"


def test_nan_in_the_text_is_refused() -> None:
    text = json.dumps(_with(rtt_ms=1.0)).replace("1.0", "NaN")
    with pytest.raises(PathReportError, match="NaN is not JSON"):
        parse_agent_frame(text)


def test_build_refuses_more_than_a_message_holds() -> None:
    with pytest.raises(ValueError, match="at most"):
        build_paths([ENTRY] * (MAX_PATH_ENTRIES + 1))


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
                    max_leaves=20))  # fmt: skip
def test_anything_else_raises_only_bad_input(doc: Any) -> None:
    with contextlib.suppress(BadInput):
        read_paths({"type": "paths", "paths": [doc]})


def test_a_repeated_key_is_refused() -> None:
    text = json.dumps(_with(path_mtu=1400)).replace(
        '"path_mtu": 1400', '"path_mtu": 1400, "path_mtu": 9000'
    )
    with pytest.raises(PathReportError, match="appears twice"):
        parse_agent_frame(text)
    with pytest.raises(PathReportError, match="appears twice"):
        parse_agent_frame('{"type": "paths", "type": "paths", "paths": []}')
