//! Cookies: the server seals a session's keys into one, so it keeps no per-client state; the
//! client keeps a jar of them and spends one per request (RFC 8915 §6).
//!
//! Stratum's cookie is `key id (4) || nonce (16) || AES-SIV(master key; AD = key id, nonce;
//! aead (2) || reserved (2) || C2S (32) || S2C (32))`, 104 bytes. Master keys are shared by all
//! agents of a TimeService (the operator keeps them in a Secret), so a cookie sealed by one
//! agent opens at any other the Service routes to. Keys rotate: the current one seals, the
//! current and the previous one open, so a cookie lives between one and two rotation periods.
//!
//! A server may bind its keys to a context ([`CookieKeys::bound_to`], the agent uses the
//! tenant's id): the context joins the associated data, so a cookie issued for one tenant does
//! not open on another tenant's port even though both share the TimeService's master keys.

use super::aead::{AEAD_AES_SIV_CMAC_256, AeadKey, KEY_LEN, NONCE_LEN, TAG_LEN};
use super::ke::{COOKIES_PER_EXCHANGE, MAX_COOKIE_LEN};
use rand::CryptoRng;
use std::collections::VecDeque;
use thiserror::Error;

const KEY_ID_LEN: usize = 4;
const PLAINTEXT_LEN: usize = 2 + 2 + 2 * KEY_LEN;
/// Length of every cookie a Stratum server issues (a multiple of 4, so it needs no padding in
/// an extension field).
pub const COOKIE_LEN: usize = KEY_ID_LEN + NONCE_LEN + TAG_LEN + PLAINTEXT_LEN;

/// The two keys of one NTS session, as the TLS exporter derived them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionKeys {
    /// Authenticates requests.
    pub c2s: AeadKey,
    /// Authenticates responses.
    pub s2c: AeadKey,
}

/// One cookie master key and the id that names it inside cookies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterKey {
    pub id: u32,
    pub key: AeadKey,
}

/// The keys a server seals and opens cookies with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CookieKeys {
    current: MasterKey,
    previous: Option<MasterKey>,
    /// Published one rotation ahead: servers that learn of a rotation later than others still
    /// open the cookies those others already seal with it.
    next: Option<MasterKey>,
    /// Joins the associated data after the key id: cookies open only under the same context.
    context: Vec<u8>,
}

/// Why a cookie does not open. The server answers each with an NTS NAK.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum CookieError {
    #[error("the cookie is {0} bytes; this server's are {COOKIE_LEN}")]
    WrongLength(usize),
    #[error("the cookie was sealed with master key {0}, which this server no longer holds")]
    UnknownKey(u32),
    #[error("the cookie does not authenticate under its master key")]
    Forged,
    #[error("the cookie names AEAD algorithm {0}")]
    UnsupportedAead(u16),
    #[error("this server holds no cookie keys yet")]
    NoKeys,
}

impl CookieKeys {
    /// Keys after a rotation: `current` seals, both open. Equal ids are not two keys, so a
    /// `previous` with the current id is dropped.
    pub fn new(current: MasterKey, previous: Option<MasterKey>) -> Self {
        let previous = previous.filter(|p| p.id != current.id);
        Self {
            current,
            previous,
            next: None,
            context: Vec::new(),
        }
    }

    /// The same keys, also opening cookies sealed with `next`, the key the coming rotation
    /// makes current (dropped when its id is the current's or the previous').
    pub fn with_next(self, next: Option<MasterKey>) -> Self {
        let next = next.filter(|n| n.id != self.current.id && Some(n.id) != self.previous_id());
        Self { next, ..self }
    }

    /// The id of the key the coming rotation makes current, if published.
    pub fn next_id(&self) -> Option<u32> {
        self.next.as_ref().map(|n| n.id)
    }

    /// The same keys, sealing and opening only cookies of `context` (a tenant's id).
    pub fn bound_to(&self, context: &[u8]) -> Self {
        Self {
            context: context.to_vec(),
            ..self.clone()
        }
    }

    /// The id of the key cookies are sealed with before a rotation, if still held.
    pub fn previous_id(&self) -> Option<u32> {
        self.previous.as_ref().map(|p| p.id)
    }

    fn associated_data(&self, id: &[u8]) -> Vec<u8> {
        [id, &self.context].concat()
    }

    /// The id of the key new cookies are sealed with.
    pub fn current_id(&self) -> u32 {
        self.current.id
    }

    /// Seals `keys` into a fresh cookie.
    pub fn seal(&self, keys: &SessionKeys, rng: &mut impl CryptoRng) -> Vec<u8> {
        let mut nonce = [0; NONCE_LEN];
        rng.fill_bytes(&mut nonce);
        let id = self.current.id.to_be_bytes();
        let mut plaintext = Vec::with_capacity(PLAINTEXT_LEN);
        plaintext.extend_from_slice(&AEAD_AES_SIV_CMAC_256.to_be_bytes());
        plaintext.extend_from_slice(&[0, 0]);
        plaintext.extend_from_slice(keys.c2s.as_bytes());
        plaintext.extend_from_slice(keys.s2c.as_bytes());
        let mut cookie = Vec::with_capacity(COOKIE_LEN);
        cookie.extend_from_slice(&id);
        cookie.extend_from_slice(&nonce);
        let associated = self.associated_data(&id);
        cookie.extend_from_slice(&self.current.key.seal(&nonce, &associated, &plaintext));
        cookie
    }

