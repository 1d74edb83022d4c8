#!/usr/bin/env python3
"""`make bench`: what serving NTP costs, how long a request spends in the server, and the
highest loss-free rate, for stratum-agent, chronyd, ntpd-rs and a raw UDP echo, side by side.

Method (the README's "Performance" section shows the last run and says how to read it):
- Every server runs pinned to one core (BENCH_SERVER_CPU, default 0) with real-time
  round-robin priority; the load generator (`stratumctl bench`) is pinned to another
  (BENCH_LOAD_CPU, default 1). All traffic is on loopback.
- The three NTP servers get the same policy: a 10,000-CIDR allow list that includes the
  load's sources, and per-client rate limiting that the load (spread over 2,048 sources)
  never reaches. chronyd and ntpd-rs are tuned as their docs advise for serving.
- Rounds are interleaved (echo, chronyd, ntpd-rs, agent; again; ...), BENCH_ROUNDS of them
  (default 5), so host noise falls on every server alike. Each figure is the median over the
  rounds, printed with its min and max; ratios are medians of per-round ratios.
- Cost: the server's CPU time per answered request at fixed rates (default 10k/s and 40k/s),
  from its threads' run time (/proc/PID/task/*/schedstat, nanoseconds) plus that of
  ksoftirqd on its core, minus what it used while idle just before. This kernel has no IRQ
  time accounting, so the softirq work done in the server's own context (on loopback, the
  receive path of its replies up to the generator's socket) is already in its threads' run
  time. It is the same for every server; the user-space part (utime/stime split) is the
  server's own code.
- Everything runs in a network namespace of the benchmark's own (see run_in_own_namespace).
- In-server latency: a loopback packet tap (`stratumctl bench --in-server`) pairs each
  request with its reply; from the kernel's stamp of one to that of the other. The
  generator-side round trip is printed beside it.
- Max rate: the highest rate with < 0.1% loss, searched around the previous round's result.
  A single generator core caps it; a server that answers all the generator can send is
  reported as "≥" that rate.
- NTS (BENCH_NTS=0 leaves it out): chronyd -x with an NTS server certificate (`chronyd-nts`)
  and the agent's second tenant with an NTS endpoint (`stratum-agent-nts`, same process), both
  with a certificate from a CA made with openssl for the run. The generator runs one key
  exchange, checks one authenticated answer, then sends requests built and sealed per batch
  with a full cookie jar (no placeholders: a client's steady state); the same cost and
  max-rate measurements, and the agent's NTS rate as a multiple of chronyd's.

Nothing runs with CAP_SYS_TIME, every load step is bounded in count and time, and nothing
here fails on a number: benchmarks are not tests. Writes bench/results.md and
bench/results.json (BENCH_OUT sets the directory).
"""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from agent_config import agent_config, tenant

ROOT = Path(__file__).resolve().parent.parent
NO_SYS_TIME = ["setpriv", "--bounding-set=-sys_time", "--inh-caps=-sys_time"]


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        sys.exit(f"bench: {name} must be a whole number, not {value!r}")


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name, str(default))
    try:
        return float(value)
    except ValueError:
        sys.exit(f"bench: {name} must be a number, not {value!r}")


SERVER_CPU = env_int("BENCH_SERVER_CPU", 0)
LOAD_CPU = env_int("BENCH_LOAD_CPU", 1)
ROUNDS = env_int("BENCH_ROUNDS", 5)
RATES = [int(r) for r in os.environ.get("BENCH_RATES", "10000 40000").split()]
COST_SECONDS = env_float("BENCH_COST_SECONDS", 3.0)
LATENCY_SECONDS = env_float("BENCH_LATENCY_SECONDS", 2.0)
STEP_SECONDS = env_float("BENCH_STEP_SECONDS", 1.5)
IDLE_SECONDS = env_float("BENCH_IDLE_SECONDS", 1.0)
SOURCES = os.environ.get("BENCH_SOURCES", "127.0.0.0/16")
SOURCE_COUNT = env_int("BENCH_SOURCE_COUNT", 2048)
MAX_RATE = env_int("BENCH_MAX_RATE", 2_000_000)
OUT_DIR = Path(os.environ.get("BENCH_OUT", ROOT / "bench"))
CTL = Path(os.environ.get("BENCH_CTL", ROOT / "target/release/stratumctl"))
AGENT = Path(os.environ.get("BENCH_AGENT", ROOT / "target/release/stratum-agent"))
NTPD_RS = Path(os.environ.get("NTPD_RS_BIN", "")) / "ntp-daemon"
LOSS_BOUND = 0.001
# Accuracy (Q1): warm-up, then the measured window; the route changes halfway through it.
ACCURACY_WARMUP = env_float("BENCH_ACCURACY_WARMUP", 60.0)
ACCURACY_SECONDS = env_float("BENCH_ACCURACY_SECONDS", 240.0)
ACCURACY_SAMPLE = env_float("BENCH_ACCURACY_SAMPLE", 2.0)
ACCURACY_SEED = env_int("BENCH_ACCURACY_SEED", 2026)
ACCURACY_POLL = env_int("BENCH_ACCURACY_POLL", 2)  # log2 s, both clients: minpoll = maxpoll
SIM_FREQUENCY_PPM = 30.0
SIM_WANDER = 0.01  # ppm per √s
SCENARIOS = ["symmetric", "asymmetric", "jitter", "loss", "route-change"]
# Per-client rate limit of every NTP server: 1000 requests/s; the load gives each of its
# 2,048 sources about 20/s at 40k/s, and under 1000/s even at 2M/s.
ALLOWED = [f"10.{i // 256}.{i % 256}.0/24" for i in range(9999)] + [SOURCES]

