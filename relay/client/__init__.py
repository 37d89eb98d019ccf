"""Clients of a relay: the STUN client, binding helpers and the liveness probe."""
