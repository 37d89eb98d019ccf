"""The gateway's wheelhouse as a PEP 503 index: names, pages, requirements, and pip itself
installing from a running gateway with ``--require-hashes``.

The wheelhouse is real: three small wheels written here (a pure-Python project that
depends on a second one, built for x86_64 and for aarch64), indexed with
:func:`gateway.packages.write_index` as ``wiregate wheelhouse build`` does.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import platform
import sys
import zipfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import create_app
from gateway.packages import (
    INDEX_NAME,
    load_wheelhouse,
    normalize,
    parse_index,
    parse_wheel_name,
    write_index,
)
from wiregate.errors import ConfigError
from wiregate.settings import GatewaySettings

Client = TestClient[web.Request, web.Application]
ClientFactory = Callable[[web.Application], Awaitable[Client]]
ServerFactory = Callable[[web.Application], Awaitable[TestServer]]

MACHINE = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine(), platform.machine())
OTHER = "aarch64" if MACHINE == "x86_64" else "x86_64"
ALPHA = "Alpha.Pkg-1.0-py3-none-any.whl"  # not normalized on purpose: PEP 503 names
BETA_HERE = f"beta-2.0-py3-none-manylinux2014_{MACHINE}.whl"
BETA_OTHER = f"beta-2.0-py3-none-manylinux2014_{OTHER}.whl"
UNLISTED = "gamma-1.0-py3-none-any.whl"


def make_wheel(directory: Path, filename: str, requires: tuple[str, ...] = ()) -> Path:
    """A minimal valid wheel: one module, METADATA, WHEEL and RECORD."""
    project, version, _tags = parse_wheel_name(filename)
    dist = filename.split("-")[0]
    module = project.replace("-", "_")
    tag = "-".join(filename.removesuffix(".whl").split("-")[-3:])
    files = {
        f"{module}.py": f"NAME = {project!r}\n".encode(),
        f"{dist}-{version}.dist-info/METADATA": (
            f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n"
            + "".join(f"Requires-Dist: {r}\n" for r in requires)
        ).encode(),
        f"{dist}-{version}.dist-info/WHEEL": (
            f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n"
        ).encode(),
    }
    record = "".join(
        f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}\n"
        for name, data in files.items()
    )
    files[f"{dist}-{version}.dist-info/RECORD"] = (
        record + f"{dist}-{version}.dist-info/RECORD,,\n"
    ).encode()
    path = directory / filename
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


@pytest.fixture
def house(tmp_path: Path) -> Path:
    directory = tmp_path / "wheelhouse"
    directory.mkdir()
    make_wheel(directory, ALPHA, requires=("beta==2.0",))
    make_wheel(directory, BETA_HERE)
    make_wheel(directory, BETA_OTHER)
    write_index(directory)
    (directory / UNLISTED).write_bytes(b"not in the index")  # added after the build
    (tmp_path / "secret.txt").write_text("outside the wheelhouse")
    return directory


def _settings(tmp_path: Path, house: Path | None) -> GatewaySettings:
    return GatewaySettings(state_dir=tmp_path / "state", admin_socket=tmp_path / "gw.sock",
                           wheelhouse_dir=house)  # fmt: skip


# --------------------------------------------------------------------------- the pure part


def test_names_are_normalized_as_pep_503_says() -> None:
    assert normalize("Alpha.Pkg") == "alpha-pkg"
    assert normalize("Friendly-Bard") == normalize("FRIENDLY_BARD") == "friendly-bard"
    assert normalize("a__b..c--d") == "a-b-c-d"
    assert parse_wheel_name(
        "pydantic_core-2.50.5-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64.whl"
    ) == ("pydantic-core", "2.50.5", ("manylinux2014_x86_64", "manylinux_2_17_x86_64"))


@pytest.mark.parametrize(
    "name", ["../x-1.0-py3-none-any.whl", "x-1.0-py3-none-any.whl/..", ".x-1.0-py3-none-any.whl",
             "x-1.0.tar.gz", "x/y-1.0-py3-none-any.whl", "x-1.0-py3-none-any.whl\x00"],
)  # fmt: skip
def test_only_plain_wheel_names_are_accepted(name: str) -> None:
    with pytest.raises(ValueError, match="not a wheel file name"):
        parse_wheel_name(name)
    with pytest.raises(ConfigError):
        parse_index(f"{'0' * 64}  {name}\n")


def test_the_index_and_the_requirements(house: Path) -> None:
    index = (house / INDEX_NAME).read_text().splitlines()
    assert [line.split("  ")[1] for line in index] == sorted([ALPHA, BETA_HERE, BETA_OTHER])
    loaded = load_wheelhouse(house)
    assert sorted(loaded.projects) == ["alpha-pkg", "beta"]
    assert set(loaded.platforms) == {"x86_64", "aarch64"}
    digest = {line.split("  ")[1]: line.split("  ")[0] for line in index}
    text = loaded.requirements(MACHINE)
    assert text is not None
    pins = [line for line in text.splitlines() if not line.startswith("#")]
    assert pins == [
        "alpha-pkg==1.0 \\", f"    --hash=sha256:{digest[ALPHA]}",
        "beta==2.0 \\", f"    --hash=sha256:{digest[BETA_HERE]}",
    ]  # fmt: skip
    assert (house / f"requirements-{MACHINE}.txt").read_text() == text
    assert loaded.requirements("riscv64") is None


def test_two_versions_of_a_project_are_refused(house: Path) -> None:
    (house / UNLISTED).unlink()
    make_wheel(house, "beta-2.1-py3-none-any.whl")
    with pytest.raises(ConfigError, match=r"beta 2\.0 and 2\.1"):
        write_index(house)


def test_a_missing_index_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the wheelhouse index") as err:
        load_wheelhouse(tmp_path)
    assert err.value.hint and "wiregate wheelhouse build" in err.value.hint


# --------------------------------------------------------------------------- the routes


async def test_the_simple_index(aiohttp_client: ClientFactory, tmp_path: Path, house: Path) -> None:
    client = await aiohttp_client(create_app(_settings(tmp_path, house)))
    root = await client.get("/simple/")
    assert root.status == 200 and root.content_type == "text/html"
    body = await root.text()
    assert '<a href="alpha-pkg/">alpha-pkg</a>' in body and '<a href="beta/">beta</a>' in body
    page = await client.get("/simple/beta/")
    text = await page.text()
    for name in (BETA_HERE, BETA_OTHER):
        digest = hashlib.sha256((house / name).read_bytes()).hexdigest()
        assert f'href="../../wheels/{name}#sha256={digest}"' in text
    moved = await client.get("/simple/Alpha.Pkg/", allow_redirects=False)
    assert moved.status == 301 and moved.headers["Location"] == "/simple/alpha-pkg/"
    again = await client.get("/simple/beta/", headers={"If-None-Match": page.headers["ETag"]})
    assert again.status == 304


async def test_unknown_projects_and_platforms_are_404(
    aiohttp_client: ClientFactory, tmp_path: Path, house: Path
) -> None:
    client = await aiohttp_client(create_app(_settings(tmp_path, house)))
    missing = await client.get("/simple/gamma/")
    assert missing.status == 404 and (await missing.json())["error"] == "not_found"
    riscv = await client.get("/wheels/requirements-riscv64.txt")
    assert riscv.status == 404 and "x86_64" in (await riscv.json())["hint"]


async def test_wheels_are_served_with_length_type_and_etag(
    aiohttp_client: ClientFactory, tmp_path: Path, house: Path
) -> None:
    client = await aiohttp_client(create_app(_settings(tmp_path, house)))
    resp = await client.get(f"/wheels/{ALPHA}")
    data = await resp.read()
    assert resp.status == 200 and data == (house / ALPHA).read_bytes()
    assert resp.headers["Content-Type"] == "application/octet-stream"
    assert resp.headers["Content-Length"] == str(len(data)) and resp.headers["ETag"]
    cached = await client.get(f"/wheels/{ALPHA}", headers={"If-None-Match": resp.headers["ETag"]})
    assert cached.status == 304
    reqs = await client.get(f"/wheels/requirements-{MACHINE}.txt")
    assert reqs.status == 200 and reqs.content_type == "text/plain"
    assert await reqs.text() == (house / f"requirements-{MACHINE}.txt").read_text()


@pytest.mark.parametrize(
    "path",
    [f"/wheels/{UNLISTED}", f"/wheels/{INDEX_NAME}", "/wheels/..%2Fsecret.txt",
     "/wheels/%2e%2e%2f%2e%2e%2fsecret.txt", "/wheels/../secret.txt", "/wheels/..",
     "/wheels/%2Fetc%2Fpasswd", f"/wheels/.%2F{ALPHA}", f"/wheels/sub%2F..%2F{ALPHA}"],
)  # fmt: skip
async def test_nothing_but_listed_wheels_is_served(
    aiohttp_client: ClientFactory, tmp_path: Path, house: Path, path: str
) -> None:
    client = await aiohttp_client(create_app(_settings(tmp_path, house)))
    resp = await client.get(path, allow_redirects=False)
    assert resp.status == 404, path
    body = await resp.read()
    assert b"outside the wheelhouse" not in body and b"not in the index" not in body


async def test_without_a_wheelhouse_every_route_is_404_with_a_hint(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    client = await aiohttp_client(create_app(_settings(tmp_path, None)))
    for path in ("/simple/", "/simple/wiregate/", f"/wheels/requirements-{MACHINE}.txt",
                 f"/wheels/{ALPHA}"):  # fmt: skip
        resp = await client.get(path)
        assert resp.status == 404, path
        assert "wheelhouse_dir" in (await resp.json())["hint"]


def test_a_broken_wheelhouse_stops_the_gateway_from_starting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the wheelhouse index"):
        create_app(_settings(tmp_path, tmp_path))


# --------------------------------------------------------------------------- pip itself


async def _pip_install(index: str, requirements: Path, venv: Path) -> tuple[int, str]:
    """``pip install --require-hashes`` into ``venv`` from ``index`` only: no pip
    configuration, no PIP_* variable of this environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
        "--disable-pip-version-check", "--no-cache-dir", "--index-url", index,
        "--require-hashes", "-r", str(requirements),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def _venv(path: Path) -> Path:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "venv", "--without-pip",
                                                str(path))  # fmt: skip
    assert await proc.wait() == 0
    return path


