"""The soak: hundreds of simulated agents churning against real gateway processes on
PostgreSQL while real wireguard-go tunnels carry traffic (see tests/soak/driver.py)."""
