"""Every setting the manifests give is one the process reads.

- A ``WIREGATE_*`` variable (``env``, or a key of a ConfigMap given by ``envFrom``)
  must be a setting of the container's process: ``env_prefix`` + a field name
  of its pydantic settings class, a field's alias, or an option's ``envvar``.
- A key the manifests reference (``secretKeyRef``, ``configMapKeyRef``, a ConfigMap
  or Secret volume's items, a projected token) must be read: the variable it
  feeds is read, or the file it becomes is named by a setting (its path in a
  value), or lies in a directory a setting names and is a file the process reads
  there (the gateway's key files in ``state_dir``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import PurePosixPath
from typing import Any

import click
import pytest
from pydantic import AliasChoices

from lab.manifests import ROOT, Doc, find, pod_spec, render
from wiregate.cli.serve import agent, gateway, relay
from wiregate.settings import AgentSettings, GatewaySettings, RelaySettings

TARGETS = ["base"] + [
    f"overlays/{p.parent.name}" for p in sorted((ROOT / "overlays").glob("*/kustomization.yaml"))
]
WORKLOAD_KINDS = {"Deployment", "DaemonSet", "StatefulSet", "Job", "CronJob", "Pod"}
_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def _implicit_files() -> dict[str, dict[str, set[str]]]:
    """Files a process reads inside a directory setting, by name (from the product)."""
    from gateway.relays import KEY_FILE as RELAY_SIGNING_KEY
    from gateway.web.keyfile import KEY_FILE as WEB_SESSION_KEY

    return {"gateway": {"state_dir": {RELAY_SIGNING_KEY, WEB_SESSION_KEY}}}


PROCESSES: dict[str, tuple[type[Any], click.Command]] = {
    "gateway": (GatewaySettings, gateway),
    "relay": (RelaySettings, relay),
    "agent": (AgentSettings, agent),
}


def setting_names(settings: type[Any], command: click.Command) -> dict[str, str]:
    """Environment name -> field name (or the option's name) for one process."""
    prefix = settings.model_config.get("env_prefix", "")
    names: dict[str, str] = {}
    for field, info in settings.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            for choice in alias.choices:
                if isinstance(choice, str):
                    names[choice.upper()] = field
        elif isinstance(alias, str):
            names[alias.upper()] = field
        else:
            names[f"{prefix}{field}".upper()] = field
    for param in command.params:
        envvars = param.envvar if isinstance(param.envvar, list | tuple) else [param.envvar]
        for envvar in envvars:
            if envvar:
                names[str(envvar)] = str(param.name)
    return names


def containers(docs: list[Doc]) -> Iterable[tuple[Doc, Doc]]:
    for d in docs:
        if d["kind"] in WORKLOAD_KINDS:
            for c in pod_spec(d)["containers"]:
                yield d, c


def problems(docs: list[Doc]) -> list[str]:
    """What a rendered set of manifests sets that nobody reads (empty: all read)."""
    found: list[str] = []
    for doc, c in containers(docs):
        where = f"{doc['kind']}/{doc['metadata']['name']}/{c['name']}"
        process = c["args"][0]
        settings, command = PROCESSES[process]
        valid = setting_names(settings, command)

        # the environment, as the kubelet builds it: (name, value, source)
        env: list[tuple[str, str, str]] = []
        for source in c.get("envFrom", []):
            ref = source.get("configMapRef") or source.get("secretRef") or {}
            kind = "ConfigMap" if "configMapRef" in source else "Secret"
            data = (
                find(docs, "ConfigMap", ref["name"]).get("data", {}) if kind == "ConfigMap" else {}
            )
            for key, value in data.items():
                env.append((source.get("prefix", "") + key, str(value), f"{kind}/{ref['name']}"))
        for e in c.get("env", []):
            ref = e.get("valueFrom", {})
            src = "env"
            for key, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
                if key in ref:
                    src = f"{kind}/{ref[key]['name']} key {ref[key]['key']}"
            env.append((e["name"], str(e.get("value", "")), src))

        referenced = {m for _, value, _ in env for m in _VAR.findall(value)}
        read_env: dict[str, str] = {}
        for name, value, src in env:
            if name.startswith("WIREGATE_") and name not in valid:
                found.append(
                    f"{where}: {name} (from {src}) is not a setting of `wiregate {process}`"
                )
            elif name not in valid and name not in referenced:
                found.append(f"{where}: {name} (from {src}) is never read")
            if name in valid:
                read_env[valid[name]] = value

        # files: mounted keys must be named by a setting, directly or by their directory
        values = [*read_env.values(), *c["args"]]
        dirs: set[tuple[str, str]] = set()  # (directory, file name read there)
        for field, names in _implicit_files().get(process, {}).items():
            directory = read_env.get(field, str(settings.model_fields[field].default))
            dirs |= {(directory, n) for n in names}
        volumes = {v["name"]: v for v in pod_spec(doc).get("volumes", [])}
        for m in c.get("volumeMounts", []):
            for path, src in mounted_keys(docs, volumes[m["name"]]):
                pod_path = str(PurePosixPath(m["mountPath"]) / path)
                named = any(pod_path in v for v in values)
                inside = (str(PurePosixPath(pod_path).parent), PurePosixPath(pod_path).name) in dirs
                if not named and not inside:
                    found.append(f"{where}: {src} mounted at {pod_path} is never read")
    return found


def mounted_keys(docs: list[Doc], volume: Doc) -> list[tuple[str, str]]:
    """(path in the mount, what it is) of each key a volume puts there."""
    out: list[tuple[str, str]] = []

    def items(src: Doc, kind: str, name: str, keys: Iterable[str]) -> None:
        listed = src.get("items") or [{"key": k, "path": k} for k in keys]
        out.extend((i["path"], f"{kind}/{name} key {i['key']}") for i in listed)

    if "configMap" in volume:
        name = volume["configMap"]["name"]
        items(volume["configMap"], "ConfigMap", name, find(docs, "ConfigMap", name)["data"])
    elif "secret" in volume:
        items(volume["secret"], "Secret", volume["secret"]["secretName"], [])
    elif "projected" in volume:
        for s in volume["projected"]["sources"]:
            if "serviceAccountToken" in s:
                out.append((s["serviceAccountToken"]["path"], "projected ServiceAccount token"))
            elif "configMap" in s:
                name = s["configMap"]["name"]
                items(s["configMap"], "ConfigMap", name, find(docs, "ConfigMap", name)["data"])
            elif "secret" in s:
                items(s["secret"], "Secret", s["secret"]["name"], [])
    return out


@pytest.mark.parametrize("target", TARGETS)
def test_every_setting_in_the_manifests_is_read(target: str) -> None:
    assert problems(render(target)) == []


def test_the_names_come_from_the_settings_classes() -> None:
    gw = setting_names(GatewaySettings, gateway)
    assert gw["WIREGATE_WORKLOAD_ISSUERS"] == "workload_issuers"
    assert gw["WIREGATE_CONFIG"] == "config_file"
    ag = setting_names(AgentSettings, agent)
    assert ag["NODE_NAME"] == ag["WIREGATE_NODE_NAME"] == "node_name"
    assert ag["WIREGATE_WORKLOAD_TOKEN"] == "workload_token"
    assert "WIREGATE_KUBERNETES_TOKEN_FILE" not in ag
    assert setting_names(RelaySettings, relay)["WIREGATE_SIGNERS_URL"] == "signers_url"


def _with(docs: list[Doc], kind: str, name: str) -> Doc:
    return find(docs, kind, name)


def test_an_unknown_variable_or_an_unread_key_is_found() -> None:
    import copy

    docs = copy.deepcopy(render("overlays/ha"))
    gw = _with(docs, "Deployment", "wiregate-gateway")
    c = pod_spec(gw)["containers"][0]
    c["env"].append({"name": "WIREGATE_KUBERNETES_TOKEN_FILE", "value": "/x"})
    c["env"].append(
        {"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}}
    )
    state = next(v for v in pod_spec(gw)["volumes"] if v["name"] == "state")
    state["secret"]["items"].append({"key": "stray.key", "path": "stray.key"})
    _with(docs, "ConfigMap", "wiregate-gateway")["data"]["WIREGATE_RELAY_ID"] = "relay-1"
    found = problems(docs)
    assert any("WIREGATE_KUBERNETES_TOKEN_FILE" in p and "not a setting" in p for p in found)
    assert any("DB_PASSWORD (from Secret/db key password) is never read" in p for p in found)
    assert any("key stray.key" in p and "never read" in p for p in found)
    assert any("WIREGATE_RELAY_ID (from ConfigMap/" in p for p in found), found
    assert len(found) == 4, found
