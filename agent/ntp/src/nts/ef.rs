//! NTS extension fields of NTP packets (RFC 8915 §5): building and checking authenticated
//! requests and responses, on both sides.
//!
//! A request is the header, a Unique Identifier, one cookie, placeholders for more cookies,
//! and an Authenticator whose AEAD tag covers every byte before it under the C2S key. A
//! response echoes the identifier and carries, encrypted under the S2C key, one new cookie
//! per cookie and placeholder of the request. Nothing may follow the Authenticator: bytes
//! there would be unauthenticated, so such packets are refused on both sides.

use super::aead::{AeadKey, NONCE_LEN, TAG_LEN};
use super::cookie::{CookieError, CookieJar, CookieKeys, SessionKeys};
use super::ke::{COOKIES_PER_EXCHANGE, MAX_COOKIE_LEN};
use crate::packet::{HEADER_LEN, KissCode, MIN_EXTENSION_LEN, Packet, ParseError};
use rand::CryptoRng;
use thiserror::Error;

/// NTP extension field types of NTS (RFC 8915 §7.5).
pub mod field_type {
    pub const UNIQUE_IDENTIFIER: u16 = 0x0104;
    pub const COOKIE: u16 = 0x0204;
    pub const COOKIE_PLACEHOLDER: u16 = 0x0304;
    pub const AUTHENTICATOR: u16 = 0x0404;
}

/// Length of the unique identifiers Stratum sends, and the least it accepts.
pub const UNIQUE_ID_LEN: usize = 32;

/// Appends one extension field, its value zero-padded to a word and to the RFC 7822 minimum.
fn push_field(out: &mut Vec<u8>, field_type: u16, value: &[u8]) {
    let length = (4 + value.len()).next_multiple_of(4).max(MIN_EXTENSION_LEN);
    out.extend_from_slice(&field_type.to_be_bytes());
    // Values here are cookies (≤ 256 bytes), identifiers and authenticators: far below 64 KiB.
    out.extend_from_slice(&u16::try_from(length).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(value);
    out.resize(out.len() + length - 4 - value.len(), 0);
}

/// Appends an Authenticator sealing everything in `out` so far under `key`, with `plaintext`
/// (encrypted extension fields) inside.
fn push_authenticator(
    out: &mut Vec<u8>,
    key: &AeadKey,
    plaintext: &[u8],
    rng: &mut impl CryptoRng,
) {
    let mut nonce = [0; NONCE_LEN];
    rng.fill_bytes(&mut nonce);
    let ciphertext = key.seal(&nonce, out, plaintext);
    let mut value = Vec::with_capacity(4 + NONCE_LEN + ciphertext.len() + 3);
    value.extend_from_slice(&u16::try_from(NONCE_LEN).unwrap_or(u16::MAX).to_be_bytes());
    value.extend_from_slice(
        &u16::try_from(ciphertext.len())
            .unwrap_or(u16::MAX)
            .to_be_bytes(),
    );
    value.extend_from_slice(&nonce);
    value.extend_from_slice(&ciphertext);
    push_field(out, field_type::AUTHENTICATOR, &value);
}

/// Not an extension field type: stands for a MAC trailer in [`fields`]' output.
const MAC_TRAILER: u16 = 0xffff;

/// One extension field and where it starts in the datagram.
struct Field<'a> {
    at: usize,
    field_type: u16,
    value: &'a [u8],
}

/// The extension fields of a datagram, as [`Packet::parse`] validated them. A trailer it
/// would read as a legacy MAC is returned as a field of type [`MAC_TRAILER`], so that the
/// rule "nothing after the authenticator" covers it too.
fn fields(datagram: &[u8]) -> Result<(Packet, Vec<Field<'_>>), ParseError> {
    let view = Packet::parse(datagram)?;
    let mut at = HEADER_LEN;
    let mut found = Vec::new();
    for field in view.extension_fields() {
        found.push(Field {
            at,
            field_type: field.field_type,
            value: field.value,
        });
        at += 4 + field.value.len();
    }
    if let Some(mac) = view.mac {
        found.push(Field {
            at,
            field_type: MAC_TRAILER,
            value: mac,
        });
    }
    Ok((view.header, found))
}

