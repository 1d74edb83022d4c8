//! Symmetric-key authentication of NTP packets, sans-IO: the MAC trailer of RFC 5905 §7.3
//! (a 4-byte key id and a digest after the header), computed with AES-128-CMAC (RFC 8573) or,
//! for devices that know nothing newer, the legacy `H(key || packet)` digests with SHA-1 and
//! MD5; and the key file those keys come from.
//!
//! The key file is the one devices and daemons already use, one key per line:
//! `ID TYPE KEY`, `#` starting a comment. `TYPE` is `AES128` (also ntpsec's `AES`, `CMAC`),
//! `SHA1` or `MD5` (also ntpd's `M`). `KEY` is `HEX:<hex>` or `ASCII:<text>` (chrony's
//! spelling), or bare as ntpd and ntpsec read it: up to 20 characters are ASCII, longer ones
//! hex. Parsing errors name the line and never quote the key.
//!
//! A request whose MAC names an unknown key or does not verify is not served: the caller
//! answers it with a crypto-NAK (the header and a zero key id, RFC 5905 §7.4) or not at all.

use std::collections::BTreeMap;
use std::fmt;

use aes::Aes128;
use cmac::{Cmac, Mac as _};
use md5::{Digest as _, Md5};
use sha1::Sha1;
use subtle::ConstantTimeEq;
use thiserror::Error;

use crate::packet::{HEADER_LEN, KissCode};

/// Length of the key id in front of every MAC.
pub const KEY_ID_LEN: usize = 4;
/// Length of a crypto-NAK's trailer: a zero key id and no digest.
pub const CRYPTO_NAK_LEN: usize = HEADER_LEN + KEY_ID_LEN;
/// Most keys one file may hold: every key is kept in memory by every agent.
pub const MAX_KEYS: usize = 1024;
/// Longest SHA-1 or MD5 key accepted (ntpd reads at most 64 bytes of hex).
pub const MAX_LEGACY_KEY_LEN: usize = 64;
/// A bare key of at most this many characters is ASCII, a longer one hex (ntpd and ntpsec).
const BARE_ASCII_MAX: usize = 20;

/// How a key authenticates packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MacAlgorithm {
    /// AES-128-CMAC (RFC 8573): a 16-byte MAC from a 16-byte key. The one to use.
    AesCmac128,
    /// SHA-1 over the key and the packet: a 20-byte digest. Legacy, for devices only.
    Sha1Legacy,
    /// MD5 over the key and the packet: a 16-byte digest. Legacy, for devices only.
    Md5Legacy,
}

impl MacAlgorithm {
    /// Length of the digest after the key id.
    pub fn digest_len(self) -> usize {
        match self {
            MacAlgorithm::AesCmac128 | MacAlgorithm::Md5Legacy => 16,
            MacAlgorithm::Sha1Legacy => 20,
        }
    }

    /// The name a key file uses (chrony's spelling).
    pub fn name(self) -> &'static str {
        match self {
            MacAlgorithm::AesCmac128 => "AES128",
            MacAlgorithm::Sha1Legacy => "SHA1",
            MacAlgorithm::Md5Legacy => "MD5",
        }
    }

    /// Whether only a device that can do nothing better should use it.
    pub fn is_legacy(self) -> bool {
        !matches!(self, MacAlgorithm::AesCmac128)
    }

    /// Reads a key file's type column, in any case.
    pub fn parse(name: &str) -> Option<Self> {
        match name.to_ascii_uppercase().as_str() {
            "AES128" | "AES-128" | "AES" | "AES-128-CMAC" | "AES128CMAC" | "CMAC" => {
                Some(MacAlgorithm::AesCmac128)
            }
            "SHA1" | "SHA-1" => Some(MacAlgorithm::Sha1Legacy),
            "MD5" | "M" => Some(MacAlgorithm::Md5Legacy),
            _ => None,
        }
    }
}

/// One key. Its bytes never appear in `Debug` output.
#[derive(Clone)]
pub struct SymmetricKey {
    algorithm: MacAlgorithm,
    secret: Box<[u8]>,
    /// The CMAC with its key schedule done once, cloned per packet.
    cmac: Option<Cmac<Aes128>>,
}

impl PartialEq for SymmetricKey {
    fn eq(&self, other: &Self) -> bool {
        self.algorithm == other.algorithm && bool::from(self.secret.ct_eq(&other.secret))
    }
}

