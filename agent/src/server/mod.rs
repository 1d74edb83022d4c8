//! The NTP server half of the agent: one UDP port per tenant (and the fleet's peer port), each
//! served by `workers` OS threads with one SO_REUSEPORT socket each, bound to `[::]`
//! dual-stack so IPv4 and IPv6 clients share it.
//!
//! Ownership:
//! - [`Server`] owns the running ports and applies config changes ([`Server::apply`]): only
//!   ports whose rules changed get a new policy generation, only removed ports close, only
//!   new ports open; nothing else is touched, so the other tenants never notice.
//! - The run loop publishes the clock each turn ([`Server::publish_clock`]): the state replies
//!   carry and the host → served-clock map applied to kernel timestamps.
//! - Workers ([`worker`]) read both through `ArcSwap` once per batch; counters are per worker
//!   ([`stats`]) and summed on scrape ([`Server::export_metrics`]), client logs are per port
//!   ([`clients`]).
//!
//! The per-packet logic is [`path::handle_request`]; the syscalls live in [`batch_io`].

pub mod batch_io;
pub mod clients;
pub mod path;
pub mod stats;
pub mod tenants;
pub mod worker;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use stratum_api::agent_config::ServingConfig;
use stratum_ntp::server::{ServerClockState, TenantConfig};

use crate::clock::Timescale;
use crate::metrics::Metrics;
use batch_io::SocketOptions;
use clients::ClientRow;
use path::{ClockSnapshot, PortPolicy, PortState};
use stats::{KOD_LABELS, OUTCOME_LABELS, TenantStats, TenantTotals};
use tenants::PortChange;
use worker::PortShared;

/// Server settings fixed for the life of the process.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Worker threads (sockets) per port.
    pub workers: usize,
    /// Clients tracked per port, for rate limiting and the client log (bounded memory:
    /// about 80 bytes per client).
    pub client_capacity: usize,
    /// Address to bind: `::` serves IPv4 and IPv6; an IPv4 address only IPv4.
    pub bind: IpAddr,
    /// Requested socket receive buffer, bytes.
    pub receive_buffer: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            workers: default_workers(),
            client_capacity: 4096,
            bind: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            receive_buffer: 4 << 20,
        }
    }
}

/// One worker per core this process may run on (respects taskset/cpusets).
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// How often an idle worker looks at its stop flag (a stop also wakes it at once).
const IDLE_WAKE: Duration = Duration::from_millis(100);

struct RunningPort {
    shared: Arc<PortShared>,
    stop: Arc<AtomicBool>,
    /// Duplicates of the workers' sockets, to wake them on stop.
    wakers: Vec<std::net::UdpSocket>,
    threads: Vec<JoinHandle<()>>,
    local: SocketAddr,
}

impl RunningPort {
    fn shut_down(self) {
        self.stop.store(true, Ordering::Relaxed);
        for waker in &self.wakers {
            batch_io::wake_receivers(waker.as_fd());
        }
        for thread in self.threads {
            if thread.join().is_err() {
                tracing::error!("a server worker panicked");
            }
        }
    }
}

#[derive(Default)]
struct Ports {
    running: BTreeMap<u16, RunningPort>,
    stats: BTreeMap<String, Arc<TenantStats>>,
    /// Tenant ids whose series are in the metrics registry.
    exported: BTreeSet<String>,
}

/// What one [`Server::apply`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Ports newly serving.
    pub opened: Vec<u16>,
    /// Ports closed.
    pub closed: Vec<u16>,
    /// Ports with a new policy generation.
    pub updated: Vec<u16>,
    /// Ports that could not be opened, and why; retried on the next apply.
    pub failed: Vec<(u16, String)>,
}

/// Counters of one tenant, for `/serverstats`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TenantServerStats {
    /// Tenant id.
    pub tenant: String,
    /// Its port.
    pub port: u16,
    /// Counters since the tenant appeared.
    pub totals: TenantTotals,
    /// Clients in the port's log (bounded by the table size).
    pub clients_tracked: usize,
}

/// Everything `/serverstats` returns.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerStats {
    /// Worker threads per port.
    pub workers: usize,
    /// Whether replies currently say synchronized.
    pub synchronized: bool,
    /// Stratum replies carry.
    pub stratum: u8,
    /// One row per served port.
    pub tenants: Vec<TenantServerStats>,
}

/// The top clients of one tenant, for `/clients`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TenantClients {
    /// Tenant id.
    pub tenant: String,
    /// Its port.
    pub port: u16,
    /// Most active clients first.
    pub clients: Vec<ClientRow>,
}

