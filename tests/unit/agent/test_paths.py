"""The per-peer path machine: NAT pairings, relay fallback, retries, and properties."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.discovery.netcheck import NatType
from agent.paths.machine import (
    TRANSITIONS,
    Action,
    Event,
    Handshake,
    LocalNat,
    PathMachine,
    PathState,
    PeerUpdate,
    Predict,
    RelayFailed,
    RelayReady,
    ReleaseRelay,
    RequestRelay,
    SetEndpoint,
    Tick,
)
from agent.paths.predict import MAX_PROBES
from agent.paths.vocabulary import rank_candidates

PUB, LAN = "203.0.113.5:51820", "10.0.0.5:51820"
RELAY = "192.0.2.9:40000"


def machine(
    ours: NatType,
    theirs: NatType | None,
    endpoints: tuple[str, ...] = (PUB, LAN),
    *,
    leads: bool = True,
) -> PathMachine:
    m = PathMachine("peer-1", leads=leads)
    m.handle(LocalNat(0.0, ours, "198.51.100.1:51820"))
    m.handle(PeerUpdate(0.0, endpoints, theirs))
    return m


def relayed(m: PathMachine, now: float = 10.0) -> None:
    """Let the probes time out (each gets its full 5 s) and the relay answer."""
    m.handle(Tick(now - 5.0))
    m.handle(Tick(now))
    assert m.state is PathState.RELAY_PENDING
    assert m.handle(RelayReady(now, RELAY)) == [SetEndpoint("peer-1", RELAY)]
    assert m.handle(Handshake(now + 0.2, now + 0.1, RELAY)) == []  # the relay's kicks end


def test_eim_to_eim_goes_direct() -> None:
    m = machine(NatType.EIM, NatType.EIM)
    assert m.state is PathState.PROBING_DIRECT
    assert m.handle(Handshake(1.0, 1.0, PUB)) == []
    report = m.explain()
    assert (report.path, report.endpoint) == ("direct", PUB)
    assert "eim" in report.reason


def test_open_peer_with_any_nat_is_direct_and_says_so() -> None:
    for ours in NatType:
        if ours is NatType.UDP_BLOCKED:
            continue
        m = machine(ours, NatType.OPEN)
        m.handle(Handshake(0.5, 0.5))
        assert m.explain().reason == "peer is reachable directly (open host)"


def test_symmetric_both_sides_relays_immediately() -> None:
    m = PathMachine("peer-1")
    m.handle(LocalNat(0.0, NatType.SYMMETRIC))
    assert m.handle(PeerUpdate(0.0, (PUB,), NatType.SYMMETRIC)) == [RequestRelay("peer-1")]
    assert m.handle(RelayReady(0.5, RELAY)) == [SetEndpoint("peer-1", RELAY)]
    report = m.explain()
    assert report.path == "relayed"
    assert report.reason.startswith("both sides behind symmetric NAT")
    for t in (1.5, 2.5, 3.5, 4.5):  # the relay's kicks (no handshake through it yet)
        assert m.handle(Tick(t)) == [SetEndpoint("peer-1", RELAY)]
    assert m.next_deadline() is None  # direct is pointless: no retries


def test_symmetric_pair_on_a_shared_lan_still_tries_direct() -> None:
    m = PathMachine("peer-1")
    m.handle(LocalNat(0.0, NatType.SYMMETRIC, networks=("10.0.0.7/24",)))
    m.handle(PeerUpdate(0.0, (PUB, LAN), NatType.SYMMETRIC))
    assert m.state is PathState.PROBING_DIRECT


def test_udp_blocked_relays_with_reason() -> None:
    for ours, theirs, why in [
        (NatType.UDP_BLOCKED, NatType.EIM, "UDP blocked on this network"),
        (NatType.EIM, NatType.UDP_BLOCKED, "UDP blocked on the peer's network"),
    ]:
        m = machine(ours, theirs)
        m.handle(RelayReady(0.2, RELAY))
        assert m.explain().reason.startswith(why)


def test_no_handshake_on_any_candidate_falls_back_to_relay() -> None:
    m = machine(NatType.EIM, None)
    assert m.handle(Tick(5.0)) == [SetEndpoint("peer-1", LAN)]
    assert m.handle(Tick(10.0)) == [RequestRelay("peer-1")]
    m.handle(RelayReady(10.5, RELAY))
    report = m.explain()
    assert report.reason == (
        "no handshake on any direct candidate within 5 s; retrying direct every 30 s"
    )


def test_direct_going_silent_moves_to_relay() -> None:
    m = machine(NatType.EIM, NatType.EIM)
    m.handle(Handshake(1.0, 1.0))
    m.handle(Handshake(100.0, 90.0))
    assert m.next_deadline() == 270.0
    assert m.handle(Tick(270.0)) == [RequestRelay("peer-1")]
    assert "direct path went silent (no handshake for 180 s)" in m.explain().reason


def test_retry_direct_success_returns_to_direct_and_releases_relay() -> None:
    m = machine(NatType.EIM, NatType.EIM)
    relayed(m)
    assert m.next_deadline() == 60.0  # now + 30 s, up to the 30 s wall-clock grid
    assert m.handle(Tick(60.0)) == [SetEndpoint("peer-1", PUB)]
    assert m.state is PathState.RETRY_DIRECT
    assert m.handle(Handshake(61.0, 61.0, PUB)) == [ReleaseRelay("peer-1")]
    assert m.explain().path == "direct"


def test_failed_retries_back_off_and_cap() -> None:
    m = machine(NatType.EIM, NatType.EIM, (PUB,))
    relayed(m, 5.0)
    for backoff in (30.0, 60.0, 120.0, 240.0, 240.0, 240.0, 240.0):
        deadline = m.next_deadline()
        assert deadline is not None
        # on the backoff's wall-clock grid, so that both sides of a pair retry together
        assert deadline % backoff == 0
        assert backoff <= deadline - m.explain().since < 2 * backoff
        m.handle(Tick(deadline))
        assert m.state is PathState.RETRY_DIRECT
        assert m.handle(Tick(deadline + 5.0)) == [SetEndpoint("peer-1", RELAY)]
        m.handle(Handshake(deadline + 5.2, deadline + 5.1, RELAY))  # back through the relay
    assert "retrying direct every 240 s" in m.explain().reason


def test_retry_grids_of_two_sides_meet() -> None:
    """Two sides relayed at different moments, with different backoffs, still retry at
    the same instant within one period of the slower one."""
    a = machine(NatType.EIM, NatType.EIM, (PUB,))
    b = machine(NatType.EIM, NatType.EIM, (PUB,))
    relayed(a, 5.0)
    relayed(b, 47.0)
    times: dict[str, set[float]] = {"a": set(), "b": set()}
    for name, m in (("a", a), ("b", b)):
        for _ in range(4):
            deadline = m.next_deadline()
            assert deadline is not None
            times[name].add(deadline)
            m.handle(Tick(deadline))
            m.handle(Tick(deadline + 5.0))
    assert times["a"] & times["b"]


def test_relay_unavailable_fails_with_reason() -> None:
    m = machine(NatType.SYMMETRIC, NatType.SYMMETRIC)
    m.handle(RelayFailed(1.0, "no relay is configured"))
    report = m.explain()
    assert report.path == "failed"
    assert report.reason == "both sides behind symmetric NAT; no relay: no relay is configured"


def test_peer_endpoint_change_while_direct_reprobes() -> None:
    m = machine(NatType.EIM, NatType.EIM)
    m.handle(Handshake(1.0, 1.0))
    new = "203.0.113.77:51820"
    assert m.handle(PeerUpdate(50.0, (new,), NatType.EIM)) == [SetEndpoint("peer-1", new)]
    assert m.state is PathState.PROBING_DIRECT
    assert m.handle(PeerUpdate(50.5, (new,), NatType.EIM)) == []
    assert m.handle(Tick(51.0)) == [SetEndpoint("peer-1", new)]  # a fresh handshake: a kick


def test_roaming_to_a_relay_is_no_evidence_of_direct() -> None:
    m = machine(NatType.EIM, NatType.EIM, (PUB,))
    relayed(m, 5.0)
    m.handle(Tick(60.0))  # retry direct (30 s after, on the 30 s grid)
    assert m.state is PathState.RETRY_DIRECT
    m.handle(Handshake(61.0, 61.0, RELAY))  # the peer's packets came through the relay
    assert m.state is PathState.RETRY_DIRECT


def test_the_peer_reaching_us_directly_while_relayed_makes_the_path_direct() -> None:
    """A symmetric-NAT peer reaches an open host: the open host's probes of the peer's
    STUN mapping fail, but the peer's handshake arrives from its real mapping, where
    WireGuard roams to. That address is adopted and the relay released."""
    m = machine(NatType.OPEN, NatType.SYMMETRIC, (PUB,))
    relayed(m, 5.0)
    real = "203.0.113.5:61234"
    assert m.handle(Handshake(20.0, 19.5, real)) == [
        SetEndpoint("peer-1", real),
        ReleaseRelay("peer-1"),
    ]
    report = m.explain()
    assert report.path == "direct" and report.endpoint == real
    assert report.reason == (
        f"this host is reachable directly (open host); the peer reached it from {real}"
    )


def test_same_nat_prefers_lan_address() -> None:
    ranked = rank_candidates(
        ["203.0.113.5:51820", "192.168.1.9:51820", "10.9.9.9:51820"],
        peer_reflexive="203.0.113.5:51820",
        our_reflexive="203.0.113.5:40000",
        our_networks=["192.168.1.4/24"],
    )
    assert ranked.order == ("192.168.1.9:51820", "10.9.9.9:51820", "203.0.113.5:51820")
    other = rank_candidates(
        ["10.9.9.9:51820", "198.51.100.3:51820", "203.0.113.5:51820", "bogus"],
        peer_reflexive="203.0.113.5:51820",
        our_reflexive="198.51.100.200:1",
    )
    assert other.order == ("203.0.113.5:51820", "198.51.100.3:51820", "10.9.9.9:51820")


def test_table_covers_every_state_and_event() -> None:
    kinds = {"local_nat", "peer", "handshake", "relay_ready", "relay_failed", "tick"}
    assert set(TRANSITIONS) == {(s, k) for s in PathState for k in kinds}


# -- properties over random event sequences -----------------------------------------------

CANDIDATES = [PUB, LAN, "198.51.100.3:51820", "192.168.1.9:51820", "[2001:db8::1]:51820"]
RELAYS = [RELAY, "192.0.2.10:40001"]
nats = st.sampled_from(list(NatType))


def _event(draw: st.DrawFn, now: float, last_set: float) -> Event:
    choice = draw(st.integers(0, 5))
    if choice == 0:
        return LocalNat(now, draw(nats), draw(st.sampled_from([None, "203.0.113.5:1"])))
    if choice == 1:
        endpoints = tuple(draw(st.lists(st.sampled_from(CANDIDATES), max_size=4)))
        return PeerUpdate(now, endpoints, draw(st.one_of(st.none(), nats)))
    if choice == 2:
        latest = draw(st.one_of(st.none(), st.floats(max(0.0, now - 400), now)))
        return Handshake(now, latest, draw(st.sampled_from([None, *CANDIDATES, *RELAYS])))
    if choice == 3:
        return RelayReady(now, draw(st.sampled_from(RELAYS)))
    if choice == 4:
        return RelayFailed(now, "refused")
    return Tick(now)


@st.composite
def scripts(draw: st.DrawFn) -> list[Event]:
    now, events = 0.0, []
    for _ in range(draw(st.integers(1, 40))):
        now += draw(st.sampled_from([0.0, 0.1, 1.0, 4.9, 5.0, 30.0, 200.0]))
        events.append(_event(draw, now, 0.0))
    return events


@settings(max_examples=150, deadline=None)
@given(scripts())
def test_random_sequences_keep_the_invariants(events: list[Event]) -> None:
    m = PathMachine("peer-1")
    states, candidates, relays = set(TRANSITIONS), set(), set()
    outstanding, last_set, current = False, None, None
    predicted: float | None = None
    for event in events:
        before = m.state
        if isinstance(event, PeerUpdate):  # a peer change may restart the path at once
            candidates, last_set = set(event.endpoints), None
        if isinstance(event, RelayReady):
            relays.add(event.endpoint)
        if isinstance(event, RelayFailed):  # whatever the relay held for us is gone,
            outstanding, last_set = False, None  # so moving off it at once is no flap
        for action in m.handle(event):
            adopted = (  # where WireGuard already sends: the peer's own address
                isinstance(event, Handshake)
                and action == SetEndpoint("peer-1", event.endpoint or "")
                and event.endpoint not in relays
            )
            # the same endpoint afresh (a probe's kick, a re-probe) moves no traffic: no flap
            again = isinstance(action, SetEndpoint) and action.endpoint == current
            if again:
                pass
            elif adopted:
                last_set = event.now
            elif isinstance(action, SetEndpoint):
                assert action.endpoint in candidates | relays
                if last_set is not None:
                    assert event.now - last_set >= m.timers.probe_timeout - 1e-6  # float sums
                last_set = event.now
            if isinstance(action, SetEndpoint):
                current = action.endpoint
            elif isinstance(action, RequestRelay):
                assert not outstanding
                outstanding = True
            elif isinstance(action, Predict):  # bounded, towards the peer, rate-limited
                assert f"{action.plan.address}:{action.plan.ports[0]}" in candidates
                assert len(action.plan.ports) <= MAX_PROBES
                if predicted is not None:
                    assert event.now - predicted >= m.timers.probe_timeout - 1e-6
                predicted = event.now
            else:
                assert isinstance(action, ReleaseRelay)  # cancelling is idempotent
                outstanding = False
        if isinstance(event, RelayFailed):  # it answers the request made by then; re-asked?
            outstanding = m.state is PathState.RELAY_PENDING
            last_set = None  # a timer due at the same instant may have moved first
        blocked = isinstance(event, LocalNat) and event.nat is NatType.UDP_BLOCKED
        if blocked and before is PathState.PROBING_DIRECT:  # direct is pointless: the probe
            assert m.state is not PathState.PROBING_DIRECT  # ends
        asks = before is not PathState.RELAY_PENDING and m.state is PathState.RELAY_PENDING
        if asks and isinstance(event, LocalNat):  # a verdict ruling direct out ends a probe
            last_set = None  # (one a timer just began) at once: the relay's endpoint follows
        assert (m.state, event.kind) in states
        deadline = m.next_deadline()
        assert deadline is None or deadline > event.now
        assert m.explain().reason


def test_handshakes_over_a_lost_relay_are_no_direct_evidence() -> None:
    """The relay dies: WireGuard still reports the handshakes made through it, at the
    relay's endpoint; they must not make the path look direct."""
    m = machine(NatType.SYMMETRIC, NatType.EIM, (PUB,))
    relayed(m, 5.0)
    assert m.state is PathState.RELAYED
    m.handle(Handshake(12.0, 11.0, RELAY))
    m.handle(RelayFailed(13.0, "relay r1 stopped answering"))
    assert m.state is PathState.RELAY_PENDING
    m.handle(Handshake(14.0, 11.0, RELAY))
    assert m.state is PathState.RELAY_PENDING
    assert m.explain().path == "probing"


