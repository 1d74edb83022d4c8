//! NTS for upstreams: the session of each `nts` upstream (its cookie jar and the NTP address
//! its key exchange named), turning the core's plain requests into authenticated ones, and
//! checking replies before the core sees them. Free of IO: the run loop runs the key
//! exchanges ([`crate::nts_ke`]) and sends the datagrams.
//!
//! The rule this module exists for: an address learned from a key exchange is never polled
//! without NTS. Its polls are withheld while there is no cookie, and a reply that does not
//! authenticate never reaches the core, whatever it says.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

use stratum_ntp::nts::ef::{ClientRequest, ResponseError, UNIQUE_ID_LEN, verify_response};
use stratum_ntp::nts::{AeadKey, CookieJar};
use stratum_ntp::packet::{HEADER_LEN, Packet};

/// One upstream's session.
#[derive(Debug)]
struct Session {
    jar: CookieJar,
    address: SocketAddr,
    /// The configured name, for metrics.
    source: String,
}

/// What to send for a poll.
#[derive(Debug)]
pub enum Outgoing {
    /// Not an NTS address: the core's request as it is.
    Plain,
    /// The authenticated request, and how to check its reply.
    Nts {
        datagram: Vec<u8>,
        check: ReplyCheck,
    },
    /// An NTS address without a cookie (or whose request did not parse): send nothing, and
    /// run the upstream's key exchange again.
    Withheld { upstream: String, source: String },
}

/// How to check the reply to one NTS request; moves into the task that waits for it.
#[derive(Debug, Clone)]
pub struct ReplyCheck {
    pub upstream: String,
    /// The configured name, for metrics.
    pub source: String,
    unique_id: [u8; UNIQUE_ID_LEN],
    s2c: AeadKey,
}

/// A reply that authenticated: its header for the core and the cookies it brought.
#[derive(Debug)]
pub struct Authenticated {
    pub header: [u8; HEADER_LEN],
    pub cookies: Vec<Vec<u8>>,
}

impl ReplyCheck {
    /// Verifies `datagram` against the request this check belongs to.
    pub fn check(&self, datagram: &[u8]) -> Result<Authenticated, ResponseError> {
        let verified = verify_response(datagram, &self.unique_id, &self.s2c)?;
        Ok(Authenticated {
            header: verified.header.to_bytes(),
            cookies: verified.cookies,
        })
    }
}

/// A fixed label per way a reply can fail, for metrics.
pub fn failure_label(error: &ResponseError) -> &'static str {
    match error {
        ResponseError::Malformed(_) => "malformed",
        ResponseError::WrongUniqueId => "wrong_unique_id",
        ResponseError::Nak => "nak",
        ResponseError::Unauthenticated => "unauthenticated",
        ResponseError::BadAuthenticator => "bad_authenticator",
        ResponseError::AuthenticationFailed => "authentication_failed",
        ResponseError::TrailingFields => "trailing_fields",
    }
}

/// The sessions of all `nts` upstreams, by upstream key (`host:port`).
#[derive(Debug, Default)]
pub struct NtsUpstreams {
    sessions: BTreeMap<String, Session>,
    by_address: HashMap<SocketAddr, String>,
}

impl NtsUpstreams {
    /// Installs the session a key exchange for `upstream` (configured name `source`) gave;
    /// replaces any older one.
    pub fn install(&mut self, upstream: &str, source: &str, address: SocketAddr, jar: CookieJar) {
        if let Some(old) = self.sessions.remove(upstream) {
            // The old address stays NTS-only while any session claims it.
            if !self.sessions.values().any(|s| s.address == old.address) {
                self.by_address.remove(&old.address);
            }
        }
        self.by_address.insert(address, upstream.to_owned());
        self.sessions.insert(
            upstream.to_owned(),
            Session {
                jar,
                address,
                source: source.to_owned(),
            },
        );
    }

