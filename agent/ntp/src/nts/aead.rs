//! AEAD_AES_SIV_CMAC_256 (RFC 5297), the one algorithm NTS must support, from the RustCrypto
//! `aes-siv` crate. The NTS convention (RFC 8915 §5.6) puts the associated data first and the
//! nonce last in the S2V input; the output is the 16-byte synthetic IV followed by the
//! ciphertext.

use aes_siv::KeyInit;
use aes_siv::siv::Aes128Siv;
use std::fmt;
use thiserror::Error;

/// IANA AEAD identifier of AEAD_AES_SIV_CMAC_256.
pub const AEAD_AES_SIV_CMAC_256: u16 = 15;
/// Key length of AEAD_AES_SIV_CMAC_256 (two AES-128 keys).
pub const KEY_LEN: usize = 32;
/// The synthetic IV that doubles as the authentication tag.
pub const TAG_LEN: usize = 16;
/// The nonce length Stratum sends; RFC 8915 asks for at least 16 bytes with SIV.
pub const NONCE_LEN: usize = 16;

/// A 256-bit AES-SIV key. Its `Debug` never shows the bytes, so keys cannot leak into logs.
#[derive(Clone, PartialEq, Eq)]
pub struct AeadKey([u8; KEY_LEN]);

impl fmt::Debug for AeadKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AeadKey(<redacted>)")
    }
}

/// The tag did not verify: wrong key, or bytes changed on the way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("authentication failed")]
pub struct AuthenticationFailed;

impl AeadKey {
    pub const fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// A key from exactly [`KEY_LEN`] bytes (for example the TLS exporter's output).
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }

    /// The raw bytes, for sealing inside a cookie or writing into a Secret.
    pub const fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    fn cipher(&self) -> Aes128Siv {
        Aes128Siv::new(&self.0.into())
    }

    /// Encrypts `plaintext`, authenticating it with `associated` and `nonce`.
    pub fn seal(&self, nonce: &[u8], associated: &[u8], plaintext: &[u8]) -> Vec<u8> {
        // Two headers are far below the 126 that S2V allows, so encryption cannot fail.
        self.cipher()
            .encrypt([associated, nonce], plaintext)
            .unwrap_or_default()
    }

    /// Decrypts and verifies what [`Self::seal`] produced.
    pub fn open(
        &self,
        nonce: &[u8],
        associated: &[u8],
        ciphertext: &[u8],
    ) -> Result<Vec<u8>, AuthenticationFailed> {
        if ciphertext.len() < TAG_LEN {
            return Err(AuthenticationFailed);
        }
        self.cipher()
            .decrypt([associated, nonce], ciphertext)
            .map_err(|_| AuthenticationFailed)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// RFC 5297 appendix A.1 (deterministic mode): the published key, AD, plaintext and
    /// output. With no nonce, S2V runs over the AD alone, which `Aes128Siv` does when given one
    /// header; this pins that the crate is the AES-SIV of the RFC, not a look-alike.
    #[test]
    fn the_cipher_matches_the_rfc_5297_test_vector() {
        let key: [u8; 32] =
            hex("fffefdfc fbfaf9f8 f7f6f5f4 f3f2f1f0 f0f1f2f3 f4f5f6f7 f8f9fafb fcfdfeff")
                .try_into()
                .unwrap();
        let ad = hex("10111213 14151617 18191a1b 1c1d1e1f 20212223 24252627");
        let plaintext = hex("11223344 55667788 99aabbcc ddee");
        let expected = hex("85632d07 c6e8f37f 950acd32 0a2ecc93 40c02b96 90c4dc04 daef7f6a fe5c");
        let mut cipher = Aes128Siv::new(&key.into());
        assert_eq!(cipher.encrypt([&ad[..]], &plaintext).unwrap(), expected);
    }

    #[test]
    fn sealed_bytes_open_only_with_the_same_key_nonce_and_associated_data() {
        let key = AeadKey::from_bytes([7; KEY_LEN]);
        let sealed = key.seal(&[1; NONCE_LEN], b"header", b"secret cookie");
        assert_eq!(sealed.len(), TAG_LEN + 13);
        assert_eq!(
            key.open(&[1; NONCE_LEN], b"header", &sealed).unwrap(),
            b"secret cookie"
        );
        let other = AeadKey::from_bytes([8; KEY_LEN]);
        assert_eq!(
            other.open(&[1; NONCE_LEN], b"header", &sealed),
            Err(AuthenticationFailed)
        );
        assert!(key.open(&[2; NONCE_LEN], b"header", &sealed).is_err());
        assert!(key.open(&[1; NONCE_LEN], b"headex", &sealed).is_err());
        let mut flipped = sealed.clone();
        flipped[TAG_LEN] ^= 1;
        assert!(key.open(&[1; NONCE_LEN], b"header", &flipped).is_err());
        assert!(
            key.open(&[1; NONCE_LEN], b"header", &sealed[..TAG_LEN - 1])
                .is_err()
        );
    }

    #[test]
    fn a_key_never_shows_its_bytes_in_debug_output() {
        let shown = format!("{:?}", AeadKey::from_bytes([0xab; KEY_LEN]));
        assert!(!shown.contains("ab") && !shown.contains("171"), "{shown}");
    }

    fn hex(s: &str) -> Vec<u8> {
        let digits: Vec<u8> = s
            .bytes()
            .filter(u8::is_ascii_hexdigit)
            .map(|b| (b as char).to_digit(16).unwrap() as u8)
            .collect();
        digits
            .chunks(2)
            .map(|pair| pair[0] << 4 | pair[1])
            .collect()
    }
}
