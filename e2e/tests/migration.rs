//! Issue 17's migration path, run as docs/operations.md tells an admin to, with the patch files
//! of `examples/migration/`: a host chronyd keeps the real node's clock; the shared
//! TimeService goes to `Monitor` (1-monitor.yaml); the agent there sets chronyd's own view of
//! the clock beside its measurement (NodeClock `hostDaemon`, `kubectl get nodeclocks -o wide`,
//! `stratumctl tracking` through the README's `kubectl exec` recipe, the dashboard's Offset
//! panel on the stack's Prometheus) and the TimeService's `OtherTimeDaemon` condition names the
//! node; chronyd stops and all of that clears; the TimeService goes back to `Discipline`
//! (2-discipline.yaml) and is Ready again.
//!
//! The host chronyd runs `-x` (never adjusts a clock) without CAP_SYS_TIME in the real node's
//! network namespace, following one of the stack's upstreams, with its command port on that
//! namespace's loopback, as a node's chronyd has it. The TimeService keeps `clock: Simulated`
//! throughout, so the `Discipline` step steers software clocks, never this machine's.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use kube::api::Api;
use stratum_api::{NodeClock, TimeService};
use stratum_e2e::harness::*;
use stratum_e2e::real_node::{chronyd_in_real_node, real_node};

