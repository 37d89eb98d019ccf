"""Integration tests against real, independently written peers (an OpenID Provider)."""
