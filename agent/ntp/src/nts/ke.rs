//! NTS Key Establishment (RFC 8915 §4): the record codec and both sides of the negotiation.
//!
//! A message is a sequence of records ending with End of Message. Each record is a critical
//! bit, a 15-bit type, a 16-bit body length and the body. Decoding is strict (a known record
//! with a malformed body is an error, never guessed at) and bounded: a peer cannot make us
//! hold more than [`MAX_MESSAGE_LEN`] bytes or accept a cookie longer than
//! [`MAX_COOKIE_LEN`]. Decoding what we encoded gives the same records back, which the fuzz
//! target checks on arbitrary input.

use super::aead::AEAD_AES_SIV_CMAC_256;
use thiserror::Error;

/// TLS ALPN protocol id of NTS-KE.
pub const ALPN: &[u8] = b"ntske/1";
/// TLS exporter label for the C2S and S2C keys.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-network-time-security";
/// The registered NTS-KE port.
pub const DEFAULT_KE_PORT: u16 = 4460;
/// Next Protocol id of NTPv4, the only protocol NTS-KE negotiates today.
pub const NEXT_PROTOCOL_NTPV4: u16 = 0;
/// Largest message either side accepts; real ones are under 1.5 KiB.
pub const MAX_MESSAGE_LEN: usize = 16 * 1024;
/// Largest cookie a client keeps; servers' cookies are ~100 bytes.
pub const MAX_COOKIE_LEN: usize = 256;
/// Cookies a server hands out per key exchange, and a client keeps at most.
pub const COOKIES_PER_EXCHANGE: usize = 8;

const CRITICAL_BIT: u16 = 0x8000;

/// Record types (RFC 8915 §7.6).
mod record_type {
    pub const END_OF_MESSAGE: u16 = 0;
    pub const NEXT_PROTOCOL: u16 = 1;
    pub const ERROR: u16 = 2;
    pub const WARNING: u16 = 3;
    pub const AEAD_ALGORITHM: u16 = 4;
    pub const NEW_COOKIE: u16 = 5;
    pub const NTPV4_SERVER: u16 = 6;
    pub const NTPV4_PORT: u16 = 7;
}

/// Error codes a server sends (RFC 8915 §4.1.3).
pub mod error_code {
    pub const UNRECOGNIZED_CRITICAL_RECORD: u16 = 0;
    pub const BAD_REQUEST: u16 = 1;
    pub const INTERNAL_SERVER_ERROR: u16 = 2;
}

/// One NTS-KE record. Known types carry their decoded body; anything else is kept verbatim so
/// a message round-trips and the negotiation can refuse unknown critical records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    EndOfMessage,
    NextProtocol(Vec<u16>),
    Error(u16),
    Warning(u16),
    AeadAlgorithm(Vec<u16>),
    NewCookie(Vec<u8>),
    /// NTPv4 Server Negotiation: the host name or address to send NTP to.
    Server(String),
    /// NTPv4 Port Negotiation: the UDP port to send NTP to.
    Port(u16),
    Unknown {
        critical: bool,
        record_type: u16,
        body: Vec<u8>,
    },
}

/// Why a message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RecordError {
    #[error("NTS-KE message longer than {MAX_MESSAGE_LEN} bytes without an End of Message record")]
    TooLong,
    #[error("NTS-KE record type {record_type} has a malformed {length}-byte body")]
    BadBody { record_type: u16, length: usize },
    #[error("NTS-KE server name is not printable ASCII")]
    BadServerName,
}

impl Record {
    /// The critical bit we send. RFC 8915 requires it on End of Message, Next Protocol, Error
    /// and Warning and forbids it on New Cookie; on AEAD, Server and Port it is set so that a
    /// client which does not understand where to send NTP stops instead of guessing.
    fn critical(&self) -> bool {
        match self {
            Self::NewCookie(_) => false,
            Self::Unknown { critical, .. } => *critical,
            _ => true,
        }
    }