fn kubectl(args: &[&str]) -> Output {
    let bin = std::env::var("STRATUM_E2E_BIN").expect("STRATUM_E2E_BIN from e2e/stack.sh env");
    Command::new(PathBuf::from(bin).join("kubectl"))
        .args(args)
        .output()
        .expect("kubectl runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `kubectl patch` of the shared TimeService with one of `examples/migration/`'s files.
fn patch_with_example(file: &str) -> Result<(), String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/migration/").to_owned() + file;
    let out = kubectl(&[
        "patch",
        "timeservice",
        SHARED_TIME_SERVICE,
        "--type",
        "merge",
        "--patch-file",
        &path,
    ]);
    out.status
        .success()
        .then_some(())
        .ok_or_else(|| format!("kubectl patch {file}: {}", text(&out.stderr)))
}

/// The host chronyd, and the shared TimeService back in `Discipline`, however the test ends:
/// `mode` set by `kubectl patch` is not the test manager's field, so the next test's apply
/// would not reset it.
struct Restore {
    chronyd: Option<std::process::Child>,
}

impl Restore {
    fn stop_chronyd(&mut self) {
        if let Some(mut c) = self.chronyd.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }
}

impl Drop for Restore {
    fn drop(&mut self) {
        self.stop_chronyd();
        if std::thread::panicking()
            && let Err(e) = patch_with_example("2-discipline.yaml")
        {
            eprintln!("restoring Discipline: {e}");
        }
    }
}

/// A node's chronyd in the real node's network namespace: client only (`port 0`), its command
/// port on 127.0.0.1:323, following one of the stack's upstreams.
fn host_chronyd(dir: &std::path::Path) -> std::process::Child {
    let upstream = upstreams().remove(0);
    let conf = dir.join("chrony.conf");
    std::fs::write(
        &conf,
        format!(
            "server {upstream} iburst minpoll 0 maxpoll 0\nport 0\nbindcmdaddress 127.0.0.1\n\
             pidfile {}\ndriftfile {}\n",
            dir.join("chronyd.pid").display(),
            dir.join("chrony.drift").display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("chronyd.log")).unwrap();
    chronyd_in_real_node(&conf, log)
}

/// Whether the agents' DaemonSet has rolled out its current template, every pod ready, and
/// that template adds SYS_TIME (`Discipline`) or not (`Monitor`).
async fn rolled_out(client: &kube::Client, sys_time: bool) -> Option<()> {
    let api: Api<DaemonSet> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
    let ds = api
        .get(&format!("{SHARED_TIME_SERVICE}-agent"))
        .await
        .ok()?;
    let adds = ds
        .spec
        .as_ref()?
        .template
        .spec
        .as_ref()?
        .containers
        .iter()
        .flat_map(|c| c.security_context.as_ref())
        .flat_map(|s| s.capabilities.as_ref())
        .flat_map(|c| c.add.iter().flatten())
        .any(|cap| cap == "SYS_TIME");
    let status = ds.status.as_ref()?;
    let current = status.observed_generation == ds.metadata.generation;
    let done = status.desired_number_scheduled > 0
        && status.updated_number_scheduled.unwrap_or(0) == status.desired_number_scheduled
        && status.number_ready == status.desired_number_scheduled;
    (adds == sys_time && current && done).then_some(())
}

fn condition(ts: &TimeService, type_: &str) -> Option<(String, String, String)> {
    condition_of(&ts.status.as_ref()?.conditions, type_)
}

#[tokio::test]
#[ignore = "needs the e2e cluster: make e2e"]
async fn the_documented_migration_from_a_host_chronyd_runs_monitor_compare_stop_discipline() {
    let client = client().await;
    ensure_shared_time_service(&client).await;
    let node = real_node();
    let prometheus = std::env::var("STRATUM_E2E_PROMETHEUS").expect("STRATUM_E2E_PROMETHEUS");
    let dir = run_dir().join("e2e-migration");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();

    // The node as it was before Stratum: its own chronyd keeps the clock.
    let mut restore = Restore {
        chronyd: Some(host_chronyd(&dir)),
    };

    // 1. Monitor.
    patch_with_example("1-monitor.yaml").unwrap();
    let (_, took) = wait_for(
        Duration::from_secs(180),
        "the agents rolled out in Monitor (no SYS_TIME), every pod ready",
        || rolled_out(&client, false),
    )
    .await;
    eprintln!("Monitor rolled out in {:.1} s", took.as_secs_f64());

    // 2. Compare: the agent on the real node reads chronyd's view at start and every 15 s.
    let clocks: Api<NodeClock> = Api::all(client.clone());
    let (view, took) = wait_for(
        Duration::from_secs(90),
        "the real node's NodeClock to show chronyd's view and OtherTimeDaemon=True",
        || async {
            let status = clocks.get(&node).await.ok()?.status?;
            let seen = status
                .conditions
                .iter()
                .any(|c| c.type_ == "OtherTimeDaemon" && c.status == "True");
            let view = status.host_daemon?;
            (seen && view.daemon == "chronyd" && view.offset_nanos.is_some()).then_some(view)
        },
    )
    .await;
    eprintln!(
        "NodeClock hostDaemon after {:.1} s: {view:?}",
        took.as_secs_f64()
    );
    assert!(view.error.is_none(), "{view:?}");
    assert!(view.error_bound_nanos.is_some_and(|b| b > 0), "{view:?}");
    assert_eq!(
        view.reference.as_deref(),
        Some(upstreams()[0].as_str()),
        "chronyd follows the upstream it was given: {view:?}"
    );

    let time_services: Api<TimeService> = Api::all(client.clone());
    let ((status, reason, message), _) = wait_for(
        Duration::from_secs(30),
        "the TimeService's OtherTimeDaemon condition naming the real node",
        || async {
            let ts = time_services.get(SHARED_TIME_SERVICE).await.ok()?;
            condition(&ts, "OtherTimeDaemon").filter(|c| c.0 == "True" && c.2.contains(&node))
        },
    )
    .await;
    eprintln!("TimeService OtherTimeDaemon={status} ({reason}): {message}");
    assert_eq!(reason, "Detected");

    // `kubectl get nodeclocks -o wide`: the daemon's offset beside the agent's.
    let wide = kubectl(&["get", "nodeclocks", "-o", "wide"]);
    let table = text(&wide.stdout);
    let header = table.lines().next().unwrap_or_default();
    assert!(
        header.contains("DAEMON") && header.contains("DAEMON OFFSET"),
        "{table}"
    );
    let row = table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(node.as_str()))
        .unwrap_or_else(|| panic!("no row for {node}:\n{table}"));
    assert!(row.contains("chronyd"), "{row}");

    // The README's recipe: `stratumctl tracking` in the node's agent pod.
    let pod = kubectl(&[
        "-n",
        AGENT_NAMESPACE,
        "get",
        "pods",
        "-l",
        "app.kubernetes.io/name=stratum-agent",
        "--field-selector",
        &format!("spec.nodeName={node}"),
        "-o",
        "name",
    ]);
    let pod = text(&pod.stdout).trim().to_owned();
    assert!(pod.starts_with("pod/"), "the agent pod on {node}: {pod:?}");
    let tracking = kubectl(&[
        "-n",
        AGENT_NAMESPACE,
        "exec",
        &pod,
        "--",
        "stratumctl",
        "tracking",
    ]);
    let tracking_text = text(&tracking.stdout);
    assert!(tracking.status.success(), "{}", text(&tracking.stderr));
    let line = tracking_text
        .lines()
        .find(|l| l.starts_with("Host daemon"))
        .unwrap_or_else(|| panic!("no host daemon line:\n{tracking_text}"));
    assert!(
        line.contains("chronyd says ") && line.contains("agent − chronyd: "),
        "{line}"
    );
    eprintln!("stratumctl tracking on {node}: {line}");

    // The dashboard's Offset panel: the agent's series and chronyd's, side by side.
    let queries = dashboard_queries("Offset (and the host daemon's own view)");
    assert_eq!(queries.len(), 2, "{queries:?}");
    let every = |q: &str| q.replace("$time_service", ".*").replace("$node", ".*");
    let (side_by_side, _) = wait_for(
        Duration::from_secs(90),
        "Prometheus to hold the real node's offset and chronyd's view of it",
        || async {
            let mut values = Vec::new();
            for q in &queries {
                let v = prometheus_query(&prometheus, &every(q), None)?;
                let series = v["data"]["result"]
                    .as_array()?
                    .iter()
                    .find(|s| s["metric"]["node"] == node.as_str())?
                    .clone();
                values.push(series);
            }
            Some(values)
        },
    )
    .await;
    assert_eq!(
        side_by_side[1]["metric"]["daemon"], "chronyd",
        "{side_by_side:?}"
    );
    eprintln!(
        "dashboard on {node}: agent {} s, chronyd {} s",
        side_by_side[0]["value"][1], side_by_side[1]["value"][1]
    );

    // 3. Stop the host daemon: within the agent's next look (60 s) it is gone everywhere.
    restore.stop_chronyd();
    let (_, took) = wait_for(
        Duration::from_secs(90),
        "the real node's NodeClock without chronyd's view, OtherTimeDaemon=False",
        || async {
            let status = clocks.get(&node).await.ok()?.status?;
            let quiet = status
                .conditions
                .iter()
                .any(|c| c.type_ == "OtherTimeDaemon" && c.status == "False");
            (quiet && status.host_daemon.is_none()).then_some(())
        },
    )
    .await;
    eprintln!(
        "chronyd stopped: NodeClock clear after {:.1} s",
        took.as_secs_f64()
    );
    wait_for(
        Duration::from_secs(30),
        "the TimeService's OtherTimeDaemon condition to stop naming the real node",
        || async {
            let ts = time_services.get(SHARED_TIME_SERVICE).await.ok()?;
            condition(&ts, "OtherTimeDaemon").filter(|c| !c.2.contains(&node))
        },
    )
    .await;

    // 4. Discipline: the pods get SYS_TIME back and the TimeService is Ready again.
    patch_with_example("2-discipline.yaml").unwrap();
    let (_, took) = wait_for(
        Duration::from_secs(180),
        "the agents rolled out in Discipline (SYS_TIME), every pod ready",
        || rolled_out(&client, true),
    )
    .await;
    eprintln!("Discipline rolled out in {:.1} s", took.as_secs_f64());
    ensure_shared_time_service(&client).await;
}