/// The multi-tenant NTP server.
pub struct Server {
    options: ServerOptions,
    clock: Arc<ArcSwap<ClockSnapshot>>,
    ports: Mutex<Ports>,
}

impl Server {
    /// A server with no ports yet; [`Server::apply`] opens them.
    pub fn new(options: ServerOptions) -> Self {
        Self {
            options: ServerOptions {
                workers: options.workers.max(1),
                ..options
            },
            clock: Arc::new(ArcSwap::from_pointee(ClockSnapshot::initial())),
            ports: Mutex::new(Ports::default()),
        }
    }

    /// The options in force.
    pub fn options(&self) -> &ServerOptions {
        &self.options
    }

    fn ports(&self) -> std::sync::MutexGuard<'_, Ports> {
        self.ports.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes what replies carry from now on.
    pub fn publish_clock(&self, state: ServerClockState, timescale: Timescale) {
        self.clock
            .store(Arc::new(ClockSnapshot { state, timescale }));
    }

    /// The clock snapshot in force.
    pub fn clock(&self) -> ClockSnapshot {
        **self.clock.load()
    }

    /// Brings the running ports in line with `serving`, touching only what changed.
    pub fn apply(&self, serving: &ServingConfig) -> ApplyReport {
        let desired = tenants::desired_ports(serving);
        let mut ports = self.ports();
        let changes = tenants::plan(
            ports
                .running
                .iter()
                .map(|(port, running)| (*port, running.shared.policy.load_full()))
                .collect::<Vec<_>>()
                .iter()
                .map(|(port, policy)| (*port, &policy.config)),
            &desired,
        );
        let mut report = ApplyReport::default();
        for change in changes {
            match change {
                PortChange::Close(port) => {
                    if let Some(running) = ports.running.remove(&port) {
                        running.shut_down();
                        report.closed.push(port);
                    }
                }
                PortChange::Update(port) => {
                    if let (Some(config), Some(running)) =
                        (desired.get(&port), ports.running.get(&port))
                    {
                        let stats = running.shared.policy.load().stats.clone();
                        let policy = PortPolicy::new(config.clone(), stats);
                        running.shared.policy.store(Arc::new(policy));
                        report.updated.push(port);
                    }
                }
                PortChange::Reopen(port) | PortChange::Open(port) => {
                    if let Some(running) = ports.running.remove(&port) {
                        running.shut_down();
                    }
                    let Some(config) = desired.get(&port) else {
                        continue;
                    };
                    let stats = ports
                        .stats
                        .entry(config.name.clone())
                        .or_insert_with(|| {
                            Arc::new(TenantStats::new(config.name.clone(), self.options.workers))
                        })
                        .clone();
                    match self.open(port, config.clone(), stats) {
                        Ok(running) => {
                            ports.running.insert(port, running);
                            report.opened.push(port);
                        }
                        Err(e) => report.failed.push((port, e.to_string())),
                    }
                }
            }
        }
        // Counters of tenants gone from the config go with them.
        let live: BTreeSet<String> = desired.values().map(|c| c.name.clone()).collect();
        ports.stats.retain(|id, _| live.contains(id));
        for port in &report.failed {
            tracing::error!(port = port.0, error = %port.1, "cannot serve tenant port");
        }
        if report != ApplyReport::default() {
            tracing::info!(
                opened = ?report.opened,
                closed = ?report.closed,
                updated = ?report.updated,
                "tenant ports applied"
            );
        }
        report
    }

