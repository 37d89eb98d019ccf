"""Network maps: addresses, route claims, per-agent maps and deltas, the broker."""