    /// Appends the record's wire form to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let u16s = |values: &[u16]| values.iter().flat_map(|v| v.to_be_bytes()).collect();
        let (record_type, body): (u16, Vec<u8>) = match self {
            Self::EndOfMessage => (record_type::END_OF_MESSAGE, Vec::new()),
            Self::NextProtocol(ids) => (record_type::NEXT_PROTOCOL, u16s(ids)),
            Self::Error(code) => (record_type::ERROR, code.to_be_bytes().to_vec()),
            Self::Warning(code) => (record_type::WARNING, code.to_be_bytes().to_vec()),
            Self::AeadAlgorithm(ids) => (record_type::AEAD_ALGORITHM, u16s(ids)),
            Self::NewCookie(cookie) => (record_type::NEW_COOKIE, cookie.clone()),
            Self::Server(name) => (record_type::NTPV4_SERVER, name.as_bytes().to_vec()),
            Self::Port(port) => (record_type::NTPV4_PORT, port.to_be_bytes().to_vec()),
            Self::Unknown {
                record_type, body, ..
            } => (*record_type & !CRITICAL_BIT, body.clone()),
        };
        let type_word = record_type | if self.critical() { CRITICAL_BIT } else { 0 };
        out.extend_from_slice(&type_word.to_be_bytes());
        // Bodies we build are far below 64 KiB; a longer one would be a bug, cut rather than
        // wrapped so the length never lies.
        let length = u16::try_from(body.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&length.to_be_bytes());
        out.extend_from_slice(&body[..usize::from(length)]);
    }

    /// Decodes one record from a complete body.
    fn decode(critical: bool, record_type: u16, body: &[u8]) -> Result<Self, RecordError> {
        let bad = || RecordError::BadBody {
            record_type,
            length: body.len(),
        };
        let one_u16 = || -> Result<u16, RecordError> {
            let bytes: [u8; 2] = body.try_into().map_err(|_| bad())?;
            Ok(u16::from_be_bytes(bytes))
        };
        let u16_list = || -> Result<Vec<u16>, RecordError> {
            if !body.len().is_multiple_of(2) {
                return Err(bad());
            }
            Ok(body
                .chunks_exact(2)
                .map(|pair| u16::from_be_bytes([pair[0], pair[1]]))
                .collect())
        };
        // The critical bit is optional on several known types (chrony sets it on AEAD, Server
        // and Port), so known types are read whatever it says; only unknown ones keep it.
        Ok(match record_type {
            record_type::END_OF_MESSAGE if body.is_empty() => Self::EndOfMessage,
            record_type::END_OF_MESSAGE => return Err(bad()),
            record_type::NEXT_PROTOCOL => Self::NextProtocol(u16_list()?),
            record_type::ERROR => Self::Error(one_u16()?),
            record_type::WARNING => Self::Warning(one_u16()?),
            record_type::AEAD_ALGORITHM => Self::AeadAlgorithm(u16_list()?),
            record_type::NEW_COOKIE => Self::NewCookie(body.to_vec()),
            record_type::NTPV4_SERVER => {
                let printable = !body.is_empty() && body.iter().all(|b| b.is_ascii_graphic());
                if !printable {
                    return Err(RecordError::BadServerName);
                }
                Self::Server(body.iter().map(|&b| char::from(b)).collect())
            }
            record_type::NTPV4_PORT => Self::Port(one_u16()?),
            _ => Self::Unknown {
                critical,
                record_type,
                body: body.to_vec(),
            },
        })
    }
}

/// Encodes a whole message (the caller includes the End of Message record).
pub fn encode_message(records: &[Record]) -> Vec<u8> {
    let mut out = Vec::new();
    for record in records {
        record.encode(&mut out);
    }
    out
}

