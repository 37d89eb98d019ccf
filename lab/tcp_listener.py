"""A TCP listener script for packet-filter tests: run with ``python -c LISTENER PORT...``.

It listens on every given port over IPv4 and IPv6, prints ``listening`` once ready,
and answers each connection with ``hello``.
"""

from __future__ import annotations

__all__ = ["CLIENT", "LISTENER"]

# ``python -c CLIENT SOURCE TARGET PORT``: connects from a source address; prints
# "open", "refused" or "timeout".
CLIENT = """\
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM)
s.settimeout(1.5)
s.bind((sys.argv[1], 0))
try:
    s.connect((sys.argv[2], int(sys.argv[3])))
    print("open")
except ConnectionRefusedError:
    print("refused")
except (TimeoutError, socket.timeout):
    print("timeout")
"""

LISTENER = """\
import selectors, socket, sys
sel = selectors.DefaultSelector()
for port in sys.argv[1:]:
    for family, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((addr, int(port)))
        s.listen()
        sel.register(s, selectors.EVENT_READ)
print("listening", flush=True)
while True:
    for key, _ in sel.select():
        conn, _ = key.fileobj.accept()
        conn.sendall(b"hello")
        conn.close()
"""