/// The nonce and ciphertext of an Authenticator value, or `None` when its lengths do not fit.
fn authenticator_parts(value: &[u8]) -> Option<(&[u8], &[u8])> {
    let nonce_len = usize::from(u16::from_be_bytes([*value.first()?, *value.get(1)?]));
    let ciphertext_len = usize::from(u16::from_be_bytes([*value.get(2)?, *value.get(3)?]));
    let nonce_start = 4;
    let ciphertext_start = nonce_start + nonce_len.next_multiple_of(4);
    // RFC 8915 §5.6: at least 16 bytes of nonce (or nonce and padding) with SIV.
    if nonce_len == 0 || ciphertext_start - nonce_start < NONCE_LEN || ciphertext_len < TAG_LEN {
        return None;
    }
    let nonce = value.get(nonce_start..nonce_start + nonce_len)?;
    let ciphertext = value.get(ciphertext_start..ciphertext_start + ciphertext_len)?;
    Some((nonce, ciphertext))
}

/// Reads the extension fields inside a decrypted Authenticator.
fn inner_fields(plaintext: &[u8]) -> Option<Vec<(u16, &[u8])>> {
    let mut rest = plaintext;
    let mut found = Vec::new();
    while !rest.is_empty() {
        let field_type = u16::from_be_bytes([*rest.first()?, *rest.get(1)?]);
        let length = usize::from(u16::from_be_bytes([*rest.get(2)?, *rest.get(3)?]));
        if length < 4 || !length.is_multiple_of(4) {
            return None;
        }
        found.push((field_type, rest.get(4..length)?));
        rest = rest.get(length..)?;
    }
    Some(found)
}

/// An authenticated request, ready to send.
#[derive(Debug, Clone)]
pub struct ClientRequest {
    pub datagram: Vec<u8>,
    /// The identifier the response must echo.
    pub unique_id: [u8; UNIQUE_ID_LEN],
}

impl ClientRequest {
    /// Spends a cookie from `jar` on an authenticated request with `header` (mode 3, its
    /// transmit timestamp set). `None` when the jar is empty: the caller runs the key exchange
    /// again and sends nothing meanwhile, never a plain request.
    pub fn build(header: &Packet, jar: &mut CookieJar, rng: &mut impl CryptoRng) -> Option<Self> {
        let placeholders = jar.placeholders_wanted();
        let cookie = jar.take()?;
        let mut unique_id = [0; UNIQUE_ID_LEN];
        rng.fill_bytes(&mut unique_id);
        let mut datagram = header.to_bytes().to_vec();
        push_field(&mut datagram, field_type::UNIQUE_IDENTIFIER, &unique_id);
        push_field(&mut datagram, field_type::COOKIE, &cookie);
        let placeholder = vec![0; cookie.len()];
        for _ in 0..placeholders {
            push_field(&mut datagram, field_type::COOKIE_PLACEHOLDER, &placeholder);
        }
        push_authenticator(&mut datagram, &jar.keys().c2s, &[], rng);
        Some(Self {
            datagram,
            unique_id,
        })
    }
}

/// A response that authenticated under the session's S2C key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedResponse {
    pub header: Packet,
    /// New cookies, for the jar.
    pub cookies: Vec<Vec<u8>>,
}

/// Why a response is not taken. Each is counted and dropped; none gives time.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ResponseError {
    #[error("malformed packet: {0}")]
    Malformed(#[from] ParseError),
    #[error("the response does not echo the request's unique identifier")]
    WrongUniqueId,
    #[error("the server refused the cookie (NTS NAK)")]
    Nak,
    #[error("the response carries no NTS authenticator")]
    Unauthenticated,
    #[error("the response's authenticator is malformed")]
    BadAuthenticator,
    #[error("the response does not authenticate under the session key")]
    AuthenticationFailed,
    #[error("extension fields follow the authenticator, unauthenticated")]
    TrailingFields,
}