async def _fetch(server: TestServer, path: str, target: Path) -> Path:
    async with ClientSession() as session, session.get(server.make_url(path)) as resp:
        assert resp.status == 200
        target.write_bytes(await resp.read())
    return target


async def test_pip_installs_from_the_served_index_with_hashes_required(
    aiohttp_server: ServerFactory, tmp_path: Path, house: Path
) -> None:
    server = await aiohttp_server(create_app(_settings(tmp_path, house)))
    index = f"http://127.0.0.1:{server.port}/simple/"
    requirements = await _fetch(server, f"/wheels/requirements-{MACHINE}.txt", tmp_path / "r.txt")
    venv = await _venv(tmp_path / "venv")
    code, output = await _pip_install(index, requirements, venv)
    assert code == 0, output
    assert "Successfully installed alpha-pkg-1.0 beta-2.0" in output
    [site] = (venv / "lib").glob("python3.*/site-packages")
    assert (site / "alpha_pkg.py").exists() and (site / "beta.py").exists()


async def test_pip_refuses_a_wheel_changed_after_the_build(
    aiohttp_server: ServerFactory, tmp_path: Path, house: Path
) -> None:
    wheel = house / BETA_HERE
    data = bytearray(wheel.read_bytes())
    data[len(data) // 2] ^= 0x01  # one byte
    wheel.write_bytes(bytes(data))
    server = await aiohttp_server(create_app(_settings(tmp_path, house)))
    index = f"http://127.0.0.1:{server.port}/simple/"
    requirements = await _fetch(server, f"/wheels/requirements-{MACHINE}.txt", tmp_path / "r.txt")
    venv = await _venv(tmp_path / "venv")
    code, output = await _pip_install(index, requirements, venv)
    assert code != 0
    assert "DO NOT MATCH THE HASHES" in output and BETA_HERE in output
    [site] = (venv / "lib").glob("python3.*/site-packages")
    assert not (site / "beta.py").exists() and not (site / "alpha_pkg.py").exists()