SERVER_ORDER = ["udp-echo", "chronyd", "ntpd-rs", "stratum-agent", "chronyd-nts", "stratum-agent-nts"]
NTS = os.environ.get("BENCH_NTS", "1") != "0"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_pki(work: Path) -> dict:
    """A CA and a server certificate for 127.0.0.1 it signed (ECDSA P-256), for the NTS rows."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=work, check=True, capture_output=True, stdin=subprocess.DEVNULL)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=stratum bench CA")
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (work / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                                  "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf")
    for name in ("server.key", "server.pem"):
        (work / name).chmod(0o644)
    return {"ca": work / "ca.pem", "cert": work / "server.pem", "key": work / "server.key"}


# --- peers: release builds only ---------------------------------------------------------------


def elf_section_names(path: Path) -> set[str]:
    """Section names of a 64-bit little-endian ELF file (enough to tell a debug build)."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return set()
    shoff = int.from_bytes(data[0x28:0x30], "little")
    shentsize = int.from_bytes(data[0x3A:0x3C], "little")
    shnum = int.from_bytes(data[0x3C:0x3E], "little")
    shstrndx = int.from_bytes(data[0x3E:0x40], "little")

    def section(i: int) -> tuple[int, int, int]:
        base = shoff + i * shentsize
        name = int.from_bytes(data[base : base + 4], "little")
        offset = int.from_bytes(data[base + 0x18 : base + 0x20], "little")
        size = int.from_bytes(data[base + 0x20 : base + 0x28], "little")
        return name, offset, size

    _, strings_at, _ = section(shstrndx)
    names = set()
    for i in range(shnum):
        name, _, _ = section(i)
        end = data.index(b"\0", strings_at + name)
        names.add(data[strings_at + name : end].decode(errors="replace"))
    return names


def check_release(name: str, path: Path) -> None:
    """Refuses a debug build: it would flatter every ratio against it."""
    if ".debug_info" in elf_section_names(path) and os.environ.get("BENCH_ALLOW_DEBUG") != "1":
        sys.exit(
            f"bench: {path} ({name}) carries debug info: a debug build. Build it with "
            "--release (bench/setup.sh does for ntpd-rs), or set BENCH_ALLOW_DEBUG=1 to "
            "measure it anyway"
        )


def version(command: list[str]) -> str:
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except OSError as e:
        return f"unknown ({e})"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else "unknown"


# --- CPU accounting ---------------------------------------------------------------------------


