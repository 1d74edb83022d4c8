#!/usr/bin/env python3
"""One NTP client request, answered or not, and where the answer came from.

Sends a mode-3 request to HOST PORT from an unconnected UDP socket, so a reply from any source
address is received (a connected socket, as real clients use, silently drops a reply from an
address other than the one asked). Prints one JSON line: the reply's source address and its
header fields. Exit status 1 when no reply to this request came within TIMEOUT seconds.

Usage: ntp_probe.py HOST PORT [TIMEOUT]
"""

import json
import os
import socket
import sys
import time


def main():
    host, port = sys.argv[1], int(sys.argv[2])
    timeout = float(sys.argv[3]) if len(sys.argv) > 3 else 2.0
    transmit = os.urandom(8)
    request = bytes([0x23]) + bytes(39) + transmit  # LI 0, version 4, mode 3 (client)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(request, (host, port))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                print(json.dumps({"to": f"{host}:{port}", "reply": None}))
                return 1
            s.settimeout(left)
            try:
                data, source = s.recvfrom(2048)
            except socket.timeout:
                continue
            if len(data) >= 48 and data[24:32] == transmit:
                break
    stratum = data[1]
    refid = data[12:16]
    print(json.dumps({
        "to": f"{host}:{port}",
        "from": f"{source[0]}:{source[1]}",
        "leap": data[0] >> 6,
        "version": (data[0] >> 3) & 7,
        "mode": data[0] & 7,
        "stratum": stratum,
        # Stratum 0 is a Kiss-o'-Death: the reference ID is its ASCII code.
        "kissCode": refid.decode("ascii", "replace").rstrip("\0") if stratum == 0 else None,
        "length": len(data),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
