"""Device names as DNS labels (pure functions) and the store's name, tag and expiry
cases on SQLite (lab/device_name_cases.py; tests/service runs them on PostgreSQL)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.store.names import check_label, given_for, next_free, to_label
from lab.device_name_cases import *  # noqa: F403 (its tests and fixtures, here on SQLite)
from wiregate.errors import BadInput


@pytest.fixture(params=["sqlite"])
def db_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'wiregate.db'}"


@pytest.mark.parametrize(
    ("requested", "label"),
    [
        ("vm-1", "vm-1"),
        ("Web_01.Prod", "web-01-prod"),
        ("node.example.com", "node-example-com"),
        ("a" * 63, "a" * 63),
        ("b" * 62 + "._", "b" * 62),
        ("_", "device"),
        ("Z9", "z9"),
    ],
)
def test_a_requested_name_becomes_a_label(requested: str, label: str) -> None:
    assert to_label(requested) == label
    assert check_label(label) == label


@pytest.mark.parametrize("bad", ["", "A", "-a", "a-", "a_b", "a.b", "a b", "a" * 64, "é"])
def test_labels_are_checked(bad: str) -> None:
    with pytest.raises(BadInput) as refused:
        check_label(bad)
    assert refused.value.code == "invalid_name" and refused.value.status == 400


def test_the_first_free_suffix_is_given() -> None:
    assert next_free("web", set()) == "web"
    assert next_free("web", {"web", "web-2", "web-4"}) == "web-3"
    long = "a" * 63
    assert next_free(long, {long}) == "a" * 61 + "-2"
    taken = {long} | {"a" * 61 + f"-{n}" for n in range(2, 10)}
    assert next_free(long, taken) == "a" * 60 + "-10"
    hyphen = "a" * 60 + "-bc"
    assert next_free(hyphen, {hyphen}) == "a" * 60 + "-2"  # no label ends in "-" + "-2"
    assert given_for("web-12", "web") and given_for("web", "web")
    assert not given_for("web-x", "web") and not given_for("webs", "web")
