//! NTP packet codec: the 48-byte header, RFC 7822 extension fields and the MAC trailer.
//!
//! Parsing borrows from the input (no allocation), never panics and returns a typed
//! [`ParseError`] for malformed input. Every header field is kept verbatim, so
//! `parse` followed by `encode_into` reproduces the input bytes exactly.

use crate::time::{NtpShort, NtpTimestamp};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Size of the fixed NTP header.
pub const HEADER_LEN: usize = 48;
/// Largest trailer that RFC 7822 treats as a MAC (4-byte key id + up to 20-byte digest).
pub const MAX_MAC_LEN: usize = 24;
/// Smallest legal extension field (type, length, 12 bytes of value).
pub const MIN_EXTENSION_LEN: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ParseError {
    #[error("packet shorter than the 48-byte NTP header ({0} bytes)")]
    TooShort(usize),
    #[error("unsupported NTP version {0}")]
    UnsupportedVersion(u8),
    #[error("extension field at byte {offset} has invalid length {length}")]
    BadExtensionLength { offset: usize, length: usize },
    #[error("trailing {0} bytes are neither an extension field nor a MAC")]
    BadTrailer(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("output buffer of {available} bytes cannot hold {needed} bytes")]
pub struct EncodeError {
    pub needed: usize,
    pub available: usize,
}

/// Leap indicator (header bits 0-1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum LeapIndicator {
    #[default]
    NoWarning,
    /// Last minute of the day has 61 seconds.
    Insert,
    /// Last minute of the day has 59 seconds.
    Delete,
    /// Clock unsynchronized.
    Unknown,
}

impl LeapIndicator {
    pub const fn from_bits(bits: u8) -> Self {
        match bits & 0b11 {
            0 => Self::NoWarning,
            1 => Self::Insert,
            2 => Self::Delete,
            _ => Self::Unknown,
        }
    }

    pub const fn to_bits(self) -> u8 {
        match self {
            Self::NoWarning => 0,
            Self::Insert => 1,
            Self::Delete => 2,
            Self::Unknown => 3,
        }
    }
}

/// Association mode (header bits 5-7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    Reserved,
    SymmetricActive,
    SymmetricPassive,
    Client,
    Server,
    Broadcast,
    Control,
    Private,
}

impl Mode {
    pub const fn from_bits(bits: u8) -> Self {
        match bits & 0b111 {
            0 => Self::Reserved,
            1 => Self::SymmetricActive,
            2 => Self::SymmetricPassive,
            3 => Self::Client,
            4 => Self::Server,
            5 => Self::Broadcast,
            6 => Self::Control,
            _ => Self::Private,
        }
    }

    pub const fn to_bits(self) -> u8 {
        match self {
            Self::Reserved => 0,
            Self::SymmetricActive => 1,
            Self::SymmetricPassive => 2,
            Self::Client => 3,
            Self::Server => 4,
            Self::Broadcast => 5,
            Self::Control => 6,
            Self::Private => 7,
        }
    }
}

/// The 32-bit reference identifier: an IPv4 address, an ASCII source name or a kiss code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct ReferenceId(pub [u8; 4]);

impl ReferenceId {
    pub const fn from_u32(value: u32) -> Self {
        Self(value.to_be_bytes())
    }

    pub const fn to_u32(self) -> u32 {
        u32::from_be_bytes(self.0)
    }

    /// Printable form: ASCII when all bytes are printable (trailing NULs trimmed), else dotted.
    pub fn display(self) -> String {
        let trimmed: Vec<u8> = self.0.iter().copied().take_while(|b| *b != 0).collect();
        if !trimmed.is_empty() && trimmed.iter().all(|b| b.is_ascii_graphic()) {
            String::from_utf8_lossy(&trimmed).into_owned()
        } else {
            let [a, b, c, d] = self.0;
            format!("{a}.{b}.{c}.{d}")
        }
    }
}

/// Kiss-o'-Death codes a client acts on (RFC 5905 §7.4); others are carried verbatim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KissCode {
    /// Rate exceeded: increase the poll interval.
    Rate,
    /// Access denied: stop talking to this server.
    Deny,
    /// Access restricted: stop talking to this server.
    Rstr,
    /// NTS NAK: the cookie was not accepted.
    Ntsn,
    Other([u8; 4]),
}

impl KissCode {
    pub const fn from_reference_id(id: ReferenceId) -> Self {
        match &id.0 {
            b"RATE" => Self::Rate,
            b"DENY" => Self::Deny,
            b"RSTR" => Self::Rstr,
            b"NTSN" => Self::Ntsn,
            _ => Self::Other(id.0),
        }
    }