/// Checks a response to the request whose identifier is `unique_id`. A matching NTS NAK is
/// reported as [`ResponseError::Nak`] so the caller can re-key; it is not authenticated, so it
/// must not be taken as more than a hint.
pub fn verify_response(
    datagram: &[u8],
    unique_id: &[u8],
    s2c: &AeadKey,
) -> Result<VerifiedResponse, ResponseError> {
    let (header, fields) = fields(datagram)?;
    let echoes = fields.iter().any(|f| {
        f.field_type == field_type::UNIQUE_IDENTIFIER
            && f.value.get(..unique_id.len()) == Some(unique_id)
    });
    if !echoes {
        return Err(ResponseError::WrongUniqueId);
    }
    let Some(auth_index) = fields
        .iter()
        .position(|f| f.field_type == field_type::AUTHENTICATOR)
    else {
        if header.stratum == 0 && header.kiss_code() == Some(KissCode::Ntsn) {
            return Err(ResponseError::Nak);
        }
        return Err(ResponseError::Unauthenticated);
    };
    if auth_index + 1 != fields.len() {
        return Err(ResponseError::TrailingFields);
    }
    let auth = &fields[auth_index];
    // The identifier counts only if the authenticator covers it.
    let covered = fields[..auth_index].iter().any(|f| {
        f.field_type == field_type::UNIQUE_IDENTIFIER
            && f.value.get(..unique_id.len()) == Some(unique_id)
    });
    if !covered {
        return Err(ResponseError::WrongUniqueId);
    }
    let (nonce, ciphertext) =
        authenticator_parts(auth.value).ok_or(ResponseError::BadAuthenticator)?;
    let plaintext = s2c
        .open(nonce, &datagram[..auth.at], ciphertext)
        .map_err(|_| ResponseError::AuthenticationFailed)?;
    let inner = inner_fields(&plaintext).ok_or(ResponseError::BadAuthenticator)?;
    let cookies = inner
        .into_iter()
        .filter(|(t, value)| {
            *t == field_type::COOKIE && !value.is_empty() && value.len() <= MAX_COOKIE_LEN
        })
        .map(|(_, value)| value.to_vec())
        .take(COOKIES_PER_EXCHANGE)
        .collect();
    Ok(VerifiedResponse { header, cookies })
}

/// A request that authenticated: what the server needs to answer it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthenticatedRequest {
    pub header: Packet,
    pub unique_id: Vec<u8>,
    pub keys: SessionKeys,
    /// Cookies to return: one for the spent cookie and one per placeholder.
    pub cookies_wanted: usize,
    /// The request's length, which the response must not exceed (no amplification).
    pub request_len: usize,
}

/// Why a request carrying NTS fields gets no answer at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum DropReason {
    #[error("malformed packet")]
    Malformed,
    #[error("NTS fields without a single unique identifier of at least 32 bytes")]
    BadUniqueId,
    #[error("NTS fields without exactly one cookie")]
    BadCookieCount,
    #[error("NTS fields without an authenticator, or fields after it")]
    BadAuthenticatorPlacement,
    #[error("the authenticator is malformed")]
    BadAuthenticator,
    #[error("the request does not authenticate under its cookie's key")]
    AuthenticationFailed,
}

/// What a server does with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerVerdict {
    /// No NTS fields: an ordinary request, which the tenant may serve or refuse.
    Plain,
    /// Answer with [`build_response`].
    Authenticated(AuthenticatedRequest),
    /// The cookie did not open (expired master key, another cluster's cookie): answer with
    /// [`build_nak`] so the client re-keys.
    Nak {
        unique_id: Vec<u8>,
        reason: CookieError,
    },
    /// Answer nothing.
    Drop(DropReason),
}

/// Checks a request against the TimeService's cookie keys.
pub fn verify_request(datagram: &[u8], cookie_keys: &CookieKeys) -> ServerVerdict {
    verify_request_with(datagram, |cookie| cookie_keys.open(cookie))
}

