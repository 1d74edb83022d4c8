//! chronyd's view of the clock, asked the way `chronyc tracking` asks it: one request on its
//! command port (UDP 323 on loopback), which chronyd answers without authentication for the
//! monitoring commands. Sans-IO: [`tracking_request`] builds the datagram and
//! [`parse_tracking_reply`] judges the answer; [`super::daemon_clock`] does the one round trip.
//!
//! The wire format is chrony's command protocol, version 6 (chrony 2.2 and later): a 20-byte
//! request header, a 28-byte reply header, big-endian integers, and chrony's own 32-bit float
//! (a 7-bit signed exponent over a 25-bit signed coefficient). chronyd ignores a request
//! shorter than its reply, so the request is padded to the reply's length (its defence against
//! amplification).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Protocol version 6.
const PROTOCOL_VERSION: u8 = 6;
const PACKET_REQUEST: u8 = 1;
const PACKET_REPLY: u8 = 2;
/// The `tracking` command and its reply format.
const COMMAND_TRACKING: u16 = 33;
const REPLY_TRACKING: u16 = 5;
/// Reply status codes this module names; others are reported by number.
const STATUS_SUCCESS: u16 = 0;
const STATUS_UNAUTHORIZED: u16 = 2;

const REPLY_HEADER_LEN: usize = 28;
/// ref_id, address (16 + family + pad), stratum, leap status, reference time (3 words), and
/// nine floats.
const TRACKING_BODY_LEN: usize = 4 + 20 + 2 + 2 + 12 + 9 * 4;
/// The tracking reply's length; the request (a 20-byte header, no body) is padded to it.
pub const TRACKING_REPLY_LEN: usize = REPLY_HEADER_LEN + TRACKING_BODY_LEN;

/// Leap status "not synchronised".
const LEAP_UNSYNCHRONIZED: u16 = 3;

/// The `tracking` request with `sequence`, which the reply echoes.
pub fn tracking_request(sequence: u32) -> [u8; TRACKING_REPLY_LEN] {
    let mut packet = [0u8; TRACKING_REPLY_LEN];
    packet[0] = PROTOCOL_VERSION;
    packet[1] = PACKET_REQUEST;
    packet[4..6].copy_from_slice(&COMMAND_TRACKING.to_be_bytes());
    // attempt (6..8) stays 0: every poll is a first attempt with a fresh sequence.
    packet[8..12].copy_from_slice(&sequence.to_be_bytes());
    packet
}

/// What chronyd says about the clock it keeps.
#[derive(Clone, Debug, PartialEq)]
pub struct ChronyTracking {
    /// The reference id (an IPv4 address, a hash of an IPv6 one, or a refclock's name).
    pub reference_id: u32,
    /// The selected source's address, when it is one.
    pub reference_address: Option<IpAddr>,
    /// Stratum chronyd serves.
    pub stratum: u16,
    /// Whether chronyd considers itself synchronized (leap status other than "unsynchronised").
    pub synchronized: bool,
    /// The system clock's offset from chronyd's time, seconds; positive when the clock is
    /// ahead. chronyc prints it as "System time": the correction it still has to apply, negated.
    pub system_offset_seconds: f64,
    /// The offset measured at the last clock update, seconds (chronyc's "Last offset").
    pub last_offset_seconds: f64,
    /// The long-term RMS of those offsets, seconds.
    pub rms_offset_seconds: f64,
    /// The frequency correction, ppm (chronyc's "Frequency", positive when the clock runs
    /// slow without it).
    pub frequency_ppm: f64,
    /// Root delay, seconds.
    pub root_delay_seconds: f64,
    /// Root dispersion, seconds.
    pub root_dispersion_seconds: f64,
}

impl ChronyTracking {
    /// Root delay / 2 + root dispersion: chronyd's bound on its clock's error.
    pub fn root_distance_seconds(&self) -> f64 {
        self.root_delay_seconds.abs() / 2.0 + self.root_dispersion_seconds.abs()
    }