    pub const fn to_reference_id(self) -> ReferenceId {
        ReferenceId(match self {
            Self::Rate => *b"RATE",
            Self::Deny => *b"DENY",
            Self::Rstr => *b"RSTR",
            Self::Ntsn => *b"NTSN",
            Self::Other(bytes) => bytes,
        })
    }
}

/// The fixed 48-byte NTP header with every field kept as sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet {
    pub leap: LeapIndicator,
    pub version: u8,
    pub mode: Mode,
    pub stratum: u8,
    /// log2 seconds, as sent (may be out of range; interpret with care).
    pub poll: i8,
    /// log2 seconds.
    pub precision: i8,
    pub root_delay: NtpShort,
    pub root_dispersion: NtpShort,
    pub reference_id: ReferenceId,
    pub reference_timestamp: NtpTimestamp,
    pub origin_timestamp: NtpTimestamp,
    pub receive_timestamp: NtpTimestamp,
    pub transmit_timestamp: NtpTimestamp,
}

/// A parsed packet borrowing its variable-length parts from the input buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketView<'a> {
    pub header: Packet,
    /// The validated extension-field region (possibly empty); iterate with
    /// [`PacketView::extension_fields`].
    pub extension_bytes: &'a [u8],
    /// The MAC trailer (key id + digest), if present.
    pub mac: Option<&'a [u8]>,
}

/// One RFC 7822 extension field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtensionField<'a> {
    pub field_type: u16,
    /// The value bytes including any padding (length − 4 bytes).
    pub value: &'a [u8],
}

/// Iterator over a validated extension-field region.
#[derive(Debug, Clone)]
pub struct ExtensionFields<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for ExtensionFields<'a> {
    type Item = ExtensionField<'a>;

    fn next(&mut self) -> Option<Self::Item> {
        let (field_type, length) = read_extension_header(self.rest)?;
        let field = self.rest.get(4..length)?;
        self.rest = self.rest.get(length..).unwrap_or_default();
        Some(ExtensionField {
            field_type,
            value: field,
        })
    }
}

fn read_extension_header(bytes: &[u8]) -> Option<(u16, usize)> {
    let field_type = u16::from_be_bytes([*bytes.first()?, *bytes.get(1)?]);
    let length = usize::from(u16::from_be_bytes([*bytes.get(2)?, *bytes.get(3)?]));
    Some((field_type, length))
}

