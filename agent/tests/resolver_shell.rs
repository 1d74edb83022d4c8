//! The run loop's IO shell with an injected resolver: a name that fails to resolve at start
//! is retried off the loop and polled once it resolves, against an NTP responder on
//! loopback. Real sockets and wall time (seconds); the simulated clock backend, so this
//! machine's clock is never touched.

#![allow(clippy::unwrap_used)]

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use stratum_agent::agent::{AgentOptions, Outputs, Shared, run_with_resolver};
use stratum_agent::clock::{Backend, SimulationParams, SystemClockPolicy, host_realtime};
use stratum_agent::config_source::ConfigUpdate;
use stratum_agent::metrics::Metrics;
use stratum_agent::resolver::{ResolveError, Resolver};
use stratum_agent::status::AgentStatus;
use stratum_api::agent_config::{AgentConfig, ClockBackend, UpstreamKind};
use stratum_ntp::packet::{LeapIndicator, Packet, ReferenceId};
use stratum_ntp::server::{ServerClockState, build_reply};
use stratum_ntp::time::NtpTimestamp;
use tokio::sync::{mpsc, watch};

/// Fails until `fixed` is set, then answers `address`.
struct Flaky {
    fixed: Arc<AtomicBool>,
    address: SocketAddr,
    /// Lookups so far, for the test to wait on.
    calls: watch::Sender<u32>,
}

impl Resolver for Flaky {
    fn lookup(
        &self,
        host: String,
        _port: u16,
    ) -> BoxFuture<'static, Result<Vec<SocketAddr>, ResolveError>> {
        let answer = if self.fixed.load(Ordering::Relaxed) {
            Ok(vec![self.address])
        } else {
            Err(ResolveError::Lookup {
                host,
                source: std::io::Error::other("simulated SERVFAIL"),
            })
        };
        // Counted once the answer is decided: a test that fixes DNS after seeing n lookups
        // knows all n failed (counting first let the n-th see the fix and succeed).
        self.calls.send_modify(|n| *n += 1);
        Box::pin(async move { answer })
    }
}

/// A stratum-1 responder on loopback answering from this host's clock.
fn responder() -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let address = socket.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        let mut out = [0u8; 512];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            let now = host_realtime();
            let Ok(view) = Packet::parse(&buf[..n]) else {
                continue;
            };
            let state = ServerClockState {
                synchronized: true,
                leap: LeapIndicator::NoWarning,
                stratum: 1,
                precision: -20,
                root_delay: 0.0,
                root_dispersion: 1e-5,
                reference_id: ReferenceId(*b"GPS\0"),
                reference_time: NtpTimestamp::from_clock_time(now),
                updated_at: now,
            };
            if let Some(len) = build_reply(&view, now, host_realtime(), &state, None, &mut out) {
                let _ = socket.send_to(&out[..len], from);
            }
        }
    });
    address
}

/// A running agent loop with `config` and `resolver`, and what stops it.
struct Running {
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    state_dir: std::path::PathBuf,
    /// The statuses the loop publishes, to wait on.
    snapshots: watch::Receiver<AgentStatus>,
}