def run_time_ns(pid: int) -> int:
    """Nanoseconds on CPU of every live thread of `pid` (scheduler's run time, not ticks)."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return 0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            pass  # a thread that ended between listing and reading
    return total


def user_system_ticks(pid: int) -> tuple[int, int]:
    """utime and stime of every live thread of `pid`, in clock ticks: only their split is
    used (the run time above is the precise total)."""
    user = system = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return 0, 0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            user, system = user + int(fields[11]), system + int(fields[12])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            pass
    return user, system


def ksoftirqd_pid(cpu: int) -> int | None:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    if f.read().strip() == f"ksoftirqd/{cpu}":
                        return int(entry)
            except OSError:
                pass
    return None


def cpu_times(cpu: int | None = None) -> list[int]:
    """The /proc/stat line of one CPU (or all): user nice system idle iowait irq softirq steal."""
    key = "cpu" if cpu is None else f"cpu{cpu}"
    with open("/proc/stat") as f:
        for line in f:
            parts = line.split()
            if parts[0] == key:
                return [int(v) for v in parts[1:]]
    raise RuntimeError(f"no {key} in /proc/stat")


# --- servers ----------------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    port: int
    process: subprocess.Popen
    version: str
    note: str = ""
    best_rate: int = 0
    results: list[dict] = field(default_factory=list)
    # (NTS-KE port, CA file) for a server loaded with NTS requests.
    nts: tuple[int, Path] | None = None


def pinned(command: list[str]) -> list[str]:
    prio = ["chrt", "-r", "10"] if subprocess.run(["chrt", "-r", "10", "true"], capture_output=True).returncode == 0 else []
    return prio + ["taskset", "-c", str(SERVER_CPU)] + NO_SYS_TIME + command


def start(name: str, command: list[str], work: Path) -> subprocess.Popen:
    logfile = open(work / f"{name}.log", "w")
    return subprocess.Popen(pinned(command), stdout=logfile, stderr=subprocess.STDOUT)


def start_echo(work: Path) -> Server:
    port = free_port()
    process = start("udp-echo", [str(CTL), "echo-server", "--listen", f"127.0.0.1:{port}", "--workers", "1", "--duration", "3600"], work)
    return Server("udp-echo", port, process, "stratumctl echo-server (same socket options and batching as the agent)")


def start_chronyd(work: Path, pki: dict | None = None) -> Server:
    """chronyd -x serving; with `pki`, also NTS (its own instance, files and NTS-KE port)."""
    port = free_port()
    name = "chronyd-nts" if pki else "chronyd"
    conf = work / f"{name}.conf"
    nts: tuple[int, Path] | None = None
    nts_lines: list[str] = []
    if pki:
        nts = (free_tcp_port(), pki["ca"])
        nts_lines = [f"ntsport {nts[0]}", f"ntsserverkey {pki['key']}", f"ntsservercert {pki['cert']}",
                     f"ntsdumpdir {work}/{name}-nts"]
    lines = nts_lines + [
        f"port {port}",
        "local stratum 2",
        "cmdport 0",
        f"pidfile {work}/{name}.pid",
        f"driftfile {work}/{name}.drift",
        # chrony.conf(5): the client log must hold every client for rate limiting to work;
        # 2,048 sources need ~260 kB, the default is 512 kB; 16 MB leaves no doubt.
        "clientloglimit 16777216",
        # Per-client limit: 2^-10 s between requests (~1000/s), the largest burst allowed.
        "ratelimit interval -10 burst 255",
    ] + [f"allow {cidr}" for cidr in ALLOWED]
    conf.write_text("\n".join(lines) + "\n")
    process = start(name, ["chronyd", "-x", "-d", "-u", "root", "-f", str(conf)], work)
    return Server(name, port, process, version(["chronyd", "-v"]) + " -x" + (", NTS server" if pki else ""), nts=nts)


def start_ntpd_rs(work: Path) -> Server | None:
    if not NTPD_RS.is_file():
        log(f"ntpd-rs not found at {NTPD_RS}: skipped (bench/setup.sh builds it)")
        return None
    check_release("ntpd-rs", NTPD_RS)
    port = free_port()
    conf = work / "ntp.toml"
    cidrs = ", ".join(f'"{c}"' for c in ALLOWED)
    conf.write_text(
        "[observability]\nlog-level = \"warn\"\n\n"
        "[[server]]\n"
        f'listen = "127.0.0.1:{port}"\n'
        # ntp.toml(5): rate limiting is off unless the cache is sized; one entry per client.
        "rate-limiting-cache-size = 8192\n"
        "rate-limiting-cutoff-ms = 1\n"
        f'allowlist = {{ filter = [{cidrs}], action = "ignore" }}\n'
    )
    process = start("ntpd-rs", [str(NTPD_RS), "-c", str(conf)], work)
    return Server("ntpd-rs", port, process, version([str(NTPD_RS), "--version"]) + " (release, crates.io)")


def start_agent(work: Path, upstream_port: int, pki: dict | None = None) -> list[Server]:
    """The agent; with `pki`, a second tenant with an NTS endpoint (the same process), as its
    own Server after the plain one."""
    check_release("stratum-agent", AGENT)
    port, status, metrics = free_port(), free_port(), free_port()
    # Rate limiting on: 1000 requests/s per client, burst 1000 (see ALLOWED).
    tenants = [tenant("bench/ntp", port, ALLOWED)]
    nts: tuple[int, Path] | None = None
    nts_port = free_port()
    if pki:
        nts = (free_tcp_port(), pki["ca"])
        nts_tenant = tenant("bench/nts", nts_port, ALLOWED)
        nts_tenant["nts"] = {"kePort": nts[0], "certificateFile": str(pki["cert"]), "keyFile": str(pki["key"]),
                             "ntpPort": nts_port, "unauthenticated": "Deny"}
        tenants.append(nts_tenant)
    config = agent_config("bench", upstream_port, tenants,
                          drift_file=str(work / "agent-drift.json"), holdover_seconds=0, heartbeat_seconds=60)
    if pki:
        keys = work / "cookie-keys.json"
        keys.write_text(json.dumps({"current": {"id": 1, "key": os.urandom(32).hex()}}))
        config["serving"]["ntsCookieKeysFile"] = str(keys)
    (work / "agent.json").write_text(json.dumps(config))
    process = start("stratum-agent", [
        str(AGENT), "run", "--config", str(work / "agent.json"), "--node-name", "bench",
        "--clock", "simulated", "--metrics-addr", f"127.0.0.1:{metrics}",
        "--status-addr", f"127.0.0.1:{status}", "--state-dir", str(work), "--no-report",
        "--log-format", "text",
    ], work)
    server = Server("stratum-agent", port, process, version([str(AGENT), "--version"]) + " (release)")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        out = subprocess.run([str(CTL), "--agent", f"127.0.0.1:{status}", "--json", "tracking"], capture_output=True, text=True)
        if out.returncode == 0 and json.loads(out.stdout).get("synchronized"):
            server.note = "synchronized to the chronyd above"
            break
        time.sleep(0.5)
    else:
        server.note = "NOT synchronized (answers LI=3)"
    servers = [server]
    if pki:
        servers.append(Server("stratum-agent-nts", nts_port, process, server.version + ", NTS tenant", server.note, nts=nts))
    return servers


# --- load -------------------------------------------------------------------------------------


def load(port: int, rate: float, seconds: float, in_server: bool = False,
         nts: tuple[int, Path] | None = None) -> dict:
    command = (["nice", "-n", "-19"] if os.geteuid() == 0 else []) + [
        "taskset", "-c", str(LOAD_CPU), *NO_SYS_TIME, str(CTL), "--json", "bench", "--quiet",
        "--target", f"127.0.0.1:{port}", "--rate", str(rate), "--duration", str(seconds),
        "--max-requests", str(int(rate * seconds) + 1), "--sources", SOURCES,
        "--source-count", str(SOURCE_COUNT), "--wait", "0.3",
    ] + (["--in-server"] if in_server else []) + (
        ["--nts-ke", f"127.0.0.1:{nts[0]}", "--nts-ca", str(nts[1])] if nts else [])
    out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30)
    if out.returncode != 0:
        raise RuntimeError(f"stratumctl bench failed: {out.stderr.strip()}")
    return json.loads(out.stdout)


def wait_answering(server: Server) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            if load(server.port, 100, 0.2, nts=server.nts)["answered"] > 0:
                return
        except RuntimeError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{server.name} does not answer on port {server.port}")


def cost(server: Server, rate: int, softirqd: int | None) -> dict:
    """CPU nanoseconds per answered request at `rate`, net of the idle rate just before."""
    pid = server.process.pid

    def used() -> tuple[int, int]:  # (server threads, ksoftirqd on its core)
        return run_time_ns(pid), run_time_ns(softirqd) if softirqd else 0

    idle_from, t0 = used(), time.monotonic()
    time.sleep(IDLE_SECONDS)
    idle_to, idle_window = used(), time.monotonic() - t0
    idle_rates = [(idle_to[i] - idle_from[i]) / idle_window for i in (0, 1)]
    before, ticks_before, t0 = used(), user_system_ticks(pid), time.monotonic()
    report = load(server.port, rate, COST_SECONDS, nts=server.nts)
    after, ticks_after, window = used(), user_system_ticks(pid), time.monotonic() - t0
    server_ns, softirq_ns = (after[i] - before[i] - idle_rates[i] * window for i in (0, 1))
    user, system = (ticks_after[i] - ticks_before[i] for i in (0, 1))
    answered = max(report["answered"], 1)
    # The user-space part is the server's own code, apart from the kernel's socket work that
    # every server pays; ticks give the split, the run time the total.
    user_share = user / (user + system) if user + system else 0.0
    return {"rate": rate, "nsPerRequest": (server_ns + softirq_ns) / answered,
            "userNsPerRequest": server_ns * user_share / answered,
            "idleNsPerSecond": sum(idle_rates),
            "answered": report["answered"], "lossRatio": report["lossRatio"],
            "unsynchronized": report["unsynchronized"], "generatorLimited": report["generatorLimited"]}


def passes(report: dict) -> bool:
    return report["lossRatio"] < LOSS_BOUND and not report["generatorLimited"]


def max_rate(server: Server) -> dict:
    """Highest loss-free rate. The first round doubles then bisects; later rounds start from
    the best rate so far and move by 12% steps (at most 5 steps a round)."""
    steps = []

    def step(rate: int) -> dict:
        report = load(server.port, rate, STEP_SECONDS, nts=server.nts)
        steps.append({"rate": rate, "sentRate": report["sentRate"], "lossRatio": report["lossRatio"],
                      "generatorLimited": report["generatorLimited"]})
        return report

    best, capped = 0, False
    if server.best_rate == 0:
        rate, low, high = 25_000, 0, 0
        while True:
            report = step(rate)
            if passes(report):
                low = rate
                if rate >= MAX_RATE:
                    break
                rate *= 2
            elif report["generatorLimited"] and report["lossRatio"] < LOSS_BOUND:
                low, capped = int(report["sentRate"]), True
                break
            else:
                high = rate
                break
        for _ in range(3):
            if capped or high == 0 or high - low <= high // 20:
                break
            rate = (low + high) // 2
            report = step(rate)
            if passes(report):
                low = rate
            else:
                high = rate
        best = low
    else:
        rate = server.best_rate
        for _ in range(5):
            report = step(rate)
            if passes(report):
                best = max(best, rate)
                if best < rate or rate >= MAX_RATE:
                    break
                rate = int(rate * 1.12)
            elif report["generatorLimited"] and report["lossRatio"] < LOSS_BOUND:
                best, capped = max(best, int(report["sentRate"])), True
                break
            else:
                if best:
                    break
                rate = int(rate / 1.12)
    server.best_rate = max(best, 25_000)
    return {"maxRate": best, "generatorLimited": capped, "steps": steps}


# --- accuracy (Q1) ----------------------------------------------------------------------------


def agent_error(status_port: int) -> float | None:
    """The simulated clock's actual error against true time (the host clock), seconds."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{status_port}/status", timeout=2) as r:
            return json.load(r)["tracking"].get("simulatedErrorSeconds")
    except (OSError, ValueError, KeyError):
        return None


