//! The run loop's state and its handlers, free of IO: the core [`System`], the upstreams this
//! node polls, what each name resolved to, which addresses are mobilized, and the egress
//! fallback. [`crate::agent::run`] feeds it timer ticks, replies, configs and DNS answers and
//! does what it asks (send polls, start lookups, apply clock actions); tests drive the same
//! handlers on a simulated clock with simulated DNS and servers.
//!
//! Names are resolved off the loop ([`crate::resolver`]). A name that gives nothing usable is
//! retried with backoff forever. A pool keeps `maxSources` healthy members: one that stays
//! unreachable, is a falseticker for [`FALSE_FOR`], or is denied by KoD is replaced by
//! another address of the pool, and the bad address is not taken again for
//! [`REJECT_FOR`]. A server denied by KoD is retried after [`REJECT_FOR`] too.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use stratum_api::agent_config::{AgentConfig, UpstreamConfig, UpstreamKind};
use stratum_ntp::clock::ClockAction;
use stratum_ntp::nts::ke::DEFAULT_KE_PORT;
use stratum_ntp::packet::KissCode;
use stratum_ntp::source::{PollRequest, SourceId};
use stratum_ntp::system::{ConfigError, ResponseOutcome, SourceState, System, SystemState};
use stratum_ntp::time::ClockTime;

use crate::agent::{Fallback, Resolved, system_config, tier_usable, upstream_key};
use crate::resolver::{LookupRequest, Resolution, retry_delay};

/// Unanswered polls after which a member counts as unreachable (the reachability register's
/// width: a burst at start and after a loss is eight packets).
pub const UNREACHABLE_POLLS: u32 = 8;
/// How long a member must stay a falseticker, or selection stay undecided, before a pool
/// replaces it: several polls even at 2^6 s, long past a transient spike.
pub const FALSE_FOR: f64 = 300.0;
/// How long a replaced or denied address is not taken again. For a denied server this is
/// also its retry interval: DENY is its operator's decision and asking again sooner is
/// abuse, but never asking again would need a restart once the ACL is fixed or the name
/// moves to another server.
pub const REJECT_FOR: f64 = 3600.0;

/// Readings of the steered clock (for the core) and of a clock that is never stepped (for
/// the loop's own schedules, so a step does not stall or rush a retry).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Now {
    /// The clock the core steers.
    pub clock: ClockTime,
    /// A monotonic clock.
    pub mono: ClockTime,
}

impl Now {
    /// Reads both from `clock`.
    pub fn read(clock: &dyn stratum_ntp::clock::Clock) -> Self {
        Self {
            clock: clock.now(),
            mono: clock.monotonic(),
        }
    }
}

/// Why a member was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// No reply to [`UNREACHABLE_POLLS`] polls.
    Unreachable,
    /// Outside the majority for [`FALSE_FOR`].
    Falseticker,
    /// Selection found no majority for [`FALSE_FOR`]; this member was the farthest out.
    Outlier,
    /// Kiss-o'-Death DENY or RSTR.
    Denied(KissCode),
}

/// What the driver did that the shell should log or report.
#[derive(Clone, Debug, PartialEq)]
pub enum DriverEvent {
    /// A lookup succeeded.
    Resolved {
        /// `host:port`.
        upstream: String,
        /// Addresses in the answer.
        addresses: usize,
    },
    /// A lookup failed; it is retried with backoff while the name still needs addresses.
    ResolveFailed {
        /// `host:port`.
        upstream: String,
        /// Why.
        error: String,
    },
    /// A member was dropped; `replacement` took its place when there was one.
    Dropped {
        /// `host:port`.
        upstream: String,
        /// The bad address.
        address: SocketAddr,
        /// Why.
        fault: Fault,
        /// The address polled instead.
        replacement: Option<SocketAddr>,
    },
    /// Polling of the real upstreams besides the egress tier started (`true`) or ended.
    Fallback(bool),
}