    fn open(
        &self,
        port: u16,
        config: TenantConfig,
        stats: Arc<TenantStats>,
    ) -> std::io::Result<RunningPort> {
        let shared = Arc::new(PortShared {
            policy: ArcSwap::from_pointee(PortPolicy::new(config, stats)),
            state: Mutex::new(PortState::new(self.options.client_capacity, rand::random())),
        });
        let socket_options = SocketOptions {
            reuse_port: true,
            dual_stack: true,
            receive_buffer: self.options.receive_buffer,
            receive_timeout: IDLE_WAKE,
        };
        let mut sockets = Vec::with_capacity(self.options.workers);
        let mut local = SocketAddr::new(self.options.bind, port);
        for _ in 0..self.options.workers {
            let socket = match batch_io::bind_udp(local, socket_options) {
                Ok(s) => s,
                // A host without IPv6: serve IPv4 rather than nothing.
                Err(e)
                    if sockets.is_empty()
                        && local.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED)
                        && e.raw_os_error() == Some(libc::EAFNOSUPPORT) =>
                {
                    local = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port);
                    batch_io::bind_udp(local, socket_options)?
                }
                Err(e) => return Err(e),
            };
            sockets.push(socket);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut wakers = Vec::with_capacity(sockets.len());
        let mut threads = Vec::with_capacity(sockets.len());
        for (index, socket) in sockets.into_iter().enumerate() {
            wakers.push(socket.try_clone()?);
            let (worker_port, clock, worker_stop) =
                (shared.clone(), self.clock.clone(), stop.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("ntp-{port}-{index}"))
                .spawn(move || worker::run(socket, worker_port, clock, index, worker_stop));
            match spawned {
                Ok(handle) => threads.push(handle),
                Err(e) => {
                    RunningPort {
                        shared,
                        stop,
                        wakers,
                        threads,
                        local,
                    }
                    .shut_down();
                    return Err(e);
                }
            }
        }
        Ok(RunningPort {
            shared,
            stop,
            wakers,
            threads,
            local,
        })
    }

    /// Stops every port (shutdown).
    pub fn stop_all(&self) {
        let running = std::mem::take(&mut self.ports().running);
        for (_, port) in running {
            port.shut_down();
        }
    }

    /// The ports being served and their tenants.
    pub fn served_ports(&self) -> Vec<(u16, String, SocketAddr)> {
        self.ports()
            .running
            .iter()
            .map(|(port, r)| (*port, r.shared.policy.load().config.name.clone(), r.local))
            .collect()
    }

    /// Per-tenant counters.
    pub fn stats(&self) -> ServerStats {
        let clock = self.clock();
        let ports = self.ports();
        let tenants = ports
            .running
            .iter()
            .map(|(port, running)| {
                let policy = running.shared.policy.load();
                let clients_tracked = running
                    .shared
                    .state
                    .lock()
                    .map_or(0, |s| s.clients.occupied());
                TenantServerStats {
                    tenant: policy.stats.id.clone(),
                    port: *port,
                    totals: policy.stats.totals(),
                    clients_tracked,
                }
            })
            .collect();
        ServerStats {
            workers: self.options.workers,
            synchronized: clock.state.synchronized,
            stratum: clock.state.stratum,
            tenants,
        }
    }

    /// The `limit` most active clients of each tenant (or of `tenant` only).
    pub fn clients(&self, tenant: Option<&str>, limit: usize) -> Vec<TenantClients> {
        let ports = self.ports();
        ports
            .running
            .iter()
            .filter_map(|(port, running)| {
                let id = running.shared.policy.load().config.name.clone();
                if tenant.is_some_and(|wanted| wanted != id) {
                    return None;
                }
                // Copy under the lock (a memcpy), sort outside it: workers wait only briefly.
                let log = running
                    .shared
                    .state
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clients
                    .clone();
                Some(TenantClients {
                    tenant: id,
                    port: *port,
                    clients: log.top(limit),
                })
            })
            .collect()
    }

    /// Brings `stratum_agent_tenant_requests_total` and `..._kod_sent_total` up to the
    /// workers' counters (called on every scrape). Series of configured tenants exist from
    /// the start, at 0; series of removed tenants are dropped.
    pub fn export_metrics(&self, metrics: &Metrics) {
        let mut ports = self.ports();
        let Ports {
            stats, exported, ..
        } = &mut *ports;
        for gone in exported.iter().filter(|id| !stats.contains_key(*id)) {
            for outcome in OUTCOME_LABELS {
                let _ = metrics
                    .tenant_requests
                    .remove_label_values(&[gone.as_str(), outcome]);
            }
            for code in KOD_LABELS {
                let _ = metrics
                    .tenant_kod
                    .remove_label_values(&[gone.as_str(), code]);
            }
        }
        exported.retain(|id| stats.contains_key(id));
        for (id, tenant) in stats.iter() {
            let totals = tenant.totals();
            for (outcome, total) in OUTCOME_LABELS.iter().zip(totals.outcomes()) {
                catch_up(&metrics.tenant_requests, [id.as_str(), outcome], total);
            }
            for (code, total) in KOD_LABELS.iter().zip(totals.kods()) {
                catch_up(&metrics.tenant_kod, [id.as_str(), code], total);
            }
            exported.insert(id.clone());
        }
    }
}

/// Moves a Prometheus counter up to `total`; a smaller total means the tenant was removed and
/// re-added between scrapes, which is a counter reset.
fn catch_up(vec: &prometheus::IntCounterVec, labels: [&str; 2], total: u64) {
    let counter = vec.with_label_values(&labels);
    let current = counter.get();
    if total >= current {
        counter.inc_by(total - current);
    } else {
        let _ = vec.remove_label_values(&labels);
        vec.with_label_values(&labels).inc_by(total);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop_all();
    }
}
