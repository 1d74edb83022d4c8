//! The NTP server half of the agent: one UDP port per tenant (and the fleet's peer port),
//! bound to `[::]` dual-stack so IPv4 and IPv6 clients share it, served by at most one worker
//! thread per core for all ports together.
//!
//! Ownership:
//! - [`Server`] owns the workers and the port table and applies config changes
//!   ([`Server::apply`]): only ports whose rules changed get a new policy generation, only
//!   removed ports close, only new ports open; nothing else is touched, so the other tenants
//!   never notice. It binds every port's sockets itself (one SO_REUSEPORT socket per worker,
//!   so the kernel spreads each port over the workers and a bind error is the caller's to
//!   see) and hands each worker its socket through the worker's command queue and eventfd.
//!   A closed port is acknowledged by every worker before `apply` returns, so its sockets are
//!   gone and the port can be bound again.
//! - Each worker ([`worker`]) owns its socket of every port in one epoll set and sleeps in
//!   `epoll_wait` without a timeout: an idle server costs no wake-ups, and threads do not
//!   grow with tenants. Replies leave from their request's destination address (IP_PKTINFO /
//!   IPV6_PKTINFO, [`batch_io`]).
//! - Ports that cannot be bound are kept as failed, retried on every apply and by
//!   [`Server::retry_failed`] with a backoff, counted in a gauge and listed by
//!   [`Server::failed_ports`] for the NodeClock status.
//! - The run loop publishes the clock each turn ([`Server::publish_clock`]): the state replies
//!   carry and the host → served-clock map applied to kernel timestamps.
//! - Workers read both through `ArcSwap` once per batch; counters are per worker
//!   ([`stats`]) and summed on scrape ([`Server::export_metrics`]); the rate table and
//!   client log are per port ([`clients`]), behind one mutex, made on the port's first
//!   datagram so idle tenants cost no table.
//!
//! The per-packet logic is [`path::handle_request`]; the syscalls live in [`batch_io`].

pub mod batch_io;
pub mod clients;
pub mod path;
pub mod stats;
pub mod tenants;
pub mod worker;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use stratum_api::agent_config::ServingConfig;
use stratum_ntp::nts::CookieKeys;
use stratum_ntp::server::ServerClockState;
use stratum_ntp::symmetric::SymmetricKeys;

use crate::clock::Timescale;
use crate::metrics::Metrics;
use batch_io::SocketOptions;
use clients::ClientRow;
use path::{ClockSnapshot, PortPolicy};
use stats::{ALWAYS_EXPORTED_OUTCOMES, KOD_LABELS, OUTCOME_LABELS, TenantStats, TenantTotals};
use tenants::{KeyMaterial, PortChange, PortRules};
use worker::{Command, PortShared, Worker};

/// Server settings fixed for the life of the process.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Worker threads, each serving its own SO_REUSEPORT socket of every port.
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

/// First wait before a failed port is bound again, doubled per failure up to
/// [`RETRY_MAX`]: a port held by another process is usually freed within seconds, and a
/// permanent clash should not cost a bind attempt per loop turn.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);
/// How long `apply` waits for the workers to confirm closed ports.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

struct RunningPort {
    shared: Arc<PortShared>,
    local: SocketAddr,
}

/// A configured port that is not being served, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FailedPort {
    /// The port.
    pub port: u16,
    /// Its tenant id.
    pub tenant: String,
    /// The last error.
    pub error: String,
    /// Failed attempts so far.
    pub attempts: u32,
}

struct Failure {
    report: FailedPort,
    retry_at: Instant,
}

#[derive(Default)]
struct Ports {
    workers: Vec<Worker>,
    running: BTreeMap<u16, RunningPort>,
    failed: BTreeMap<u16, Failure>,
    /// What the last apply asked for, for [`Server::retry_failed`].
    desired: BTreeMap<u16, PortRules>,
    /// The NTS cookie master keys and tenants' symmetric keys loaded so far.
    material: KeyMaterial,
    stats: BTreeMap<String, Arc<TenantStats>>,
    /// Series labels (tenant ids, or [`ALL_TENANTS`]) in the metrics registry.
    exported: BTreeSet<String>,
    /// `serving.metricsPerTenant: false`: request metrics as totals over every tenant.
    totals_only: bool,
    /// Each tenant's totals at the last export, to carry a removed tenant's counts on.
    last_totals: BTreeMap<String, TenantTotals>,
    /// What tenants removed since the start had counted, so the totals never go down.
    retired: TenantTotals,
}