def test_a_blocker_learnt_while_relayed_becomes_the_reason() -> None:
    m = machine(NatType.UNKNOWN, None)
    relayed(m)
    assert m.explain().reason.startswith("no handshake on any direct candidate")
    m.handle(LocalNat(11.0, NatType.SYMMETRIC, None))
    m.handle(PeerUpdate(12.0, (PUB, LAN), NatType.SYMMETRIC))
    assert m.explain().reason == "both sides behind symmetric NAT; not retrying direct"
    assert m.next_deadline() is None


def test_our_mapping_changing_reprobes_a_direct_path() -> None:
    m = machine(NatType.EIM, NatType.EIM)
    m.handle(Handshake(1.0, 1.0, PUB))
    assert m.state is PathState.DIRECT
    assert m.handle(LocalNat(30.0, NatType.EIM, "198.51.100.1:51820")) == []  # the same
    assert m.handle(LocalNat(60.0, NatType.EIM, "198.51.100.1:20641")) == [
        SetEndpoint("peer-1", PUB)
    ]
    assert m.state is PathState.PROBING_DIRECT
    m.handle(Handshake(61.0, 61.0, PUB))
    assert m.state is PathState.DIRECT


def test_a_better_candidate_arriving_while_probing_is_probed_first() -> None:
    """The peer's reflexive address reaches the map while its LAN address is probed."""
    m = machine(NatType.EIM, NatType.EIM, (LAN,))
    assert m.state is PathState.PROBING_DIRECT
    assert m.handle(PeerUpdate(1.0, (PUB, LAN), NatType.EIM)) == [SetEndpoint("peer-1", PUB)]
    assert m.handle(PeerUpdate(1.5, (PUB, LAN), NatType.EIM)) == []  # nothing new: go on


