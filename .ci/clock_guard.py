#!/usr/bin/env python3
"""Fails a CI run if anything touched this machine's clock.

`snapshot FILE` records CLOCK_REALTIME - CLOCK_MONOTONIC and the kernel's clock discipline
state read with adjtimex(modes=0), which only reads. `check FILE` compares the current state with
the snapshot and exits 1 on a step above 100 ms or any change of frequency, tick or status.
"""
import ctypes
import ctypes.util
import json
import sys
import time

STEP_LIMIT_S = 0.100


class Timex(ctypes.Structure):
    # struct timex from <sys/timex.h> on 64-bit Linux; only the leading fields are read.
    _fields_ = [
        ("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long), ("status", ctypes.c_int),
        ("constant", ctypes.c_long), ("precision", ctypes.c_long), ("tolerance", ctypes.c_long),
        ("time_sec", ctypes.c_long), ("time_usec", ctypes.c_long), ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long), ("jitter", ctypes.c_long), ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long), ("jitcnt", ctypes.c_long), ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long), ("stbcnt", ctypes.c_long), ("tai", ctypes.c_int),
        ("reserved", ctypes.c_int * 11),
    ]


def read_state():
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    tx = Timex()
    tx.modes = 0  # read only: with modes == 0 adjtimex changes nothing
    if libc.adjtimex(ctypes.byref(tx)) < 0:
        raise OSError(ctypes.get_errno(), "adjtimex")
    # Sample realtime-monotonic a few times and keep the tightest bracket.
    best = None
    for _ in range(5):
        m1 = time.clock_gettime(time.CLOCK_MONOTONIC)
        r = time.clock_gettime(time.CLOCK_REALTIME)
        m2 = time.clock_gettime(time.CLOCK_MONOTONIC)
        if best is None or m2 - m1 < best[0]:
            best = (m2 - m1, r - (m1 + m2) / 2)
    return {"realtime_minus_monotonic": best[1], "freq": tx.freq, "tick": tx.tick, "status": tx.status}


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in ("snapshot", "check"):
        print("usage: clock_guard.py snapshot|check FILE", file=sys.stderr)
        return 2
    mode, path = sys.argv[1], sys.argv[2]
    now = read_state()
    if mode == "snapshot":
        with open(path, "w") as f:
            json.dump(now, f)
        print(f"clock guard: recorded {now}")
        return 0
    with open(path) as f:
        before = json.load(f)
    problems = []
    step = now["realtime_minus_monotonic"] - before["realtime_minus_monotonic"]
    if abs(step) > STEP_LIMIT_S:
        problems.append(f"the clock was stepped by {step:+.6f} s")
    for key in ("freq", "tick", "status"):
        if now[key] != before[key]:
            problems.append(f"kernel {key} changed from {before[key]} to {now[key]}")
    if problems:
        print("clock guard: FAILED, something changed this machine's clock:", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    print(f"clock guard: clock untouched (realtime-monotonic moved {step * 1e6:+.1f} µs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
