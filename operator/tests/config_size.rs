//! The agent config of the scale scenario (1000 tenants, 10,000 dual-stack pods) fits a
//! ConfigMap with room to spare, in the form the operator writes and the agent reads.

#![allow(clippy::unwrap_used)]

#[path = "support/scale.rs"]
mod scale;

use stratum_api::AgentConfig;
use stratum_api::agent_config::CONFIG_MAP_LIMIT_BYTES;
use stratum_operator::plan::{Planner, config_map_bytes};

#[test]
fn the_scale_scenario_config_fits_a_config_map_with_room_to_grow() {
    for addressing in [scale::Addressing::Sequential, scale::Addressing::PerNode] {
        let ts = scale::time_service();
        let index = scale::index(addressing, &ts);
        let mut planner = Planner::new();
        let plan = planner
            .plan_time_service(&index, &ts, &scale::settings())
            .unwrap();
        assert!(plan.blocked.is_none(), "{:?}", plan.blocked);
        let config = plan.config.unwrap();
        let cm = plan.config_map.unwrap();
        let bytes = config_map_bytes(&cm);
        // Room to grow: under half the limit even when pod addresses hardly aggregate.
        assert!(
            bytes < CONFIG_MAP_LIMIT_BYTES / 2,
            "{addressing:?}: {bytes} bytes"
        );
        // What the agent reads back is what was planned, and every tenant allows exactly
        // what the operator resolved for it.
        let read = AgentConfig::from_config_map(&cm).unwrap();
        assert_eq!(read, config);
        // The payload is many gzip members; the documented `base64 -d | gunzip` reads them all.
        let payload = stratum_api::agent_config::config_map_payload(&cm).unwrap();
        let document = stratum_operator::build::agent_config::document(&config);
        let members = stratum_operator::build::gzip::chunks(document.as_bytes()).len();
        assert!(members > 10, "{members} members");
        assert_eq!(gunzip_command(&payload), document);
        assert_eq!(read.serving.tenants.len(), 1000);
        for t in &read.serving.tenants {
            let (ns, name) = t.id.split_once('/').unwrap();
            let expected = planner.allowed(&index, &(ns.to_owned(), name.to_owned()));
            assert_eq!(
                AgentConfig::tenant_allowed(&read.serving, t),
                *expected,
                "{}",
                t.id
            );
        }
    }
}

/// The payload through the system's `gzip -dc`, as `docs/contracts.md` tells users to read it.
fn gunzip_command(payload: &[u8]) -> String {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new("gzip")
        .arg("-dc")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("gzip is installed");
    let mut stdin = child.stdin.take().unwrap();
    let input = payload.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input).unwrap());
    let output = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(output.status.success(), "gzip -dc failed");
    String::from_utf8(output.stdout).unwrap()
}