fn read_u32(bytes: &[u8; HEADER_LEN], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn read_u64(bytes: &[u8; HEADER_LEN], at: usize) -> u64 {
    (u64::from(read_u32(bytes, at)) << 32) | u64::from(read_u32(bytes, at + 4))
}

impl Packet {
    /// The header of a client request (mode 3, version 4) as Stratum's sources send it: only
    /// the poll and the transmit timestamp the reply must echo are set.
    pub fn client_request(poll: i8, transmit: NtpTimestamp) -> Self {
        Self {
            leap: LeapIndicator::NoWarning,
            version: 4,
            mode: Mode::Client,
            stratum: 0,
            poll,
            precision: 0,
            root_delay: NtpShort::ZERO,
            root_dispersion: NtpShort::ZERO,
            reference_id: ReferenceId::default(),
            reference_timestamp: NtpTimestamp::ZERO,
            origin_timestamp: NtpTimestamp::ZERO,
            receive_timestamp: NtpTimestamp::ZERO,
            transmit_timestamp: transmit,
        }
    }

    /// Parses a datagram. Versions 1–4 are accepted; extension fields only in version 4.
    pub fn parse(bytes: &[u8]) -> Result<PacketView<'_>, ParseError> {
        let (head, trailer) = bytes
            .split_first_chunk::<HEADER_LEN>()
            .ok_or(ParseError::TooShort(bytes.len()))?;
        let header = Self::from_header_bytes(head);
        if !(1..=4).contains(&header.version) {
            return Err(ParseError::UnsupportedVersion(header.version));
        }
        let (extension_bytes, mac) = split_trailer(trailer, header.version)?;
        Ok(PacketView {
            header,
            extension_bytes,
            mac,
        })
    }

    fn from_header_bytes(bytes: &[u8; HEADER_LEN]) -> Self {
        let first = bytes[0];
        Self {
            leap: LeapIndicator::from_bits(first >> 6),
            version: (first >> 3) & 0b111,
            mode: Mode::from_bits(first),
            stratum: bytes[1],
            poll: bytes[2] as i8,
            precision: bytes[3] as i8,
            root_delay: NtpShort::from_bits(read_u32(bytes, 4)),
            root_dispersion: NtpShort::from_bits(read_u32(bytes, 8)),
            reference_id: ReferenceId::from_u32(read_u32(bytes, 12)),
            reference_timestamp: NtpTimestamp::from_bits(read_u64(bytes, 16)),
            origin_timestamp: NtpTimestamp::from_bits(read_u64(bytes, 24)),
            receive_timestamp: NtpTimestamp::from_bits(read_u64(bytes, 32)),
            transmit_timestamp: NtpTimestamp::from_bits(read_u64(bytes, 40)),
        }
    }

    /// The header as wire bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0] = (self.leap.to_bits() << 6) | ((self.version & 0b111) << 3) | self.mode.to_bits();
        out[1] = self.stratum;
        out[2] = self.poll as u8;
        out[3] = self.precision as u8;
        out[4..8].copy_from_slice(&self.root_delay.to_bits().to_be_bytes());
        out[8..12].copy_from_slice(&self.root_dispersion.to_bits().to_be_bytes());
        out[12..16].copy_from_slice(&self.reference_id.0);
        out[16..24].copy_from_slice(&self.reference_timestamp.to_bits().to_be_bytes());
        out[24..32].copy_from_slice(&self.origin_timestamp.to_bits().to_be_bytes());
        out[32..40].copy_from_slice(&self.receive_timestamp.to_bits().to_be_bytes());
        out[40..48].copy_from_slice(&self.transmit_timestamp.to_bits().to_be_bytes());
        out
    }

    /// Writes the 48-byte header into `out`, returning the number of bytes written.
    pub fn encode_into(&self, out: &mut [u8]) -> Result<usize, EncodeError> {
        let available = out.len();
        let slot = out.get_mut(..HEADER_LEN).ok_or(EncodeError {
            needed: HEADER_LEN,
            available,
        })?;
        slot.copy_from_slice(&self.to_bytes());
        Ok(HEADER_LEN)
    }

    /// The kiss code when this is a Kiss-o'-Death packet (stratum 0).
    pub fn kiss_code(&self) -> Option<KissCode> {
        (self.stratum == 0).then(|| KissCode::from_reference_id(self.reference_id))
    }

    /// Root distance the server claims for itself: root delay / 2 + root dispersion.
    pub fn root_distance(&self) -> f64 {
        self.root_delay.to_secs_f64() / 2.0 + self.root_dispersion.to_secs_f64()
    }
}

/// Splits what follows the header into (extension fields, MAC) per RFC 7822: in version 4,
/// a remainder of at most 24 bytes is a MAC, anything longer starts with an extension field.
fn split_trailer(trailer: &[u8], version: u8) -> Result<(&[u8], Option<&[u8]>), ParseError> {
    let mut offset = 0;
    loop {
        let rest = trailer.get(offset..).unwrap_or_default();
        if rest.is_empty() {
            return Ok((trailer, None));
        }
        if rest.len() <= MAX_MAC_LEN || version < 4 {
            if rest.len() < 4 || rest.len() > MAX_MAC_LEN || rest.len() % 4 != 0 {
                return Err(ParseError::BadTrailer(rest.len()));
            }
            let (extensions, mac) = trailer.split_at(offset);
            return Ok((extensions, Some(mac)));
        }
        let (_, length) = read_extension_header(rest).ok_or(ParseError::BadTrailer(rest.len()))?;
        if length < MIN_EXTENSION_LEN || length % 4 != 0 || length > rest.len() {
            return Err(ParseError::BadExtensionLength {
                offset: HEADER_LEN + offset,
                length,
            });
        }
        offset += length;
    }
}

