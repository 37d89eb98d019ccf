"""The relay's asyncio adapters: STUN listeners, the forwarding ports, metrics."""
