//! The shared TimeService's agent as a container on the stack's real node: the image that
//! `make images` built, started by a real kubelet through containerd from the DaemonSet the
//! operator wrote. What is real here and nowhere else: the securityContext as the kernel sees
//! it, the kubelet's probes, the hostPath drift file, and pod deletion (preStop drain, SIGTERM,
//! the replacement pod). Figures are printed; the bounds the issue sets are asserted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, LogParams};
use stratum_e2e::harness::*;
use stratum_e2e::real_node::*;

/// The `frequencyPpm` of the drift file an agent on the real node keeps.
fn drift_file_ppm() -> Option<f64> {
    let path = std::path::Path::new(&drift_directory()).join("drift.json");
    let file: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    file["frequencyPpm"].as_f64()
}

/// The frequency an agent's log says it restored from its drift file (`--log-format json`).
fn restored_ppm(log: &str) -> Option<f64> {
    log.lines()
        .filter(|l| l.contains("drift restored"))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|line| {
            line["fields"]["ppm"]
                .as_f64()
                .or_else(|| line["ppm"].as_f64())
        })
}

#[tokio::test]
#[ignore = "needs the e2e cluster and the images of `make images`: make e2e"]
async fn the_agent_container_runs_without_sys_time_drains_before_it_exits_and_keeps_its_drift() {
    let client = client().await;
    ensure_shared_time_service(&client).await;
    let node = real_node();
    let ns = "e2e-real-agent";
    namespace(&client, ns, serde_json::json!({})).await;
    apply_tenant(&client, ns, serde_json::json!({})).await;
    let (pod, container_id) = ready_agent_pod(&client, &node).await;
    let pod_name = pod.metadata.name.clone().unwrap();

    // The pod spec is production's: SYS_TIME asked for, a read-only root, both probes.
    let spec = pod.spec.clone().unwrap();
    let container = &spec.containers[0];
    assert_eq!(container.image.as_deref(), Some(AGENT_IMAGE));
    let sc = container.security_context.clone().unwrap();
    assert_eq!(
        sc.capabilities.unwrap().add.as_deref(),
        Some(&["SYS_TIME".to_string()][..])
    );
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert!(container.liveness_probe.is_some() && container.readiness_probe.is_some());

    // As the kernel sees the process: no CAP_SYS_TIME anywhere (the node's runtime wrapper
    // removed it, and said so), nothing else either, and the root really is read-only.
    let pid = container_pid(&container_id)
        .unwrap_or_else(|| panic!("no task for the agent container {container_id}"));
    let caps = capabilities(pid);
    assert_eq!(caps.len(), 5, "capability sets of pid {pid}: {caps:?}");
    for (set, value) in &caps {
        assert_eq!(
            value & CAP_SYS_TIME_BIT,
            0,
            "{set} = {value:016x} holds CAP_SYS_TIME"
        );
        if set == "CapEff" {
            assert_eq!(
                value & !CAP_NET_BIND_SERVICE_BIT,
                0,
                "the agent holds capabilities it never asked for: CapEff {value:016x}"
            );
        }
    }
    assert!(
        runtime_wrapper_removed_sys_time(&container_id),
        "the runtime wrapper logged no removal for the agent container {container_id}"
    );
    let probe_file = format!("/proc/{pid}/root/stratum-e2e-write-probe");
    let write = std::fs::write(&probe_file, b"x");
    let _ = std::fs::remove_file(&probe_file);
    assert_eq!(
        write.as_ref().err().and_then(std::io::Error::raw_os_error),
        Some(30), // EROFS
        "writing into the agent's root filesystem: {write:?}"
    );
    eprintln!(
        "agent container {pod_name} on {node}: {}",
        describe_capabilities(&caps)
    );

    // Its endpoint is in the tenant's ready set.
    wait_for(
        Duration::from_secs(60),
        "the real node's endpoint ready",
        || async {
            endpoint_readiness(&client, ns)
                .await?
                .iter()
                .any(|(n, r)| *n == node && *r)
                .then_some(())
        },
    )
    .await;

    // Delete the pod: the endpoint leaves the ready set while the agent still runs (the
    // preStop drain), then SIGTERM ends it well inside the grace period.
    let pods: Api<Pod> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
    let deleted = Instant::now();
    pods.delete(&pod_name, &DeleteParams::default())
        .await
        .unwrap();
    let (_, unready_after) = wait_for(
        Duration::from_secs(10),
        "the deleted agent's endpoint out of the ready set",
        || async {
            let endpoints = endpoint_readiness(&client, ns).await?;
            (!endpoints.iter().any(|(n, r)| *n == node && *r)).then_some(())
        },
    )
    .await;
    let alive_when_unready = process_alive(pid);
    let (_, exit_wait) = wait_for(
        Duration::from_secs(15),
        "the deleted agent's process to exit",
        || async { (!process_alive(pid)).then_some(()) },
    )
    .await;
    let exited_after = deleted.elapsed();
    eprintln!(
        "agent pod {pod_name} deleted: endpoint not ready after {:.2} s, process exited after \
         {:.2} s ({:.2} s later)",
        unready_after.as_secs_f64(),
        exited_after.as_secs_f64(),
        exit_wait.as_secs_f64()
    );
    assert!(
        alive_when_unready,
        "the agent exited before its endpoint left the ready set"
    );
    assert!(
        exited_after < Duration::from_secs(10),
        "the agent took {exited_after:?}: the kubelet's grace period would have killed it"
    );

    // On its way out it saved its drift on the hostPath; the replacement pod reads it.
    let saved = drift_file_ppm().expect("no drift file on the real node's hostPath");
    let (new_pod, _) = ready_agent_pod(&client, &node).await;
    let new_name = new_pod.metadata.name.unwrap();
    assert_ne!(new_name, pod_name, "the DaemonSet made a new pod");
    let (restored, _) = wait_for(
        Duration::from_secs(30),
        "the new agent's log to say it restored the drift",
        || async {
            let log = pods.logs(&new_name, &LogParams::default()).await.ok()?;
            restored_ppm(&log)
        },
    )
    .await;
    eprintln!(
        "drift file: {saved:+.6} ppm saved by {pod_name}, {restored:+.6} ppm restored by {new_name}"
    );
    assert!(
        (restored - saved).abs() < 1e-9,
        "the new agent restored {restored} ppm, the file held {saved} ppm"
    );
}
