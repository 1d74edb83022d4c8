//! The real agent binary started while its API server is unreachable (a node rebooted during
//! a control-plane outage): with the last good config in its state directory it serves its
//! tenants and disciplines from a chronyd (`-x`) on loopback, says `configSource: cache`, and
//! stays live; without one (or with a corrupt one) it stays live and waits. SIGTERM ends it
//! promptly even though the last NodeClock write cannot reach the API server.
//!
//! "Unreachable" is the harsher kind: a TCP listener that never accepts, so connections hang
//! rather than fail fast. Times are printed; the bounds asserted are generous (they catch an
//! agent that waits for the API server, not a slow machine).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "server_common/mod.rs"]
mod common;

use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use stratum_agent::config_cache::ConfigCache;
use stratum_agent::config_source::ConfigSource;
use stratum_api::AgentConfig;

const CONFIG_MAP: (&str, &str) = ("stratum-system", "cluster-agent-config");

/// An API server that is "down": it holds connections open and never answers.
struct HungApiServer {
    _listener: TcpListener,
    port: u16,
    kubeconfig: std::path::PathBuf,
}

impl HungApiServer {
    /// Connections the agent opened that sit in the listener's queue, never accepted: its
    /// API calls, hanging (`/proc/net/tcp`, state ESTABLISHED on the listening port).
    fn hanging_connections(&self) -> usize {
        let local = format!(":{:04X}", self.port);
        std::fs::read_to_string("/proc/net/tcp")
            .unwrap_or_default()
            .lines()
            .skip(1)
            .filter(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                fields.get(1).is_some_and(|a| a.ends_with(&local)) && fields.get(3) == Some(&"01")
            })
            .count()
    }
}

impl HungApiServer {
    fn start(dir: &TempDir) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let kubeconfig = dir.path("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\ncurrent-context: down\n\
                 clusters:\n- name: down\n  cluster:\n    server: https://127.0.0.1:{port}\n    \
                 insecure-skip-tls-verify: true\n\
                 users:\n- name: agent\n  user:\n    token: not-a-real-token\n\
                 contexts:\n- name: down\n  context:\n    cluster: down\n    user: agent\n"
            ),
        )
        .unwrap();
        Self {
            _listener: listener,
            port,
            kubeconfig,
        }
    }
}

struct Agent {
    child: Child,
    started: Instant,
    metrics_port: u16,
    status_port: u16,
}

fn start_agent(state_dir: &std::path::Path, api: &HungApiServer) -> Agent {
    let (metrics_port, status_port) = (free_tcp_port(), free_tcp_port());
    let started = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_stratum-agent"))
        .args(["run", "--node-name", "test", "--clock", "simulated"])
        .args(["--server-workers", "1", "--log-format", "json"])
        .arg("--config-map")
        .arg(format!("{}/{}", CONFIG_MAP.0, CONFIG_MAP.1))
        .arg("--metrics-addr")
        .arg(format!("127.0.0.1:{metrics_port}"))
        .arg("--status-addr")
        .arg(format!("127.0.0.1:{status_port}"))
        .arg("--state-dir")
        .arg(state_dir)
        .env("KUBECONFIG", &api.kubeconfig)
        .env("STRATUM_DENY_SYSTEM_CLOCK", "1")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(state_dir.join("agent.log")).expect("the agent's log"))
        .spawn()
        .expect("starting the agent");
    Agent {
        child: Child(child),
        started,
        metrics_port,
        status_port,
    }
}

fn cache_in(dir: &std::path::Path) -> std::sync::Arc<ConfigCache> {
    ConfigCache::for_source(
        dir,
        &ConfigSource::ConfigMap {
            namespace: CONFIG_MAP.0.into(),
            name: CONFIG_MAP.1.into(),
        },
    )
    .unwrap()
}