    /// Keeps only the sessions of upstreams still configured with NTS.
    pub fn retain(&mut self, nts_upstreams: &[String]) {
        self.sessions.retain(|key, _| nts_upstreams.contains(key));
        let sessions = &self.sessions;
        self.by_address.retain(|_, key| sessions.contains_key(key));
    }

    /// The request to send for the core's `request` to `address`.
    pub fn outgoing(
        &mut self,
        address: SocketAddr,
        request: &[u8],
        rng: &mut impl rand::CryptoRng,
    ) -> Outgoing {
        let Some(upstream) = self.by_address.get(&address) else {
            return Outgoing::Plain;
        };
        let Some(session) = self.sessions.get_mut(upstream) else {
            return Outgoing::Withheld {
                upstream: upstream.clone(),
                source: upstream.clone(),
            };
        };
        let withheld = |session: &Session| Outgoing::Withheld {
            upstream: upstream.clone(),
            source: session.source.clone(),
        };
        let Ok(view) = Packet::parse(request) else {
            return withheld(session);
        };
        match ClientRequest::build(&view.header, &mut session.jar, rng) {
            Some(built) => Outgoing::Nts {
                datagram: built.datagram,
                check: ReplyCheck {
                    upstream: upstream.clone(),
                    source: session.source.clone(),
                    unique_id: built.unique_id,
                    s2c: session.jar.keys().s2c.clone(),
                },
            },
            None => withheld(session),
        }
    }

    /// Keeps the cookies an authenticated reply brought. Cookies for a session that was
    /// replaced meanwhile belong to the old keys and are dropped.
    pub fn add_cookies(&mut self, check: &ReplyCheck, cookies: Vec<Vec<u8>>) {
        if let Some(session) = self.sessions.get_mut(&check.upstream)
            && session.jar.keys().s2c == check.s2c
        {
            session.jar.add(cookies);
        }
    }

    /// Cookies held per upstream, by configured name, for metrics and status.
    pub fn cookies_held(&self) -> impl Iterator<Item = (&str, usize)> {
        self.sessions
            .values()
            .map(|s| (s.source.as_str(), s.jar.len()))
    }

