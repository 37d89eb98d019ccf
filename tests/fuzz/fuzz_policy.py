"""Coverage-guided fuzzing of the policy loader (identity/policy_file.py) through files.

The first byte picks the file's suffix (``.yaml``, ``.json``, ``.toml``); the
rest is the file. Properties: ``load_policy_file`` returns a policy or raises
:class:`ConfigError` whose message names the file (it does not parse) or the
path inside the document; a loaded policy summarises.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import atheris
import yaml
from _harness import PROJECT, fuzz

with atheris.instrument_imports(include=PROJECT):
    from gateway.errors import ConfigError
    from identity.policy_file import load_policy_file

SUFFIXES = (".yaml", ".json", ".toml")
SECTIONS = ("(document)", "groups", "tag_rules", "acls", "routes", "key_expiry", "policy")
PATH = re.compile(rf"^({'|'.join(map(re.escape, SECTIONS))})([.\[].*?)?: ")
SHM = Path("/dev/shm")
WORK = Path(tempfile.mkdtemp(prefix="wiregate-fuzz-policy-", dir=SHM if SHM.is_dir() else None))
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


def test_one_input(data: bytes) -> None:
    if not data:
        return
    path = WORK / f"policy{SUFFIXES[data[0] % len(SUFFIXES)]}"
    path.write_bytes(data[1:])
    try:
        policy = load_policy_file(path)
    except ConfigError as exc:
        named = exc.message.startswith(f"policy file {path} does not parse")
        assert named or PATH.match(exc.message), f"no path in: {exc.message}"
        return
    policy.summary()


if __name__ == "__main__":
    fuzz(test_one_input, seeds())
