"""wiregate relay: a STUN server (RFC 8489) and an authenticated UDP relay for WireGuard.

Nothing is imported here: an agent that needs only the STUN client or the probe
(:mod:`relay.client`) never loads the relay's server side. The modules:

- cores (sans-IO): :mod:`relay.stun` (the STUN codec), :mod:`relay.stun_core`
  (the Binding server), :mod:`relay.controlwire` (the bind handshake's codec),
  :mod:`relay.tickets`, :mod:`relay.forwarding` (the relay core), :mod:`relay.pool`
  (the allocation table), :mod:`relay.filters` (what is forwarded, and where never);
- :mod:`relay.aio`: the asyncio adapters and the process entry point
  (:func:`relay.aio.stun.run_relay`);
- :mod:`relay.client`: the STUN client, the agent's bind helpers, the liveness probe;
- :mod:`relay.errors`, :mod:`relay.metrics`, :mod:`relay.endpoints`.
"""
