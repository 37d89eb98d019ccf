"""Configuration: command-line flags > environment (``WIREGATE_…``) > TOML file > defaults.

Each process has its own settings class. The TOML file holds one table per
process (``[gateway]``, ``[agent]``, ``[relay]``); the environment uses the
prefix ``WIREGATE_`` (``WIREGATE_LISTEN``, ``WIREGATE_DATABASE_URL`` …). Flags
are passed as keyword arguments by the CLI and win over everything else.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from wiregate.errors import ConfigError
from wiregate.model import DnsConfig
from wiregate.net import destination_refusal, parse_endpoint

__all__ = [
    "ADMIN_SOCKET",
    "AgentSettings",
    "GatewaySettings",
    "OidcIssuerSettings",
    "RelaySettings",
    "WorkloadIssuerSettings",
    "check_signers_url",
    "dns_name",
    "load_settings",
    "parse_port_range",
    "parse_relay_entry",
]

_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_RELAY_PORTS = 16384


_DNS_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def dns_name(text: str, what: str) -> str:
    """``text`` as a lower-case DNS name without the trailing dot; ValueError otherwise."""
    name = text.strip().lower().removesuffix(".")
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
        raise ValueError(f"{what} {text!r} is not a DNS name (labels of a-z, 0-9 and '-')")
    if labels[-1] == "arpa":
        raise ValueError(f"{what} {text!r} is under arpa (the reverse zones)")
    return name


def _under(name: str, zone: str) -> bool:
    return name == zone or name.endswith("." + zone)


def parse_relay_entry(text: str) -> tuple[str, str, int]:
    """``"id=HOST:PORT"`` to ``(id, host, port)``; ValueError with the reason otherwise."""
    relay_id, sep, address = text.partition("=")
    if not sep or not _ID_PATTERN.match(relay_id):
        raise ValueError(
            f"{text!r} is not id=HOST:PORT (id: letters, digits, '.', '_', '-'; 1..64)"
        )
    host, port = parse_endpoint(
        address, allow_names=True, from_peer=False, what=f"relay {relay_id}", error=ValueError
    ).pair
    return relay_id, host, port


def check_signers_url(url: str) -> None:
    """ValueError unless ``url`` is https, or plain http to an in-cluster Service
    (``NAME.NAMESPACE.svc`` or ``NAME.NAMESPACE.svc.CLUSTER_DOMAIN``) or loopback."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https") or not host or parts.query or parts.fragment:
        raise ValueError("signers_url must be https://HOST[:PORT]/PATH")
    if parts.scheme == "http" and not _in_cluster_or_loopback(host):
        raise ValueError(
            "signers_url: plain http only to an in-cluster Service (NAME.NAMESPACE.svc) or"
            " loopback; use https"
        )


def _in_cluster_or_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    return len(labels) >= 3 and labels[2] == "svc" and all(labels)


def parse_port_range(text: str) -> tuple[int, ...]:
    """``"40000-40063"``, ``"40000"`` or a comma list of both, to ports in order.

    Port 0 (a single item, repeatable) means an ephemeral port, for tests. Ports
    must not repeat; at least two are needed (a relayed pair uses two).
    """
    ports: list[int] = []
    for item in (part.strip() for part in text.split(",")):
        first, sep, last = item.partition("-")
        if not first.isdigit() or (sep and not last.isdigit()):
            raise ValueError(f"{item!r} is not a port or a range FIRST-LAST")
        low, high = int(first), int(last) if sep else int(first)
        if sep and not 0 < low <= high < 65536:
            raise ValueError(f"range {item!r} must be FIRST-LAST with 1 <= FIRST <= LAST <= 65535")
        if high > 65535:
            raise ValueError(f"port {item!r} is above 65535")
        ports.extend(range(low, high + 1))
        if len(ports) > MAX_RELAY_PORTS:
            raise ValueError(f"at most {MAX_RELAY_PORTS} relay ports")
    fixed = [p for p in ports if p]
    if len(set(fixed)) != len(fixed):
        raise ValueError("relay ports repeat")
    if len(ports) < 2:
        raise ValueError("a relay needs at least two relay ports (one pair uses two)")
    return tuple(ports)