/// The `tenant` label of the request metrics' totals (`serving.metrics.perTenant: false`): no
/// tenant id looks like it, ids being `namespace/name`.
pub const ALL_TENANTS: &str = "_all";

/// The request metrics' series, by `tenant` label: each tenant's own (`totals_only` false), or
/// one [`ALL_TENANTS`] series summing every tenant and `retired`. The fleet's peer port is
/// infrastructure, not a tenant: it keeps its own series either way.
pub fn tenant_series(
    current: &BTreeMap<String, TenantTotals>,
    totals_only: bool,
    retired: &TenantTotals,
) -> BTreeMap<String, TenantTotals> {
    if !totals_only {
        return current.clone();
    }
    let mut all = *retired;
    let mut series = BTreeMap::new();
    for (id, totals) in current {
        if id == tenants::PEER_TENANT_ID {
            series.insert(id.clone(), *totals);
        } else {
            all.add(totals);
        }
    }
    series.insert(ALL_TENANTS.to_owned(), all);
    series
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
    /// Ports that could not be opened, and why; retried on the next apply and by
    /// [`Server::retry_failed`].
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
    /// Worker threads (each serves every port).
    pub workers: usize,
    /// Whether replies currently say synchronized.
    pub synchronized: bool,
    /// Stratum replies carry.
    pub stratum: u8,
    /// One row per served port.
    pub tenants: Vec<TenantServerStats>,
    /// Configured ports not served (bind failures being retried).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<FailedPort>,
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
    /// A server with no ports yet; [`Server::apply`] starts the workers and opens them.
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

    /// Brings the running ports in line with `serving`, touching only what changed; ports
    /// that failed before are tried again.
    pub fn apply(&self, serving: &ServingConfig) -> ApplyReport {
        let mut ports = self.ports();
        ports.desired = tenants::desired_ports(serving, &ports.material);
        ports.totals_only = !serving.metrics_per_tenant;
        let report = self.reconcile(&mut ports, None);
        drop(ports);
        log_report(&report);
        report
    }

    /// Puts new NTS cookie master keys in force on every NTS port of `serving` (the config
    /// in force; a rotation, or the first load); plain ports are not touched. `None` forgets
    /// them: cookies then get the NAK.
    pub fn set_cookie_keys(
        &self,
        keys: Option<CookieKeys>,
        serving: &ServingConfig,
    ) -> ApplyReport {
        self.update_material(serving, |material| {
            let changed = material.cookie_keys != keys;
            material.cookie_keys = keys;
            changed
        })
    }

    /// Puts the symmetric keys read from each tenant's key file (by path) in force on the
    /// ports of `serving` (the config in force); a tenant whose file is not in `keys` fails
    /// every MAC until it is.
    pub fn set_symmetric_keys(
        &self,
        keys: BTreeMap<String, Arc<SymmetricKeys>>,
        serving: &ServingConfig,
    ) -> ApplyReport {
        self.update_material(serving, |material| {
            let changed = material.symmetric != keys;
            material.symmetric = keys;
            changed
        })
    }

    /// Applies `change` to the key material and, when it says something changed, puts the
    /// ports of `serving` in line with it (only ports whose rules changed are touched).
    fn update_material(
        &self,
        serving: &ServingConfig,
        change: impl FnOnce(&mut KeyMaterial) -> bool,
    ) -> ApplyReport {
        let mut ports = self.ports();
        if !change(&mut ports.material) {
            return ApplyReport::default();
        }
        ports.desired = tenants::desired_ports(serving, &ports.material);
        let report = self.reconcile(&mut ports, None);
        drop(ports);
        log_report(&report);
        report
    }

    /// Whether `source` may use tenant port `port` (its deny and allow lists), for the
    /// tenant's NTS-KE endpoint: the same gate as its NTP port, from the same policy.
    pub fn allowed(&self, port: u16, source: IpAddr) -> bool {
        self.ports()
            .running
            .get(&port)
            .is_some_and(|running| running.shared.policy.load().allowed(source))
    }

    /// Binds again the failed ports whose backoff has passed (the agent loop calls this every
    /// turn; it costs nothing while no port is failing).
    pub fn retry_failed(&self) -> ApplyReport {
        let mut ports = self.ports();
        let now = Instant::now();
        if !ports.failed.values().any(|f| f.retry_at <= now) {
            return ApplyReport::default();
        }
        let report = self.reconcile(&mut ports, Some(now));
        drop(ports);
        log_report(&report);
        report
    }

    /// Configured ports not being served, and why.
    pub fn failed_ports(&self) -> Vec<FailedPort> {
        self.ports()
            .failed
            .values()
            .map(|f| f.report.clone())
            .collect()
    }

    /// Brings the ports in line with `ports.desired`. With `due`, failed ports whose backoff
    /// has not passed by then are left for later (an apply retries them all at once).
    fn reconcile(&self, ports: &mut Ports, due: Option<Instant>) -> ApplyReport {
        let Ports {
            workers,
            running,
            failed,
            desired,
            stats,
            ..
        } = ports;
        let changes = tenants::plan(
            running
                .iter()
                .map(|(port, running)| (*port, running.shared.policy.load_full()))
                .collect::<Vec<_>>()
                .iter()
                .map(|(port, policy)| (*port, &policy.rules)),
            desired,
        );
        let mut report = ApplyReport::default();
        let mut opening = Vec::new();
        let mut removed = Vec::new();
        for change in changes {
            match change {
                PortChange::Close(port) => {
                    running.remove(&port);
                    removed.push(port);
                    report.closed.push(port);
                }
                PortChange::Update(port) => {
                    if let (Some(config), Some(running)) = (desired.get(&port), running.get(&port))
                    {
                        let stats = running.shared.policy.load().stats.clone();
                        let policy = PortPolicy::with_rules(config.clone(), stats);
                        running.shared.policy.store(Arc::new(policy));
                        report.updated.push(port);
                    }
                }
                PortChange::Reopen(port) => {
                    running.remove(&port);
                    removed.push(port);
                    opening.push(port);
                }
                PortChange::Open(port) => {
                    let waiting =
                        due.is_some_and(|now| failed.get(&port).is_some_and(|f| f.retry_at > now));
                    if !waiting {
                        opening.push(port);
                    }
                }
            }
        }
        // Closed and reopened ports: every worker drops its socket before any new one is
        // bound, so a port never has sockets of two tenants at once.
        if !removed.is_empty() {
            sync_workers(workers, |_| {
                removed.iter().map(|p| Command::Remove(*p)).collect()
            });
        }
        failed.retain(|port, _| desired.contains_key(port));
        let workers_started = if opening.is_empty() {
            Ok(())
        } else {
            self.ensure_workers(workers)
        };
        let mut adds: Vec<Vec<Command>> = workers.iter().map(|_| Vec::new()).collect();
        for port in opening {
            let Some(config) = desired.get(&port) else {
                continue;
            };
            let bound = match &workers_started {
                Ok(()) => self.bind_port(port, workers.len()),
                Err(e) => Err(std::io::Error::new(
                    e.kind(),
                    format!("starting workers: {e}"),
                )),
            };
            let tenant_stats = stats
                .entry(config.core.name.clone())
                .or_insert_with(|| {
                    Arc::new(TenantStats::new(
                        config.core.name.clone(),
                        self.options.workers,
                    ))
                })
                .clone();
            match bound {
                Ok((sockets, local)) => {
                    let shared = Arc::new(PortShared {
                        policy: ArcSwap::from_pointee(PortPolicy::with_rules(
                            config.clone(),
                            tenant_stats,
                        )),
                        state: Mutex::new(None),
                        client_capacity: self.options.client_capacity,
                        seed: rand::random(),
                    });
                    for (queue, socket) in adds.iter_mut().zip(sockets) {
                        queue.push(Command::Add {
                            port,
                            socket,
                            shared: shared.clone(),
                        });
                    }
                    running.insert(port, RunningPort { shared, local });
                    failed.remove(&port);
                    report.opened.push(port);
                }
                Err(e) => {
                    // Retried on the next apply and, after the backoff, by retry_failed.
                    let attempts = failed.get(&port).map_or(0, |f| f.report.attempts) + 1;
                    let backoff = RETRY_FIRST
                        .saturating_mul(1 << attempts.min(16).saturating_sub(1))
                        .min(RETRY_MAX);
                    failed.insert(
                        port,
                        Failure {
                            report: FailedPort {
                                port,
                                tenant: config.core.name.clone(),
                                error: e.to_string(),
                                attempts,
                            },
                            retry_at: Instant::now() + backoff,
                        },
                    );
                    report.failed.push((port, e.to_string()));
                }
            }
        }
        // Sockets are bound already (datagrams queue from now on); the workers pick them up
        // on their next wake, no need to wait.
        for (worker, queue) in workers.iter().zip(adds) {
            if !queue.is_empty() {
                worker.send(queue);
            }
        }
        // Counters of tenants gone from the config go with them.
        let live: BTreeSet<&String> = desired.values().map(|c| &c.core.name).collect();
        stats.retain(|id, _| live.contains(id));
        report
    }

    /// Starts the missing workers.
    fn ensure_workers(&self, workers: &mut Vec<Worker>) -> std::io::Result<()> {
        while workers.len() < self.options.workers {
            workers.push(Worker::spawn(workers.len(), self.clock.clone())?);
        }
        Ok(())
    }

    /// One socket of `port` per worker, all bound or none.
    fn bind_port(&self, port: u16, count: usize) -> std::io::Result<(Vec<UdpSocket>, SocketAddr)> {
        let socket_options = SocketOptions {
            reuse_port: true,
            dual_stack: true,
            receive_buffer: self.options.receive_buffer,
            receive_timeout: None,
        };
        let mut sockets = Vec::with_capacity(count);
        let mut local = SocketAddr::new(self.options.bind, port);
        for _ in 0..count {
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
        Ok((sockets, local))
    }

    /// Stops every port (shutdown).
    pub fn stop_all(&self) {
        let mut ports = self.ports();
        ports.running.clear();
        ports.failed.clear();
        ports.desired.clear();
        for worker in std::mem::take(&mut ports.workers) {
            worker.stop();
        }
    }

    /// The ports being served and their tenants.
    pub fn served_ports(&self) -> Vec<(u16, String, SocketAddr)> {
        self.ports()
            .running
            .iter()
            .map(|(port, r)| (*port, r.shared.policy.load().config().name.clone(), r.local))
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
                    .map_or(0, |s| s.as_ref().map_or(0, |s| s.clients.occupied()));
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
            failed: ports.failed.values().map(|f| f.report.clone()).collect(),
        }
    }

    /// The `limit` most active clients of each tenant (or of `tenant` only).
    pub fn clients(&self, tenant: Option<&str>, limit: usize) -> Vec<TenantClients> {
        let ports = self.ports();
        ports
            .running
            .iter()
            .filter_map(|(port, running)| {
                let id = running.shared.policy.load().config().name.clone();
                if tenant.is_some_and(|wanted| wanted != id) {
                    return None;
                }
                // Copy under the lock (a memcpy), sort outside it: workers wait only briefly.
                let log = running
                    .shared
                    .state
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_ref()
                    .map(|s| s.clients.clone());
                Some(TenantClients {
                    tenant: id,
                    port: *port,
                    clients: log.map_or_else(Vec::new, |log| log.top(limit)),
                })
            })
            .collect()
    }

    /// Brings `stratum_agent_tenant_requests_total` and `..._kod_sent_total` up to the
    /// workers' counters (called on every scrape): per tenant, or as totals (see
    /// [`tenant_series`]). Series of configured tenants exist from the start, at 0; series no
    /// longer wanted (a removed tenant, the other mode's) are dropped.
    pub fn export_metrics(&self, metrics: &Metrics) {
        let mut ports = self.ports();
        metrics
            .tenant_port_bind_failures
            .set(i64::try_from(ports.failed.len()).unwrap_or(i64::MAX));
        let Ports {
            stats,
            exported,
            totals_only,
            last_totals,
            retired,
            ..
        } = &mut *ports;
        let current: BTreeMap<String, TenantTotals> = stats
            .iter()
            .map(|(id, t)| (id.clone(), t.totals()))
            .collect();
        for (id, last) in last_totals.iter() {
            if !current.contains_key(id) && id != tenants::PEER_TENANT_ID {
                retired.add(last);
            }
        }
        let series = tenant_series(&current, *totals_only, retired);
        *last_totals = current;
        for gone in exported.iter().filter(|label| !series.contains_key(*label)) {
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
            let _ = metrics
                .tenant_nts_authenticated
                .remove_label_values(&[gone.as_str()]);
            let _ = metrics
                .tenant_symmetric_authenticated
                .remove_label_values(&[gone.as_str()]);
        }
        exported.retain(|label| series.contains_key(label));
        for (label, totals) in &series {
            for (i, (outcome, total)) in OUTCOME_LABELS.iter().zip(totals.outcomes()).enumerate() {
                if i < ALWAYS_EXPORTED_OUTCOMES || total > 0 {
                    catch_up(&metrics.tenant_requests, &[label.as_str(), outcome], total);
                }
            }
            for (code, total) in KOD_LABELS.iter().zip(totals.kods()) {
                catch_up(&metrics.tenant_kod, &[label.as_str(), code], total);
            }
            // A series only for tenants that served NTS: the others would all sit at 0.
            if totals.authenticated > 0 {
                catch_up(
                    &metrics.tenant_nts_authenticated,
                    &[label.as_str()],
                    totals.authenticated,
                );
            }
            if totals.mac_authenticated > 0 {
                catch_up(
                    &metrics.tenant_symmetric_authenticated,
                    &[label.as_str()],
                    totals.mac_authenticated,
                );
            }
            exported.insert(label.clone());
        }
    }
}

