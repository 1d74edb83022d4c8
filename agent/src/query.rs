//! One-shot NTP query of any server (`stratumctl query`): the way to test a tenant VIP by
//! hand. Uses the host clock as the local clock; reports offset, delay, stratum, refid, leap.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;
use stratum_ntp::packet::{LeapIndicator, Mode, Packet};
use stratum_ntp::time::{NtpShort, NtpTimestamp};

use crate::upstream;

/// The answer of one server.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct QueryResult {
    /// Server queried.
    pub server: String,
    /// Offset of the server from this host (server − host), seconds.
    pub offset_seconds: f64,
    /// Round-trip delay, seconds.
    pub delay_seconds: f64,
    /// Stratum.
    pub stratum: u8,
    /// Reference ID, printable.
    pub reference_id: String,
    /// Leap indicator.
    pub leap: String,
    /// Root delay, seconds.
    pub root_delay_seconds: f64,
    /// Root dispersion, seconds.
    pub root_dispersion_seconds: f64,
    /// Version of the reply.
    pub version: u8,
    /// Kiss code, when the server sent a Kiss-o'-Death.
    pub kiss_code: Option<String>,
}

/// What an answer says about the server, as `stratumctl query`'s exit status reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Served, with time from a synchronized clock: exit 0.
    Synchronized,
    /// Answered, but the server says its clock is unsynchronized (leap 3 or stratum 16): 2.
    Unsynchronized,
    /// A Kiss-o'-Death: the server refused this client (DENY, RSTR, RATE, ...): 3.
    Refused,
}

impl Verdict {
    /// The process exit status (1 is left for errors: no reply, invalid reply, bad input).
    pub fn exit_code(self) -> u8 {
        match self {
            Verdict::Synchronized => 0,
            Verdict::Unsynchronized => 2,
            Verdict::Refused => 3,
        }
    }
}

impl QueryResult {
    /// What this answer says about the server.
    pub fn verdict(&self) -> Verdict {
        if self.kiss_code.is_some() {
            Verdict::Refused
        } else if self.leap == "unsynchronized" || self.stratum >= 16 {
            Verdict::Unsynchronized
        } else {
            Verdict::Synchronized
        }
    }
}

/// How good an answer must be for `stratumctl waitsync` to stop waiting.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SyncBound {
    /// Largest root distance (root delay / 2 + root dispersion) accepted, seconds.
    pub max_root_distance: f64,
    /// Largest |offset| from this host accepted, seconds; `None`: any (a VM or device whose
    /// own clock is still wrong waits for its server, not for itself).
    pub max_offset: Option<f64>,
}

/// What one answer means to a waiter.
#[derive(Clone, Debug, PartialEq)]
pub enum WaitStep {
    /// Synchronized and within the bound: stop, exit 0.
    Done,
    /// Not yet (unsynchronized, or outside the bound, said why): ask again.
    NotYet(String),
    /// Refused (Kiss-o'-Death): stop, exit 3; asking again only earns more refusals.
    Refused(String),
}

impl QueryResult {
    /// Root delay / 2 + root dispersion: how far the server's time may be from true time.
    pub fn root_distance(&self) -> f64 {
        self.root_delay_seconds / 2.0 + self.root_dispersion_seconds
    }

    /// Whether this answer ends a wait for `bound`.
    pub fn wait_step(&self, bound: SyncBound) -> WaitStep {
        match self.verdict() {
            Verdict::Refused => WaitStep::Refused(format!(
                "the server refused this client (Kiss-o'-Death {})",
                self.kiss_code.as_deref().unwrap_or("?")
            )),
            Verdict::Unsynchronized => WaitStep::NotYet("the server is unsynchronized".into()),
            Verdict::Synchronized if self.root_distance() > bound.max_root_distance => {
                WaitStep::NotYet(format!(
                    "root distance {:.6} s is above {:.6} s",
                    self.root_distance(),
                    bound.max_root_distance
                ))
            }
            Verdict::Synchronized => match bound.max_offset {
                Some(max) if self.offset_seconds.abs() > max => WaitStep::NotYet(format!(
                    "offset {:+.6} s is beyond ±{max:.6} s",
                    self.offset_seconds
                )),
                _ => WaitStep::Done,
            },
        }
    }
}

/// Why a query failed.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// No reply, or a network error.
    #[error(transparent)]
    Exchange(#[from] upstream::ExchangeError),
    /// The reply is not a valid answer to our request.
    #[error("invalid reply from {0}: {1}")]
    Invalid(SocketAddr, String),
}