# -- direct wherever the NATs allow it ------------------------------------------------------

SYM_LAN = "192.0.2.2:51820"  # a symmetric-NAT peer's private address: on no network of ours


def test_a_probe_restarts_the_handshake_every_kick_until_it_times_out() -> None:
    """WireGuard retransmits an unanswered initiation only after 5 s: a peer that
    installed us after our first initiation would be missed by a shorter probe."""
    m = machine(NatType.EIM, NatType.EIM, (PUB,))
    assert m.wants_fresh_handshake()
    kicks = [m.handle(Tick(t)) for t in (1.0, 2.0, 3.0, 4.0)]
    assert kicks == [[SetEndpoint("peer-1", PUB)]] * 4
    assert m.state is PathState.PROBING_DIRECT
    assert m.handle(Tick(5.0)) == [RequestRelay("peer-1")]


def test_a_handshake_due_with_a_kick_wins_over_the_kick() -> None:
    m = machine(NatType.EIM, NatType.EIM, (PUB,))
    assert m.handle(Handshake(1.0, 0.9, PUB)) == []
    assert m.state is PathState.DIRECT


def test_an_unreachable_private_candidate_is_probed_gently() -> None:
    """An open host and a symmetric-NAT peer that advertises only its private address:
    no kicks and no session resets (they would cut the handshake the peer sends)."""
    m = machine(NatType.OPEN, NatType.SYMMETRIC, (SYM_LAN,))
    assert m.state is PathState.PROBING_DIRECT
    assert not m.wants_fresh_handshake()
    assert m.handle(Tick(1.0)) == [] and m.handle(Tick(2.0)) == []


