//! `stratum-ntp`: the sans-IO NTP core of the Stratum agent.
//!
//! No sockets, no async runtime, no Kubernetes: time enters as arguments ([`time::ClockTime`])
//! and actions leave as values ([`clock::ClockAction`], [`source::PollRequest`],
//! [`server::Decision`]), so every behaviour is tested deterministically on simulated time.
//!
//! Modules:
//! - [`time`]: local instants and the NTP wire time formats (era-aware timestamps).
//! - [`packet`]: the NTP codec (header, extension fields, MAC trailer, kiss codes).
//! - [`source`]: one upstream association (polling, iburst, reachability, validation, KoD).
//! - [`filter`]: per-source clock filter and frequency regression.
//! - [`select`]: intersection, clustering, combining, system peer, leap vote.
//! - [`discipline`]: the clock loop (step window, slews, panic thresholds, drift, meddling).
//! - [`leap`]: scheduling leap seconds for the kernel, or smearing them.
//! - [`system`]: the client facade the agent drives, and its status snapshot.
//! - [`nts`]: Network Time Security: NTS-KE records, the AEAD, cookies, NTS extension fields.
//! - [`server`]: access policy, rate limiting and reply building for the NTP server.
//! - [`clock`]: the clock trait, the actions, and a simulated clock.
//! - [`sim`]: a deterministic network simulator and the must-show scenarios.
#![forbid(unsafe_code)]

pub mod clock;
pub mod discipline;
pub mod filter;
pub mod leap;
pub mod nts;
pub mod packet;
pub mod refid;
pub mod select;
pub mod server;
pub mod sim;
pub mod source;
pub mod symmetric;
pub mod system;
pub mod time;

pub use clock::{Clock, ClockAction, SimulatedClock, apply_action};
pub use discipline::{DisciplineConfig, DriftState};
pub use leap::LeapMode;
pub use packet::{Packet, PacketView, ParseError};
pub use server::{Decision, ServerClockState, ServerPolicy};
pub use source::{SourceConfig, SourceId};
pub use system::{System, SystemConfig, SystemState};
pub use time::{ClockTime, NtpTimestamp};
