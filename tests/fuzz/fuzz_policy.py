"""Coverage-guided fuzzing of the policy loader (identity/policy_file.py): ``load_policy_file``.

The first byte picks the file's suffix (``.yaml``, ``.json``, ``.toml``); the
rest is the file's content (handed over in memory, read as the file would be).
Properties: the loader returns a policy or raises :class:`ConfigError` whose
message names the file (it does not parse) or the path inside the document; a
loaded policy summarises.
"""

from __future__ import annotations

import json
import re

import atheris
import yaml
from _harness import PROJECT, fuzz

with atheris.instrument_imports(include=PROJECT):
    from identity.policy_file import load_policy_file
    from wiregate.errors import ConfigError

SUFFIXES = (".yaml", ".json", ".toml")
SECTIONS = ("(document)", "groups", "tag_rules", "acls", "routes", "key_expiry", "policy")
PATH = re.compile(rf"^({'|'.join(map(re.escape, SECTIONS))})([.\[].*?)?: ")
IDP = "https://idp.example.com"
DOC = {
    "groups": {"eng": {"issuer": IDP, "claim": "groups", "values": ["engineering"]}},
    "tag_rules": [
        {"issuer": IDP, "claim": "sub", "match": "system:serviceaccount:*", "tags": ["tag:node"]},
        {"group": "eng", "tags": ["tag:laptop"]},
    ],
    "acls": [
        {"src": ["group:eng"], "dst": ["tag:db"], "ports": ["tcp:5432", "icmp", "udp:1-9"]},
        {"src": ["tag:node"], "dst": ["tag:node", "*"]},
    ],
    "routes": [{"tags": ["tag:node"], "allow": ["10.244.0.0/16", "fd00:244::/48"]}],
    "key_expiry": {"default": "180d", "tag:node": "never"},
}
LEGACY_TOML = b'[[rules]]\nsrc = ["tag:a"]\ndst = ["*"]\n'


def seeds() -> list[bytes]:
    return [
        b"\x00" + yaml.safe_dump(DOC).encode(),
        b"\x00" + yaml.safe_dump(DOC, default_flow_style=True).encode(),
        b"\x01" + json.dumps(DOC).encode(),
        b"\x02" + LEGACY_TOML,
        b"\x00rules: [{src: ['*'], dst: ['*']}]\n",
    ]


class _InMemoryFile:
    """What ``load_policy_file`` uses of a Path (no file system per input)."""

    def __init__(self, data: bytes, suffix: str) -> None:
        self._data, self.suffix = data, suffix

    def read_bytes(self) -> bytes:
        return self._data

    def __str__(self) -> str:
        return f"policy{self.suffix}"


def test_one_input(data: bytes) -> None:
    if not data:
        return
    path = _InMemoryFile(data[1:], SUFFIXES[data[0] % len(SUFFIXES)])
    try:
        policy = load_policy_file(path)  # type: ignore[arg-type]
    except ConfigError as exc:
        named = exc.message.startswith(f"policy file {path} does not parse")
        assert named or PATH.match(exc.message), f"no path in: {exc.message}"
        return
    policy.summary()


if __name__ == "__main__":
    fuzz(test_one_input, seeds())
