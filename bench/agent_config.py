"""The agent config the benchmarks run (`bench.py`, `idle-tenants.sh`, `agent-memory.sh`): a
simulated clock, one upstream on loopback, and the tenants a benchmark asks for. One place, so
a config format change is made once and every benchmark measures the same agent."""

from __future__ import annotations


def tenant(tenant_id: str, port: int, allowed: list[str], interval: float = 0.001, burst: int = 1000) -> dict:
    """A tenant serving `allowed`, with a per-client limit of one request per `interval`
    seconds after a burst of `burst` (the defaults, ~1000/s, are never reached by the load)."""
    return {
        "id": tenant_id, "port": port, "allowed": allowed, "denied": [],
        "rateLimit": {"clientIntervalSeconds": interval, "clientBurst": burst, "kissOfDeath": True},
    }


def agent_config(revision: str, upstream_port: int, tenants: list[dict], *, poll: tuple[int, int] = (4, 4),
                 drift_file: str = "/nonexistent/drift.json", holdover_seconds: float = 3600,
                 heartbeat_seconds: float = 30) -> dict:
    """A whole agent config; `poll` is (minPoll, maxPoll) of the one upstream, 127.0.0.1."""
    return {
        "version": 1, "revision": revision, "timeService": "bench",
        "clock": {"backend": "simulated"},
        "upstreams": [{"host": "127.0.0.1", "kind": "server", "port": upstream_port, "iburst": True,
                       "minPoll": poll[0], "maxPoll": poll[1], "maxSources": 1}],
        "selection": {"minSources": 1, "maxDistanceSeconds": 1.5},
        "discipline": {"makeStepThresholdSeconds": 0.1, "makeStepLimit": 3, "maxSlewPpm": 500,
                       "panicStartupSeconds": 86400, "panicRuntimeSeconds": 1000,
                       "rtcSync": False, "driftFile": drift_file},
        "leap": {"mode": "kernel", "smearWindowSeconds": 86400},
        "serving": {"holdoverSeconds": holdover_seconds, "tenants": tenants},
        "reporting": {"heartbeatSeconds": heartbeat_seconds},
    }
