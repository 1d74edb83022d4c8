//! `chronyd -Q` as a client under test: it measures the offset of the servers its config
//! names and prints it, never setting the clock, and runs here without CAP_SYS_TIME on top.
//! Shared by `common` and `server_common`.

use std::path::Path;
use std::process::{Command, Output, Stdio};

/// Runs `chronyd -Q -t 8` with `config` (server lines and options; `cmdport 0` and a pidfile
/// in `dir` are added), after `prefix` (e.g. `["ip", "netns", "exec", NS]`), and returns the
/// offset it printed, or `None` when it got no usable time.
pub fn chronyd_query(prefix: &[&str], chronyd: &Path, dir: &Path, config: &str) -> Option<f64> {
    let tag: u32 = rand::random();
    let conf = dir.join(format!("chronyd-query-{tag}.conf"));
    std::fs::write(
        &conf,
        format!(
            "{config}cmdport 0\npidfile {}\n",
            dir.join(format!("chronyd-query-{tag}.pid")).display()
        ),
    )
    .expect("writing chronyd's config");
    let (program, before) = match prefix.split_first() {
        Some((program, rest)) => (*program, rest),
        None => ("setpriv", &[][..]),
    };
    let mut command = Command::new(program);
    command.args(before);
    if !prefix.is_empty() {
        command.arg("setpriv");
    }
    let output = command
        .args(["--bounding-set=-sys_time", "--inh-caps=-sys_time"])
        .arg(chronyd)
        .args(["-Q", "-t", "8", "-u", "root", "-f"])
        .arg(&conf)
        .stdin(Stdio::null())
        .output()
        .expect("running chronyd");
    chrony_wrong_by(&output)
}

/// The offset `chronyd -Q` printed ("System clock wrong by -0.000001 seconds (ignored)").
pub fn chrony_wrong_by(output: &Output) -> Option<f64> {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    text.lines()
        .find_map(|l| l.split("System clock wrong by ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}