TABLES = ("gateway", "agent", "relay")  # the TOML file's tables, one per process
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "json", "console")
# where the systemd unit's RuntimeDirectory= puts it; `wiregate admin` looks here too
ADMIN_SOCKET = Path("/run/wiregate-gateway/gateway.sock")


class _TomlTable(PydanticBaseSettingsSource):
    """Reads one table of a TOML file as a settings source."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path | None, table: str) -> None:
        super().__init__(settings_cls)
        self._data: dict[str, Any] = {}
        if path is not None:
            try:
                with path.open("rb") as fh:
                    doc = tomllib.load(fh)
            except OSError as exc:
                raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
            unknown = sorted(set(doc) - set(TABLES))
            if unknown:
                raise ConfigError(
                    f"config file {path}: unknown table [{unknown[0]}]",
                    hint="known tables: " + ", ".join(f"[{name}]" for name in TABLES),
                )
            table_data = doc.get(table, {})
            if not isinstance(table_data, dict):
                raise ConfigError(f"[{table}] in {path} must be a table")
            self._data = table_data

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


class _Base(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WIREGATE_", extra="forbid")
    _table: ClassVar[str] = ""
    _config_file: ClassVar[Path | None] = None

    log_format: str = "auto"  # auto | json | console
    log_level: str = "info"  # debug | info | warning | error

    @field_validator("log_level", "log_format")
    @classmethod
    def _log_choice(cls, value: str, info: ValidationInfo) -> str:
        choices = LOG_LEVELS if info.field_name == "log_level" else LOG_FORMATS
        if value.lower() not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return value.lower()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = _TomlTable(settings_cls, cls._config_file, cls._table)
        return (init_settings, env_settings, toml)


class OidcIssuerSettings(BaseModel):
    """One OpenID Provider of the SSO web pages (``[[gateway.oidc]]``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str  # shown on the issuer chooser; lowercase letters, digits, - and _
    issuer: str  # exactly as the provider's discovery document says
    client_id: str
    client_secret: str  # "file:PATH" or "env:VAR"; never the secret itself
    scopes: list[str] = ["openid", "email", "profile"]
    algorithms: list[str] = ["RS256"]  # asymmetric only
    groups_claim: str = "groups"
    insecure_http: bool = False  # http:// on loopback only (tests)

    @field_validator("client_secret")
    @classmethod
    def _secret_reference(cls, value: str) -> str:
        kind, sep, rest = value.partition(":")
        if not sep or kind not in ("file", "env") or not rest:
            raise ValueError("client_secret must be file:PATH or env:VAR, never the secret")
        return value


class WorkloadIssuerSettings(BaseModel):
    """A trusted issuer of workload tokens (``[[gateway.workload_issuers]]``); see
    identity/workload.py and docs/operations.md "Workload identity"."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str  # shown in audit records and errors
    issuer: str  # exactly as its discovery document says (a cluster: kube-apiserver's issuer)
    kind: Literal["kubernetes", "oidc"] = "oidc"
    audience: str = ""  # the gateway's name in the tokens; default: public_url
    algorithms: list[str] = ["RS256"]  # asymmetric only
    ca_bundle: Path | None = None  # CA for the issuer's HTTPS (a cluster CA)
    # bearer token sent with the discovery and JWKS fetches over https, re-read at each
    # fetch: a cluster issuer answers authenticated ServiceAccounts only (the gateway's own
    # token, /var/run/secrets/kubernetes.io/serviceaccount/token)
    token_file: Path | None = None
    tags: list[str] = []  # granted to every workload of this issuer (plus policy tag_rules)
    max_lifetime: float = 48 * 3600.0  # tokens living longer than this are refused
    insecure_http: bool = False  # http:// on loopback only (tests)


class GatewaySettings(_Base):
    """Settings of ``wiregate gateway``."""

    _table: ClassVar[str] = "gateway"

    listen: str = "127.0.0.1:8080"
    metrics_listen: str = "127.0.0.1:9090"
    admin_socket: Path = ADMIN_SOCKET  # trusted by file permissions (0600)
    admin_token_file: Path | None = None  # bearer token for admin calls over TCP
    state_dir: Path = Path("/var/lib/wiregate/gateway")
    database_url: str = ""  # default: sqlite+aiosqlite:///<state_dir>/wiregate.db
    ipv4_pool: str = "100.64.0.0/16"
    ipv6_pool: str = "fd7a:7767:6174::/64"
    default_keepalive: int | None = 25
    policy_file: Path | None = None
    max_body_bytes: int = 64 * 1024
    # `wiregate wheelhouse build` output served as /simple/ and /wheels/ (VMs install from
    # it); None: those routes answer 404
    wheelhouse_dir: Path | None = None
    relays: list[str] = []  # "id=HOST:PORT" of each relay's control port
    # "id=HOST:PORT" of a relay's TLS/TCP listener (its tcp_listen, e.g. relay.example:443),
    # handed to agents with their tickets; HOST must be a name or address in the relay's
    # certificate, issued by a CA the agents trust (the system store or their ca_file)
    relay_tcp: list[str] = []
    relay_probe_interval: float = 5.0  # PING every relay this often; down after 2 misses
    # -- names (docs/names.md): every device is NAME.<dns_domain>, answered by its agents --
    dns_domain: str = "wg.internal"  # "": agents serve no names
    # split DNS: zone -> nameservers (IP addresses) the agents forward it to over the tunnel,
    # e.g. {"cluster.local": ["10.96.0.10"]}
    dns_zones: dict[str, list[str]] = {}
    # -- device lifecycle: key expiry, ephemeral devices -------------------------------
    key_expiry: float | None = 180 * 86400.0  # people's device keys; None: never expire
    expiry_sweep_interval: float = 30.0  # how often expired/ephemeral devices are swept
    # on SIGTERM: /readyz answers 503 this long before agent streams are closed (1012)
    # so a load balancer stops sending new agents here first (Kubernetes: a few seconds)
    shutdown_delay: float = Field(default=0.0, ge=0.0, le=300.0)
    ephemeral_timeout: float = 300.0  # an ephemeral device away this long is removed
    # -- TLS of the API listener (docs/operations.md "TLS") ----------------------------
    tls_cert: Path | None = None  # PEM chain; with tls_key: `listen` serves HTTPS (TLS 1.2+)
    tls_key: Path | None = None  # PEM key, 0600; both files reloaded on change and SIGHUP
    http_redirect_listen: str = ""  # "HOST:PORT": plain HTTP answering 308 to public_url
    # CIDRs of reverse proxies whose X-Forwarded-For is believed (the rightmost hop not
    # in them is the client, for rate limits); none: the TCP peer is the client
    trusted_proxies: list[str] = []
    # slow clients: the request line and headers must arrive within header_timeout s of
    # the first byte, a JSON body within body_timeout s (both counted from the start)
    header_timeout: float = Field(default=10.0, gt=0.0, le=300.0)
    body_timeout: float = Field(default=30.0, gt=0.0, le=600.0)

    # -- SSO web pages (gateway/web): sign-in, device approval, my devices, admin ------
    public_url: str = ""  # what browsers use, e.g. https://gw.example.com; redirect URI base
    oidc: list[OidcIssuerSettings] = []  # no issuer: the pages say SSO is not configured
    admin_groups: list[str] = []  # members of any of these groups may use /admin
    session_lifetime: float = 8 * 3600.0
    workload_issuers: list[WorkloadIssuerSettings] = []  # POST /api/v1/enroll workload_token

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if value and (parts.scheme not in ("http", "https") or not parts.hostname
                      or parts.path not in ("", "/") or parts.query or parts.fragment):  # fmt: skip
            raise ValueError("public_url must be http(s)://HOST[:PORT] without a path")
        return value.rstrip("/")

    @field_validator("session_lifetime")
    @classmethod
    def _session_lifetime(cls, value: float) -> float:
        if not 300.0 <= value <= 7 * 86400.0:
            raise ValueError("session_lifetime must be 300..604800 seconds")
        return value

    # -- end of the SSO web pages block ---------------------------------------------------

    @model_validator(mode="after")
    def _workload_audiences(self) -> GatewaySettings:
        # a person's ID token (aud: the SSO client_id) must never pass as a workload token
        for workload in self.workload_issuers:
            audience = workload.audience or self.public_url
            for sso in self.oidc:
                if sso.issuer.rstrip("/") == workload.issuer.rstrip("/") and (
                    sso.client_id == audience
                ):
                    raise ValueError(
                        f"workload_issuers {workload.name!r} has the audience {audience!r},"
                        f" the client_id of oidc {sso.name!r} of the same issuer: that"
                        " issuer's ID tokens of people would enroll as workloads; give the"
                        " workload issuer another audience"
                    )
        return self

    @model_validator(mode="after")
    def _tls(self) -> GatewaySettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        https = self.public_url.startswith("https://")
        if self.tls_cert is not None and self.public_url and not https:
            raise ValueError("public_url must be https:// when tls_cert is set")
        if self.http_redirect_listen:
            where = self.http_redirect_listen
            parse_endpoint(where, allow_names=True, from_peer=False, allow_port_zero=True,
                           what="http_redirect_listen", error=ValueError)  # fmt: skip
            if not https:
                raise ValueError("http_redirect_listen needs an https:// public_url to send to")
        return self

    @field_validator("dns_domain")
    @classmethod
    def _dns_domain(cls, value: str) -> str:
        return dns_name(value, "dns_domain") if value.strip() else ""

    @model_validator(mode="after")
    def _dns_zones(self) -> GatewaySettings:
        zones: dict[str, list[str]] = {}
        for zone, servers in self.dns_zones.items():
            name = dns_name(zone, "dns_zones:")
            domain = self.dns_domain
            if domain and (_under(name, domain) or _under(domain, name)):
                raise ValueError(f"dns_zones: {zone!r} overlaps the mesh domain {domain!r}")
            if not 1 <= len(servers) <= 8:
                raise ValueError(f"dns_zones: {zone!r} needs 1..8 nameserver addresses")
            zones[name] = [_nameserver(zone, server) for server in servers]
        if len(zones) != len(self.dns_zones):
            raise ValueError("dns_zones: a zone is named twice")
        self.dns_zones = zones
        return self

    def mesh_dns(self) -> DnsConfig | None:
        """What the map tells agents about names (None: names are off)."""
        if not self.dns_domain:
            return None
        zones = tuple(sorted((zone, tuple(servers)) for zone, servers in self.dns_zones.items()))
        return DnsConfig(self.dns_domain, zones)

    @field_validator("relay_probe_interval")
    @classmethod
    def _relay_probe_interval(cls, value: float) -> float:
        if not 0.1 <= value <= 300.0:
            raise ValueError("relay_probe_interval must be 0.1..300 seconds")
        return value

    @field_validator("relays")
    @classmethod
    def _relays(cls, value: list[str]) -> list[str]:
        ids = [parse_relay_entry(entry)[0] for entry in value]
        if len(set(ids)) != len(ids):
            raise ValueError("relay ids repeat")
        return value

    @model_validator(mode="after")
    def _relay_tcp(self) -> GatewaySettings:
        known = {parse_relay_entry(entry)[0] for entry in self.relays}
        ids = [parse_relay_entry(entry)[0] for entry in self.relay_tcp]
        if len(set(ids)) != len(ids):
            raise ValueError("relay_tcp: relay ids repeat")
        for relay_id in ids:
            if relay_id not in known:
                raise ValueError(f"relay_tcp: {relay_id!r} is not one of relays")
        return self

    @field_validator("trusted_proxies")
    @classmethod
    def _trusted_proxies(cls, value: list[str]) -> list[str]:
        try:
            return [str(ipaddress.ip_network(cidr, strict=True)) for cidr in value]
        except ValueError as exc:
            raise ValueError(f"trusted_proxies: {exc} (CIDRs such as 10.0.0.0/8)") from None

    @field_validator("ipv4_pool")
    @classmethod
    def _v4(cls, value: str) -> str:
        net = ipaddress.ip_network(value, strict=True)
        if net.version != 4 or net.prefixlen > 30:
            raise ValueError("ipv4_pool must be an IPv4 network of /30 or larger")
        return str(net)

    @field_validator("ipv6_pool")
    @classmethod
    def _v6(cls, value: str) -> str:
        net = ipaddress.ip_network(value, strict=True)
        if net.version != 6 or net.prefixlen > 120:
            raise ValueError("ipv6_pool must be an IPv6 network of /120 or larger")
        return str(net)

    # -- peer Services: pods reach devices by name (docs/deploy-kubernetes.md) ---------------
    # a headless Service + EndpointSlices per selected device in peer_services_namespace,
    # kept by the replica holding the "peer-services" lease (gateway/cluster)
    peer_services: bool = False
    peer_services_namespace: str = "wiregate-peers"
    peer_services_tag: str = "tag:vm"  # devices carrying this tag; "": every device
    peer_services_ports: list[str] = []  # "[NAME:]PORT[/PROTO]" each; none: headless, no ports
    peer_services_resync: float = Field(default=300.0, ge=5.0, le=86400.0)  # full resync (s)
    peer_services_kubeconfig: Path | None = None  # None: the in-cluster ServiceAccount

    @field_validator("peer_services_namespace")
    @classmethod
    def _peer_services_namespace(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", value):
            raise ValueError("peer_services_namespace must be a namespace name (a DNS label)")
        return value

    # "[NAME:]PORT[/PROTO]": a port's name is an IANA service name (lower case, <= 15)
    PEER_PORT: ClassVar[str] = (r"^(?:(?P<name>[a-z0-9]([-a-z0-9]{0,13}[a-z0-9])?):)?"
                                r"(?P<port>[0-9]{1,5})(?:/(?P<proto>TCP|UDP|SCTP))?$")  # fmt: skip

    @field_validator("peer_services_ports")
    @classmethod
    def _peer_services_ports(cls, value: list[str]) -> list[str]:
        names = []
        for text in value:
            found = re.match(cls.PEER_PORT, text)
            if found is None or not 0 < int(found["port"]) < 65536:
                raise ValueError(f"peer_services_ports: {text!r} is not [NAME:]PORT[/TCP|UDP|SCTP]")
            names.append(found["name"] or "")
        if len(names) > 1 and not all(names):
            raise ValueError("peer_services_ports: with several ports, each needs a NAME:")
        if len(set(names)) != len(names):
            raise ValueError("peer_services_ports: port names repeat")
        return value

    # -- end of the peer Services block ------------------------------------------------------

    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.state_dir / 'wiregate.db'}"


def _nameserver(zone: str, text: str) -> str:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"dns_zones: {zone!r}: {text!r} is not an IP address") from None
    refusal = destination_refusal(ip)
    if refusal is not None:
        raise ValueError(f"dns_zones: {zone!r}: {text} is refused ({refusal})")
    return str(ip)


class AgentSettings(_Base):
    """Settings of ``wiregate agent``."""

    _table: ClassVar[str] = "agent"

    server: str = "http://127.0.0.1:8080"
    auth_key: str = ""  # "file:PATH" or "env:VAR"; never the key itself in argv
    # "file:PATH" of a workload token (re-read at each enrollment: projected tokens rotate);
    # with kubernetes = true and no auth_key: the projected token of deploy/kubernetes
    workload_token: str = ""
    state_dir: Path = Path("/var/lib/wiregate/agent")
    run_dir: Path = Path("/run/wiregate")
    interface: str = "wg0"
    listen_port: int = 51820
    hostname: str = ""
    backend: str = "auto"  # auto | kernel | userspace
    userspace_binary: str = "wireguard-go"
    route_table: int = 51820
    rule_priority: int = 5210
    fwmark: int = 0x5747
    mtu: int = 0  # 0: derived from the underlay link (minus 60 for IPv4, 80 for IPv6)
    endpoints: list[str] = []  # extra "ip:port" candidates to advertise
    stun_servers: list[str] = []  # "host:port" STUN servers for netcheck (reflexive endpoint)
    reconcile_interval: float = 30.0  # read the interface back and repair drift this often
    netcheck_interval: float = 60.0  # seconds between STUN probes of the WireGuard port
    path_probe_timeout: float = 5.0  # seconds a direct candidate gets to carry a handshake
    path_silence: float = 180.0  # a direct path without a handshake this long is dead
    path_retry: float = 30.0  # first retry of direct while relayed (doubles, up to 300 s)
    relay_ping_interval: float = 5.0  # liveness probe of the relay a peer is relayed through
    pmtu_interval: float = 600.0  # re-probe each tunnel's path MTU this often (0: never probe)
    metrics_listen: str = ""  # "HOST:PORT" serves Prometheus /metrics; empty: no listener
    # -- Kubernetes node integration (agent/kubenode.py) ------------------------
    kubernetes: bool = False  # read this node's Node: pod CIDRs as routes, InternalIP, annotations
    node_name: str = Field(  # NODE_NAME from the downward API
        "", validation_alias=AliasChoices("node_name", "WIREGATE_NODE_NAME", "NODE_NAME")
    )
    kubeconfig: Path | None = None  # None: the in-cluster ServiceAccount config
    # the cluster's Service CIDR(s), advertised so that devices reach ClusterIPs through nodes
    kube_service_cidrs: list[str] = []
    # gateway mode: also advertise every agent-less Node's pod CIDRs and forward onward
    kube_gateway: bool = False
    # pod identity (agent/kubepods.py): the label keys reported with each pod of this node
    # (the policy can select pods by these only); namespace and service account always are
    pod_labels: list[str] = ["app", "app.kubernetes.io/name"]
    # -- the node's own traffic through the tunnel (docs/host-traffic.md) ---------------
    # off; nonstrict (a peer node without a fresh handshake is reached in clear, counted);
    # strict (never in clear). On, this node also advertises its host addresses as routes.
    host_traffic: Literal["off", "nonstrict", "strict"] = "off"
    host_addresses: list[str] = []  # host addresses to advertise (kubernetes: + InternalIPs)
    host_traffic_exempt: list[str] = []  # CIDRs never routed into the tunnel: the API server's
    host_traffic_fresh: float = 30.0  # a peer silent this long is stale (nonstrict: clear)
    host_traffic_node_tag: str = "tag:node"  # peers with this tag have host destinations
    rotation_check_interval: float = 60.0  # how often the key's rotation time is checked
    ca_file: Path | None = None  # PEM CA(s) trusted for the gateway's HTTPS, plus the system's
    tags: list[str] = []
    # -- names (agent/dns, docs/names.md): the mesh domain's DNS server ---------------
    dns: bool = True  # answer the map's names on this device's tunnel addresses
    dns_port: int = 53
    # how the host's resolver learns of the mesh domain: auto (systemd-resolved if it runs,
    # else /etc/resolv.conf if it is a plain file), resolved, resolv.conf, or off
    dns_resolver: Literal["auto", "resolved", "resolv.conf", "off"] = "auto"
    dns_resolv_conf: Path = Path("/etc/resolv.conf")  # the file of the resolv.conf mode
    dns_allow: list[str] = []  # source CIDRs that may query besides this host (a pod CIDR)
    dns_allow_pods: bool = False  # kubernetes: this node's pod CIDRs (the Node's) may query
    # addresses of this host the server also listens on, besides the tunnel addresses
    # (a node's InternalIP: the endpoint of the wiregate-dns Service that CoreDNS asks)
    dns_listen: list[str] = []

    @field_validator("pod_labels")
    @classmethod
    def _pod_labels(cls, value: list[str]) -> list[str]:
        from wiregate.podwire import MAX_LABELS, PodReportError, read_pods

        if len(value) > MAX_LABELS:
            raise ValueError(f"pod_labels: at most {MAX_LABELS} label keys")
        probe = {"namespace": "n", "name": "n", "ips": [], "service_account": "n"}
        message = {"type": "pods", "full": True, "remove": []}
        try:  # the same check as the gateway's, on a pod carrying every key
            read_pods(message | {"upsert": [probe | {"labels": dict.fromkeys(value, "")}]})
        except PodReportError as exc:
            raise ValueError(f"pod_labels: {exc.message}") from None
        return list(dict.fromkeys(value))

    @field_validator("dns_port")
    @classmethod
    def _dns_port(cls, value: int) -> int:
        if not 0 < value < 65536:
            raise ValueError("dns_port must be 1..65535")
        return value

    @field_validator("dns_allow")
    @classmethod
    def _dns_allow(cls, value: list[str]) -> list[str]:
        try:
            return [str(ipaddress.ip_network(cidr, strict=True)) for cidr in value]
        except ValueError as exc:
            raise ValueError(f"dns_allow: {exc} (CIDRs such as 10.244.1.0/24)") from None

    @field_validator("dns_listen")
    @classmethod
    def _dns_listen(cls, value: list[str]) -> list[str]:
        out = []
        for raw in value:
            try:
                address = ipaddress.ip_address(raw)
            except ValueError:
                raise ValueError(f"dns_listen: {raw!r} is not an IP address") from None
            if address.is_unspecified or address.is_multicast:
                raise ValueError(f"dns_listen: {raw} is not one address of this host")
            out.append(str(address))
        return list(dict.fromkeys(out))

    @field_validator("host_addresses", "host_traffic_exempt")
    @classmethod
    def _host_networks(cls, value: list[str]) -> list[str]:
        try:
            return [str(ipaddress.ip_network(cidr, strict=True)) for cidr in value]
        except ValueError as exc:
            raise ValueError(
                f"{exc} (addresses or CIDRs such as 10.0.0.12 or 10.0.0.0/24)"
            ) from None

    @field_validator("host_traffic_fresh")
    @classmethod
    def _host_fresh(cls, value: float) -> float:
        if not 15 <= value <= 180:  # the nudges' passive keepalives come back within ~10 s
            raise ValueError("host_traffic_fresh must be 15..180 seconds")
        return value

    @field_validator("listen_port")
    @classmethod
    def _port(cls, value: int) -> int:
        if not 0 < value < 65536:
            raise ValueError("listen_port must be 1..65535")
        return value

    @field_validator("auth_key")
    @classmethod
    def _auth_key(cls, value: str) -> str:
        kind, sep, rest = value.partition(":")
        if value and (not sep or kind not in ("file", "env") or not rest):
            raise ValueError(
                "auth_key must be file:PATH or env:VAR"
                " (a literal key leaks into process listings and files)"
            )
        return value

    @field_validator("workload_token")
    @classmethod
    def _workload_token(cls, value: str) -> str:
        if value and (not value.startswith("file:") or value == "file:"):
            raise ValueError(
                "workload_token must be file:PATH"
                " (a literal token leaks into process listings and files)"
            )
        return value


class RelaySettings(_Base):
    """Settings of ``wiregate relay``."""

    _table: ClassVar[str] = "relay"

    stun_listen: list[str] = ["0.0.0.0:3478"]
    metrics_listen: str = "127.0.0.1:9091"  # Prometheus /metrics and /livez; empty: none
    relay_id: str = ""  # empty: no WireGuard relay, STUN only
    relay_listen: str = "0.0.0.0:3480"  # the control port
    relay_ports: str = "40000-40063"  # "FIRST-LAST", or a comma list of ports and ranges
    own_addresses: list[str] = []  # this relay's public addresses (never forwarded to)
    verify_keys_file: Path | None = None  # JSON: {"signers": [{"public_key", "tenants"}]}
    # or the gateway's GET /api/v1/relay/signers, fetched at start and every signers_refresh
    # seconds (a rotated key is picked up); exactly one of the two with a relay_id
    signers_url: str = ""
    signers_ca_file: Path | None = None  # CA bundle for an https signers_url; default: system
    signers_refresh: float = 60.0
    max_allocations: int = 4096
    max_allocations_per_device: int = 16
    bytes_per_second: int = 12_500_000
    burst_bytes: int = 1_000_000
    idle_timeout: float = 60.0
    max_datagram: int = 1500
    # bound pairs forwarded by nftables/conntrack ("kernel"), by Python ("userspace"), or
    # "auto": the kernel where nftables and net.ipv4.ip_forward permit it (docs/operations.md)
    forward_path: Literal["auto", "kernel", "userspace"] = "auto"
    # -- STUN rate limits (relay.stun_core's defaults; docs/operations.md, "STUN") ------
    stun_rate: float = 200.0  # replies/s per source (an IPv4 address, an IPv6 /64)
    stun_burst: float = 1000.0  # replies a quiet source may get at once
    stun_global_rate: float = 30000.0  # replies/s to all sources together
    stun_global_burst: float = 60000.0
    # -- WireGuard over TLS/TCP for networks that block UDP (relay.aio.tcp) -------------
    tcp_listen: str = ""  # "HOST:PORT", e.g. "0.0.0.0:443"; empty: no TCP transport
    tls_cert: Path | None = None  # PEM chain ("%d/NAME": LoadCredential=); reloaded on change
    tls_key: Path | None = None  # PEM key, 0600
    tcp_max_connections: int = 1024
    tcp_idle_timeout: float = 120.0  # a connection with no frame this long is closed

    @field_validator("stun_rate", "stun_burst", "stun_global_rate", "stun_global_burst")
    @classmethod
    def _stun_limit(cls, value: float) -> float:
        if not 1.0 <= value <= 10_000_000.0:
            raise ValueError("must be 1..10000000")
        return value

    @field_validator("relay_id")
    @classmethod
    def _relay_id(cls, value: str) -> str:
        if value and not _ID_PATTERN.match(value):
            raise ValueError("relay_id must be 1..64 letters, digits, '.', '_' or '-'")
        return value

    @field_validator("signers_url")
    @classmethod
    def _signers_url(cls, value: str) -> str:
        if value:
            check_signers_url(value)
        return value

    @field_validator("signers_refresh")
    @classmethod
    def _signers_refresh(cls, value: float) -> float:
        if not 5.0 <= value <= 86400.0:
            raise ValueError("signers_refresh must be 5..86400 seconds")
        return value

    @field_validator("relay_listen")
    @classmethod
    def _relay_listen(cls, value: str) -> str:
        parse_endpoint(  # port 0: an ephemeral port
            value,
            allow_names=True,
            from_peer=False,
            allow_port_zero=True,
            what="listen address",
            error=ValueError,
        )
        return value

    @field_validator("relay_ports")
    @classmethod
    def _relay_ports(cls, value: str) -> str:
        parse_port_range(value)
        return value

    @field_validator("own_addresses")
    @classmethod
    def _own(cls, value: list[str]) -> list[str]:
        return [str(ipaddress.ip_address(v.strip("[]"))) for v in value]

    @field_validator("max_allocations", "max_allocations_per_device", "bytes_per_second")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1")
        return value

    @field_validator("burst_bytes")
    @classmethod
    def _burst(cls, value: int) -> int:
        if value < 1500:
            raise ValueError("must be at least 1500 (one full datagram)")
        return value

    @field_validator("idle_timeout")
    @classmethod
    def _idle(cls, value: float) -> float:
        if not 5.0 <= value <= 3600.0:
            raise ValueError("must be 5..3600 seconds")
        return value

    @field_validator("max_datagram")
    @classmethod
    def _datagram(cls, value: int) -> int:
        if not 148 <= value <= 65507:
            raise ValueError("must be 148..65507 bytes (a handshake initiation is 148)")
        return value

    @field_validator("tcp_idle_timeout")
    @classmethod
    def _tcp_idle(cls, value: float) -> float:
        if not 10.0 <= value <= 3600.0:
            raise ValueError("must be 10..3600 seconds")
        return value

    @field_validator("tcp_max_connections")
    @classmethod
    def _tcp_connections(cls, value: int) -> int:
        if not 1 <= value <= 1_000_000:
            raise ValueError("must be 1..1000000")
        return value

    @model_validator(mode="after")
    def _tcp(self) -> RelaySettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        if self.tcp_listen:
            parse_endpoint(self.tcp_listen, allow_names=True, from_peer=False,
                           allow_port_zero=True, what="tcp_listen", error=ValueError)  # fmt: skip
            if self.tls_cert is None:
                raise ValueError("tcp_listen needs tls_cert and tls_key (the stream is TLS only)")
            if not self.relay_id:
                raise ValueError("tcp_listen needs relay_id (it carries the WireGuard relay)")
        return self


S = TypeVar("S", bound=_Base)


def load_settings(cls: type[S], config_file: Path | None, **flags: Any) -> S:
    """Build settings for ``cls`` from flags, env, the TOML file and defaults."""
    given = {k: v for k, v in flags.items() if v is not None and v != ()}
    cls._config_file = config_file
    try:
        return cls(**given)
    except ValidationError as exc:
        where = f"[{cls._table}] in {config_file}, " if config_file else ""
        hint = f"fix it in {where}the WIREGATE_* environment or the flags"
        raise ConfigError(_describe(exc), hint=hint) from exc
    finally:
        cls._config_file = None


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "settings"
        parts.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
    return "invalid configuration: " + "; ".join(parts)