impl fmt::Debug for SymmetricKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SymmetricKey")
            .field("algorithm", &self.algorithm)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl SymmetricKey {
    /// A key of `algorithm` made of `secret`; AES-128-CMAC needs exactly 16 bytes, the legacy
    /// digests 1 to [`MAX_LEGACY_KEY_LEN`].
    pub fn new(algorithm: MacAlgorithm, secret: &[u8]) -> Result<Self, KeyProblem> {
        let cmac = match algorithm {
            MacAlgorithm::AesCmac128 => Some(
                <Cmac<Aes128>>::new_from_slice(secret)
                    .map_err(|_| KeyProblem::AesKeyLength(secret.len()))?,
            ),
            MacAlgorithm::Sha1Legacy | MacAlgorithm::Md5Legacy => {
                if secret.is_empty() || secret.len() > MAX_LEGACY_KEY_LEN {
                    return Err(KeyProblem::LegacyKeyLength(secret.len()));
                }
                None
            }
        };
        Ok(Self {
            algorithm,
            secret: secret.into(),
            cmac,
        })
    }

    /// The algorithm.
    pub fn algorithm(&self) -> MacAlgorithm {
        self.algorithm
    }

    /// Writes the digest of `data` into `out` (at least [`MacAlgorithm::digest_len`] bytes)
    /// and returns its length.
    fn digest(&self, data: &[u8], out: &mut [u8]) -> Option<usize> {
        let len = self.algorithm.digest_len();
        let out = out.get_mut(..len)?;
        match (&self.cmac, self.algorithm) {
            (Some(cmac), _) => {
                let mut mac = cmac.clone();
                mac.update(data);
                out.copy_from_slice(&mac.finalize().into_bytes());
            }
            (None, MacAlgorithm::Sha1Legacy) => {
                let mut hash = Sha1::new();
                hash.update(&self.secret);
                hash.update(data);
                out.copy_from_slice(&hash.finalize());
            }
            (None, _) => {
                let mut hash = Md5::new();
                hash.update(&self.secret);
                hash.update(data);
                out.copy_from_slice(&hash.finalize());
            }
        }
        Some(len)
    }
}

/// Why a key cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum KeyProblem {
    #[error("an AES128 key must be 16 bytes, this one has {0}")]
    AesKeyLength(usize),
    #[error("a SHA1 or MD5 key must have 1 to {MAX_LEGACY_KEY_LEN} bytes, this one has {0}")]
    LegacyKeyLength(usize),
}

/// Why a key file was refused: the line (1-based) and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum KeyFileError {
    #[error("line {line}: expected `ID TYPE KEY`")]
    Shape { line: usize },
    #[error("line {line}: key id must be a number from 1 to 4294967295 (0 marks a crypto-NAK)")]
    KeyId { line: usize },
    #[error("line {line}: key id {id} appears twice")]
    DuplicateId { line: usize, id: u32 },
    #[error("line {line}: unknown key type (use AES128, or SHA1 or MD5 for legacy devices)")]
    Type { line: usize },
    #[error("line {line}: the key is not valid hex")]
    Hex { line: usize },
    #[error(
        "line {line}: a bare key longer than {BARE_ASCII_MAX} characters is read as hex and this one is not; write HEX: or ASCII: in front"
    )]
    AmbiguousBareKey { line: usize },
    #[error("line {line}: {problem}")]
    Key { line: usize, problem: KeyProblem },
    #[error("more than {MAX_KEYS} keys")]
    TooManyKeys,
    #[error("no keys")]
    Empty,
}

/// A set of keys by key id (never 0).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SymmetricKeys {
    keys: BTreeMap<u32, SymmetricKey>,
}

