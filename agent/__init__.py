"""The wiregate agent: enrollment, the map stream and the WireGuard data plane."""