    /// Opens a cookie sealed with the current, the previous or the next key.
    pub fn open(&self, cookie: &[u8]) -> Result<SessionKeys, CookieError> {
        if cookie.len() != COOKIE_LEN {
            return Err(CookieError::WrongLength(cookie.len()));
        }
        let (id_bytes, rest) = cookie.split_at(KEY_ID_LEN);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let id = u32::from_be_bytes([id_bytes[0], id_bytes[1], id_bytes[2], id_bytes[3]]);
        let master = std::iter::once(&self.current)
            .chain(&self.previous)
            .chain(&self.next)
            .find(|k| k.id == id)
            .ok_or(CookieError::UnknownKey(id))?;
        let plaintext = master
            .key
            .open(nonce, &self.associated_data(id_bytes), sealed)
            .map_err(|_| CookieError::Forged)?;
        let (aead, keys) = plaintext.split_at(4);
        let aead = u16::from_be_bytes([aead[0], aead[1]]);
        if aead != AEAD_AES_SIV_CMAC_256 {
            return Err(CookieError::UnsupportedAead(aead));
        }
        let (c2s, s2c) = keys.split_at(KEY_LEN);
        // The plaintext length is fixed by the cookie length checked above.
        match (AeadKey::from_slice(c2s), AeadKey::from_slice(s2c)) {
            (Some(c2s), Some(s2c)) => Ok(SessionKeys { c2s, s2c }),
            _ => Err(CookieError::Forged),
        }
    }
}

/// A client's cookies for one upstream, with the session keys they belong to. Each cookie is
/// spent once (reusing one would let an observer link requests); a client out of cookies, or
/// whose responses stop authenticating, runs the key exchange again.
#[derive(Debug, Clone)]
pub struct CookieJar {
    keys: SessionKeys,
    cookies: VecDeque<Vec<u8>>,
}

impl CookieJar {
    pub fn new(keys: SessionKeys, cookies: Vec<Vec<u8>>) -> Self {
        let mut jar = Self {
            keys,
            cookies: VecDeque::new(),
        };
        jar.add(cookies);
        jar
    }

    pub fn keys(&self) -> &SessionKeys {
        &self.keys
    }

    /// Cookies left to spend.
    pub fn len(&self) -> usize {
        self.cookies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cookies.is_empty()
    }

    /// Takes the oldest cookie for a request.
    pub fn take(&mut self) -> Option<Vec<u8>> {
        self.cookies.pop_front()
    }

    /// Keeps cookies from a response, up to [`COOKIES_PER_EXCHANGE`]; empty and oversized
    /// ones are dropped.
    pub fn add(&mut self, cookies: impl IntoIterator<Item = Vec<u8>>) {
        for cookie in cookies {
            if cookie.is_empty() || cookie.len() > MAX_COOKIE_LEN {
                continue;
            }
            if self.cookies.len() == COOKIES_PER_EXCHANGE {
                self.cookies.pop_front();
            }
            self.cookies.push_back(cookie);
        }
    }

