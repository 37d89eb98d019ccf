"""What agents send on the map stream (wiregate.mapwire): generated messages and garbage.

Valid messages give their endpoints in canonical form, deduplicated, in order,
and the canonical form is a fixed point; any other JSON value, in any field,
any text and any frame kind is refused with :class:`BadInput` only.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from aiohttp import WSMsgType
from hypothesis import given
from hypothesis import strategies as st

from wiregate.errors import BadInput
from wiregate.mapwire import MAX_ENDPOINTS, NAT_TYPES, parse_agent_message, parse_endpoint

TEXT = WSMsgType.TEXT
endpoints = st.one_of(
    st.builds(lambda a, p: (f"{a}:{p}", f"{a}:{p}"), st.ip_addresses(v=4), st.integers(1, 65535)),
    st.builds(
        lambda a, p: (f"[{a.exploded}]:{p}", f"[{a}]:{p}"),
        st.ip_addresses(v=6),
        st.integers(1, 65535),
    ),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=80),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=20,
)


def refused_or_parsed(kind: WSMsgType, data: Any) -> None:
    with contextlib.suppress(BadInput):
        report = parse_agent_message(kind, data)
        assert len(report.endpoints) <= MAX_ENDPOINTS
        assert report.nat is None or report.nat in NAT_TYPES
        assert all(parse_endpoint(e) == e for e in report.endpoints)


@given(st.lists(endpoints, max_size=MAX_ENDPOINTS), st.none() | st.sampled_from(sorted(NAT_TYPES)))
def test_valid_messages_give_canonical_endpoints(pairs: list[tuple[str, str]], nat: Any) -> None:
    msg: dict[str, Any] = {"type": "endpoints", "endpoints": [sent for sent, _ in pairs]}
    if nat is not None:
        msg["nat"] = nat
    report = parse_agent_message(TEXT, json.dumps(msg))
    assert report.endpoints == list(dict.fromkeys(canonical for _, canonical in pairs))
    assert report.nat == nat
    assert [parse_endpoint(e) for e in report.endpoints] == report.endpoints


@given(st.sampled_from(["type", "endpoints", "nat", "extra"]), json_values)
def test_any_value_in_any_field_is_parsed_or_refused(field: str, value: Any) -> None:
    msg = {"type": "endpoints", "endpoints": ["192.0.2.1:51820"], "nat": "eim", field: value}
    refused_or_parsed(TEXT, json.dumps(msg))


@given(json_values)
def test_any_json_document_is_parsed_or_refused(value: Any) -> None:
    refused_or_parsed(TEXT, json.dumps(value))


@given(st.lists(json_values, max_size=5))
def test_any_json_in_the_endpoint_list_is_parsed_or_refused(values: list[Any]) -> None:
    refused_or_parsed(TEXT, json.dumps({"type": "endpoints", "endpoints": values}))


@given(st.text(max_size=200))
def test_any_text_is_parsed_or_refused(text: str) -> None:
    refused_or_parsed(TEXT, text)


@given(st.sampled_from([k for k in WSMsgType if k is not TEXT]), st.binary(max_size=50))
def test_frames_other_than_text_are_refused(kind: WSMsgType, data: bytes) -> None:
    with pytest.raises(BadInput):
        parse_agent_message(kind, data)


# --- regressions found by fuzzing ----------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        # nat given as a list: TypeError (unhashable) instead of BadInput
        b'{"type": "endpoints", "endpoints": [], "nat": []}',
        b'{"type": "endpoints", "endpoints": [], "nat": {}}',
        # nesting deeper than the JSON decoder's recursion limit: RecursionError
        b"[" * 100_000,
    ],
)
def test_regression_refused_with_bad_input(data: bytes) -> None:
    with pytest.raises(BadInput):
        parse_agent_message(TEXT, data.decode())