impl SymmetricKeys {
    /// Reads a key file (see the module docs). A file without a key is refused: a tenant that
    /// names a key Secret expects its devices to be served.
    pub fn parse(text: &str) -> Result<Self, KeyFileError> {
        let mut keys = BTreeMap::new();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let content = raw.split('#').next().unwrap_or_default().trim();
            if content.is_empty() {
                continue;
            }
            let mut columns = content.split_whitespace();
            let (Some(id), Some(kind), Some(key), None) = (
                columns.next(),
                columns.next(),
                columns.next(),
                columns.next(),
            ) else {
                return Err(KeyFileError::Shape { line });
            };
            let id = id
                .parse::<u32>()
                .ok()
                .filter(|id| *id != 0)
                .ok_or(KeyFileError::KeyId { line })?;
            let algorithm = MacAlgorithm::parse(kind).ok_or(KeyFileError::Type { line })?;
            let secret = decode_key(key, line)?;
            let key = SymmetricKey::new(algorithm, &secret)
                .map_err(|problem| KeyFileError::Key { line, problem })?;
            if keys.len() == MAX_KEYS {
                return Err(KeyFileError::TooManyKeys);
            }
            if keys.insert(id, key).is_some() {
                return Err(KeyFileError::DuplicateId { line, id });
            }
        }
        if keys.is_empty() {
            return Err(KeyFileError::Empty);
        }
        Ok(Self { keys })
    }

    /// The same keys as a key file in one spelling (`ID TYPE HEX:...`), ids ascending; what
    /// [`Self::parse`] reads back into equal keys.
    pub fn to_key_file(&self) -> String {
        let mut text = String::new();
        for (id, key) in &self.keys {
            let hex: String = key.secret.iter().map(|b| format!("{b:02x}")).collect();
            text.push_str(&format!("{id} {} HEX:{hex}\n", key.algorithm.name()));
        }
        text
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether there is no key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The key with `id`.
    pub fn get(&self, id: u32) -> Option<&SymmetricKey> {
        self.keys.get(&id)
    }

    /// Each key id with its algorithm, ids ascending (what status may show: no key bytes).
    pub fn algorithms(&self) -> impl Iterator<Item = (u32, MacAlgorithm)> + '_ {
        self.keys.iter().map(|(id, key)| (*id, key.algorithm))
    }

    /// Checks the MAC trailer `mac` (as [`crate::packet::PacketView::mac`] splits it) of
    /// `packet`, the whole datagram.
    pub fn check(&self, packet: &[u8], mac: Option<&[u8]>) -> MacCheck {
        let Some(mac) = mac else {
            return MacCheck::Absent;
        };
        let Some((id_bytes, digest)) = mac.split_first_chunk::<KEY_ID_LEN>() else {
            return MacCheck::Malformed;
        };
        let key_id = u32::from_be_bytes(*id_bytes);
        if key_id == 0 {
            // A zero key id with no digest is a crypto-NAK: servers send it, clients never.
            return MacCheck::Malformed;
        }
        let Some(key) = self.keys.get(&key_id) else {
            return MacCheck::UnknownKey { key_id };
        };
        let Some(signed) = packet
            .len()
            .checked_sub(mac.len())
            .and_then(|n| packet.get(..n))
        else {
            return MacCheck::Malformed;
        };
        if digest.len() != key.algorithm.digest_len() {
            return MacCheck::BadMac { key_id };
        }
        let mut expected = [0u8; 20];
        let Some(len) = key.digest(signed, &mut expected) else {
            return MacCheck::Malformed;
        };
        if bool::from(expected[..len].ct_eq(digest)) {
            MacCheck::Valid { key_id }
        } else {
            MacCheck::BadMac { key_id }
        }
    }

    /// Appends key `key_id`'s MAC to the packet in `buffer[..len]`; returns the new length, or
    /// `None` when the key is unknown or `buffer` too short.
    pub fn sign(&self, key_id: u32, buffer: &mut [u8], len: usize) -> Option<usize> {
        let key = self.keys.get(&key_id)?;
        let total = len + KEY_ID_LEN + key.algorithm.digest_len();
        let buffer = buffer.get_mut(..total)?;
        let (signed, trailer) = buffer.split_at_mut(len);
        let (id_slot, digest_slot) = trailer.split_at_mut(KEY_ID_LEN);
        id_slot.copy_from_slice(&key_id.to_be_bytes());
        key.digest(signed, digest_slot)?;
        Some(total)
    }
}

/// What a request's MAC trailer says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MacCheck {
    /// No MAC: an unauthenticated request.
    Absent,
    /// The MAC verifies with key `key_id`: answer signed with the same key.
    Valid { key_id: u32 },
    /// No key with that id.
    UnknownKey { key_id: u32 },
    /// The key exists and the digest does not match it (wrong key, wrong type, tampering).
    BadMac { key_id: u32 },
    /// A trailer no client sends (a zero key id, or no room for one).
    Malformed,
}

/// The kiss code of a crypto-NAK's header (RFC 5905 §7.4's "CRYP": authentication failed), so
/// a client that ignores the zero key id still sees a Kiss-o'-Death and no time.
pub const CRYPTO_NAK_KISS: KissCode = KissCode::Other(*b"CRYP");

