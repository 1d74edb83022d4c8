//! The agent config of the scale scenario (1000 tenants, 10,000 dual-stack pods) fits a
//! ConfigMap with room to spare, in the form the operator writes and the agent reads.

#![allow(clippy::unwrap_used)]

#[path = "support/scale.rs"]
mod scale;

use stratum_api::AgentConfig;
use stratum_api::agent_config::CONFIG_MAP_LIMIT_BYTES;
use stratum_operator::plan::{config_map_bytes, plan_time_service};

#[test]
fn the_scale_scenario_config_fits_a_config_map_with_room_to_grow() {
    for addressing in [scale::Addressing::Sequential, scale::Addressing::PerNode] {
        let ts = scale::time_service();
        let mut index = scale::index(addressing, &ts);
        let plan = plan_time_service(&mut index, &ts, &scale::settings()).unwrap();
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
        assert_eq!(read.serving.tenants.len(), 1000);
        for t in &read.serving.tenants {
            let (ns, name) = t.id.split_once('/').unwrap();
            let expected = index.allowed(&(ns.to_owned(), name.to_owned()));
            assert_eq!(
                AgentConfig::tenant_allowed(&read.serving, t),
                *expected,
                "{}",
                t.id
            );
        }
    }
}