    /// Placeholders to send with the next request (asked before [`Self::take`]), so that the
    /// jar is full again after its response, which carries one cookie for the one spent plus
    /// one per placeholder.
    pub fn placeholders_wanted(&self) -> usize {
        COOKIES_PER_EXCHANGE.saturating_sub(self.cookies.len())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn session(seed: u8) -> SessionKeys {
        SessionKeys {
            c2s: AeadKey::from_bytes([seed; KEY_LEN]),
            s2c: AeadKey::from_bytes([seed.wrapping_add(1); KEY_LEN]),
        }
    }

    fn master(id: u32) -> MasterKey {
        MasterKey {
            id,
            key: AeadKey::from_bytes([id as u8; KEY_LEN]),
        }
    }

    #[test]
    fn a_cookie_sealed_by_one_agent_opens_at_another_holding_the_same_master_keys() {
        let mut rng = StdRng::seed_from_u64(1);
        let agent_a = CookieKeys::new(master(1), None);
        let agent_b = CookieKeys::new(master(1), None);
        let cookie = agent_a.seal(&session(10), &mut rng);
        assert_eq!(cookie.len(), COOKIE_LEN);
        assert_eq!(COOKIE_LEN % 4, 0);
        assert_eq!(agent_b.open(&cookie).unwrap(), session(10));
        // Two cookies for the same keys differ, so a client's requests cannot be linked.
        assert_ne!(agent_a.seal(&session(10), &mut rng), cookie);
        // The keys are not readable in the cookie.
        assert!(!cookie.windows(KEY_LEN).any(|w| w == [10; KEY_LEN]));
    }

    #[test]
    fn old_cookies_open_for_one_rotation_and_then_fail_cleanly() {
        let mut rng = StdRng::seed_from_u64(2);
        let before = CookieKeys::new(master(1), None);
        let cookie = before.seal(&session(3), &mut rng);
        let after_one = CookieKeys::new(master(2), Some(master(1)));
        assert_eq!(after_one.open(&cookie).unwrap(), session(3));
        assert_eq!(after_one.current_id(), 2);
        let after_two = CookieKeys::new(master(3), Some(master(2)));
        assert_eq!(after_two.open(&cookie), Err(CookieError::UnknownKey(1)));
    }

    #[test]
    fn an_agent_that_rotated_first_is_understood_by_one_that_has_not_yet() {
        // Rotation reaches agents at different times (a Secret volume updates within a
        // minute or so): the key about to become current is published one rotation ahead.
        let mut rng = StdRng::seed_from_u64(5);
        let rotated = CookieKeys::new(master(2), Some(master(1))).with_next(Some(master(3)));
        let lagging = CookieKeys::new(master(1), None).with_next(Some(master(2)));
        let cookie = rotated.seal(&session(9), &mut rng);
        assert_eq!(lagging.open(&cookie).unwrap(), session(9));
        assert_eq!(lagging.next_id(), Some(2));
        // The next key never seals, and one equal to a held key is not a third key.
        assert_eq!(cookie[..4], 2u32.to_be_bytes());
        let dup = CookieKeys::new(master(2), Some(master(1))).with_next(Some(master(1)));
        assert_eq!(dup.next_id(), None);
        // Without `next`, the lagging agent refuses the cookie: what the publication prevents.
        let unpublished = CookieKeys::new(master(1), None);
        assert_eq!(unpublished.open(&cookie), Err(CookieError::UnknownKey(2)));
    }

    #[test]
    fn a_cookie_bound_to_one_tenant_does_not_open_for_another() {
        let mut rng = StdRng::seed_from_u64(4);
        let keys = CookieKeys::new(master(1), None);
        let tenant_a = keys.bound_to(b"team-a/ntp");
        let cookie = tenant_a.seal(&session(7), &mut rng);
        // Another agent serving tenant a opens it; tenant b (same master keys) does not, nor
        // does the unbound set.
        assert_eq!(
            keys.bound_to(b"team-a/ntp").open(&cookie).unwrap(),
            session(7)
        );
        assert_eq!(
            keys.bound_to(b"team-b/ntp").open(&cookie),
            Err(CookieError::Forged)
        );
        assert_eq!(keys.open(&cookie), Err(CookieError::Forged));
        // Rotation keeps the binding.
        let rotated = CookieKeys::new(master(2), Some(master(1))).bound_to(b"team-a/ntp");
        assert_eq!(rotated.open(&cookie).unwrap(), session(7));
        assert_eq!(rotated.previous_id(), Some(1));
    }

    #[test]
    fn forged_truncated_and_foreign_cookies_do_not_open() {
        let mut rng = StdRng::seed_from_u64(3);
        let keys = CookieKeys::new(master(1), None);
        let cookie = keys.seal(&session(5), &mut rng);
        for at in [0, 4, 20, COOKIE_LEN - 1] {
            let mut flipped = cookie.clone();
            flipped[at] ^= 0x40;
            assert!(keys.open(&flipped).is_err(), "bit flipped at {at}");
        }
        assert_eq!(
            keys.open(&cookie[..COOKIE_LEN - 4]),
            Err(CookieError::WrongLength(COOKIE_LEN - 4))
        );
        // Another TimeService's agents hold other master keys under the same id.
        let other = CookieKeys::new(
            MasterKey {
                id: 1,
                key: AeadKey::from_bytes([99; KEY_LEN]),
            },
            None,
        );
        assert_eq!(other.open(&cookie), Err(CookieError::Forged));
    }

    #[test]
    fn the_jar_spends_each_cookie_once_and_asks_for_enough_to_refill() {
        let mut jar = CookieJar::new(session(1), (0..8).map(|i| vec![i; 100]).collect());
        assert_eq!(jar.len(), 8);
        assert_eq!(
            jar.placeholders_wanted(),
            0,
            "a full jar spends one and gets one back"
        );
        assert_eq!(jar.take(), Some(vec![0; 100]));
        for _ in 0..4 {
            jar.take();
        }
        assert_eq!(jar.len(), 3);
        assert_eq!(
            jar.placeholders_wanted(),
            5,
            "3 - 1 + 1 + 5 = 8 after the response"
        );
        jar.add([vec![], vec![7; MAX_COOKIE_LEN + 1], vec![8; 100]]);
        assert_eq!(jar.len(), 4, "empty and oversized cookies are dropped");
        jar.add((0..10).map(|i| vec![i; 100]));
        assert_eq!(jar.len(), COOKIES_PER_EXCHANGE);
        assert_eq!(jar.take(), Some(vec![2; 100]), "the oldest were pushed out");
        while jar.take().is_some() {}
        assert!(jar.is_empty());
    }
}
