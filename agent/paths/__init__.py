"""Per-peer path choice (direct or relayed): the machine, its vocabulary and its driver."""