/// [`verify_request`] with the cookie opened by `open_cookie`: a server without keys yet
/// passes one that always fails (`CookieError::NoKeys`), so its clients get the NAK.
pub fn verify_request_with(
    datagram: &[u8],
    open_cookie: impl FnOnce(&[u8]) -> Result<SessionKeys, CookieError>,
) -> ServerVerdict {
    let Ok((header, fields)) = fields(datagram) else {
        return ServerVerdict::Drop(DropReason::Malformed);
    };
    let is_nts = |t: u16| {
        matches!(
            t,
            field_type::UNIQUE_IDENTIFIER
                | field_type::COOKIE
                | field_type::COOKIE_PLACEHOLDER
                | field_type::AUTHENTICATOR
        )
    };
    if !fields.iter().any(|f| is_nts(f.field_type)) {
        return ServerVerdict::Plain;
    }
    let of_type = |t| fields.iter().filter(move |f| f.field_type == t);
    let mut ids = of_type(field_type::UNIQUE_IDENTIFIER);
    let (Some(id), None) = (ids.next(), ids.next()) else {
        return ServerVerdict::Drop(DropReason::BadUniqueId);
    };
    if id.value.len() < UNIQUE_ID_LEN {
        return ServerVerdict::Drop(DropReason::BadUniqueId);
    }
    let mut cookies = of_type(field_type::COOKIE);
    let (Some(cookie), None) = (cookies.next(), cookies.next()) else {
        return ServerVerdict::Drop(DropReason::BadCookieCount);
    };
    let auth_index = fields
        .iter()
        .position(|f| f.field_type == field_type::AUTHENTICATOR);
    let Some(auth) = auth_index
        .filter(|&i| i + 1 == fields.len())
        .map(|i| &fields[i])
    else {
        return ServerVerdict::Drop(DropReason::BadAuthenticatorPlacement);
    };
    let unique_id = id.value.to_vec();
    let keys = match open_cookie(cookie.value) {
        Ok(keys) => keys,
        Err(reason) => return ServerVerdict::Nak { unique_id, reason },
    };
    let Some((nonce, ciphertext)) = authenticator_parts(auth.value) else {
        return ServerVerdict::Drop(DropReason::BadAuthenticator);
    };
    if keys
        .c2s
        .open(nonce, &datagram[..auth.at], ciphertext)
        .is_err()
    {
        return ServerVerdict::Drop(DropReason::AuthenticationFailed);
    }
    let placeholders = of_type(field_type::COOKIE_PLACEHOLDER).count();
    ServerVerdict::Authenticated(AuthenticatedRequest {
        header,
        unique_id,
        keys,
        cookies_wanted: (1 + placeholders).min(COOKIES_PER_EXCHANGE),
        request_len: datagram.len(),
    })
}

/// The authenticated response: `reply` (the 48-byte header the server built), the echoed
/// identifier and fresh cookies sealed under `cookie_keys`, encrypted under the S2C key. As
/// many cookies as were asked for, less any that would make the response longer than the
/// request.
pub fn build_response(
    reply: &[u8; HEADER_LEN],
    request: &AuthenticatedRequest,
    cookie_keys: &CookieKeys,
    rng: &mut impl CryptoRng,
) -> Vec<u8> {
    let mut datagram = reply.to_vec();
    push_field(
        &mut datagram,
        field_type::UNIQUE_IDENTIFIER,
        &request.unique_id,
    );
    let mut inner = Vec::new();
    for _ in 0..request.cookies_wanted {
        let mut next = inner.clone();
        push_field(
            &mut next,
            field_type::COOKIE,
            &cookie_keys.seal(&request.keys, rng),
        );
        let authenticator_len = 4 + 4 + NONCE_LEN + (next.len() + TAG_LEN).next_multiple_of(4);
        if datagram.len() + authenticator_len > request.request_len {
            break;
        }
        inner = next;
    }
    push_authenticator(&mut datagram, &request.keys.s2c, &inner, rng);
    datagram
}

