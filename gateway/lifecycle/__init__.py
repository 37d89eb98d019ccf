"""A device's life after enrollment: key lifetimes and the background sweeper."""