def test_the_symmetric_peer_reaching_an_open_host_is_direct_on_both_sides() -> None:
    real = "198.51.100.10:30352"  # the peer's NAT mapping towards us
    m = machine(NatType.OPEN, NatType.SYMMETRIC, (SYM_LAN,))
    assert m.handle(Handshake(1.5, 1.2, real)) == [SetEndpoint("peer-1", real)]
    report = m.explain()
    assert (report.path, report.endpoint) == ("direct", real)
    assert report.reason == (
        f"this host is reachable directly (open host); the peer reached it from {real}"
    )
    peer = machine(NatType.SYMMETRIC, NatType.OPEN, (PUB,))
    peer.handle(Handshake(1.5, 1.2, PUB))
    assert peer.explain().reason == "peer is reachable directly (open host)"


def test_a_roamed_endpoint_is_adopted_even_after_the_relay_was_set() -> None:
    """The peer's handshake arrived before our relay was bound; WireGuard roams back to
    the peer's address with its next packet. That is direct evidence: not a fight."""
    real = "198.51.100.10:30352"
    m = machine(NatType.OPEN, NatType.SYMMETRIC, (SYM_LAN,))
    relayed(m, 5.0)
    assert m.next_deadline() is None  # no candidate of the peer reachable: no retries
    assert "direct once the peer reaches this host" in m.explain().reason
    assert m.handle(Handshake(4.9, 1.0, real)) == []  # read before the relay was written
    assert m.state is PathState.RELAYED
    assert m.handle(Handshake(6.0, 1.0, real)) == [
        SetEndpoint("peer-1", real),
        ReleaseRelay("peer-1"),
    ]
    assert m.explain().path == "direct"