def chronyd_error(socket_path: Path) -> float | None:
    """chronyd -x's error against true time: with -x it keeps its corrections in a software
    clock over the system clock (which here is true time), and `tracking`'s "System time"
    is the offset between the two."""
    out = subprocess.run(["chronyc", "-h", str(socket_path), "-c", "tracking"], capture_output=True, text=True, timeout=5)
    fields = out.stdout.strip().split(",")
    if out.returncode != 0 or len(fields) < 6 or fields[0] in ("", "00000000"):
        return None
    try:
        return float(fields[4])
    except ValueError:
        return None


def accuracy(work: Path) -> dict:
    """Q1: the agent and chronyd -x behind identical delay relays to one upstream chronyd, per
    scenario, all scenarios at once (each client and relay is idle but for a packet every
    few seconds). The agent steers a simulated clock with a +30 ppm frequency error and
    wander; chronyd -x keeps a software clock over this host's (true) one."""
    processes: list[subprocess.Popen] = []
    total = ACCURACY_WARMUP + ACCURACY_SECONDS
    load_core = ["taskset", "-c", str(LOAD_CPU)] + NO_SYS_TIME

    def spawn(name: str, command: list[str]) -> subprocess.Popen:
        process = subprocess.Popen(load_core + command, stdout=open(work / f"q1-{name}.log", "w"), stderr=subprocess.STDOUT)
        processes.append(process)
        return process

    try:
        upstream = free_port()
        (work / "q1-upstream.conf").write_text(
            f"port {upstream}\nlocal stratum 1\ncmdport 0\npidfile {work}/q1-upstream.pid\nallow 127.0.0.0/8\n")
        spawn("upstream", ["chronyd", "-x", "-d", "-u", "root", "-f", str(work / "q1-upstream.conf")])
        clients: dict[str, dict] = {}
        for scenario in SCENARIOS:
            relay_agent, relay_chronyd, status = free_port(), free_port(), free_port()
            for name, port in (("agent", relay_agent), ("chronyd", relay_chronyd)):
                spawn(f"relay-{scenario}-{name}", [
                    str(CTL), "delay-proxy", "--listen", f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{upstream}",
                    "--scenario", scenario, "--seed", str(ACCURACY_SEED),
                    "--route-change-after", str(ACCURACY_WARMUP + ACCURACY_SECONDS / 2), "--duration", str(total + 60)])
            config = agent_config("q1", relay_agent, [], poll=(ACCURACY_POLL, ACCURACY_POLL),
                                  drift_file=str(work / f"q1-{scenario}-drift.json"), holdover_seconds=0,
                                  heartbeat_seconds=60)
            config_path = work / f"q1-{scenario}-agent.json"
            config_path.write_text(json.dumps(config))
            state = work / f"q1-{scenario}"
            state.mkdir()
            spawn(f"agent-{scenario}", [
                str(AGENT), "run", "--config", str(config_path), "--node-name", f"q1-{scenario}", "--clock", "simulated",
                "--sim-frequency-ppm", str(SIM_FREQUENCY_PPM), "--sim-wander", str(SIM_WANDER),
                "--metrics-addr", f"127.0.0.1:{free_port()}", "--status-addr", f"127.0.0.1:{status}",
                "--state-dir", str(state), "--no-report", "--log-format", "text"])
            sock = work / f"q1-{scenario}-chronyd.sock"
            (work / f"q1-{scenario}-chronyd.conf").write_text(
                f"server 127.0.0.1 port {relay_chronyd} minpoll {ACCURACY_POLL} maxpoll {ACCURACY_POLL} iburst\n"
                f"port 0\ncmdport 0\nbindcmdaddress {sock}\npidfile {work}/q1-{scenario}-chronyd.pid\n")
            spawn(f"chronyd-{scenario}", ["chronyd", "-x", "-d", "-u", "root", "-f", str(work / f"q1-{scenario}-chronyd.conf")])
            clients[scenario] = {"status": status, "socket": sock, "agent": [], "chronyd": []}
        log(f"accuracy: {len(SCENARIOS)} scenarios side by side, {ACCURACY_WARMUP:.0f} s warm-up then "
            f"{ACCURACY_SECONDS:.0f} s measured (poll 2^{ACCURACY_POLL} s; route change at {ACCURACY_WARMUP + ACCURACY_SECONDS / 2:.0f} s)")
        started = time.monotonic()
        next_sample, next_progress = started + ACCURACY_WARMUP, started + 60
        while time.monotonic() < started + total:
            now = time.monotonic()
            if now >= next_sample:
                for c in clients.values():
                    for name, value in (("agent", agent_error(c["status"])), ("chronyd", chronyd_error(c["socket"]))):
                        if value is not None:
                            c[name].append(value)
                next_sample += ACCURACY_SAMPLE
            if now >= next_progress:
                log(f"accuracy: {now - started:.0f} of {total:.0f} s")
                next_progress += 60
            time.sleep(max(0.0, min(next_sample, next_progress) - time.monotonic()))
    finally:
        for p in processes:
            p.terminate()
        for p in processes:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()

    def stats(values: list[float]) -> dict:
        if not values:
            return {"samples": 0}
        magnitudes = sorted(abs(v) for v in values)
        return {"samples": len(values), "rms": (sum(v * v for v in values) / len(values)) ** 0.5,
                "p99": magnitudes[min(len(magnitudes) - 1, int(0.99 * len(magnitudes)))], "max": magnitudes[-1]}

    return {scenario: {"agent": stats(c["agent"]), "chronyd": stats(c["chronyd"])} for scenario, c in clients.items()}