/// Decodes the message at the start of `bytes`: `Ok(None)` while its End of Message record
/// has not arrived yet, else the records (End of Message included) and the bytes they took.
pub fn decode_message(bytes: &[u8]) -> Result<Option<(Vec<Record>, usize)>, RecordError> {
    let mut records = Vec::new();
    let mut at = 0;
    loop {
        if at >= MAX_MESSAGE_LEN {
            return Err(RecordError::TooLong);
        }
        let Some(head) = bytes.get(at..at + 4) else {
            return incomplete(bytes.len());
        };
        let type_word = u16::from_be_bytes([head[0], head[1]]);
        let length = usize::from(u16::from_be_bytes([head[2], head[3]]));
        if at + 4 + length > MAX_MESSAGE_LEN {
            return Err(RecordError::TooLong);
        }
        let Some(body) = bytes.get(at + 4..at + 4 + length) else {
            return incomplete(bytes.len());
        };
        let record = Record::decode(
            type_word & CRITICAL_BIT != 0,
            type_word & !CRITICAL_BIT,
            body,
        )?;
        at += 4 + length;
        let done = record == Record::EndOfMessage;
        records.push(record);
        if done {
            return Ok(Some((records, at)));
        }
    }
}

fn incomplete(buffered: usize) -> Result<Option<(Vec<Record>, usize)>, RecordError> {
    if buffered >= MAX_MESSAGE_LEN {
        Err(RecordError::TooLong)
    } else {
        Ok(None)
    }
}

/// The TLS exporter context for one direction's key (RFC 8915 §5.1): the next protocol, the
/// AEAD and 0 for client-to-server or 1 for server-to-client.
pub fn exporter_context(aead: u16, server_to_client: bool) -> [u8; 5] {
    let [p0, p1] = NEXT_PROTOCOL_NTPV4.to_be_bytes();
    let [a0, a1] = aead.to_be_bytes();
    [p0, p1, a0, a1, u8::from(server_to_client)]
}

/// The request a client sends: NTPv4 with AES-SIV-CMAC-256.
pub fn client_request() -> Vec<u8> {
    encode_message(&[
        Record::NextProtocol(vec![NEXT_PROTOCOL_NTPV4]),
        Record::AeadAlgorithm(vec![AEAD_AES_SIV_CMAC_256]),
        Record::EndOfMessage,
    ])
}

/// What a successful key exchange gives the client, besides the exported keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agreement {
    pub aead: u16,
    /// At most [`COOKIES_PER_EXCHANGE`], each of 1 to [`MAX_COOKIE_LEN`] bytes.
    pub cookies: Vec<Vec<u8>>,
    /// Where to send NTP; the KE server's own address when absent.
    pub ntp_server: Option<String>,
    /// Which UDP port; 123 when absent.
    pub ntp_port: Option<u16>,
}