/// The NTS NAK: `kod` (a Kiss-o'-Death header with code NTSN) and the echoed identifier,
/// unauthenticated because the server has no key to authenticate it with.
pub fn build_nak(kod: &[u8; HEADER_LEN], unique_id: &[u8]) -> Vec<u8> {
    let mut datagram = kod.to_vec();
    push_field(&mut datagram, field_type::UNIQUE_IDENTIFIER, unique_id);
    datagram
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::nts::aead::KEY_LEN;
    use crate::nts::cookie::MasterKey;
    use crate::packet::{LeapIndicator, Mode, ReferenceId};
    use crate::time::{NtpShort, NtpTimestamp};
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn header(mode: Mode, stratum: u8, reference_id: ReferenceId) -> Packet {
        Packet {
            leap: LeapIndicator::NoWarning,
            version: 4,
            mode,
            stratum,
            poll: 6,
            precision: -20,
            root_delay: NtpShort::ZERO,
            root_dispersion: NtpShort::ZERO,
            reference_id,
            reference_timestamp: NtpTimestamp::ZERO,
            origin_timestamp: NtpTimestamp::ZERO,
            receive_timestamp: NtpTimestamp::ZERO,
            transmit_timestamp: NtpTimestamp::from_bits(0x1234_5678_9abc_def0),
        }
    }

    fn client_header() -> Packet {
        header(Mode::Client, 0, ReferenceId([0; 4]))
    }

    fn reply_header() -> [u8; HEADER_LEN] {
        header(Mode::Server, 2, ReferenceId(*b"GPS\0")).to_bytes()
    }

    struct Exchange {
        rng: StdRng,
        server_keys: CookieKeys,
        jar: CookieJar,
    }

    /// A client whose key exchange with a server holding master key 1 gave it eight cookies.
    fn exchange(seed: u64) -> Exchange {
        let mut rng = StdRng::seed_from_u64(seed);
        let server_keys = CookieKeys::new(
            MasterKey {
                id: 1,
                key: AeadKey::from_bytes([1; KEY_LEN]),
            },
            None,
        );
        let session = SessionKeys {
            c2s: AeadKey::from_bytes([2; KEY_LEN]),
            s2c: AeadKey::from_bytes([3; KEY_LEN]),
        };
        let cookies = (0..8)
            .map(|_| server_keys.seal(&session, &mut rng))
            .collect();
        Exchange {
            jar: CookieJar::new(session, cookies),
            rng,
            server_keys,
        }
    }

    fn served(x: &mut Exchange, request: &ClientRequest) -> Vec<u8> {
        let ServerVerdict::Authenticated(authenticated) =
            verify_request(&request.datagram, &x.server_keys)
        else {
            panic!("not authenticated");
        };
        build_response(&reply_header(), &authenticated, &x.server_keys, &mut x.rng)
    }

    #[test]
    fn a_request_authenticates_and_its_response_refills_the_jar() {
        let mut x = exchange(1);
        for _ in 0..3 {
            x.jar.take();
        }
        let request = ClientRequest::build(&client_header(), &mut x.jar, &mut x.rng).unwrap();
        assert_eq!(x.jar.len(), 4);
        let ServerVerdict::Authenticated(authenticated) =
            verify_request(&request.datagram, &x.server_keys)
        else {
            panic!("not authenticated");
        };
        assert_eq!(
            authenticated.cookies_wanted, 4,
            "one for the cookie, three placeholders"
        );
        assert_eq!(authenticated.header, client_header());
        assert_eq!(authenticated.unique_id, request.unique_id);
        let response = build_response(&reply_header(), &authenticated, &x.server_keys, &mut x.rng);
        assert!(response.len() <= request.datagram.len(), "never amplifies");
        let verified = verify_response(&response, &request.unique_id, &x.jar.keys().s2c).unwrap();
        assert_eq!(verified.header.stratum, 2);
        assert_eq!(verified.cookies.len(), 4);
        x.jar.add(verified.cookies);
        assert_eq!(x.jar.len(), 8);
        // The new cookies are good for the next request.
        let next = ClientRequest::build(&client_header(), &mut x.jar, &mut x.rng).unwrap();
        assert!(matches!(
            verify_request(&next.datagram, &x.server_keys),
            ServerVerdict::Authenticated(_)
        ));
    }

    #[test]
    fn a_request_without_nts_fields_is_plain_and_an_empty_jar_sends_nothing() {
        let mut x = exchange(2);
        assert_eq!(
            verify_request(&client_header().to_bytes(), &x.server_keys),
            ServerVerdict::Plain
        );
        while x.jar.take().is_some() {}
        assert!(ClientRequest::build(&client_header(), &mut x.jar, &mut x.rng).is_none());
    }

    #[test]
    fn any_changed_byte_of_a_request_is_refused_or_naked_never_served() {
        let mut x = exchange(3);
        let request = ClientRequest::build(&client_header(), &mut x.jar, &mut x.rng).unwrap();
        for at in 0..request.datagram.len() {
            let mut changed = request.datagram.clone();
            changed[at] ^= 0x01;
            let verdict = verify_request(&changed, &x.server_keys);
            assert!(
                !matches!(verdict, ServerVerdict::Authenticated(_)),
                "byte {at} changed and still authenticated"
            );
        }
    }

    #[test]
    fn any_changed_byte_of_a_response_is_refused() {
        let mut x = exchange(4);
        let request = ClientRequest::build(&client_header(), &mut x.jar, &mut x.rng).unwrap();
        let response = served(&mut x, &request);
        for at in 0..response.len() {
            let mut changed = response.clone();
            changed[at] ^= 0x01;
            assert!(
                verify_response(&changed, &request.unique_id, &x.jar.keys().s2c).is_err(),
                "byte {at} changed and still verified"
            );
        }
    }

    #[test]
    fn a_response_to_another_request_or_under_another_key_is_refused() {
        let mut x = exchange(5);
        let first = ClientRequest::build(&client_header(), &mut x.jar, &mut x.rng).unwrap();
        let second = ClientRequest::build(&client_header(), &mut x.jar, &mut x.rng).unwrap();
        let response = served(&mut x, &first);
        let s2c = x.jar.keys().s2c.clone();
        assert_eq!(
            verify_response(&response, &second.unique_id, &s2c),
            Err(ResponseError::WrongUniqueId)
        );
        assert_eq!(
            verify_response(
                &response,
                &first.unique_id,
                &AeadKey::from_bytes([9; KEY_LEN])
            ),
            Err(ResponseError::AuthenticationFailed)
        );
        // Plain time from a spoofer, even one echoing the identifier, is unauthenticated.
        let mut spoofed = reply_header().to_vec();
        push_field(
            &mut spoofed,
            field_type::UNIQUE_IDENTIFIER,
            &first.unique_id,
        );
        assert_eq!(
            verify_response(&spoofed, &first.unique_id, &s2c),
            Err(ResponseError::Unauthenticated)
        );
        assert_eq!(
            verify_response(&reply_header(), &first.unique_id, &s2c),
            Err(ResponseError::WrongUniqueId)
        );
    }

    #[test]
    fn fields_after_the_authenticator_are_refused_on_both_sides() {
        let mut x = exchange(6);
        let request = ClientRequest::build(&client_header(), &mut x.jar, &mut x.rng).unwrap();
        // A field, and a short trailer that RFC 7822 parsing reads as a legacy MAC.
        for trailer_len in [28, 12] {
            let mut padded = request.datagram.clone();
            push_field(&mut padded, 0x7777, &vec![0; trailer_len]);
            assert_eq!(
                verify_request(&padded, &x.server_keys),
                ServerVerdict::Drop(DropReason::BadAuthenticatorPlacement),
                "{trailer_len}-byte field after the authenticator"
            );
        }
        let mut response = served(&mut x, &request);
        push_field(&mut response, field_type::COOKIE, &[5; 104]);
        assert_eq!(
            verify_response(&response, &request.unique_id, &x.jar.keys().s2c),
            Err(ResponseError::TrailingFields)
        );
    }

    #[test]
    fn a_cookie_the_server_cannot_open_gets_a_nak_the_client_recognizes() {
        let mut x = exchange(7);
        let request = ClientRequest::build(&client_header(), &mut x.jar, &mut x.rng).unwrap();
        // Two rotations later, master key 1 is gone.
        let rotated = CookieKeys::new(
            MasterKey {
                id: 3,
                key: AeadKey::from_bytes([33; KEY_LEN]),
            },
            Some(MasterKey {
                id: 2,
                key: AeadKey::from_bytes([22; KEY_LEN]),
            }),
        );
        let ServerVerdict::Nak { unique_id, reason } = verify_request(&request.datagram, &rotated)
        else {
            panic!("expected a NAK");
        };
        assert_eq!(reason, CookieError::UnknownKey(1));
        let kod = header(Mode::Server, 0, KissCode::Ntsn.to_reference_id()).to_bytes();
        let nak = build_nak(&kod, &unique_id);
        assert_eq!(
            verify_response(&nak, &request.unique_id, &x.jar.keys().s2c),
            Err(ResponseError::Nak)
        );
    }

    #[test]
    fn requests_missing_or_doubling_nts_fields_are_dropped() {
        let mut x = exchange(8);
        let build = |x: &mut Exchange, edit: &dyn Fn(&mut Vec<u8>)| {
            let cookie = x.jar.take().unwrap();
            let mut datagram = client_header().to_bytes().to_vec();
            edit(&mut datagram);
            push_field(&mut datagram, field_type::COOKIE, &cookie);
            push_authenticator(&mut datagram, &x.jar.keys().c2s, &[], &mut x.rng);
            verify_request(&datagram, &x.server_keys)
        };
        let id = [7; UNIQUE_ID_LEN];
        assert_eq!(
            build(&mut x, &|_| {}),
            ServerVerdict::Drop(DropReason::BadUniqueId)
        );
        assert_eq!(
            build(&mut x, &|d| push_field(
                d,
                field_type::UNIQUE_IDENTIFIER,
                &[7; 16]
            )),
            ServerVerdict::Drop(DropReason::BadUniqueId)
        );
        assert_eq!(
            build(&mut x, &|d| {
                push_field(d, field_type::UNIQUE_IDENTIFIER, &id);
                push_field(d, field_type::UNIQUE_IDENTIFIER, &id);
            }),
            ServerVerdict::Drop(DropReason::BadUniqueId)
        );
        assert_eq!(
            build(&mut x, &|d| {
                push_field(d, field_type::UNIQUE_IDENTIFIER, &id);
                push_field(d, field_type::COOKIE, &[1; 104]);
            }),
            ServerVerdict::Drop(DropReason::BadCookieCount)
        );
        // Without an authenticator at all.
        let mut bare = client_header().to_bytes().to_vec();
        push_field(&mut bare, field_type::UNIQUE_IDENTIFIER, &id);
        push_field(&mut bare, field_type::COOKIE, &x.jar.take().unwrap());
        assert_eq!(
            verify_request(&bare, &x.server_keys),
            ServerVerdict::Drop(DropReason::BadAuthenticatorPlacement)
        );
    }

    #[test]
    fn a_request_asking_for_more_cookies_than_it_has_room_for_gets_fewer_not_a_bigger_reply() {
        let mut x = exchange(9);
        let request = ClientRequest::build(&client_header(), &mut x.jar, &mut x.rng).unwrap();
        let ServerVerdict::Authenticated(mut authenticated) =
            verify_request(&request.datagram, &x.server_keys)
        else {
            panic!("not authenticated");
        };
        authenticated.cookies_wanted = COOKIES_PER_EXCHANGE;
        let response = build_response(&reply_header(), &authenticated, &x.server_keys, &mut x.rng);
        assert!(response.len() <= request.datagram.len());
        let verified = verify_response(&response, &request.unique_id, &x.jar.keys().s2c).unwrap();
        assert_eq!(verified.cookies.len(), 1, "the request had room for one");
    }
}