def test_a_direct_path_follows_the_peer_roaming_but_not_to_a_relay() -> None:
    m = machine(NatType.EIM, NatType.EIM, (PUB,))
    m.handle(Handshake(1.0, 1.0, PUB))
    moved = "203.0.113.5:40123"
    assert m.handle(Handshake(30.0, 29.0, moved)) == [SetEndpoint("peer-1", moved)]
    assert m.state is PathState.DIRECT and m.explain().endpoint == moved
    m.handle(RelayReady(31.0, RELAY))  # an answer nobody waits for: a relay's address
    assert m.handle(Handshake(40.0, 39.0, RELAY)) == []
    assert m.explain().endpoint == moved


def test_a_stale_session_at_a_roamed_address_is_no_evidence() -> None:
    m = machine(NatType.OPEN, NatType.SYMMETRIC, (SYM_LAN,))
    relayed(m, 5.0)
    assert m.handle(Handshake(400.0, 100.0, "198.51.100.10:30352")) == []
    assert m.state is PathState.RELAYED


def test_the_direct_reason_follows_the_peer_nat_type_learnt_later() -> None:
    m = machine(NatType.EIM, None, (PUB,))
    m.handle(Handshake(1.0, 1.0, PUB))
    assert m.explain().reason == "hole punched through NAT (eim <-> unknown)"
    assert m.handle(PeerUpdate(2.0, (PUB,), NatType.OPEN)) == []
    assert m.explain().reason == "peer is reachable directly (open host)"


def test_eim_to_symmetric_relays_and_names_the_symmetric_side() -> None:
    m = machine(NatType.EIM, NatType.SYMMETRIC, (SYM_LAN,))
    relayed(m)
    assert m.explain().reason.startswith(
        "no handshake on any direct candidate within 5 s "
        "(eim <-> symmetric: the peer's symmetric NAT maps every peer anew)"
    )
    s = machine(NatType.SYMMETRIC, NatType.EIM, (PUB,))
    relayed(s)
    assert "this host's symmetric NAT maps every peer anew" in s.explain().reason
    assert "retrying direct every 30 s" in s.explain().reason


SYM_PUB = "198.51.100.14:51820"  # a symmetric NAT's public address, as its host advertises


def test_an_easy_side_predicts_and_names_the_prediction_that_let_the_peer_in() -> None:
    m = PathMachine("peer-1")
    m.handle(LocalNat(0.0, NatType.EIM, "198.51.100.10:51820"))
    out = m.handle(PeerUpdate(0.0, (SYM_PUB, SYM_LAN), NatType.SYMMETRIC))
    predicted = [a for a in out if isinstance(a, Predict)]
    assert len(predicted) == 1 and predicted[0].plan.address == "198.51.100.14"
    assert predicted[0].plan.ports[0] == 51820 and len(predicted[0].plan.ports) == 128
    assert not m.wants_fresh_handshake()  # the peer's handshake must land: no resets
    assert m.handle(PeerUpdate(1.0, (SYM_PUB,), NatType.SYMMETRIC)) == []  # rate-limited
    real = "198.51.100.14:30503"
    m.handle(Handshake(2.0, 1.5, real))
    report = m.explain()
    assert (report.path, report.endpoint) == ("direct", real)
    assert report.reason == "direct through hard NAT by port prediction after 128 probes"


