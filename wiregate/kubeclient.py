"""The official Kubernetes client's configuration, shared by the agent and the gateway."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wiregate.errors import ConfigError

__all__ = ["api_client"]


def api_client(kubeconfig: Path | None, *, setting: str = "kubeconfig", what: str = "") -> Any:
    """A ``kubernetes.client.ApiClient`` from ``kubeconfig``, or from the pod's
    ServiceAccount when None; :class:`ConfigError` naming ``setting`` when neither works
    (``what``: whose configuration it is, for the message)."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    try:
        if kubeconfig is not None:
            return config.new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]
        configuration = client.Configuration()
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        return client.ApiClient(configuration)
    except (ConfigException, OSError) as exc:
        where = kubeconfig or "the in-cluster ServiceAccount"
        prefix = f"{what}: " if what else ""
        raise ConfigError(
            f"{prefix}no Kubernetes client configuration from {where}: {exc}",
            hint=f"run in a pod with a ServiceAccount, or set {setting}",
        ) from exc