    /// Whether `address` belongs to an NTS upstream.
    pub fn is_nts(&self, address: SocketAddr) -> bool {
        self.by_address.contains_key(&address)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use stratum_ntp::nts::SessionKeys;
    use stratum_ntp::nts::cookie::{CookieKeys, MasterKey};
    use stratum_ntp::nts::ef::{ServerVerdict, build_response, verify_request};

    fn server_keys() -> CookieKeys {
        CookieKeys::new(
            MasterKey {
                id: 1,
                key: AeadKey::from_bytes([1; 32]),
            },
            None,
        )
    }

    fn session(cookies: usize, rng: &mut StdRng) -> CookieJar {
        let keys = SessionKeys {
            c2s: AeadKey::from_bytes([2; 32]),
            s2c: AeadKey::from_bytes([3; 32]),
        };
        let cookies = (0..cookies)
            .map(|_| server_keys().seal(&keys, rng))
            .collect();
        CookieJar::new(keys, cookies)
    }

    fn core_request() -> Vec<u8> {
        let mut bytes = vec![0u8; HEADER_LEN];
        bytes[0] = 0x23;
        bytes[40..48].copy_from_slice(&[9; 8]);
        bytes
    }

    const NTS: &str = "nts.example:123";

    fn addr(last: u8) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, last], 123))
    }

    #[test]
    fn a_plain_address_is_sent_as_the_core_built_it() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut nts = NtsUpstreams::default();
        nts.install(NTS, "nts.example", addr(1), session(8, &mut rng));
        assert!(matches!(
            nts.outgoing(addr(2), &core_request(), &mut rng),
            Outgoing::Plain
        ));
    }

    #[test]
    fn an_nts_address_is_authenticated_and_its_reply_checked_before_the_core_sees_it() {
        let mut rng = StdRng::seed_from_u64(2);
        let mut nts = NtsUpstreams::default();
        nts.install(NTS, "nts.example", addr(1), session(8, &mut rng));
        let Outgoing::Nts { datagram, check } = nts.outgoing(addr(1), &core_request(), &mut rng)
        else {
            panic!("not authenticated");
        };
        assert_eq!(
            &datagram[40..48],
            &[9; 8],
            "the core's transmit timestamp is kept"
        );
        let ServerVerdict::Authenticated(request) = verify_request(&datagram, &server_keys())
        else {
            panic!("the server does not accept it");
        };
        let mut reply = [0u8; HEADER_LEN];
        reply[0] = 0x24;
        reply[1] = 2;
        let response = build_response(&reply, &request, &server_keys(), &mut rng);
        let authenticated = check.check(&response).unwrap();
        assert_eq!(authenticated.header, reply);
        assert_eq!(authenticated.cookies.len(), 1);
        nts.add_cookies(&check, authenticated.cookies);
        assert_eq!(nts.cookies_held().collect::<Vec<_>>(), [("nts.example", 8)]);

        // The same reply with its time changed does not get through.
        let mut forged = response.clone();
        forged[47] ^= 1;
        assert_eq!(
            check.check(&forged).map(|_| ()),
            Err(ResponseError::AuthenticationFailed)
        );
        // Nor does a plain answer from the same address.
        assert!(check.check(&reply).is_err());
    }

    #[test]
    fn out_of_cookies_the_poll_is_withheld_never_sent_plain() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut nts = NtsUpstreams::default();
        nts.install(NTS, "nts.example", addr(1), session(2, &mut rng));
        for _ in 0..2 {
            assert!(matches!(
                nts.outgoing(addr(1), &core_request(), &mut rng),
                Outgoing::Nts { .. }
            ));
        }
        match nts.outgoing(addr(1), &core_request(), &mut rng) {
            Outgoing::Withheld { upstream, source } => {
                assert_eq!((upstream.as_str(), source.as_str()), (NTS, "nts.example"));
            }
            other => panic!("expected withheld, got {other:?}"),
        }
        // A request that does not parse is withheld too, not passed on.
        assert!(matches!(
            nts.outgoing(addr(1), &[0x23; 10], &mut rng),
            Outgoing::Withheld { .. }
        ));
    }

    #[test]
    fn cookies_from_before_a_rekey_are_not_mixed_into_the_new_session() {
        let mut rng = StdRng::seed_from_u64(4);
        let mut nts = NtsUpstreams::default();
        nts.install(NTS, "nts.example", addr(1), session(8, &mut rng));
        let Outgoing::Nts { check, .. } = nts.outgoing(addr(1), &core_request(), &mut rng) else {
            panic!("not authenticated");
        };
        let fresh_keys = SessionKeys {
            c2s: AeadKey::from_bytes([4; 32]),
            s2c: AeadKey::from_bytes([5; 32]),
        };
        let fresh = CookieJar::new(fresh_keys, vec![vec![1; 100]]);
        nts.install(NTS, "nts.example", addr(1), fresh);
        nts.add_cookies(&check, vec![vec![2; 100]]);
        assert_eq!(nts.cookies_held().collect::<Vec<_>>(), [("nts.example", 1)]);
    }

    #[test]
    fn an_upstream_removed_from_the_config_loses_its_session_and_its_address_turns_plain() {
        let mut rng = StdRng::seed_from_u64(5);
        let mut nts = NtsUpstreams::default();
        nts.install(NTS, "nts.example", addr(1), session(8, &mut rng));
        nts.install("other:123", "other", addr(3), session(8, &mut rng));
        nts.retain(&["other:123".to_owned()]);
        assert!(!nts.is_nts(addr(1)));
        assert!(nts.is_nts(addr(3)));
        // A re-key that moves the upstream to another address frees the old one.
        nts.install("other:123", "other", addr(4), session(8, &mut rng));
        assert!(!nts.is_nts(addr(3)));
        assert!(nts.is_nts(addr(4)));
    }
}
