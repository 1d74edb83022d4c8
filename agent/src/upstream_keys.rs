//! Symmetric keys for upstreams (RFC 8573 AES-CMAC, legacy SHA1/MD5): each request to a keyed
//! upstream is signed with its key, and a reply reaches the core only if it is signed with the
//! same key. Free of IO: the run loop sends the datagrams and runs the checks.
//!
//! The rule, as for NTS: a keyed upstream is never polled unauthenticated. While its key file
//! has not been read (or lacks its key id) the poll is withheld, and an unsigned, NAKed or
//! badly signed reply is dropped and counted, whatever it says.

use std::sync::Arc;

use stratum_api::agent_config::UpstreamConfig;
use stratum_ntp::packet::{HEADER_LEN, MAX_MAC_LEN, Packet};
use stratum_ntp::symmetric::{MacCheck, SymmetricKeys, is_crypto_nak};

/// A signed request and how to check its reply.
#[derive(Debug)]
pub struct SignedPoll {
    pub datagram: Vec<u8>,
    pub check: MacReplyCheck,
}

/// How to check the reply to one signed request; moves into the task that waits for it.
#[derive(Debug, Clone)]
pub struct MacReplyCheck {
    /// The configured name, for metrics.
    pub source: String,
    key_id: u32,
    keys: Arc<SymmetricKeys>,
}

/// Why a keyed upstream's reply was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MacReplyError {
    /// Not NTP.
    Malformed,
    /// No MAC: never taken from a keyed upstream.
    Unsigned,
    /// The server could not verify our MAC (a key it does not hold, or holds otherwise).
    CryptoNak,
    /// Signed with another key id than the request.
    OtherKey,
    /// Signed with our key id, and the digest does not verify.
    BadMac,
}

impl MacReplyError {
    /// A fixed label per reason, for metrics.
    pub fn label(self) -> &'static str {
        match self {
            MacReplyError::Malformed => "malformed",
            MacReplyError::Unsigned => "unsigned",
            MacReplyError::CryptoNak => "crypto_nak",
            MacReplyError::OtherKey => "other_key",
            MacReplyError::BadMac => "bad_mac",
        }
    }
}

impl MacReplyCheck {
    /// The reply's header when `datagram` is signed with the request's key.
    pub fn check(&self, datagram: &[u8]) -> Result<[u8; HEADER_LEN], MacReplyError> {
        if is_crypto_nak(datagram) {
            return Err(MacReplyError::CryptoNak);
        }
        let view = Packet::parse(datagram).map_err(|_| MacReplyError::Malformed)?;
        match self.keys.check(datagram, view.mac) {
            MacCheck::Valid { key_id } if key_id == self.key_id => datagram
                .get(..HEADER_LEN)
                .and_then(|h| h.try_into().ok())
                .ok_or(MacReplyError::Malformed),
            MacCheck::Absent => Err(MacReplyError::Unsigned),
            MacCheck::BadMac { key_id } if key_id == self.key_id => Err(MacReplyError::BadMac),
            MacCheck::Valid { .. } | MacCheck::BadMac { .. } | MacCheck::UnknownKey { .. } => {
                Err(MacReplyError::OtherKey)
            }
            MacCheck::Malformed => Err(MacReplyError::Malformed),
        }
    }
}

/// The core's `request` to `upstream` signed with its key, `keys_of` giving the keys read from
/// a key file (by path); `None` when the upstream has a key that is not there (withhold the
/// poll).
pub fn sign_poll(
    request: &[u8; HEADER_LEN],
    upstream: &UpstreamConfig,
    keys_of: impl FnOnce(&str) -> Option<Arc<SymmetricKeys>>,
) -> Option<SignedPoll> {
    let key = upstream.key.as_ref()?;
    let keys = keys_of(&key.keys_file)?;
    let mut buffer = [0u8; HEADER_LEN + MAX_MAC_LEN];
    buffer[..HEADER_LEN].copy_from_slice(request);
    let len = keys.sign(key.key_id, &mut buffer, HEADER_LEN)?;
    Some(SignedPoll {
        datagram: buffer[..len].to_vec(),
        check: MacReplyCheck {
            source: upstream.host.clone(),
            key_id: key.key_id,
            keys,
        },
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::collections::BTreeMap;
    use stratum_api::agent_config::{UpstreamKeyConfig, UpstreamKind};

    const KEYS: &str = "1 AES128 HEX:000102030405060708090a0b0c0d0e0f\n2 SHA1 ASCII:sha1\n";

    fn upstream(key_id: u32) -> UpstreamConfig {
        UpstreamConfig {
            host: "ntp.example".into(),
            kind: UpstreamKind::Server,
            port: 123,
            iburst: true,
            min_poll: 6,
            max_poll: 10,
            max_sources: 1,
            nts: false,
            nts_port: None,
            key: Some(UpstreamKeyConfig {
                keys_file: "/keys/upstream-a.keys".into(),
                key_id,
            }),
        }
    }

    fn loaded() -> BTreeMap<String, Arc<SymmetricKeys>> {
        [(
            "/keys/upstream-a.keys".to_owned(),
            Arc::new(SymmetricKeys::parse(KEYS).unwrap()),
        )]
        .into()
    }

    /// What the server answers: a header signed with key `id` of `keys`.
    fn reply(keys: &str, id: u32) -> Vec<u8> {
        let mut buffer = [0u8; 72];
        buffer[0] = 0x24;
        let len = SymmetricKeys::parse(keys)
            .unwrap()
            .sign(id, &mut buffer, 48)
            .unwrap();
        buffer[..len].to_vec()
    }

    #[test]
    fn requests_are_signed_and_only_replies_signed_with_the_same_key_reach_the_core() {
        let request = [0x23u8; 48];
        let poll = sign_poll(&request, &upstream(1), |p| loaded().get(p).cloned()).unwrap();
        assert_eq!(poll.datagram.len(), 48 + 4 + 16);
        let view = Packet::parse(&poll.datagram).unwrap();
        assert_eq!(
            SymmetricKeys::parse(KEYS)
                .unwrap()
                .check(&poll.datagram, view.mac),
            MacCheck::Valid { key_id: 1 }
        );
        let good = reply(KEYS, 1);
        assert_eq!(poll.check.check(&good).unwrap()[..], good[..48]);
        assert_eq!(poll.check.check(&good[..48]), Err(MacReplyError::Unsigned));
        assert_eq!(
            poll.check.check(&reply(KEYS, 2)),
            Err(MacReplyError::OtherKey)
        );
        let forged = reply("1 AES128 HEX:ffffffffffffffffffffffffffffffff", 1);
        assert_eq!(poll.check.check(&forged), Err(MacReplyError::BadMac));
        let mut nak = good[..48].to_vec();
        nak.extend_from_slice(&[0; 4]);
        assert_eq!(poll.check.check(&nak), Err(MacReplyError::CryptoNak));
        assert_eq!(poll.check.check(&[1, 2, 3]), Err(MacReplyError::Malformed));
    }

    #[test]
    fn without_its_key_a_keyed_upstream_is_not_polled() {
        let request = [0x23u8; 48];
        assert!(sign_poll(&request, &upstream(1), |_| None).is_none());
        assert!(
            sign_poll(&request, &upstream(7), |p| loaded().get(p).cloned()).is_none(),
            "id not in the file"
        );
        let mut plain = upstream(1);
        plain.key = None;
        assert!(sign_poll(&request, &plain, |p| loaded().get(p).cloned()).is_none());
    }
}
