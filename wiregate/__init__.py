"""Shared by every wiregate process; imports none of agent, gateway, identity or relay."""
