//! The tenant client recipes of `examples/clients/`, used as they are written against a
//! tenant's Service on the stack's real node, so the docs cannot rot: real chronyd with
//! `chrony.conf`, ntpsec's ntpdig at `ntp.conf`'s server line, and a pod taking `time-config`
//! through the recipe's `envFrom`. The recipes name `team-a`; the test puts its own namespace
//! in, as the recipes tell users to.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use stratum_e2e::harness::*;
use stratum_e2e::real_node::*;

const NAMESPACE: &str = "e2e-recipes";
const TIMEZONE: &str = "Europe/Berlin";

fn recipe(file: &str) -> String {
    let path = format!("{}/../examples/clients/{file}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .replace("team-a", NAMESPACE)
}

#[tokio::test]
#[ignore = "needs the e2e cluster: make e2e"]
async fn the_chrony_and_ntpd_recipes_get_time_and_the_time_config_pod_sees_tz() {
    let client = client().await;
    ensure_shared_time_service(&client).await;
    namespace(&client, NAMESPACE, serde_json::json!({})).await;
    apply_tenant(
        &client,
        NAMESPACE,
        serde_json::json!({"timezone": TIMEZONE, "rateLimit": {"kissOfDeath": true}}),
    )
    .await;

    let chrony_conf = recipe("chrony.conf");
    let ntp_conf = recipe("ntp.conf");
    let server = ntp_conf
        .lines()
        .find_map(|l| l.strip_prefix("server "))
        .and_then(|rest| rest.split_whitespace().next())
        .expect("ntp.conf has a server line")
        .to_owned();
    assert_eq!(server, format!("ntp.{NAMESPACE}.svc.cluster.local"));
    assert!(
        chrony_conf.contains(&format!("server {server} ")),
        "chrony.conf and ntp.conf name the same server: {chrony_conf}"
    );

    // ntpdig at ntp.conf's server until the Service answers, then chronyd -Q reading the
    // recipe file itself (plus what a read-only container needs: a pid file and no command
    // port).
    let run = run_client_pod(
        &client,
        NAMESPACE,
        "recipes",
        &[("CHRONY_CONF", &chrony_conf), ("SERVER", &server)],
        r#"i=0
until ntpdig -j -t 2 "$SERVER" >/tmp/dig 2>/tmp/dig.err; do
  i=$((i+1)); [ "$i" -ge 60 ] && { cat /tmp/dig.err >/dev/termination-log; exit 1; }
  sleep 1
done
printf '%s\npidfile /tmp/chronyd.pid\ncmdport 0\n' "$CHRONY_CONF" >/tmp/chrony.conf
chronyd -d -Q -t 20 -u root -f /tmp/chrony.conf >/tmp/chrony 2>&1
{ cat /tmp/dig; echo; busybox grep -o 'System clock wrong by [-0-9.]* seconds' /tmp/chrony \
  || busybox tail -n 5 /tmp/chrony; } >/dev/termination-log"#,
    )
    .await;
    assert_eq!(run.exit_code, 0, "recipes pod: {}", run.message);
    let (dig, offset) = ntpdig_and_chrony_offset(&run);
    assert!(offset.abs() < 0.05, "chronyd with chrony.conf: {offset} s");
    eprintln!("recipes: ntpdig {dig}; chronyd -Q with chrony.conf: offset {offset:+.6} s");

    // The workload recipe: its envFrom, unchanged, in the client image (the recipe's busybox
    // image is not on the offline node; its command prints the same two variables).
    let pod: serde_json::Value =
        serde_yaml::from_str(&recipe("pod-time-config.yaml")).expect("pod-time-config.yaml");
    assert_eq!(pod["metadata"]["namespace"], NAMESPACE);
    let env_from = pod["spec"]["containers"][0]["envFrom"].clone();
    assert!(env_from.is_array(), "{pod}");
    let run = run_pod_container(
        &client,
        NAMESPACE,
        "show-time-config",
        serde_json::json!({
            "name": "app", "image": CLIENT_IMAGE, "imagePullPolicy": "Never",
            "command": ["sh", "-c", "echo \"NTP_SERVER=$NTP_SERVER TZ=$TZ\" >/dev/termination-log"],
            "envFrom": env_from,
        }),
    )
    .await;
    assert_eq!(run.exit_code, 0, "time-config pod: {}", run.message);
    assert_eq!(
        run.message.trim(),
        format!("NTP_SERVER=ntp.{NAMESPACE}.svc TZ={TIMEZONE}")
    );
}