/// Queues `commands(i)` on worker `i` followed by an acknowledgement, and waits until every
/// worker has done them.
fn sync_workers(workers: &[Worker], commands: impl Fn(usize) -> Vec<Command>) {
    let (done, acks) = std::sync::mpsc::channel();
    for (index, worker) in workers.iter().enumerate() {
        let mut queue = commands(index);
        queue.push(Command::Ack(done.clone()));
        worker.send(queue);
    }
    drop(done);
    let deadline = Instant::now() + ACK_TIMEOUT;
    for _ in workers {
        let left = deadline.saturating_duration_since(Instant::now());
        if acks.recv_timeout(left).is_err() {
            // Only a panicked worker never answers; its sockets closed with it.
            tracing::error!("a server worker did not confirm closing ports");
            return;
        }
    }
}

fn log_report(report: &ApplyReport) {
    for (port, error) in &report.failed {
        tracing::error!(port, %error, "cannot serve tenant port; retrying with backoff");
    }
    if !report.opened.is_empty() || !report.closed.is_empty() || !report.updated.is_empty() {
        tracing::info!(
            opened = ?report.opened,
            closed = ?report.closed,
            updated = ?report.updated,
            "tenant ports applied"
        );
    }
}

/// Moves a Prometheus counter up to `total`; a smaller total means the tenant was removed and
/// re-added between scrapes, which is a counter reset.
fn catch_up(vec: &prometheus::IntCounterVec, labels: &[&str], total: u64) {
    let counter = vec.with_label_values(labels);
    let current = counter.get();
    if total >= current {
        counter.inc_by(total - current);
    } else {
        let _ = vec.remove_label_values(labels);
        vec.with_label_values(labels).inc_by(total);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(served: u64, kod_rate: u64) -> TenantTotals {
        TenantTotals {
            received: served + kod_rate,
            served,
            kod_rate,
            ..TenantTotals::default()
        }
    }

    #[test]
    fn totals_only_sums_the_tenants_and_what_removed_ones_counted_but_not_the_peers() {
        let current = BTreeMap::from([
            ("ns/a".to_owned(), totals(2, 1)),
            ("ns/b".to_owned(), totals(3, 0)),
            (tenants::PEER_TENANT_ID.to_owned(), totals(7, 0)),
        ]);
        assert_eq!(
            tenant_series(&current, false, &totals(100, 100)),
            current,
            "per tenant: each its own, nothing retired added"
        );
        let series = tenant_series(&current, true, &totals(10, 4));
        assert_eq!(
            series,
            BTreeMap::from([
                (ALL_TENANTS.to_owned(), totals(15, 5)),
                (tenants::PEER_TENANT_ID.to_owned(), totals(7, 0)),
            ])
        );
        // No tenants yet: the totals exist at what was retired (0 at the start).
        assert_eq!(
            tenant_series(&BTreeMap::new(), true, &TenantTotals::default()),
            BTreeMap::from([(ALL_TENANTS.to_owned(), TenantTotals::default())])
        );
    }
}