    /// The reference as chronyc shows it: the address, or the id as text (a refclock's name)
    /// or in hex.
    pub fn reference(&self) -> String {
        if let Some(a) = self.reference_address {
            return a.to_string();
        }
        let bytes = self.reference_id.to_be_bytes();
        let text: String = bytes
            .iter()
            .take_while(|b| **b != 0)
            .map(|b| *b as char)
            .collect();
        if !text.is_empty() && text.chars().all(|c| c.is_ascii_graphic()) {
            text
        } else {
            format!("{:08X}", self.reference_id)
        }
    }
}

/// Why a reply was not a usable tracking report.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChronyError {
    /// Shorter than a tracking reply.
    #[error("a {0}-byte reply is shorter than chrony's {TRACKING_REPLY_LEN}-byte tracking reply")]
    Short(usize),
    /// Not protocol version 6.
    #[error("chronyd speaks command protocol version {0}, not 6 (chrony older than 2.2?)")]
    Version(u8),
    /// Not a reply to our request: another packet type, command or sequence.
    #[error(
        "not the reply to this request (type {packet_type}, command {command}, sequence {sequence})"
    )]
    NotOurs {
        /// Packet type.
        packet_type: u8,
        /// Command echoed.
        command: u16,
        /// Sequence echoed.
        sequence: u32,
    },
    /// chronyd refused: its `cmdallow` does not include us.
    #[error("chronyd refused the request: not allowed by its cmdallow")]
    Unauthorized,
    /// chronyd answered with another status.
    #[error("chronyd answered with status {0}")]
    Status(u16),
    /// A status of success with a reply format other than tracking.
    #[error("chronyd answered with reply format {0}, not tracking")]
    Format(u16),
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// chrony's 32-bit float: the top 7 bits a signed exponent, the low 25 bits a signed
/// coefficient, the value coefficient × 2^(exponent − 25).
pub fn decode_float(word: u32) -> f64 {
    const COEF_BITS: u32 = 25;
    let exponent = (word >> COEF_BITS) as i32;
    let exponent = if exponent >= 1 << 6 {
        exponent - (1 << 7)
    } else {
        exponent
    };
    let coefficient = (word & ((1 << COEF_BITS) - 1)) as i32;
    let coefficient = if coefficient >= 1 << (COEF_BITS - 1) {
        coefficient - (1 << COEF_BITS)
    } else {
        coefficient
    };
    f64::from(coefficient) * 2f64.powi(exponent - COEF_BITS as i32)
}