impl<'a> PacketView<'a> {
    pub fn extension_fields(&self) -> ExtensionFields<'a> {
        ExtensionFields {
            rest: self.extension_bytes,
        }
    }

    /// Encoded length: header + extension fields + MAC.
    pub fn wire_len(&self) -> usize {
        HEADER_LEN + self.extension_bytes.len() + self.mac.map_or(0, <[u8]>::len)
    }

    /// Re-encodes the whole packet; the output equals the parsed input byte for byte.
    pub fn encode_into(&self, out: &mut [u8]) -> Result<usize, EncodeError> {
        let needed = self.wire_len();
        let available = out.len();
        let slot = out
            .get_mut(..needed)
            .ok_or(EncodeError { needed, available })?;
        let (head, rest) = slot.split_at_mut(HEADER_LEN);
        head.copy_from_slice(&self.header.to_bytes());
        let (extensions, mac) = rest.split_at_mut(self.extension_bytes.len());
        extensions.copy_from_slice(self.extension_bytes);
        if let Some(mac_bytes) = self.mac {
            mac.copy_from_slice(mac_bytes);
        }
        Ok(needed)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn client_request() -> [u8; 48] {
        let mut bytes = [0u8; 48];
        bytes[0] = 0b00_100_011; // LI 0, v4, mode 3
        bytes[40..48].copy_from_slice(&0x1122_3344_5566_7788u64.to_be_bytes());
        bytes
    }

    #[test]
    fn header_fields_decode_from_their_wire_positions() {
        let bytes = client_request();
        let view = Packet::parse(&bytes).unwrap();
        assert_eq!(view.header.version, 4);
        assert_eq!(view.header.mode, Mode::Client);
        assert_eq!(
            view.header.transmit_timestamp.to_bits(),
            0x1122_3344_5566_7788
        );
        assert!(view.mac.is_none());
        assert_eq!(view.extension_fields().count(), 0);
    }

    #[test]
    fn short_and_wrong_version_packets_are_typed_errors() {
        assert_eq!(Packet::parse(&[0u8; 47]), Err(ParseError::TooShort(47)));
        let mut bytes = client_request();
        bytes[0] = 0b00_101_011;
        assert_eq!(
            Packet::parse(&bytes),
            Err(ParseError::UnsupportedVersion(5))
        );
    }

    #[test]
    fn twenty_byte_trailer_is_a_mac_and_longer_is_an_extension_field() {
        let mut bytes = client_request().to_vec();
        bytes.extend_from_slice(&[0xAA; 20]);
        let view = Packet::parse(&bytes).unwrap();
        assert_eq!(view.mac.map(<[u8]>::len), Some(20));

        let mut bytes = client_request().to_vec();
        bytes.extend_from_slice(&[0x01, 0x04, 0x00, 0x24]);
        bytes.extend_from_slice(&[7u8; 32]);
        bytes.extend_from_slice(&[0xBB; 24]);
        let view = Packet::parse(&bytes).unwrap();
        let fields: Vec<_> = view.extension_fields().collect();
        assert_eq!(fields.len(), 1);
        assert_eq!(fields[0].field_type, 0x0104);
        assert_eq!(fields[0].value.len(), 32);
        assert_eq!(view.mac.map(<[u8]>::len), Some(24));
    }

    #[test]
    fn extension_field_lengths_must_be_at_least_16_and_word_aligned() {
        let mut bytes = client_request().to_vec();
        bytes.extend_from_slice(&[0x01, 0x04, 0x00, 0x1E]);
        bytes.extend_from_slice(&[0u8; 28]);
        assert!(matches!(
            Packet::parse(&bytes),
            Err(ParseError::BadExtensionLength { length: 30, .. })
        ));
    }

    #[test]
    fn version_three_trailers_are_only_macs() {
        let mut bytes = client_request().to_vec();
        bytes[0] = 0b00_011_011;
        bytes.extend_from_slice(&[0u8; 32]);
        assert_eq!(Packet::parse(&bytes), Err(ParseError::BadTrailer(32)));
    }

    #[test]
    fn stratum_zero_carries_a_kiss_code() {
        let mut bytes = client_request();
        bytes[0] = 0b11_100_100;
        bytes[12..16].copy_from_slice(b"RATE");
        let view = Packet::parse(&bytes).unwrap();
        assert_eq!(view.header.kiss_code(), Some(KissCode::Rate));
        assert_eq!(
            KissCode::from_reference_id(ReferenceId(*b"XYZW")),
            KissCode::Other(*b"XYZW")
        );
    }

    proptest! {
        #[test]
        fn any_accepted_datagram_re_encodes_byte_for_byte(
            bytes in proptest::collection::vec(any::<u8>(), 0..200)
        ) {
            if let Ok(view) = Packet::parse(&bytes) {
                let mut out = [0u8; 256];
                let written = view.encode_into(&mut out).unwrap();
                prop_assert_eq!(&out[..written], &bytes[..]);
            }
        }

        #[test]
        fn any_header_round_trips(
            raw in proptest::array::uniform32(any::<u8>()),
            tail in proptest::array::uniform16(any::<u8>()),
            version in 1u8..=4,
        ) {
            let mut bytes = [0u8; 48];
            bytes[..32].copy_from_slice(&raw);
            bytes[32..].copy_from_slice(&tail);
            bytes[0] = (bytes[0] & 0b1100_0111) | (version << 3);
            let view = Packet::parse(&bytes).unwrap();
            prop_assert_eq!(view.header.to_bytes(), bytes);
        }
    }
}