/// Queries `server` once.
pub async fn query(server: SocketAddr, timeout: Duration) -> Result<QueryResult, QueryError> {
    let transmit = NtpTimestamp::random(&mut rand::rng());
    let request = Packet {
        leap: LeapIndicator::Unknown,
        version: 4,
        mode: Mode::Client,
        stratum: 0,
        poll: 0,
        precision: -20,
        root_delay: NtpShort::ZERO,
        root_dispersion: NtpShort::ZERO,
        reference_id: Default::default(),
        reference_timestamp: NtpTimestamp::default(),
        origin_timestamp: NtpTimestamp::default(),
        receive_timestamp: NtpTimestamp::default(),
        transmit_timestamp: transmit,
    };
    let in_flight = upstream::send(server, &request.to_bytes())?;
    let t1 = in_flight.host_tx;
    let reply = in_flight.reply(timeout).await?;
    let t4 = reply.host_rx;
    let view =
        Packet::parse(&reply.bytes).map_err(|e| QueryError::Invalid(server, e.to_string()))?;
    let p = view.header;
    if p.origin_timestamp != transmit {
        return Err(QueryError::Invalid(
            server,
            "origin timestamp does not match our request".into(),
        ));
    }
    if p.mode != Mode::Server {
        return Err(QueryError::Invalid(
            server,
            format!("mode {:?} instead of server", p.mode),
        ));
    }
    // Stratum 0 is a Kiss-o'-Death: the reference ID is the ASCII kiss code.
    let kiss_code = (p.stratum == 0).then(|| p.reference_id.display());
    let t2 = p.receive_timestamp.to_clock_time_near(t1);
    let t3 = p.transmit_timestamp.to_clock_time_near(t1);
    let offset = (t2.secs_since(t1) + t3.secs_since(t4)) / 2.0;
    let delay = t4.secs_since(t1) - t3.secs_since(t2);
    Ok(QueryResult {
        server: server.to_string(),
        offset_seconds: offset,
        delay_seconds: delay.max(0.0),
        stratum: p.stratum,
        reference_id: p.reference_id.display(),
        leap: match p.leap {
            LeapIndicator::NoWarning => "none",
            LeapIndicator::Insert => "insert",
            LeapIndicator::Delete => "delete",
            LeapIndicator::Unknown => "unsynchronized",
        }
        .into(),
        root_delay_seconds: p.root_delay.to_secs_f64(),
        root_dispersion_seconds: p.root_dispersion.to_secs_f64(),
        version: p.version,
        kiss_code,
    })
}

/// Parses `HOST[:PORT]` (IPv6 as `[addr]:port` or bare) into addresses, default port 123.
pub async fn resolve_target(target: &str) -> std::io::Result<SocketAddr> {
    if let Ok(addr) = target.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if let Ok(ip) = target.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, 123));
    }
    let (host, port) = match target.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (
            h,
            p.parse::<u16>()
                .map_err(|_| std::io::Error::other(format!("bad port in {target:?}")))?,
        ),
        _ => (target, 123),
    };
    upstream::resolve(host, port, 1)
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| std::io::Error::other(format!("{host} resolved to no address")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(leap: &str, root_delay: f64, root_dispersion: f64, offset: f64) -> QueryResult {
        QueryResult {
            server: "127.0.0.1:123".into(),
            offset_seconds: offset,
            delay_seconds: 1e-4,
            stratum: 2,
            reference_id: "127.0.0.1".into(),
            leap: leap.into(),
            root_delay_seconds: root_delay,
            root_dispersion_seconds: root_dispersion,
            version: 4,
            kiss_code: None,
        }
    }

    const BOUND: SyncBound = SyncBound {
        max_root_distance: 0.01,
        max_offset: None,
    };

    #[test]
    fn a_wait_ends_only_on_a_synchronized_answer_within_the_bound() {
        assert_eq!(
            answer("none", 0.004, 0.007, 5.0).wait_step(BOUND),
            WaitStep::Done
        );
        // 0.012 / 2 + 0.005 = 0.011 > 0.010.
        let far = answer("none", 0.012, 0.005, 0.0).wait_step(BOUND);
        assert!(
            matches!(&far, WaitStep::NotYet(why) if why.contains("root distance")),
            "{far:?}"
        );
        let unsynchronized = answer("unsynchronized", 0.0, 0.0, 0.0).wait_step(BOUND);
        assert!(matches!(unsynchronized, WaitStep::NotYet(_)));
        let off = SyncBound {
            max_offset: Some(0.1),
            ..BOUND
        };
        assert!(matches!(
            answer("none", 0.0, 0.0, -0.2).wait_step(off),
            WaitStep::NotYet(_)
        ));
        assert_eq!(
            answer("none", 0.0, 0.0, 0.05).wait_step(off),
            WaitStep::Done
        );
    }

    #[test]
    fn a_kiss_of_death_ends_the_wait_as_a_refusal() {
        let mut refused = answer("unsynchronized", 0.0, 0.0, 0.0);
        refused.kiss_code = Some("DENY".into());
        assert!(matches!(refused.wait_step(BOUND), WaitStep::Refused(why) if why.contains("DENY")));
    }
}
