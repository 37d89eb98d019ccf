"""What agents send on the map stream (wiregate.mapwire): generated messages and garbage.

Valid messages give their endpoints in canonical form, deduplicated, in order,
and the canonical form is a fixed point; any other JSON value, in any field,
and any text (or bytes) is refused with :class:`BadInput` only.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wiregate.errors import BadInput
from wiregate.mapwire import MAX_ENDPOINTS, NAT_TYPES, parse_agent_message, parse_endpoint
from wiregate.net import destination_refusal

endpoints = st.one_of(  # addresses a peer may be sent to (the others are refused)
    st.builds(
        lambda a, p: (f"{a}:{p}", f"{a}:{p}"),
        st.ip_addresses(v=4).filter(lambda a: destination_refusal(a) is None),
        st.integers(1, 65535),
    ),
    st.builds(
        lambda a, p: (f"[{a.exploded}]:{p}", f"[{a}]:{p}"),
        st.ip_addresses(v=6).filter(lambda a: destination_refusal(a) is None),
        st.integers(1, 65535),
    ),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=80),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=20,
)


def refused_or_parsed(data: str | bytes) -> None:
    with contextlib.suppress(BadInput):
        report = parse_agent_message(data)
        assert len(report.endpoints) <= MAX_ENDPOINTS
        assert report.nat is None or report.nat in NAT_TYPES
        assert all(parse_endpoint(e) == e for e in report.endpoints)


@given(st.lists(endpoints, max_size=MAX_ENDPOINTS), st.none() | st.sampled_from(sorted(NAT_TYPES)))
def test_valid_messages_give_canonical_endpoints(pairs: list[tuple[str, str]], nat: Any) -> None:
    msg: dict[str, Any] = {"type": "endpoints", "endpoints": [sent for sent, _ in pairs]}
    if nat is not None:
        msg["nat"] = nat
    report = parse_agent_message(json.dumps(msg))
    assert report.endpoints == list(dict.fromkeys(canonical for _, canonical in pairs))
    assert report.nat == nat
    assert [parse_endpoint(e) for e in report.endpoints] == report.endpoints


@given(st.sampled_from(["type", "endpoints", "nat", "extra"]), json_values)
def test_any_value_in_any_field_is_parsed_or_refused(field: str, value: Any) -> None:
    msg = {"type": "endpoints", "endpoints": ["192.0.2.1:51820"], "nat": "eim", field: value}
    refused_or_parsed(json.dumps(msg))


@given(json_values)
def test_any_json_document_is_parsed_or_refused(value: Any) -> None:
    refused_or_parsed(json.dumps(value))


@given(st.lists(json_values, max_size=5))
def test_any_json_in_the_endpoint_list_is_parsed_or_refused(values: list[Any]) -> None:
    refused_or_parsed(json.dumps({"type": "endpoints", "endpoints": values}))


@given(st.text(max_size=200))
def test_any_text_is_parsed_or_refused(text: str) -> None:
    refused_or_parsed(text)


@given(st.binary(max_size=50))
def test_any_bytes_are_parsed_or_refused(data: bytes) -> None:
    refused_or_parsed(data)


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
        parse_agent_message(data.decode())


def test_refused_addresses_are_left_out_and_the_report_kept() -> None:
    sent = ["127.0.0.1:51820", "[2002:a9fe:a9fe::1]:51820", "203.0.113.7:51820", "0.1.2.3:9"]
    report = parse_agent_message(json.dumps({"type": "endpoints", "endpoints": sent}))
    assert report.endpoints == ["203.0.113.7:51820"]
    with pytest.raises(BadInput):
        parse_agent_message(json.dumps({"type": "endpoints", "endpoints": ["127.0.0.1:0"]}))
