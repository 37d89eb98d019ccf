"""The agent's data plane: desired state, the reconciler's diff, backends, routes, filter."""
