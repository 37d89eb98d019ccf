"""Endpoint discovery: local candidates, STUN from the WireGuard port, the NAT type."""
