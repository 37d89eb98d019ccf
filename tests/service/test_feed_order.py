"""Map changes on a real PostgreSQL: a replica's broker reaches every committed change,
in version order, whatever the interleaving of replicas' commits and its own reads."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from gateway.mapping.broker import Broker
from gateway.mapping.follower import Follower
from gateway.store import EnrollRequest, KeySpec, Store
from lab.pg import PgServer
from wiregate.keys import encode_key, generate_private_key, public_from_private
from wiregate.model import Device


@pytest.fixture
def db_url(pg_server: PgServer) -> str:
    return pg_server.create_database()


def new_key() -> str:
    return encode_key(public_from_private(generate_private_key()))


async def enroll_two(store: Store) -> list[Device]:
    _key, secret = await store.create_key(KeySpec(reusable=True))
    return [
        (await store.enroll(secret, EnrollRequest(new_key(), name))).record.device
        for name in ("a1", "a2")
    ]


def after_first_read(store: Store, change: Callable[[], Awaitable[object]]) -> None:
    """Commit ``change`` (another replica's) right after the first of the reads a
    whole-map reload makes, whichever it makes first."""
    done = False

    def wrap(name: str) -> None:
        real = getattr(store, name)

        async def read(*args: Any) -> Any:
            nonlocal done
            result = await real(*args)
            if not done:
                done = True
                await change()
            return result

        setattr(store, name, read)

    wrap("map_version")
    wrap("list_devices")


async def test_a_reload_keeps_a_change_committed_between_its_reads(db_url: str) -> None:
    store, other = await Store.open(db_url), await Store.open(db_url)
    try:
        a1, _a2 = await enroll_two(store)
        broker = Broker()
        broker.load([], 0)
        follower = Follower(store, broker, listen_dsn=None)
        broker.follow(follower.wake)
        assert await store.prune_changes(keep=0, relay_pairs_idle=3600) > 0
        assert await store.changes_since(0) is None  # the next catch-up reloads
        after_first_read(store, lambda: other.set_endpoints(a1.id, ["192.0.2.1:51820"], "eim"))

        await follower.catch_up()  # the reload
        await follower.catch_up()  # and the feed after it
        assert broker.version == await other.map_version()
        assert broker.device(a1.id).endpoints == ("192.0.2.1:51820",)
        assert broker.device(a1.id).nat == "eim"
    finally:
        await store.close()
        await other.close()


async def test_concurrent_commits_on_two_replicas_reach_a_broker_in_version_order(
    db_url: str,
) -> None:
    store, other = await Store.open(db_url), await Store.open(db_url)
    try:
        a1, a2 = await enroll_two(store)
        broker = Broker()
        broker.load([a1, a2], await store.map_version())
        follower = Follower(store, broker, listen_dsn=None, poll_interval=0.05)
        follower.start()
        try:
            writes = [
                (store if i % 2 else other).set_endpoints(
                    (a1 if i % 4 < 2 else a2).id, [f"192.0.2.{i + 1}:51820"]
                )
                for i in range(16)
            ]
            done = await asyncio.gather(*writes)
            head = max(version for _, version in (d for d in done if d is not None))
            assert await follower.sync(head, 10)
        finally:
            await follower.stop()
        assert broker.device(a1.id) == (await store.get_device(a1.id)).device
        assert broker.device(a2.id) == (await store.get_device(a2.id)).device
    finally:
        await store.close()
        await other.close()