/// Reads chronyd's answer to [`tracking_request`]`(sequence)`.
pub fn parse_tracking_reply(reply: &[u8], sequence: u32) -> Result<ChronyTracking, ChronyError> {
    // The header first: a short error reply still says why.
    if reply.len() < REPLY_HEADER_LEN {
        return Err(ChronyError::Short(reply.len()));
    }
    if reply[0] != PROTOCOL_VERSION {
        return Err(ChronyError::Version(reply[0]));
    }
    let (packet_type, command, echoed) = (reply[1], u16_at(reply, 4), u32_at(reply, 16));
    if packet_type != PACKET_REPLY || command != COMMAND_TRACKING || echoed != sequence {
        return Err(ChronyError::NotOurs {
            packet_type,
            command,
            sequence: echoed,
        });
    }
    match u16_at(reply, 8) {
        STATUS_SUCCESS => {}
        STATUS_UNAUTHORIZED => return Err(ChronyError::Unauthorized),
        status => return Err(ChronyError::Status(status)),
    }
    let format = u16_at(reply, 6);
    if format != REPLY_TRACKING {
        return Err(ChronyError::Format(format));
    }
    if reply.len() < TRACKING_REPLY_LEN {
        return Err(ChronyError::Short(reply.len()));
    }
    let body = &reply[REPLY_HEADER_LEN..TRACKING_REPLY_LEN];
    let address = &body[4..20];
    let reference_address = match u16_at(body, 20) {
        1 => Some(IpAddr::V4(Ipv4Addr::new(
            address[0], address[1], address[2], address[3],
        ))),
        2 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(address);
            Some(IpAddr::V6(Ipv6Addr::from(octets)))
        }
        _ => None,
    };
    // After the reference time (body 28..40) come the nine floats.
    let float = |i: usize| decode_float(u32_at(body, 40 + 4 * i));
    Ok(ChronyTracking {
        reference_id: u32_at(body, 0),
        reference_address,
        stratum: u16_at(body, 24),
        synchronized: u16_at(body, 26) != LEAP_UNSYNCHRONIZED,
        system_offset_seconds: -float(0),
        last_offset_seconds: float(1),
        rms_offset_seconds: float(2),
        frequency_ppm: float(3),
        root_delay_seconds: float(6),
        root_dispersion_seconds: float(7),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// chrony's float for `x`, built independently of [`decode_float`] (from the definition:
    /// the largest exponent that keeps the coefficient in 25 signed bits).
    fn encode_float(x: f64) -> u32 {
        if x == 0.0 {
            return 0;
        }
        let mut exponent = x.abs().log2().floor() as i32 + 1; // |x| < 2^exponent
        exponent = exponent.clamp(-64, 63);
        let coefficient = (x * 2f64.powi(24 - exponent)).round() as i32;
        let stored_exponent = exponent + 1; // value = coef × 2^(stored − 25)
        ((stored_exponent as u32 & 0x7f) << 25) | (coefficient as u32 & 0x1ff_ffff)
    }

    /// A tracking reply as chronyd 4.x sends it (layout from chrony's candm.h).
    fn reply(sequence: u32, status: u16, family: u16, leap: u16, floats: [f64; 9]) -> Vec<u8> {
        let mut r = vec![0u8; TRACKING_REPLY_LEN];
        r[0] = 6;
        r[1] = 2;
        r[4..6].copy_from_slice(&33u16.to_be_bytes());
        r[6..8].copy_from_slice(&5u16.to_be_bytes());
        r[8..10].copy_from_slice(&status.to_be_bytes());
        r[16..20].copy_from_slice(&sequence.to_be_bytes());
        let b = &mut r[28..];
        b[0..4].copy_from_slice(&0xC000_0201u32.to_be_bytes());
        b[4..8].copy_from_slice(&[192, 0, 2, 1]);
        b[20..22].copy_from_slice(&family.to_be_bytes());
        b[24..26].copy_from_slice(&3u16.to_be_bytes());
        b[26..28].copy_from_slice(&leap.to_be_bytes());
        for (i, x) in floats.iter().enumerate() {
            b[40 + 4 * i..44 + 4 * i].copy_from_slice(&encode_float(*x).to_be_bytes());
        }
        r
    }

    #[test]
    fn the_request_is_version_6_tracking_padded_to_the_replys_length() {
        let r = tracking_request(0xDEAD_BEEF);
        assert_eq!(
            r.len(),
            104,
            "chronyd drops requests shorter than the reply"
        );
        assert_eq!(&r[..12], &[6, 1, 0, 0, 0, 33, 0, 0, 0xDE, 0xAD, 0xBE, 0xEF]);
        assert!(r[12..].iter().all(|b| *b == 0));
    }

    #[test]
    fn chronys_floats_decode_with_their_sign_and_exponent() {
        // Hand-made words: coefficient 2^23 with stored exponent 2 is 2^23 × 2^(2−25) = 1.
        assert_eq!(decode_float((2 << 25) | (1 << 23)), 1.0);
        // A negative coefficient (two's complement in 25 bits).
        assert_eq!(
            decode_float((2 << 25) | (0x1ff_ffff & (-(1i32 << 23)) as u32)),
            -1.0
        );
        // The coefficient's top bit is its sign: 2^24 alone is −2^24.
        assert_eq!(decode_float((2 << 25) | (1 << 24)), -2.0);
        // A negative exponent: stored −10 (0x76 in 7 bits), coefficient 3: 3 × 2^−35.
        assert_eq!(decode_float((0x76 << 25) | 3), 3.0 * 2f64.powi(-35));
        assert_eq!(decode_float(0), 0.0);
        // Round trips through the independent encoder keep 24 significant bits.
        for x in [12.5e-6, -3.25e-3, 0.0421, -17.0, 1e-9] {
            let back = decode_float(encode_float(x));
            assert!(
                (back - x).abs() <= x.abs() * 2f64.powi(-23),
                "{x} -> {back}"
            );
        }
    }

    #[test]
    fn a_tracking_reply_gives_the_clocks_offset_with_chronycs_sign() {
        // current_correction +12 µs: chronyc says "12 µs slow", so the clock is 12 µs behind.
        let floats = [12e-6, -3e-6, 5e-6, -7.5, 0.01, 0.05, 0.004, 0.0006, 64.0];
        let t = parse_tracking_reply(&reply(7, 0, 1, 0, floats), 7).unwrap();
        assert!((t.system_offset_seconds + 12e-6).abs() < 1e-12, "{t:?}");
        assert!((t.last_offset_seconds + 3e-6).abs() < 1e-12);
        assert!((t.frequency_ppm + 7.5).abs() < 1e-6);
        assert!((t.root_distance_seconds() - (0.002 + 0.0006)).abs() < 1e-9);
        assert_eq!(t.stratum, 3);
        assert!(t.synchronized);
        assert_eq!(t.reference(), "192.0.2.1");
        // Leap status 3 is chronyd unsynchronized; family 0 (a refclock) shows the id as text.
        let mut r = reply(7, 0, 0, 3, floats);
        r[28..32].copy_from_slice(b"GPS\0");
        let t = parse_tracking_reply(&r, 7).unwrap();
        assert!(!t.synchronized);
        assert_eq!(t.reference(), "GPS");
    }

    #[test]
    fn replies_that_are_not_ours_or_not_success_are_typed_errors() {
        let ok = reply(7, 0, 1, 0, [0.0; 9]);
        assert!(matches!(
            parse_tracking_reply(&ok, 8),
            Err(ChronyError::NotOurs { sequence: 7, .. })
        ));
        assert_eq!(
            parse_tracking_reply(&ok[..40], 7),
            Err(ChronyError::Short(40))
        );
        assert_eq!(parse_tracking_reply(&[], 7), Err(ChronyError::Short(0)));
        let mut old = ok.clone();
        old[0] = 5;
        assert_eq!(parse_tracking_reply(&old, 7), Err(ChronyError::Version(5)));
        // A request echoed back (a reflector, or our own packet) is not a reply.
        let mut echo = tracking_request(7).to_vec();
        echo[16..20].copy_from_slice(&7u32.to_be_bytes());
        assert!(matches!(
            parse_tracking_reply(&echo, 7),
            Err(ChronyError::NotOurs { packet_type: 1, .. })
        ));
        // An error reply is short (header only) and still says why: 2 is "unauthorised".
        let refused = &reply(7, 2, 1, 0, [0.0; 9])[..REPLY_HEADER_LEN];
        assert_eq!(
            parse_tracking_reply(refused, 7),
            Err(ChronyError::Unauthorized)
        );
        assert_eq!(
            parse_tracking_reply(&reply(7, 3, 1, 0, [0.0; 9]), 7),
            Err(ChronyError::Status(3))
        );
        let mut other = ok;
        other[6..8].copy_from_slice(&6u16.to_be_bytes());
        assert_eq!(parse_tracking_reply(&other, 7), Err(ChronyError::Format(6)));
    }
}
