//! Network Time Security (RFC 8915), sans-IO: the NTS-KE record layer and negotiation
//! ([`ke`]), the AEAD the NTP packets are authenticated with ([`aead`]), server cookies and the
//! client's cookie jar ([`cookie`]) and the NTS extension fields of NTP requests and replies
//! ([`ef`]).
//!
//! Nothing here opens a socket or a TLS session. The agent runs the TLS 1.3 handshake (ALPN
//! [`ke::ALPN`]), feeds the bytes it reads to [`ke::decode_message`], and derives the two
//! session keys with the TLS exporter ([`ke::EXPORTER_LABEL`], [`ke::exporter_context`]).
//! Randomness (unique identifiers, nonces) is passed in by the caller, from a CSPRNG in the
//! agent and from a seeded one in tests, so every exchange here can be replayed exactly.
//!
//! Only AEAD_AES_SIV_CMAC_256 (IANA 15) is offered and accepted: it is the one algorithm every
//! NTS implementation must support, and SIV keeps a repeated nonce from being catastrophic.

pub mod aead;
pub mod cookie;
pub mod ef;
pub mod ke;

pub use aead::{AeadKey, AuthenticationFailed};
pub use cookie::{CookieError, CookieJar, CookieKeys, MasterKey, SessionKeys};
pub use ef::{ClientRequest, ResponseError, ServerVerdict, VerifiedResponse};
pub use ke::{Agreement, KeFailure, Record, RecordError};