def test_a_relayed_easy_side_predicts_on_the_retry_grid_without_moving_off_the_relay() -> None:
    m = PathMachine("peer-1")
    m.handle(LocalNat(0.0, NatType.EIM, "198.51.100.10:51820"))
    m.handle(PeerUpdate(0.0, (SYM_PUB,), NatType.SYMMETRIC))
    relayed(m, 5.0)
    assert m.next_deadline() == 60.0  # the 30 s grid after 5 + 30
    out = m.handle(Tick(60.0))
    assert [type(a) for a in out] == [Predict] and m.state is PathState.RELAYED
    assert m.next_deadline() == 180.0  # backed off to the 60 s grid, as the peer does


def test_a_handshake_just_before_the_newest_prediction_credits_the_one_before() -> None:
    """Both sides retry on the same grid: the peer's handshake, let in by the first
    prediction, lands a moment before the retry's prediction and is read after it. The
    path is still direct by prediction (the first one's probes)."""
    m = PathMachine("peer-1")
    m.handle(LocalNat(0.0, NatType.EIM, "198.51.100.10:51820"))
    m.handle(PeerUpdate(0.0, (SYM_PUB,), NatType.SYMMETRIC))
    relayed(m, 5.0)
    assert [type(a) for a in m.handle(Tick(60.0))] == [Predict]
    real = "198.51.100.14:30503"
    m.handle(Handshake(60.5, 59.95, real))
    report = m.explain()
    assert (report.path, report.endpoint) == ("direct", real)
    assert report.reason == "direct through hard NAT by port prediction after 128 probes"


def test_no_prediction_towards_anything_but_a_symmetric_peer() -> None:
    for theirs in (NatType.EIM, NatType.OPEN, NatType.UNKNOWN, None):
        m = PathMachine("peer-1")
        m.handle(LocalNat(0.0, NatType.EIM, "198.51.100.10:51820"))
        out = m.handle(PeerUpdate(0.0, (SYM_PUB,), theirs))
        assert not any(isinstance(a, Predict) for a in out)


# -- a verdict during a probe, and the handshake restarted at the relay ---------------------


def test_a_symmetric_verdict_while_probing_a_symmetric_peer_relays_at_once() -> None:
    m = PathMachine("peer-1")
    assert m.handle(PeerUpdate(0.0, (PUB,), NatType.SYMMETRIC)) == []  # waited on, not written
    assert m.state is PathState.PROBING_DIRECT
    assert m.handle(LocalNat(0.1, NatType.SYMMETRIC, "198.51.100.1:51820")) == [
        RequestRelay("peer-1")
    ]
    assert m.explain().reason == "asking for a relay: both sides behind symmetric NAT"


def test_a_udp_blocked_verdict_while_probing_relays_at_once() -> None:
    m = PathMachine("peer-1")
    m.handle(PeerUpdate(0.0, (PUB, LAN), NatType.EIM))
    assert m.handle(LocalNat(0.5, NatType.UDP_BLOCKED)) == [RequestRelay("peer-1")]
    assert m.explain().reason == "asking for a relay: UDP blocked on this network"


def test_a_verdict_that_leaves_direct_possible_goes_on_probing() -> None:
    m = PathMachine("peer-1")
    m.handle(PeerUpdate(0.0, (PUB, LAN), NatType.SYMMETRIC))
    assert m.handle(LocalNat(0.1, NatType.SYMMETRIC, networks=("10.0.0.7/24",))) == []
    assert m.state is PathState.PROBING_DIRECT  # a symmetric pair may share a network
    m = PathMachine("peer-1")
    m.handle(PeerUpdate(0.0, (PUB,), None))
    assert m.handle(LocalNat(0.1, NatType.EIM, "198.51.100.1:51820")) == []
    assert m.state is PathState.PROBING_DIRECT


def test_the_peer_nat_type_arriving_while_probing_relays_at_once_when_pointless() -> None:
    m = PathMachine("peer-1")
    m.handle(LocalNat(0.0, NatType.SYMMETRIC, "198.51.100.1:51820"))
    m.handle(PeerUpdate(0.0, (PUB,), None))
    assert m.state is PathState.PROBING_DIRECT
    assert m.handle(PeerUpdate(0.5, (PUB,), NatType.SYMMETRIC)) == [RequestRelay("peer-1")]
    assert m.handle(PeerUpdate(0.6, (PUB,), NatType.UDP_BLOCKED)) == []  # asked already
    assert m.state is PathState.RELAY_PENDING