/// Why a server's answer gives the client no usable session. Each is final for this exchange:
/// the client backs off and tries again, and never falls back to plain NTP.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KeFailure {
    #[error("the server answered with error {0}")]
    ServerError(u16),
    #[error("the server answered with warning {0}, which this client does not know")]
    ServerWarning(u16),
    #[error("the server sent a critical record of unknown type {0}")]
    UnknownCriticalRecord(u16),
    #[error("the server sent {0} twice")]
    Duplicate(&'static str),
    #[error("the server does not offer NTPv4")]
    NoNtpV4,
    #[error("the server agreed on no AEAD algorithm Stratum supports")]
    NoCommonAead,
    #[error("the server sent no usable cookie")]
    NoCookies,
    #[error("the server sent a {0}-byte cookie")]
    BadCookie(usize),
    #[error("the server sent a record a server may not send: {0}")]
    Unexpected(&'static str),
}

/// Reads the server's answer to [`client_request`].
pub fn client_agreement(records: &[Record]) -> Result<Agreement, KeFailure> {
    let mut protocol: Option<&[u16]> = None;
    let mut aead: Option<&[u16]> = None;
    let mut agreement = Agreement {
        aead: 0,
        cookies: Vec::new(),
        ntp_server: None,
        ntp_port: None,
    };
    for record in records {
        match record {
            Record::EndOfMessage => break,
            Record::Error(code) => return Err(KeFailure::ServerError(*code)),
            Record::Warning(code) => return Err(KeFailure::ServerWarning(*code)),
            Record::NextProtocol(ids) => {
                if protocol.replace(ids).is_some() {
                    return Err(KeFailure::Duplicate("Next Protocol"));
                }
            }
            Record::AeadAlgorithm(ids) => {
                if aead.replace(ids).is_some() {
                    return Err(KeFailure::Duplicate("AEAD Algorithm"));
                }
            }
            Record::NewCookie(cookie) => {
                if cookie.is_empty() || cookie.len() > MAX_COOKIE_LEN {
                    return Err(KeFailure::BadCookie(cookie.len()));
                }
                if agreement.cookies.len() < COOKIES_PER_EXCHANGE {
                    agreement.cookies.push(cookie.clone());
                }
            }
            Record::Server(name) => {
                if agreement.ntp_server.replace(name.clone()).is_some() {
                    return Err(KeFailure::Duplicate("NTPv4 Server"));
                }
            }
            Record::Port(port) => {
                if agreement.ntp_port.replace(*port).is_some() {
                    return Err(KeFailure::Duplicate("NTPv4 Port"));
                }
            }
            Record::Unknown {
                critical: true,
                record_type,
                ..
            } => return Err(KeFailure::UnknownCriticalRecord(*record_type)),
            Record::Unknown { .. } => {}
        }
    }
    // The server must pick exactly the protocol and algorithm we offered, one each.
    if protocol != Some(&[NEXT_PROTOCOL_NTPV4][..]) {
        return Err(KeFailure::NoNtpV4);
    }
    if aead != Some(&[AEAD_AES_SIV_CMAC_256][..]) {
        return Err(KeFailure::NoCommonAead);
    }
    agreement.aead = AEAD_AES_SIV_CMAC_256;
    if agreement.cookies.is_empty() {
        return Err(KeFailure::NoCookies);
    }
    Ok(agreement)
}

/// How a server answers a request: with keys for an AEAD, or a refusal whose records it sends
/// as they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Negotiation {
    /// Export the keys for this AEAD and answer with [`server_response`].
    Agreed { aead: u16 },
    /// Send these records and close.
    Refused(Vec<Record>),
}

/// Reads a client's request. Follows RFC 8915 §4.1: one Next Protocol and one AEAD record,
/// errors for unknown critical records and for records only servers send.
pub fn server_negotiate(records: &[Record]) -> Negotiation {
    let refuse = |code| Negotiation::Refused(vec![Record::Error(code), Record::EndOfMessage]);
    let mut protocols: Option<&[u16]> = None;
    let mut aeads: Option<&[u16]> = None;
    for record in records {
        match record {
            Record::EndOfMessage => break,
            Record::NextProtocol(ids) => {
                if protocols.replace(ids).is_some() {
                    return refuse(error_code::BAD_REQUEST);
                }
            }
            Record::AeadAlgorithm(ids) => {
                if aeads.replace(ids).is_some() {
                    return refuse(error_code::BAD_REQUEST);
                }
            }
            Record::Error(_) | Record::Warning(_) | Record::NewCookie(_) => {
                return refuse(error_code::BAD_REQUEST);
            }
            Record::Unknown { critical: true, .. } => {
                return refuse(error_code::UNRECOGNIZED_CRITICAL_RECORD);
            }
            // A client may suggest a server or port; we always name our own.
            Record::Server(_) | Record::Port(_) | Record::Unknown { .. } => {}
        }
    }
    let Some(protocols) = protocols.filter(|ids| !ids.is_empty()) else {
        return refuse(error_code::BAD_REQUEST);
    };
    if !protocols.contains(&NEXT_PROTOCOL_NTPV4) {
        // No protocol in common: an empty Next Protocol record says so.
        return Negotiation::Refused(vec![Record::NextProtocol(Vec::new()), Record::EndOfMessage]);
    }
    let Some(aeads) = aeads.filter(|ids| !ids.is_empty()) else {
        return refuse(error_code::BAD_REQUEST);
    };
    if !aeads.contains(&AEAD_AES_SIV_CMAC_256) {
        return Negotiation::Refused(vec![
            Record::NextProtocol(vec![NEXT_PROTOCOL_NTPV4]),
            Record::AeadAlgorithm(Vec::new()),
            Record::EndOfMessage,
        ]);
    }
    Negotiation::Agreed {
        aead: AEAD_AES_SIV_CMAC_256,
    }
}