#[test]
fn with_a_cached_config_the_agent_serves_and_syncs_without_the_api_server_and_exits_promptly() {
    let dir = TempDir::new("offline");
    let upstream_port = free_udp_port();
    let Some(_chronyd) = chronyd_serving(&dir, upstream_port) else {
        return;
    };
    let api = HungApiServer::start(&dir);
    let tenant_port = free_udp_port();
    let mut config = AgentConfig::from_json(include_str!("data/agent-config.json")).unwrap();
    config.upstreams[0].port = upstream_port;
    config.serving.tenants = vec![tenant("ns/a", tenant_port, &["127.0.0.0/8"], false)];
    config.revision = "cached-7".into();
    let state = dir.path("state");
    cache_in(&state).store(&config).unwrap();

    let mut agent = start_agent(&state, &api);
    let target = SocketAddr::from(([127, 0, 0, 1], tenant_port));
    let client = "127.0.0.1".parse().unwrap();

    // Live from the start: the probe never waits for a config.
    assert!(wait_until(Duration::from_secs(10), || {
        http_get(agent.metrics_port, "/healthz").is_some_and(|(code, _)| code == 200)
    }));
    let live_after = agent.started.elapsed();
    // Serving: any answer (unsynchronized at first) means the tenant port runs the config.
    assert!(
        wait_until(Duration::from_secs(10), || {
            ask(client, target, Duration::from_millis(100)).is_some()
        }),
        "the tenant was not served from the cached config"
    );
    let serving_after = agent.started.elapsed();
    // Synchronized from the upstream, still without any API server.
    assert!(
        wait_until(Duration::from_secs(60), || {
            ask(client, target, Duration::from_millis(200)).is_some_and(|r| r[0] >> 6 != 3)
        }),
        "the agent never synchronized from its cached upstreams"
    );
    let synced_after = agent.started.elapsed();
    eprintln!(
        "API server unreachable, cached config: live after {:.3} s, serving after {:.3} s, \
         synchronized after {:.3} s",
        live_after.as_secs_f64(),
        serving_after.as_secs_f64(),
        synced_after.as_secs_f64()
    );
    assert!(
        serving_after < Duration::from_secs(5),
        "serving took {serving_after:?}: the start waited for the API server"
    );

    let (_, status) = http_get(agent.status_port, "/status").unwrap();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["identity"]["configSource"], "cache", "{status}");
    assert_eq!(status["identity"]["configRevision"], "cached-7");
    let (_, metrics) = http_get(agent.metrics_port, "/metrics").unwrap();
    assert!(
        metrics.contains("stratum_agent_config_source{source=\"cache\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("stratum_agent_config_source{source=\"source\"} 0"));
    // Still live while its API calls hang: wait until the config watch and the reporter's
    // NodeClock write both sit in the never-accepting server's queue.
    assert!(
        wait_until(Duration::from_secs(30), || api.hanging_connections() >= 2),
        "the agent's API calls never reached the hung server: {}",
        api.hanging_connections()
    );
    assert_eq!(
        http_get(agent.metrics_port, "/healthz").map(|(c, _)| c),
        Some(200)
    );
    // A cached config is never written back over itself: the file is the one stored.
    assert_eq!(cache_in(&state).load().unwrap().unwrap(), config);

    // SIGTERM: the last NodeClock write cannot reach the API server, and the exit is still
    // prompt, with the drift saved.
    let pid = agent.child.0.id().to_string();
    let signalled = Instant::now();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let mut exited = None;
    assert!(
        wait_until(Duration::from_secs(10), || {
            exited = agent.child.0.try_wait().unwrap();
            exited.is_some()
        }),
        "the agent did not exit after SIGTERM"
    );
    let exit_took = signalled.elapsed();
    eprintln!(
        "SIGTERM to exit: {:.3} s (API server unreachable)",
        exit_took.as_secs_f64()
    );
    assert!(exited.unwrap().success(), "exit status {exited:?}");
    assert!(
        exit_took < Duration::from_secs(3),
        "exit took {exit_took:?}; the kubelet's grace period is 10 s"
    );
    assert!(state.join("drift.json").exists(), "no drift saved on exit");
}

#[test]
fn without_a_usable_cached_config_the_agent_stays_live_and_serves_nothing() {
    let dir = TempDir::new("offline-nocache");
    let api = HungApiServer::start(&dir);
    let state = dir.path("state");
    std::fs::create_dir_all(&state).unwrap();
    let tenant_port = free_udp_port();
    // A clumsy restore: a truncated cache file. It is ignored, not run and not fatal.
    let mut config = AgentConfig::from_json(include_str!("data/agent-config.json")).unwrap();
    config.serving.tenants = vec![tenant("ns/a", tenant_port, &["127.0.0.0/8"], false)];
    let gz = config.to_gzip();
    let cache = cache_in(&state);
    std::fs::write(cache.path(), &gz[..gz.len() / 2]).unwrap();

    let agent = start_agent(&state, &api);
    assert!(wait_until(Duration::from_secs(10), || {
        http_get(agent.metrics_port, "/healthz").is_some_and(|(code, _)| code == 200)
    }));
    // The cache refused and the agent waiting on its (hung) source: still no config, still
    // live, not ready, nothing served.
    assert!(
        wait_until(Duration::from_secs(10), || {
            std::fs::read_to_string(state.join("agent.log"))
                .is_ok_and(|log| log.contains("ignoring the cached config"))
                && api.hanging_connections() >= 1
        }),
        "the agent never refused the truncated cache while waiting on the API server"
    );
    assert_eq!(
        http_get(agent.metrics_port, "/healthz").map(|(c, _)| c),
        Some(200)
    );
    assert_eq!(
        http_get(agent.metrics_port, "/readyz").map(|(c, _)| c),
        Some(503)
    );
    let target = SocketAddr::from(([127, 0, 0, 1], tenant_port));
    assert!(
        ask(
            "127.0.0.1".parse().unwrap(),
            target,
            Duration::from_millis(300)
        )
        .is_none(),
        "a tenant was served from a corrupt cache"
    );
    let (_, metrics) = http_get(agent.metrics_port, "/metrics").unwrap();
    assert!(
        metrics.contains("stratum_agent_config_source{source=\"none\"} 1"),
        "{metrics}"
    );
}