def test_the_relay_endpoint_restarts_the_handshake_until_one_goes_through() -> None:
    m = PathMachine("peer-1")
    m.handle(LocalNat(0.0, NatType.SYMMETRIC))
    m.handle(PeerUpdate(0.0, (PUB,), NatType.SYMMETRIC))
    assert m.handle(RelayReady(2.0, RELAY)) == [SetEndpoint("peer-1", RELAY)]
    assert m.wants_fresh_handshake()  # the driver resets the peer: initiation at once
    assert m.next_deadline() == 3.0
    assert m.handle(Tick(3.0)) == [SetEndpoint("peer-1", RELAY)]  # the peer bound since?
    assert m.wants_fresh_handshake()
    assert m.handle(Handshake(3.5, 1.0, RELAY)) == []  # older than the relay: no proof
    assert m.next_deadline() == 4.0
    assert m.handle(Handshake(3.8, 3.4, RELAY)) == []  # through the relay: kicks end
    assert not m.wants_fresh_handshake()
    assert m.next_deadline() is None
    assert m.state is PathState.RELAYED


def test_relay_kicks_end_with_the_probe_window_and_leave_retries_alone() -> None:
    m = machine(NatType.EIM, NatType.EIM, (PUB,))
    m.handle(Tick(5.0))
    assert m.handle(RelayReady(6.0, RELAY)) == [SetEndpoint("peer-1", RELAY)]
    kicks = [m.handle(Tick(t)) for t in (7.0, 8.0, 9.0, 10.0)]
    assert kicks == [[SetEndpoint("peer-1", RELAY)]] * 4
    assert not m.wants_fresh_handshake()
    assert m.next_deadline() == 60.0  # the retry grid, unchanged
    assert m.handle(Tick(60.0)) == [SetEndpoint("peer-1", PUB)]
    assert m.state is PathState.RETRY_DIRECT


def test_the_side_that_does_not_lead_kicks_the_relay_half_a_period_later() -> None:
    """Both sides bind at the relay together: kicks in step would cross every time."""
    leader, follower = (
        machine(NatType.EIM, NatType.EIM, (PUB,)),
        machine(NatType.EIM, NatType.EIM, (PUB,), leads=False),
    )
    for m in (leader, follower):
        m.handle(Tick(5.0))
        m.handle(RelayReady(6.0, RELAY))
    ticks = (6.5, 7.0, 7.5, 8.0, 8.5, 9.0, 9.5, 10.0, 10.5)
    kicked = {
        name: [t for t in ticks if m.handle(Tick(t))]
        for name, m in (("leader", leader), ("follower", follower))
    }
    assert kicked == {"leader": [7.0, 8.0, 9.0, 10.0], "follower": [7.5, 8.5, 9.5, 10.5]}


def test_the_side_that_does_not_lead_kicks_a_direct_probe_half_a_period_later() -> None:
    """Both sides start probing each other on the same map: kicks in step would cross."""
    m = machine(NatType.EIM, NatType.EIM, (PUB,), leads=False)
    assert m.state is PathState.PROBING_DIRECT
    ticks = (0.5, 1.0, 1.5, 2.0, 2.5)
    assert [t for t in ticks if m.handle(Tick(t))] == [1.5, 2.5]


def test_a_relayed_tick_before_the_retry_is_due_does_not_retry() -> None:
    m = machine(NatType.EIM, NatType.EIM, (PUB,))
    m.handle(Tick(5.0))
    m.handle(RelayReady(6.0, RELAY))
    assert m.handle(Tick(6.5)) == []
    assert m.state is PathState.RELAYED


# -- an open host and a peer behind symmetric NAT: its advertised addresses are never written


def test_an_open_host_never_writes_a_symmetric_peers_advertised_addresses() -> None:
    """The peer publishes its NAT's public address with its WireGuard port (for port
    prediction) and its private address; neither has a mapping towards us behind it.
    Writing one could land after the peer's handshake made WireGuard roam to its real
    mapping, and send every reply into the peer's NAT (the demo's open -> symmetric
    ping failed for ~10 s that way). Probing is waiting; the roamed address is adopted."""
    m = PathMachine("peer-1")
    m.handle(LocalNat(0.0, NatType.OPEN, PUB))
    nat_public = "198.51.100.10:51820"
    written: list[Action] = []
    written += m.handle(PeerUpdate(0.0, (nat_public, SYM_LAN), NatType.SYMMETRIC))
    for t in (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 9.0):
        written += m.handle(Tick(t))
    assert m.state is PathState.PROBING_DIRECT
    assert not [a for a in written if isinstance(a, SetEndpoint)]
    assert "waiting for the peer to reach this host" in m.explain().reason
    real = "198.51.100.10:30352"
    assert m.handle(Handshake(9.5, 9.4, real)) == [SetEndpoint("peer-1", real)]
    assert (m.explain().path, m.explain().endpoint) == ("direct", real)


def test_a_session_at_a_waited_on_candidate_is_adopted_and_written() -> None:
    """A port-preserving symmetric NAT maps the peer to the very address it published:
    the live session there is direct, and the endpoint is written so that the data
    plane's next apply keeps it (nothing chosen earlier may replace it)."""
    nat_public = "198.51.100.10:51820"
    m = machine(NatType.OPEN, NatType.SYMMETRIC, (nat_public,))
    assert m.handle(Handshake(1.0, 0.9, nat_public)) == [SetEndpoint("peer-1", nat_public)]
    assert m.state is PathState.DIRECT