/// Writes a crypto-NAK (a reply header, [`CRYPTO_NAK_KISS`] for a server, and a zero key id,
/// RFC 5905 §7.4) into `out`; returns its length, or `None` when `out` is too short.
pub fn crypto_nak(header: &[u8; HEADER_LEN], out: &mut [u8]) -> Option<usize> {
    let out = out.get_mut(..CRYPTO_NAK_LEN)?;
    out[..HEADER_LEN].copy_from_slice(header);
    out[HEADER_LEN..].fill(0);
    Some(CRYPTO_NAK_LEN)
}

/// Whether a reply is a crypto-NAK: exactly a header and a zero key id.
pub fn is_crypto_nak(packet: &[u8]) -> bool {
    packet.len() == CRYPTO_NAK_LEN && packet[HEADER_LEN..] == [0; KEY_ID_LEN]
}

fn decode_key(key: &str, line: usize) -> Result<Vec<u8>, KeyFileError> {
    if let Some(hex) = strip_prefix_ignore_case(key, "HEX:") {
        return decode_hex(hex).ok_or(KeyFileError::Hex { line });
    }
    if let Some(ascii) = strip_prefix_ignore_case(key, "ASCII:") {
        return Ok(ascii.as_bytes().to_vec());
    }
    if key.len() <= BARE_ASCII_MAX {
        return Ok(key.as_bytes().to_vec());
    }
    decode_hex(key).ok_or(KeyFileError::AmbiguousBareKey { line })
}

fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &text[prefix.len()..])
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if hex.is_empty() || !hex.len().is_multiple_of(2) {
        return None;
    }
    hex.as_bytes()
        .chunks_exact(2)
        .map(|pair| {
            let text = std::str::from_utf8(pair).ok()?;
            u8::from_str_radix(text, 16).ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const FILE: &str = "\
# devices of the lab
1 AES128 HEX:000102030405060708090a0b0c0d0e0f
2 SHA1 HEX:3132333435363738393031323334353637383930   # a switch
3 MD5 ASCII:legacy-md5-key
4 m shortbare
";

    fn request() -> Vec<u8> {
        let mut packet = vec![0u8; HEADER_LEN];
        packet[0] = 0b00_100_011; // v4 client
        packet[40..48].copy_from_slice(&0x1122_3344_5566_7788u64.to_be_bytes());
        packet
    }

    fn signed(keys: &SymmetricKeys, id: u32) -> Vec<u8> {
        let mut buffer = request();
        buffer.resize(HEADER_LEN + 24, 0);
        let len = keys.sign(id, &mut buffer, HEADER_LEN).unwrap();
        buffer.truncate(len);
        buffer
    }

    #[test]
    fn a_key_file_of_every_spelling_parses_and_round_trips() {
        let keys = SymmetricKeys::parse(FILE).unwrap();
        let summary: Vec<_> = keys.algorithms().collect();
        assert_eq!(
            summary,
            [
                (1, MacAlgorithm::AesCmac128),
                (2, MacAlgorithm::Sha1Legacy),
                (3, MacAlgorithm::Md5Legacy),
                (4, MacAlgorithm::Md5Legacy)
            ]
        );
        assert_eq!(SymmetricKeys::parse(&keys.to_key_file()).unwrap(), keys);
        assert!(!MacAlgorithm::AesCmac128.is_legacy());
        assert!(MacAlgorithm::Md5Legacy.is_legacy());
    }

    #[test]
    fn each_algorithm_signs_what_it_verifies_with_its_own_length() {
        let keys = SymmetricKeys::parse(FILE).unwrap();
        for (id, len) in [(1, 20), (2, 24), (3, 20), (4, 20)] {
            let packet = signed(&keys, id);
            assert_eq!(packet.len(), HEADER_LEN + len);
            let view = crate::packet::Packet::parse(&packet).unwrap();
            assert_eq!(
                keys.check(&packet, view.mac),
                MacCheck::Valid { key_id: id }
            );
        }
    }

    /// RFC 4493's first AES-CMAC example (empty message): the digest is the standard one,
    /// not a look-alike; and the legacy digests are H(key || packet) as ntpd computes them.
    #[test]
    fn digests_match_the_published_constructions() {
        let key = SymmetricKey::new(
            MacAlgorithm::AesCmac128,
            &decode_hex("2b7e151628aed2a6abf7158809cf4f3c").unwrap(),
        )
        .unwrap();
        let mut out = [0u8; 20];
        assert_eq!(key.digest(b"", &mut out), Some(16));
        assert_eq!(
            out[..16],
            decode_hex("bb1d6929e95937287fa37d129b756746").unwrap()[..]
        );
        let md5 = SymmetricKey::new(MacAlgorithm::Md5Legacy, b"k").unwrap();
        md5.digest(b"abc", &mut out).unwrap();
        assert_eq!(out[..16], Md5::digest(b"kabc")[..]);
        let sha1 = SymmetricKey::new(MacAlgorithm::Sha1Legacy, b"k").unwrap();
        sha1.digest(b"abc", &mut out).unwrap();
        assert_eq!(out[..20], Sha1::digest(b"kabc")[..]);
    }

    #[test]
    fn wrong_keys_ids_and_tampering_never_verify() {
        let keys = SymmetricKeys::parse(FILE).unwrap();
        let other = SymmetricKeys::parse("1 AES128 HEX:ffffffffffffffffffffffffffffffff").unwrap();
        let forged = signed(&other, 1);
        let view = crate::packet::Packet::parse(&forged).unwrap();
        assert_eq!(
            keys.check(&forged, view.mac),
            MacCheck::BadMac { key_id: 1 }
        );

        let mut unknown = signed(&keys, 1);
        unknown[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&9u32.to_be_bytes());
        let view = crate::packet::Packet::parse(&unknown).unwrap();
        assert_eq!(
            keys.check(&unknown, view.mac),
            MacCheck::UnknownKey { key_id: 9 }
        );

        // Key 1 (CMAC, 16 bytes) named on a 20-byte digest: a type confusion, not a match.
        let mut confused = signed(&keys, 2);
        confused[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&1u32.to_be_bytes());
        let view = crate::packet::Packet::parse(&confused).unwrap();
        assert_eq!(
            keys.check(&confused, view.mac),
            MacCheck::BadMac { key_id: 1 }
        );

        for byte in 0..HEADER_LEN + 20 {
            if (HEADER_LEN..HEADER_LEN + 4).contains(&byte) {
                continue;
            }
            let mut tampered = signed(&keys, 1);
            tampered[byte] ^= 0x01;
            let view = crate::packet::Packet::parse(&tampered).unwrap();
            assert_eq!(
                keys.check(&tampered, view.mac),
                MacCheck::BadMac { key_id: 1 },
                "byte {byte}"
            );
        }

        let plain = request();
        assert_eq!(keys.check(&plain, None), MacCheck::Absent);
        let mut nak = [0u8; CRYPTO_NAK_LEN];
        crypto_nak(&plain.clone().try_into().unwrap(), &mut nak).unwrap();
        assert!(is_crypto_nak(&nak));
        let view = crate::packet::Packet::parse(&nak).unwrap();
        assert_eq!(keys.check(&nak, view.mac), MacCheck::Malformed);
    }

    #[test]
    fn bad_files_name_the_line_and_never_the_key() {
        for (text, expected) in [
            ("1 AES128", KeyFileError::Shape { line: 1 }),
            ("\n0 MD5 abc", KeyFileError::KeyId { line: 2 }),
            ("-1 MD5 abc", KeyFileError::KeyId { line: 1 }),
            ("1 SHA256 abc", KeyFileError::Type { line: 1 }),
            ("1 MD5 HEX:zz", KeyFileError::Hex { line: 1 }),
            ("1 MD5 HEX:abc", KeyFileError::Hex { line: 1 }),
            (
                "1 MD5 this-secret-is-longer-than-twenty",
                KeyFileError::AmbiguousBareKey { line: 1 },
            ),
            (
                "1 AES128 ASCII:short-secret",
                KeyFileError::Key {
                    line: 1,
                    problem: KeyProblem::AesKeyLength(12),
                },
            ),
            (
                "1 MD5 a\n1 SHA1 b",
                KeyFileError::DuplicateId { line: 2, id: 1 },
            ),
            ("# only a comment\n", KeyFileError::Empty),
        ] {
            let error = SymmetricKeys::parse(text).unwrap_err();
            assert_eq!(error, expected, "{text}");
            let message = error.to_string();
            for secret in ["short-secret", "this-secret", "zz"] {
                assert!(!message.contains(secret), "{message}");
            }
        }
        let many: String = (1..=MAX_KEYS as u32 + 1)
            .map(|id| format!("{id} MD5 k\n"))
            .collect();
        assert_eq!(
            SymmetricKeys::parse(&many).unwrap_err(),
            KeyFileError::TooManyKeys
        );
        let debug = format!("{:?}", SymmetricKeys::parse(FILE).unwrap());
        assert!(
            !debug.contains("legacy-md5-key") && debug.contains("<redacted>"),
            "{debug}"
        );
    }
}
