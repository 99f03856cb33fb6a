#!/usr/bin/env python3
"""Test tool: connect to HOST PORT over TCP and print the one line the server sends.

Usage: dial.py HOST PORT

Pairs with origdst_server.py, whose reply says which listener the connection
reached and its SO_ORIGINAL_DST. On failure prints {"error": "..."} and exits 1.
"""

from __future__ import annotations

import json
import socket
import sys


def main() -> int:
    host, port = sys.argv[1], int(sys.argv[2])
    try:
        with socket.create_connection((host, port), timeout=3) as conn:
            data = b""
            while not data.endswith(b"\n"):
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
        print(data.decode().strip())
        return 0
    except OSError as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 1


if __name__ == "__main__":
    sys.exit(main())