# --- summary ----------------------------------------------------------------------------------


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)} if values else {}


def fmt(s: dict, scale: float = 1.0, digits: int = 2) -> str:
    if not s:
        return "n/a"
    return f"{s['median'] * scale:.{digits}f} [{s['min'] * scale:.{digits}f}–{s['max'] * scale:.{digits}f}]"


def summarize(servers: list[Server], host: dict) -> tuple[dict, str]:
    by = {s.name: s for s in servers}
    agent = by.get("stratum-agent")
    summary: dict = {"host": host, "servers": {}}
    for s in servers:
        entry: dict = {"version": s.version, "note": s.note, "cost": {}, "inServer": {}, "roundTrip": {}, "ratioToAgent": {}}
        for rate in RATES:
            costs = [r["cost"][str(rate)]["nsPerRequest"] for r in s.results]
            entry["cost"][str(rate)] = spread(costs)
            entry.setdefault("userCost", {})[str(rate)] = spread([r["cost"][str(rate)]["userNsPerRequest"] for r in s.results])
            entry["inServer"][str(rate)] = {q: spread([r["latency"][str(rate)]["inServer"][q] for r in s.results]) for q in ("p50Ns", "p99Ns", "p999Ns")}
            entry["roundTrip"][str(rate)] = {q: spread([r["latency"][str(rate)]["roundTrip"][q] for r in s.results]) for q in ("p50Ns", "p99Ns")}
            # NTS rows are compared with the agent's NTS tenant, the others with its plain one.
            reference = by.get("stratum-agent-nts") if s.nts else agent
            if reference is not None:
                ratios = [a["cost"][str(rate)]["nsPerRequest"] / r["cost"][str(rate)]["nsPerRequest"]
                          for a, r in zip(reference.results, s.results) if r["cost"][str(rate)]["nsPerRequest"] > 0]
                entry["ratioToAgent"][str(rate)] = spread(ratios)
        entry["maxRate"] = spread([r["maxRate"]["maxRate"] for r in s.results])
        entry["maxRateGeneratorLimited"] = any(r["maxRate"]["generatorLimited"] for r in s.results)
        summary["servers"][s.name] = entry

    lines = [
        f"Run {host['date']} on {host['cpus']} × {host['cpuModel']}, Linux {host['kernel']}; "
        f"steal {host['stealPercent']:.2f}% of CPU time during the run. Servers on CPU {SERVER_CPU} "
        f"(real-time round robin), load generator on CPU {LOAD_CPU}; {ROUNDS} interleaved rounds; "
        f"{SOURCE_COUNT} sources in {SOURCES}; {host['network']}. Figures: median [min–max] over the rounds; "
        "ratios: median [min–max] of the per-round ratios.",
        "",
        "| server | version |",
        "|---|---|",
    ]
    lines += [f"| {s.name} | {s.version}{'; ' + s.note if s.note else ''} |" for s in servers]
    lines += ["", "**CPU per answered request** (µs; server threads + ksoftirqd on its core, idle subtracted)", ""]
    header = "| server | " + " | ".join(f"at {r // 1000}k/s" for r in RATES) + " | " + " | ".join(f"agent ÷ this at {r // 1000}k/s" for r in RATES) + " |"
    lines += [header, "|---|" + "---:|" * (2 * len(RATES))]
    for s in servers:
        e = summary["servers"][s.name]
        lines.append(f"| {s.name} | " + " | ".join(fmt(e["cost"][str(r)], 1e-3) for r in RATES) + " | "
                     + " | ".join(fmt(e["ratioToAgent"].get(str(r), {})) for r in RATES) + " |")
    lines += ["", "**Of which in user space** (µs per request: the server's own code, split from the total by its threads' utime and stime)", ""]
    lines += ["| server | " + " | ".join(f"at {r // 1000}k/s" for r in RATES) + " |", "|---|" + "---:|" * len(RATES)]
    for s in servers:
        e = summary["servers"][s.name]
        lines.append(f"| {s.name} | " + " | ".join(fmt(e["userCost"][str(r)], 1e-3) for r in RATES) + " |")
    for rate in RATES:
        lines += ["", f"**Latency at {rate // 1000}k/s** (µs): in the server (loopback tap: request in → reply out) and the generator's round trip", ""]
        lines += ["| server | in-server p50 | p99 | p99.9 | round trip p50 | p99 |", "|---|---:|---:|---:|---:|---:|"]
        for s in servers:
            e = summary["servers"][s.name]
            i, t = e["inServer"][str(rate)], e["roundTrip"][str(rate)]
            lines.append(f"| {s.name} | {fmt(i['p50Ns'], 1e-3, 1)} | {fmt(i['p99Ns'], 1e-3, 1)} | {fmt(i['p999Ns'], 1e-3, 1)} | "
                         f"{fmt(t['p50Ns'], 1e-3, 1)} | {fmt(t['p99Ns'], 1e-3, 1)} |")
    lines += ["", f"**Highest rate with < {LOSS_BOUND:.1%} loss** (requests/s; ≥: the one-core generator's limit was reached first)", ""]
    lines += ["| server | max rate | ÷ udp-echo |", "|---|---:|---:|"]
    echo = summary["servers"].get("udp-echo", {}).get("maxRate", {})
    for s in servers:
        e = summary["servers"][s.name]
        bound = "≥ " if e["maxRateGeneratorLimited"] else ""
        of_echo = f"{e['maxRate']['median'] / echo['median']:.2f}" if echo and echo.get("median") else "n/a"
        lines.append(f"| {s.name} | {bound}{fmt(e['maxRate'], 1, 0)} | {of_echo} |")
    if agent is not None:
        lines += ["", "Goals: CPU per request at 40k/s ≤ 0.5x chronyd and ≤ 0.33x ntpd-rs; in-server p99 ≤ 20 µs at 40k/s; "
                  "max rate ≥ 90% of udp-echo."]
    agent_nts, chronyd_nts = by.get("stratum-agent-nts"), by.get("chronyd-nts")
    if agent_nts is not None and chronyd_nts is not None and agent_nts.results and chronyd_nts.results:
        pairs = list(zip(agent_nts.results, chronyd_nts.results))
        rate_ratio = spread([a["maxRate"]["maxRate"] / c["maxRate"]["maxRate"] for a, c in pairs if c["maxRate"]["maxRate"] > 0])
        cost_ratio = {str(r): spread([c["cost"][str(r)]["nsPerRequest"] / a["cost"][str(r)]["nsPerRequest"]
                                      for a, c in pairs if a["cost"][str(r)]["nsPerRequest"] > 0]) for r in RATES}
        summary["nts"] = {"maxRateRatio": rate_ratio, "chronydCostRatio": cost_ratio}
        bound = "≥ " if summary["servers"]["stratum-agent-nts"]["maxRateGeneratorLimited"] else ""
        lines += ["", "**NTS** (requests authenticated with NTS, AES-SIV-CMAC-256; the rows `chronyd-nts` and "
                  "`stratum-agent-nts` above)", "",
                  "| | " + " | ".join(f"chronyd ÷ agent CPU at {r // 1000}k/s" for r in RATES) + " | agent ÷ chronyd max rate |",
                  "|---|" + "---:|" * (len(RATES) + 1),
                  "| NTS | " + " | ".join(fmt(cost_ratio[str(r)]) for r in RATES) + f" | {bound}{fmt(rate_ratio)} |",
                  "", "Goal: the agent's NTS max rate ≥ 2x chronyd's."]
    return summary, "\n".join(lines) + "\n"