/// The server's answer after [`Negotiation::Agreed`]: the choices, where to send NTP, and the
/// cookies.
pub fn server_response(
    aead: u16,
    cookies: Vec<Vec<u8>>,
    ntp_server: Option<&str>,
    ntp_port: Option<u16>,
) -> Vec<u8> {
    let mut records = vec![
        Record::NextProtocol(vec![NEXT_PROTOCOL_NTPV4]),
        Record::AeadAlgorithm(vec![aead]),
    ];
    records.extend(ntp_server.map(|name| Record::Server(name.to_owned())));
    records.extend(ntp_port.map(Record::Port));
    records.extend(cookies.into_iter().map(Record::NewCookie));
    records.push(Record::EndOfMessage);
    encode_message(&records)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn decode_all(bytes: &[u8]) -> Vec<Record> {
        let (records, used) = decode_message(bytes).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        records
    }

    #[test]
    fn the_client_request_has_the_bytes_rfc_8915_prescribes() {
        // Next Protocol [0], AEAD [15], End of Message, all critical.
        assert_eq!(
            client_request(),
            [0x80, 1, 0, 2, 0, 0, 0x80, 4, 0, 2, 0, 15, 0x80, 0, 0, 0]
        );
    }

    #[test]
    fn every_record_type_round_trips_byte_for_byte() {
        let records = vec![
            Record::NextProtocol(vec![0, 0x8001]),
            Record::AeadAlgorithm(vec![15, 30]),
            Record::Warning(7),
            Record::Error(2),
            Record::NewCookie(vec![1, 2, 3]),
            Record::Server("ntp-a.tenant.svc".into()),
            Record::Port(1123),
            Record::Unknown {
                critical: false,
                record_type: 1024,
                body: vec![],
            },
            Record::Unknown {
                critical: true,
                record_type: 99,
                body: vec![9; 5],
            },
            Record::EndOfMessage,
        ];
        let bytes = encode_message(&records);
        assert_eq!(decode_all(&bytes), records);
        assert_eq!(encode_message(&decode_all(&bytes)), bytes);
    }

    #[test]
    fn a_message_is_incomplete_until_its_end_record_arrives() {
        let bytes = client_request();
        for cut in 0..bytes.len() {
            assert_eq!(decode_message(&bytes[..cut]), Ok(None), "cut at {cut}");
        }
        // Bytes after the end belong to the next message (or are garbage) and are not consumed.
        let mut longer = bytes.clone();
        longer.extend_from_slice(&[0xff; 3]);
        assert_eq!(decode_message(&longer).unwrap().unwrap().1, bytes.len());
    }

    #[test]
    fn malformed_bodies_and_endless_messages_are_refused() {
        let bad_port = [0, 7, 0, 3, 0, 1, 2];
        assert_eq!(
            decode_message(&bad_port),
            Err(RecordError::BadBody {
                record_type: 7,
                length: 3
            })
        );
        let odd_list = [0x80, 1, 0, 1, 0];
        assert!(matches!(
            decode_message(&odd_list),
            Err(RecordError::BadBody { .. })
        ));
        let eom_with_body = [0x80, 0, 0, 1, 0];
        assert!(decode_message(&eom_with_body).is_err());
        let control_char_name = [0, 6, 0, 2, b'a', b'\n'];
        assert_eq!(
            decode_message(&control_char_name),
            Err(RecordError::BadServerName)
        );
        // Warnings forever: the reader gives up at the bound instead of buffering on.
        let warning = encode_message(&[Record::Warning(0)]);
        let endless: Vec<u8> = warning
            .iter()
            .copied()
            .cycle()
            .take(MAX_MESSAGE_LEN + 6)
            .collect();
        assert_eq!(decode_message(&endless), Err(RecordError::TooLong));
        assert_eq!(
            decode_message(&endless[..MAX_MESSAGE_LEN]),
            Err(RecordError::TooLong)
        );
        // One record announcing a body beyond the bound is refused before its body arrives.
        assert_eq!(
            decode_message(&[0, 5, 0xff, 0xff]),
            Err(RecordError::TooLong)
        );
    }

    #[test]
    fn known_types_are_read_whatever_their_critical_bit_and_unknown_critical_ones_refused() {
        // chrony marks AEAD, Server and Port critical; a peer may leave them plain.
        let records = decode_all(&[0, 4, 0, 2, 0, 15, 0x80, 7, 0, 2, 4, 99, 0x80, 0, 0, 0]);
        assert_eq!(records[0], Record::AeadAlgorithm(vec![15]));
        assert_eq!(records[1], Record::Port(1123));
        let records = decode_all(&[0x80, 42, 0, 1, 7, 0x80, 0, 0, 0]);
        assert_eq!(
            records[0],
            Record::Unknown {
                critical: true,
                record_type: 42,
                body: vec![7]
            }
        );
        assert_eq!(
            client_agreement(&records),
            Err(KeFailure::UnknownCriticalRecord(42))
        );
    }

    fn agreed(records: &[Record]) -> Vec<Record> {
        let Negotiation::Agreed { aead } = server_negotiate(records) else {
            panic!("refused {records:?}");
        };
        let cookies = (0..8).map(|i| vec![i; 100]).collect();
        decode_all(&server_response(
            aead,
            cookies,
            Some("ntp.tenant-a.svc"),
            Some(1123),
        ))
    }

    #[test]
    fn our_client_and_server_agree_and_the_client_keeps_eight_cookies_and_the_address() {
        let answer = agreed(&decode_all(&client_request()));
        let agreement = client_agreement(&answer).unwrap();
        assert_eq!(agreement.aead, AEAD_AES_SIV_CMAC_256);
        assert_eq!(agreement.cookies.len(), 8);
        assert_eq!(agreement.cookies[3], vec![3; 100]);
        assert_eq!(agreement.ntp_server.as_deref(), Some("ntp.tenant-a.svc"));
        assert_eq!(agreement.ntp_port, Some(1123));
    }

    #[test]
    fn the_server_prefers_siv_among_several_offers_and_ignores_client_address_hints() {
        let request = [
            Record::NextProtocol(vec![0x4000, NEXT_PROTOCOL_NTPV4]),
            Record::AeadAlgorithm(vec![30, 17, AEAD_AES_SIV_CMAC_256]),
            Record::Server("evil.example".into()),
            Record::Port(9),
            Record::Unknown {
                critical: false,
                record_type: 1024,
                body: vec![],
            },
            Record::EndOfMessage,
        ];
        assert_eq!(
            server_negotiate(&request),
            Negotiation::Agreed {
                aead: AEAD_AES_SIV_CMAC_256
            }
        );
    }

    #[test]
    fn the_server_refuses_bad_requests_with_the_rfc_error_codes() {
        let eom = Record::EndOfMessage;
        let ntp = Record::NextProtocol(vec![0]);
        let siv = Record::AeadAlgorithm(vec![15]);
        let error = |code| Negotiation::Refused(vec![Record::Error(code), Record::EndOfMessage]);
        let cases: Vec<(Vec<Record>, Negotiation)> = vec![
            (
                vec![siv.clone(), eom.clone()],
                error(error_code::BAD_REQUEST),
            ),
            (
                vec![ntp.clone(), ntp.clone(), siv.clone(), eom.clone()],
                error(error_code::BAD_REQUEST),
            ),
            (
                vec![ntp.clone(), eom.clone()],
                error(error_code::BAD_REQUEST),
            ),
            (
                vec![
                    ntp.clone(),
                    siv.clone(),
                    Record::NewCookie(vec![1]),
                    eom.clone(),
                ],
                error(error_code::BAD_REQUEST),
            ),
            (
                vec![
                    Record::Unknown {
                        critical: true,
                        record_type: 77,
                        body: vec![],
                    },
                    ntp.clone(),
                    siv.clone(),
                    eom.clone(),
                ],
                error(error_code::UNRECOGNIZED_CRITICAL_RECORD),
            ),
            (
                vec![Record::NextProtocol(vec![0x4000]), siv.clone(), eom.clone()],
                Negotiation::Refused(vec![Record::NextProtocol(vec![]), eom.clone()]),
            ),
            (
                vec![ntp.clone(), Record::AeadAlgorithm(vec![30]), eom.clone()],
                Negotiation::Refused(vec![
                    ntp.clone(),
                    Record::AeadAlgorithm(vec![]),
                    eom.clone(),
                ]),
            ),
        ];
        for (request, expected) in cases {
            assert_eq!(server_negotiate(&request), expected, "{request:?}");
        }
    }

    #[test]
    fn the_client_refuses_answers_that_would_leave_it_unauthenticated_or_confused() {
        let good = || agreed(&decode_all(&client_request()));
        let with = |f: &dyn Fn(&mut Vec<Record>)| {
            let mut answer = good();
            f(&mut answer);
            client_agreement(&answer)
        };
        assert_eq!(
            with(&|a| a.insert(0, Record::Error(2))),
            Err(KeFailure::ServerError(2))
        );
        assert_eq!(
            with(&|a| a.insert(0, Record::Warning(5))),
            Err(KeFailure::ServerWarning(5))
        );
        assert_eq!(
            with(&|a| a[0] = Record::NextProtocol(vec![])),
            Err(KeFailure::NoNtpV4)
        );
        assert_eq!(
            with(&|a| a[0] = Record::NextProtocol(vec![0, 0])),
            Err(KeFailure::NoNtpV4)
        );
        assert_eq!(
            with(&|a| a[1] = Record::AeadAlgorithm(vec![30])),
            Err(KeFailure::NoCommonAead)
        );
        assert_eq!(
            with(&|a| {
                a.remove(1);
            }),
            Err(KeFailure::NoCommonAead)
        );
        assert_eq!(
            with(&|a| a.retain(|r| !matches!(r, Record::NewCookie(_)))),
            Err(KeFailure::NoCookies)
        );
        assert_eq!(
            with(&|a| a.insert(2, Record::NewCookie(vec![0; MAX_COOKIE_LEN + 1]))),
            Err(KeFailure::BadCookie(MAX_COOKIE_LEN + 1))
        );
        assert_eq!(
            with(&|a| a.insert(2, Record::Port(9))),
            Err(KeFailure::Duplicate("NTPv4 Port"))
        );
        // More than eight cookies: the client keeps eight.
        let many = with(&|a| a.insert(2, Record::NewCookie(vec![9; 8]))).unwrap();
        assert_eq!(many.cookies.len(), COOKIES_PER_EXCHANGE);
    }

    #[test]
    fn the_exporter_context_names_protocol_aead_and_direction() {
        assert_eq!(exporter_context(15, false), [0, 0, 0, 15, 0]);
        assert_eq!(exporter_context(15, true), [0, 0, 0, 15, 1]);
    }
}