impl Running {
    async fn start(tag: &str, config: AgentConfig, resolver: Arc<dyn Resolver>) -> Self {
        let state_dir = std::env::temp_dir().join(format!(
            "stratum-resolver-shell-{tag}-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(&state_dir).unwrap();
        let backend = Backend::open(
            ClockBackend::Simulated,
            false,
            SimulationParams {
                initial_offset: 0.0,
                frequency_error_ppm: 0.0,
                wander_ppm_per_sqrt_s: 0.0,
                seed: 1,
            },
            SystemClockPolicy::Denied,
        )
        .unwrap();
        let shared = Shared::new(Metrics::new().unwrap());
        let (snap_tx, snapshots) = watch::channel(Default::default());
        let (event_tx, mut event_rx) = mpsc::channel(64);
        tokio::spawn(async move { while event_rx.recv().await.is_some() {} });
        let (hb_tx, _hb_rx) = watch::channel(Duration::from_secs(60));
        let (config_tx, config_rx) = mpsc::channel(4);
        let (shutdown, shutdown_rx) = watch::channel(false);
        config_tx
            .send(ConfigUpdate::Valid(Box::new(config)))
            .await
            .unwrap();
        let task = tokio::spawn(run_with_resolver(
            AgentOptions {
                node: "node-a".into(),
                state_dir: Some(state_dir.clone()),
                version: "test".into(),
                config_cache: None,
            },
            backend,
            shared.clone(),
            Outputs {
                snapshots: snap_tx,
                events: event_tx,
                heartbeat: hb_tx,
            },
            config_rx,
            shutdown_rx,
            resolver,
        ));
        // The config channel must outlive the loop's first turns.
        tokio::spawn(async move {
            config_tx.closed().await;
        });
        Self {
            snapshots,
            shared,
            shutdown,
            task,
            state_dir,
        }
    }

    async fn wait_ready(&mut self, within: Duration) -> Duration {
        let start = Instant::now();
        tokio::time::timeout(within, self.snapshots.wait_for(|s| s.tracking.ready))
            .await
            .unwrap_or_else(|_| panic!("not ready within {within:?}"))
            .expect("the loop ended");
        start.elapsed()
    }

    async fn stop(self) {
        self.shutdown.send(true).unwrap();
        self.task.await.unwrap().unwrap();
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

fn config_for(hosts: &[(&str, u16)]) -> AgentConfig {
    let mut config = AgentConfig::from_json(include_str!("data/agent-config.json")).unwrap();
    let template = config.upstreams[0].clone();
    config.upstreams = hosts
        .iter()
        .map(|(host, port)| stratum_api::agent_config::UpstreamConfig {
            host: (*host).into(),
            kind: UpstreamKind::Server,
            port: *port,
            ..template.clone()
        })
        .collect();
    config.clock.backend = ClockBackend::Simulated;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_that_fails_at_start_is_retried_off_the_loop_and_synced_once_it_resolves() {
    let server = responder();
    let fixed = Arc::new(AtomicBool::new(false));
    let (calls, mut lookups) = watch::channel(0u32);
    let resolver = Arc::new(Flaky {
        fixed: fixed.clone(),
        address: server,
        calls,
    });
    let mut agent = Running::start(
        "flaky",
        config_for(&[("ntp.flaky.test", server.port())]),
        resolver,
    )
    .await;

    // Failing lookups are retried (2 s, then 4 s ...).
    tokio::time::timeout(Duration::from_secs(10), lookups.wait_for(|n| *n >= 2))
        .await
        .expect("no retry")
        .unwrap();
    assert!(!agent.shared.ready());
    fixed.store(true, Ordering::Relaxed);
    let took = agent.wait_ready(Duration::from_secs(20)).await;
    println!(
        "ready {:.1} s after DNS recovered ({} lookups)",
        took.as_secs_f64(),
        *lookups.borrow()
    );
    let metrics = agent.shared.metrics.render();
    assert!(
        metrics.contains("stratum_agent_upstream_lookups_total{result=\"failed\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("stratum_agent_upstream_lookups_total{result=\"ok\"} 1"));
    agent.stop().await;
}

/// Never answers.
struct Hangs;

impl Resolver for Hangs {
    fn lookup(
        &self,
        _host: String,
        _port: u16,
    ) -> BoxFuture<'static, Result<Vec<SocketAddr>, ResolveError>> {
        Box::pin(std::future::pending())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_lookup_does_not_hold_up_the_loop_or_the_other_upstream() {
    let server = responder();
    let mut agent = Running::start(
        "hung",
        config_for(&[("hangs.test", 123), ("127.0.0.1", server.port())]),
        Arc::new(Hangs),
    )
    .await;
    // The literal syncs in its first burst while the name's lookup hangs (5 s timeout,
    // then retries that hang again).
    let took = agent.wait_ready(Duration::from_secs(4)).await;
    println!(
        "ready after {:.2} s with one lookup hanging",
        took.as_secs_f64()
    );
    agent.stop().await;
}