def accuracy_table(q1: dict) -> str:
    if not q1:
        return ""
    lines = ["", f"**Clock accuracy behind the same delay relay** (µs; |error| over {ACCURACY_SECONDS:.0f} s after a "
             f"{ACCURACY_WARMUP:.0f} s warm-up, sampled every {ACCURACY_SAMPLE:.0f} s, poll 2^{ACCURACY_POLL} s for both). "
             f"stratum-agent: its simulated clock ({SIM_FREQUENCY_PPM:+.0f} ppm, wander {SIM_WANDER} ppm/√s) against true time; "
             "chronyd -x: its software clock over this host's clock, which is true time (`tracking`'s System time).", "",
             "| scenario | agent RMS | chronyd RMS | agent ÷ chronyd | agent p99 | chronyd p99 | agent ÷ chronyd |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for scenario, r in q1.items():
        a, c = r["agent"], r["chronyd"]
        if not a.get("samples") or not c.get("samples"):
            lines.append(f"| {scenario} | no samples: agent {a.get('samples', 0)}, chronyd {c.get('samples', 0)} | | | | | |")
            continue
        ratio = lambda x, y: f"{x / y:.2f}" if y > 0 else "n/a"  # noqa: E731
        lines.append(f"| {scenario} | {a['rms'] * 1e6:.1f} | {c['rms'] * 1e6:.1f} | {ratio(a['rms'], c['rms'])} | "
                     f"{a['p99'] * 1e6:.1f} | {c['p99'] * 1e6:.1f} | {ratio(a['p99'], c['p99'])} |")
    lines += ["", "Goal: agent error RMS ≤ chronyd's in every scenario (ratio ≤ 1.0)."]
    return "\n".join(lines) + "\n"


def compare(first: Path, second: Path) -> None:
    """`bench.py --compare A.json B.json`: how far two runs' cost ratios are apart."""
    a, b = (json.loads(p.read_text()) for p in (first, second))
    print("| server | rate | agent ÷ this, run A | run B | B ÷ A |")
    print("|---|---:|---:|---:|---:|")
    for name, entry in a["servers"].items():
        for rate, ratio in entry.get("ratioToAgent", {}).items():
            other = b["servers"].get(name, {}).get("ratioToAgent", {}).get(rate)
            if name == "stratum-agent" or not ratio or not other:
                continue
            print(f"| {name} | {int(rate) // 1000}k/s | {ratio['median']:.2f} | {other['median']:.2f} | {other['median'] / ratio['median']:.2f} |")


class SkipServing(Exception):
    """BENCH_SERVING=0: the accuracy comparison only."""


NETNS_PREFIX = "stratum-bench-"


def run_in_own_namespace() -> int:
    """Reruns this script in a network namespace of its own, removed afterwards: nothing the
    benchmark sends can reach, or be disturbed by, anything else on the host.

    BENCH_RPS=1 also steers the namespace loopback's receive processing (RPS) to the load
    generator's core, so a server's core no longer runs its replies' receive path (no NIC
    puts that on a server). Off by default: on this kind of VM each steered packet costs the
    sender an inter-processor interrupt, dearer than the receive path it moves, and servers
    that batch their sends pay fewer of them, so the steered figures favour batching servers
    (the agent) for a reason no real NIC shares.
    """
    for stale in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split("\n"):
        name = stale.split(" ")[0]
        if name.startswith(NETNS_PREFIX) and not Path(f"/proc/{name[len(NETNS_PREFIX):]}").exists():
            subprocess.run(["ip", "netns", "del", name], capture_output=True)  # an interrupted run's
    name = f"{NETNS_PREFIX}{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        env = dict(os.environ, STRATUM_BENCH_NETNS=name)
        return subprocess.run(["ip", "netns", "exec", name, sys.executable, __file__, *sys.argv[1:]], env=env).returncode
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def set_up_namespace_loopback() -> str:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    if os.environ.get("BENCH_RPS", "0") != "1":
        return "own network namespace, loopback as on the host"
    Path("/sys/class/net/lo/queues/rx-0/rps_cpus").write_text(f"{1 << LOAD_CPU:x}\n")
    return f"own network namespace; loopback receive processing steered to CPU {LOAD_CPU} (BENCH_RPS=1)"


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--compare":
        compare(Path(sys.argv[2]), Path(sys.argv[3]))
        return
    if "STRATUM_BENCH_NETNS" not in os.environ and os.environ.get("BENCH_NETNS", "1") != "0":
        if os.geteuid() == 0:
            sys.exit(run_in_own_namespace())
        log("bench: not root, so no network namespace of its own: on the host's loopback, each "
            "server's core also runs its replies' receive path (see run_in_own_namespace)")
    network = set_up_namespace_loopback() if "STRATUM_BENCH_NETNS" in os.environ else "host loopback"
    check_release("stratumctl (load generator)", CTL)
    softirqd = ksoftirqd_pid(SERVER_CPU)
    started = time.monotonic()
    steal_from, all_from = cpu_times(), cpu_times()
    with tempfile.TemporaryDirectory(prefix="stratum-bench.") as tmp:
        work = Path(tmp)
        servers: list[Server] = []
        q1 = accuracy(work) if os.environ.get("BENCH_ACCURACY", "1") != "0" else {}
        try:
            if os.environ.get("BENCH_SERVING", "1") == "0":
                raise SkipServing
            pki = make_pki(work) if NTS else None
            servers.append(start_echo(work))
            chronyd = start_chronyd(work)
            servers.append(chronyd)
            ntpd_rs = start_ntpd_rs(work)
            if ntpd_rs:
                servers.append(ntpd_rs)
            if pki:
                servers.append(start_chronyd(work, pki))
            for s in servers:
                wait_answering(s)
            agents = start_agent(work, chronyd.port, pki)
            for s in agents:
                wait_answering(s)
            servers += agents
            servers.sort(key=lambda s: SERVER_ORDER.index(s.name))
            for round_no in range(1, ROUNDS + 1):
                for s in servers:
                    result: dict = {"round": round_no, "cost": {}, "latency": {}}
                    for rate in RATES:
                        result["cost"][str(rate)] = cost(s, rate, softirqd)
                    for rate in RATES:
                        report = load(s.port, rate, LATENCY_SECONDS, in_server=True, nts=s.nts)
                        tap = report.get("inServer") or {}
                        result["latency"][str(rate)] = {"inServer": tap.get("latency", {}), "roundTrip": report["latency"],
                                                        "paired": tap.get("paired", 0), "requests": tap.get("requests", 0)}
                    result["maxRate"] = max_rate(s)
                    s.results.append(result)
                    c = result["cost"]
                    log(f"[{time.monotonic() - started:5.0f}s] round {round_no}/{ROUNDS} {s.name:<14} "
                        + "  ".join(f"{int(r) // 1000}k/s {c[r]['nsPerRequest'] / 1000:.2f} µs/req" for r in c)
                        + f"  in-server p99 at {RATES[-1] // 1000}k/s {result['latency'][str(RATES[-1])]['inServer'].get('p99Ns', 0) / 1000:.1f} µs"
                        + f"  max {'≥ ' if result['maxRate']['generatorLimited'] else ''}{result['maxRate']['maxRate']}/s")
        except SkipServing:
            pass
        finally:
            for s in servers:
                s.process.terminate()
            for s in servers:
                try:
                    s.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    s.process.kill()
    steal_to, all_to = cpu_times(), cpu_times()
    total = sum(all_to) - sum(all_from)
    host = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpus": os.cpu_count(),
        "cpuModel": next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.machine()),
        "kernel": platform.release(),
        "stealPercent": 100.0 * (steal_to[7] - steal_from[7]) / total if total else 0.0,
        "seconds": time.monotonic() - started,
        "network": network,
    }
    summary, table = summarize(servers, host)
    summary["accuracy"] = q1
    table += accuracy_table(q1)
    summary["rounds"] = {s.name: s.results for s in servers}
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    (OUT_DIR / "results.md").write_text(table)
    print(table)
    log(f"bench: {host['seconds'] / 60:.1f} min; wrote {OUT_DIR / 'results.md'} and {OUT_DIR / 'results.json'}")


if __name__ == "__main__":
    main()