# -- a read just before a reset (Handshake before_write): the peer's new session is kept ---

ROAMED = "198.51.100.20:40123"  # where the peer's packets came from (its NAT's mapping)


def test_a_session_the_peer_set_up_since_the_last_read_is_taken_before_a_reset() -> None:
    """The peer's handshake reached us between two reads, and a new map makes the
    machine probe anew (with a reset). The read before the reset shows the session at
    the address the peer came from: the path is direct there and no reset is wanted."""
    m = machine(NatType.OPEN, None, (PUB,))
    assert m.wants_fresh_handshake()
    m.handle(Handshake(0.5, None, PUB))  # a read: nothing yet
    other = "203.0.113.6:51820"  # the peer published another address meanwhile
    assert m.handle(PeerUpdate(1.2, (other,), None))[-1] == SetEndpoint("peer-1", other)
    assert m.wants_fresh_handshake()
    out = m.handle(Handshake(1.21, 1.1, ROAMED, before_write=True))
    assert m.state is PathState.DIRECT and not m.wants_fresh_handshake()
    assert out == [SetEndpoint("peer-1", ROAMED)]
    assert m.explain().endpoint == ROAMED and ROAMED in m.explain().reason


def test_a_session_seen_before_is_no_reason_to_skip_a_reset() -> None:
    """The peer's NAT mapped it anew: the old session (seen by the last read) at the old
    mapping is what the probe of the new address replaces."""
    m = machine(NatType.EIM, NatType.EIM, (PUB,))
    m.handle(Handshake(0.5, 0.4, PUB))
    assert m.state is PathState.DIRECT
    new = "203.0.113.5:20875"
    m.handle(Handshake(60.0, 59.0, PUB))  # a rekey at the old mapping, seen by a read
    assert m.handle(PeerUpdate(60.5, (new,), NatType.EIM)) == [SetEndpoint("peer-1", new)]
    assert m.state is PathState.PROBING_DIRECT
    assert m.handle(Handshake(60.5, 59.0, PUB, before_write=True)) == []
    assert m.state is PathState.PROBING_DIRECT and m.wants_fresh_handshake()


def test_a_session_older_than_the_machine_or_through_a_relay_is_no_evidence() -> None:
    m = machine(NatType.OPEN, None, (PUB,))
    m.handle(Handshake(0.5, None, PUB))
    # older than the machine (left by an earlier run of the agent)
    assert m.handle(Handshake(0.6, -5.0, ROAMED, before_write=True)) == []
    assert m.state is PathState.PROBING_DIRECT
    # a relay's address (any port of it) is not the peer's
    relayed(m)
    m.handle(Tick(60.0))  # the retry grid
    assert m.state is PathState.RETRY_DIRECT and m.wants_fresh_handshake()
    relay_port = RELAY.replace("40000", "40001")
    assert m.handle(Handshake(60.2, 60.1, relay_port, before_write=True)) == []
    assert m.state is PathState.RETRY_DIRECT


def test_a_read_before_a_reset_while_a_relay_is_being_bound_is_no_evidence() -> None:
    m = machine(NatType.OPEN, None, (PUB,))
    m.handle(Tick(5.0))
    assert m.state is PathState.RELAY_PENDING
    assert m.handle(Handshake(5.2, 5.1, ROAMED, before_write=True)) == []
    assert m.state is PathState.RELAY_PENDING


def test_a_session_through_the_relay_since_the_last_read_ends_its_kicks_before_a_reset() -> None:
    """The relay's endpoint is kicked (reset) until a handshake goes through it. One that
    lands between the poll and a kick's reset ends the kicks: the reset would destroy it."""
    m = machine(NatType.SYMMETRIC, NatType.SYMMETRIC, (PUB,))
    assert m.state is PathState.RELAY_PENDING
    assert m.handle(RelayReady(0.2, RELAY)) == [SetEndpoint("peer-1", RELAY)]
    m.handle(Handshake(0.5, None, RELAY))  # the poll: nothing yet
    assert m.wants_fresh_handshake()
    m.handle(Handshake(1.2, 1.1, RELAY, before_write=True))
    assert m.state is PathState.RELAYED and not m.wants_fresh_handshake()


def test_a_relay_session_seen_before_does_not_end_the_kicks() -> None:
    m = machine(NatType.SYMMETRIC, NatType.SYMMETRIC, (PUB,))
    m.handle(RelayReady(0.2, RELAY))
    m.handle(Handshake(0.5, 0.1, RELAY))  # older than the relay's endpoint: an old session
    m.handle(Handshake(1.2, 0.1, RELAY, before_write=True))
    assert m.wants_fresh_handshake()
