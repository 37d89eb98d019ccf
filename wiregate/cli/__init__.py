"""The ``wiregate`` command, one module per verb group."""