/// Why a config cannot be applied.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The core rejected the config.
    #[error("the config cannot drive the core: {0}")]
    Core(#[from] ConfigError),
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Lookup {
    /// Nothing to do, or waiting for a reason to look up.
    Idle,
    /// Ask at this monotonic time.
    Due(ClockTime),
    /// Sent to the resolver task.
    Outstanding,
}

/// One configured name and what became of it.
#[derive(Clone, Debug)]
struct Name {
    upstream: UpstreamConfig,
    /// IP literals never go to the resolver.
    literal: bool,
    /// The last answer.
    addresses: Vec<SocketAddr>,
    /// Mobilized addresses, at most [`Name::wanted`].
    members: Vec<SocketAddr>,
    /// Addresses not to take again before a monotonic time.
    rejected: Vec<(SocketAddr, ClockTime)>,
    /// Since when (monotonic) each member has been a falseticker.
    false_since: BTreeMap<SocketAddr, ClockTime>,
    /// A bad member is kept for want of a replacement: a lookup may bring one.
    bad_kept: bool,
    lookup: Lookup,
    /// Lookups in a row that brought nothing usable.
    failures: u32,
}

impl Name {
    fn new(upstream: UpstreamConfig, now: Now) -> Self {
        // An NTS upstream's NTP address comes from its key exchange, even for an IP literal.
        let literal = (!upstream.nts)
            .then(|| upstream.host.parse::<IpAddr>().ok())
            .flatten();
        Self {
            literal: literal.is_some(),
            addresses: literal
                .map(|ip| vec![SocketAddr::new(ip, upstream.port)])
                .unwrap_or_default(),
            upstream,
            members: Vec::new(),
            rejected: Vec::new(),
            false_since: BTreeMap::new(),
            bad_kept: false,
            lookup: if literal.is_some() {
                Lookup::Idle
            } else {
                Lookup::Due(now.mono)
            },
            failures: 0,
        }
    }

    fn wanted(&self) -> usize {
        match self.upstream.kind {
            UpstreamKind::Server => 1,
            UpstreamKind::Pool => usize::from(self.upstream.max_sources),
        }
    }

    fn is_rejected(&self, address: SocketAddr) -> bool {
        self.rejected.iter().any(|(a, _)| *a == address)
    }

    /// An address of the last answer that is neither a member, nor rejected, nor polled
    /// for another name.
    fn spare(&self, taken: &[SocketAddr]) -> Option<SocketAddr> {
        self.addresses
            .iter()
            .copied()
            .find(|a| !self.members.contains(a) && !self.is_rejected(*a) && !taken.contains(a))
    }

    fn needs_lookup(&self) -> bool {
        !self.literal && (self.members.len() < self.wanted() || self.bad_kept)
    }
}

/// The loop's state; see the module docs.
pub struct Driver {
    node: String,
    config: AgentConfig,
    fallback: Fallback,
    /// Keys of the upstreams polled now, in config order.
    active: Vec<String>,
    names: BTreeMap<String, Name>,
    system: System,
    /// Since when (monotonic) selection has found no majority.
    undecided_since: Option<ClockTime>,
    rng: StdRng,
}

impl Driver {
    /// The state for a first config. IP literals are polled at once; names wait for
    /// [`Driver::lookups_due`] and their [`Resolution`]s.
    pub fn new(
        node: &str,
        config: AgentConfig,
        now: Now,
        seed: [u8; 32],
    ) -> Result<Self, DriverError> {
        let fallback = Fallback::new(&config, node);
        let upstreams = config.upstreams_for_node(node, fallback.active());
        let mut names = BTreeMap::new();
        let active = adopt(&mut names, &upstreams, now);
        fill(&mut names, &active, now);
        let system = System::new(core_config(&config, &names, &active), now.clock, seed)?;
        let mut driver_seed = seed;
        // The core's RNG keys anti-spoof cookies; keep the retry jitter's stream apart.
        driver_seed[0] ^= 0x5a;
        Ok(Self {
            node: node.to_string(),
            system,
            config,
            fallback,
            active,
            names,
            undecided_since: None,
            rng: StdRng::from_seed(driver_seed),
        })
    }

    /// The config in force.
    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    /// The core.
    pub fn system(&self) -> &System {
        &self.system
    }

    /// The core, for drift import and clock observation.
    pub fn system_mut(&mut self) -> &mut System {
        &mut self.system
    }

    /// The mobilized addresses of each upstream polled now, keyed by `host:port`.
    pub fn members(&self) -> Resolved {
        self.active
            .iter()
            .filter_map(|k| self.names.get(k).map(|n| (k.clone(), n.members.clone())))
            .collect()
    }

    /// Handler: a new valid config. Nothing changes when the core rejects it.
    pub fn on_config(&mut self, config: AgentConfig, now: Now) -> Result<(), DriverError> {
        let mut fallback = self.fallback.clone();
        fallback.reconfigure(&config, &self.node);
        let upstreams = config.upstreams_for_node(&self.node, fallback.active());
        let mut names = self.names.clone();
        let active = adopt(&mut names, &upstreams, now);
        let previous = (
            std::mem::replace(&mut self.names, names),
            std::mem::replace(&mut self.active, active),
            std::mem::replace(&mut self.config, config),
        );
        self.fill_all(now);
        if let Err(e) = self.system.reconfigure(self.system_config(), now.clock) {
            (self.names, self.active, self.config) = previous;
            return Err(e.into());
        }
        self.fallback = fallback;
        self.schedule_lookups(now);
        Ok(())
    }

    /// Handler: the timer fired.
    pub fn on_timer(&mut self, now: Now) -> Vec<ClockAction> {
        self.system.on_timer(now.clock)
    }

    /// Handler: a reply from `source`, received at `received_at` on the steered clock.
    pub fn on_reply(
        &mut self,
        source: SourceId,
        bytes: &[u8],
        received_at: ClockTime,
        now: Now,
    ) -> ResponseOutcome {
        self.system
            .handle_response(source, bytes, received_at, now.clock)
    }

    /// Handler: a lookup finished.
    pub fn on_resolution(&mut self, resolution: Resolution, now: Now) -> Vec<DriverEvent> {
        let mut events = Vec::new();
        let Some(name) = self.names.get_mut(&resolution.key) else {
            return events;
        };
        name.lookup = Lookup::Idle;
        let succeeded = match resolution.result {
            Ok(addresses) => {
                events.push(DriverEvent::Resolved {
                    upstream: resolution.key.clone(),
                    addresses: addresses.len(),
                });
                name.addresses = addresses;
                true
            }
            Err(e) => {
                events.push(DriverEvent::ResolveFailed {
                    upstream: resolution.key.clone(),
                    error: e.to_string(),
                });
                false
            }
        };
        // Let the answer replace bad members and fill gaps before judging it.
        events.extend(self.refresh(now));
        if let Some(name) = self.names.get_mut(&resolution.key) {
            // A failed NTS key exchange is retried even while the name has its member: that
            // member is polled with nothing but the old session's cookies, if any.
            let rekey_failed = !succeeded && name.upstream.nts;
            if succeeded && !name.needs_lookup() {
                name.failures = 0;
            } else if name.needs_lookup() || rekey_failed {
                name.failures = name.failures.saturating_add(1);
                let delay = retry_delay(name.failures, self.rng.random()).as_secs_f64();
                name.lookup = Lookup::Due(now.mono.add_secs(delay));
            }
        }
        self.schedule_lookups(now);
        events
    }

    /// Handler: an NTS upstream needs a new key exchange (out of cookies, or its server sent
    /// an NTS NAK). Asks at once unless one is running or waiting out its backoff, so a
    /// withheld poll at every interval cannot turn into a key exchange at every interval.
    pub fn rekey(&mut self, key: &str, now: Now) {
        if let Some(name) = self.names.get_mut(key)
            && name.upstream.nts
            && name.lookup == Lookup::Idle
        {
            name.lookup = Lookup::Due(now.mono);
        }
    }

    /// The lookups to start now; each is outstanding until its [`Resolution`] comes back.
    pub fn lookups_due(&mut self, now: Now) -> Vec<LookupRequest> {
        let mut due = Vec::new();
        for key in &self.active {
            let Some(name) = self.names.get_mut(key) else {
                continue;
            };
            if let Lookup::Due(at) = name.lookup
                && at <= now.mono
            {
                name.lookup = Lookup::Outstanding;
                due.push(LookupRequest {
                    key: key.clone(),
                    host: name.upstream.host.clone(),
                    port: name.upstream.port,
                    nts_port: name
                        .upstream
                        .nts
                        .then(|| name.upstream.nts_port.unwrap_or(DEFAULT_KE_PORT)),
                });
            }
        }
        due
    }

    /// The configured upstream whose member `address` is (the first in config order, as a
    /// shared address is polled once).
    pub fn upstream_of(&self, address: SocketAddr) -> Option<&UpstreamConfig> {
        self.active
            .iter()
            .filter_map(|key| self.names.get(key))
            .find(|name| name.members.contains(&address))
            .map(|name| &name.upstream)
    }

    /// The next request to send now; call until `None`.
    pub fn poll_due(&mut self, now: ClockTime) -> Option<PollRequest> {
        self.system.poll_due(now)
    }

    /// Seconds until something is due: a poll, core timer work, a lookup, or the start of
    /// the egress fallback.
    pub fn next_wake(&self, now: Now) -> f64 {
        let core = self.system.next_deadline(now.clock).secs_since(now.clock);
        let fallback = self
            .fallback
            .deadline()
            .map_or(f64::INFINITY, |t| t.secs_since(now.mono));
        self.active
            .iter()
            .filter_map(|k| match self.names.get(k)?.lookup {
                Lookup::Due(at) => Some(at.secs_since(now.mono)),
                _ => None,
            })
            .fold(core.min(fallback), f64::min)
            .max(0.0)
    }

    /// After every handler: judge the members, replace bad ones, follow the egress fallback,
    /// and schedule the lookups that could help.
    pub fn housekeeping(&mut self, now: Now) -> Vec<DriverEvent> {
        let events = self.refresh(now);
        self.schedule_lookups(now);
        events
    }

    /// [`Driver::housekeeping`] without scheduling lookups.
    fn refresh(&mut self, now: Now) -> Vec<DriverEvent> {
        let mut events = Vec::new();
        let state = self.system.state(now.clock);
        let mut changed = self.judge(&state, now, &mut events);
        changed |= self.fill_all(now);
        let tier: Vec<SocketAddr> = self
            .config
            .tier_for_node(&self.node)
            .iter()
            .filter_map(|u| self.names.get(&upstream_key(u)))
            .flat_map(|n| n.members.iter().copied())
            .collect();
        if let Some(active) = self.fallback.observe(tier_usable(&state, &tier), now.mono) {
            let upstreams = self.config.upstreams_for_node(&self.node, active);
            self.active = adopt(&mut self.names, &upstreams, now);
            self.fill_all(now);
            changed = true;
            events.push(DriverEvent::Fallback(active));
        }
        if changed && let Err(e) = self.system.reconfigure(self.system_config(), now.clock) {
            // The same config passed before with other addresses; addresses cannot fail it.
            tracing::error!(error = %e, "updating the polled addresses failed");
        }
        events
    }

    /// Drops bad members (replacing them where a spare exists); whether any changed.
    fn judge(&mut self, state: &SystemState, now: Now, events: &mut Vec<DriverEvent>) -> bool {
        let decided = state.select_error.is_none();
        self.undecided_since = if decided || state.sources.is_empty() {
            None
        } else {
            Some(self.undecided_since.unwrap_or(now.mono))
        };
        let outlier = self
            .undecided_since
            .filter(|since| now.mono.secs_since(*since) >= FALSE_FOR)
            .and_then(|_| farthest_from_median(state));
        let mut taken = self.all_members();
        let mut changed = false;
        for key in self.active.clone() {
            let Some(name) = self.names.get_mut(&key) else {
                continue;
            };
            name.bad_kept = false;
            name.rejected.retain(|(_, until)| *until > now.mono);
            for address in name.members.clone() {
                let Some(source) = state.sources.iter().find(|s| s.address == address) else {
                    continue;
                };
                let is_false = decided && source.state == SourceState::Falseticker;
                if is_false {
                    name.false_since.entry(address).or_insert(now.mono);
                } else {
                    name.false_since.remove(&address);
                }
                let fault = match source.state {
                    SourceState::Demobilized => Some(Fault::Denied(
                        self.system
                            .source(source.id)
                            .and_then(|s| s.demobilized())
                            .unwrap_or(KissCode::Deny),
                    )),
                    SourceState::Unreachable if source.unanswered >= UNREACHABLE_POLLS => {
                        Some(Fault::Unreachable)
                    }
                    _ if name
                        .false_since
                        .get(&address)
                        .is_some_and(|t| now.mono.secs_since(*t) >= FALSE_FOR) =>
                    {
                        Some(Fault::Falseticker)
                    }
                    _ if outlier == Some(address) && name.upstream.kind == UpstreamKind::Pool => {
                        Some(Fault::Outlier)
                    }
                    _ => None,
                };
                let Some(fault) = fault else {
                    continue;
                };
                let others: Vec<SocketAddr> =
                    taken.iter().copied().filter(|a| *a != address).collect();
                let replacement = name.spare(&others);
                // A denied address is dead; any other bad member is better than none until
                // a replacement exists.
                if replacement.is_none() && !matches!(fault, Fault::Denied(_)) {
                    name.bad_kept = true;
                    continue;
                }
                name.members.retain(|a| *a != address);
                name.false_since.remove(&address);
                name.rejected.push((address, now.mono.add_secs(REJECT_FOR)));
                if let Some(spare) = replacement {
                    name.members.push(spare);
                    // Not a spare for the next name in this pass.
                    taken.push(spare);
                }
                if fault == Fault::Outlier {
                    // One at a time: the next judgement sees the new majority.
                    self.undecided_since = None;
                }
                changed = true;
                events.push(DriverEvent::Dropped {
                    upstream: key.clone(),
                    address,
                    fault,
                    replacement,
                });
            }
        }
        changed
    }

    /// Tops every active name up to its wanted number of members; whether any changed.
    fn fill_all(&mut self, now: Now) -> bool {
        fill(&mut self.names, &self.active, now)
    }

    /// A name that needs addresses and is not waiting asks now (the backoff after a lookup
    /// that brought nothing is set by [`Driver::on_resolution`]).
    fn schedule_lookups(&mut self, now: Now) {
        for key in &self.active {
            let Some(name) = self.names.get_mut(key) else {
                continue;
            };
            if name.lookup == Lookup::Idle && name.needs_lookup() {
                name.lookup = Lookup::Due(now.mono);
            }
        }
    }

    fn all_members(&self) -> Vec<SocketAddr> {
        all_members(&self.names, &self.active)
    }

    fn system_config(&self) -> stratum_ntp::system::SystemConfig {
        core_config(&self.config, &self.names, &self.active)
    }
}

/// Tops every active name up to its wanted number of members; whether any changed.
fn fill(names: &mut BTreeMap<String, Name>, active: &[String], now: Now) -> bool {
    let mut changed = false;
    for key in active {
        let taken = all_members(names, active);
        let Some(name) = names.get_mut(key) else {
            continue;
        };
        name.rejected.retain(|(_, until)| *until > now.mono);
        while name.members.len() < name.wanted() {
            let Some(spare) = name.spare(&taken) else {
                break;
            };
            name.members.push(spare);
            changed = true;
        }
    }
    changed
}

fn all_members(names: &BTreeMap<String, Name>, active: &[String]) -> Vec<SocketAddr> {
    active
        .iter()
        .filter_map(|k| names.get(k))
        .flat_map(|n| n.members.iter().copied())
        .collect()
}

/// The core's config: the active upstreams with their members.
fn core_config(
    config: &AgentConfig,
    names: &BTreeMap<String, Name>,
    active: &[String],
) -> stratum_ntp::system::SystemConfig {
    let mut upstreams = Vec::new();
    let mut members = Resolved::new();
    for key in active {
        if let Some(name) = names.get(key) {
            upstreams.push(name.upstream.clone());
            members.insert(key.clone(), name.members.clone());
        }
    }
    system_config(config, &upstreams, &members)
}

/// Makes sure every upstream has a [`Name`] (keeping what known ones learnt) and returns
/// their keys. Names no longer polled lose their members, so their addresses are free.
fn adopt(
    names: &mut BTreeMap<String, Name>,
    upstreams: &[UpstreamConfig],
    now: Now,
) -> Vec<String> {
    let keys: Vec<String> = upstreams.iter().map(upstream_key).collect();
    for (key, name) in names.iter_mut() {
        if !keys.contains(key) {
            name.members.clear();
            name.false_since.clear();
        }
    }
    for (key, upstream) in keys.iter().zip(upstreams) {
        let name = names
            .entry(key.clone())
            .or_insert_with(|| Name::new(upstream.clone(), now));
        // NTS on or off (or another key exchange port) changes where the addresses come from:
        // start over, so no address learned one way is ever polled the other way.
        if (name.upstream.nts, name.upstream.nts_port) != (upstream.nts, upstream.nts_port) {
            *name = Name::new(upstream.clone(), now);
        } else if name.upstream != *upstream {
            name.upstream = upstream.clone();
            let wanted = name.wanted();
            name.members.truncate(wanted);
        }
        if name.lookup == Lookup::Idle && name.needs_lookup() {
            name.lookup = Lookup::Due(now.mono);
        }
    }
    keys
}

/// With no majority the falsetickers cannot be told apart; the source farthest from the
/// median offset is the best guess, and replacing one at a time lets a majority form.
fn farthest_from_median(state: &SystemState) -> Option<SocketAddr> {
    // Only sources that answer now: a silent one's last estimate says nothing about today.
    let mut offsets: Vec<(f64, SocketAddr)> = state
        .sources
        .iter()
        .filter(|s| {
            !matches!(
                s.state,
                SourceState::Unreachable | SourceState::Demobilized | SourceState::Unusable
            )
        })
        .filter_map(|s| s.offset.map(|o| (o, s.address)))
        .collect();
    if offsets.len() < 2 {
        return None;
    }
    offsets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mid = offsets.len() / 2;
    let median = if offsets.len().is_multiple_of(2) {
        (offsets[mid - 1].0 + offsets[mid].0) / 2.0
    } else {
        offsets[mid].0
    };
    offsets
        .iter()
        .max_by(|a, b| (a.0 - median).abs().total_cmp(&(b.0 - median).abs()))
        .map(|(_, address)| *address)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::resolver::ResolveError;

    fn config(hosts: &[&str]) -> AgentConfig {
        let mut config =
            AgentConfig::from_json(include_str!("../tests/data/agent-config.json")).unwrap();
        let template = config.upstreams[0].clone();
        config.upstreams = hosts
            .iter()
            .map(|h| UpstreamConfig {
                host: (*h).into(),
                ..template.clone()
            })
            .collect();
        config
    }

    fn at(secs: f64) -> Now {
        let t = ClockTime::from_unix_secs(1_000_000).add_secs(secs);
        Now { clock: t, mono: t }
    }

    fn fail(key: &str) -> Resolution {
        Resolution {
            key: key.into(),
            result: Err(ResolveError::Empty { host: key.into() }),
        }
    }

    #[test]
    fn a_failing_name_is_asked_again_with_doubling_backoff_and_never_twice_at_once() {
        let mut driver = Driver::new("n", config(&["a.example"]), at(0.0), [1; 32]).unwrap();
        let mut asked = Vec::new();
        let mut t = 0.0;
        while t < 200.0 {
            let due = driver.lookups_due(at(t));
            assert!(due.len() <= 1);
            if let Some(request) = due.into_iter().next() {
                asked.push(t);
                // Outstanding: not asked again before the answer.
                assert!(driver.lookups_due(at(t + 100.0)).is_empty());
                driver.on_resolution(fail(&request.key), at(t));
            }
            t += 0.1;
        }
        let gaps: Vec<f64> = asked.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.len() >= 5, "{asked:?}");
        for (i, gap) in gaps.iter().enumerate() {
            let nominal = 2f64.powi(i32::try_from(i).unwrap() + 1);
            assert!(
                *gap >= nominal * 0.8 - 0.1 && *gap <= nominal * 1.2 + 0.1,
                "{gaps:?}"
            );
        }
    }

    #[test]
    fn a_new_config_keeps_known_members_and_asks_only_for_new_names() {
        let mut driver =
            Driver::new("n", config(&["192.0.2.1", "a.example"]), at(0.0), [1; 32]).unwrap();
        let due = driver.lookups_due(at(0.0));
        assert_eq!(due.len(), 1);
        driver.on_resolution(
            Resolution {
                key: due[0].key.clone(),
                result: Ok(vec!["192.0.2.2:123".parse().unwrap()]),
            },
            at(0.1),
        );
        assert_eq!(driver.system().sources().len(), 2);
        let ids: Vec<SourceId> = driver.system().sources().iter().map(|s| s.id()).collect();
        driver
            .on_config(config(&["192.0.2.1", "a.example", "b.example"]), at(1.0))
            .unwrap();
        let due = driver.lookups_due(at(1.0));
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].host, "b.example");
        let kept: Vec<SourceId> = driver.system().sources().iter().map(|s| s.id()).collect();
        assert_eq!(kept, ids, "known sources keep their state");
    }

    #[test]
    fn turning_nts_on_drops_the_plain_address_and_asks_for_a_key_exchange() {
        let mut driver = Driver::new("n", config(&["192.0.2.1"]), at(0.0), [1; 32]).unwrap();
        let plain = vec!["192.0.2.1:123".parse().unwrap()];
        assert_eq!(driver.members().get("192.0.2.1:123"), Some(&plain));
        assert!(
            driver.lookups_due(at(0.0)).is_empty(),
            "an IP literal needs no lookup"
        );

        let mut nts = config(&["192.0.2.1"]);
        nts.upstreams[0].nts = true;
        driver.on_config(nts.clone(), at(1.0)).unwrap();
        assert_eq!(driver.members().get("192.0.2.1:123"), Some(&vec![]));
        assert!(
            driver.system().sources().is_empty(),
            "nothing is polled in the clear"
        );
        let due = driver.lookups_due(at(1.0));
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].nts_port, Some(DEFAULT_KE_PORT));

        // The key exchange names another address; turning NTS off forgets it again.
        driver.on_resolution(
            Resolution {
                key: due[0].key.clone(),
                result: Ok(vec!["192.0.2.7:4123".parse().unwrap()]),
            },
            at(1.5),
        );
        assert_eq!(
            driver.members().get("192.0.2.1:123"),
            Some(&vec!["192.0.2.7:4123".parse().unwrap()])
        );
        driver.on_config(config(&["192.0.2.1"]), at(2.0)).unwrap();
        assert_eq!(driver.members().get("192.0.2.1:123"), Some(&plain));
    }

    #[test]
    fn a_config_the_core_rejects_changes_nothing() {
        let mut driver = Driver::new("n", config(&["192.0.2.1"]), at(0.0), [1; 32]).unwrap();
        let mut bad = config(&["192.0.2.9", "c.example"]);
        bad.upstreams[0].min_poll = 0;
        assert!(driver.on_config(bad, at(1.0)).is_err());
        assert!(driver.lookups_due(at(1.0)).is_empty());
        assert_eq!(
            driver.members().get("192.0.2.1:123"),
            Some(&vec!["192.0.2.1:123".parse().unwrap()])
        );
        assert_eq!(driver.members().len(), 1);
    }
}
