//! Symmetric keys on arbitrary input, both ways it arrives: a tenant's key file (untrusted,
//! parsed by the operator and again by every agent) and a request's MAC trailer. Whatever
//! parses must round-trip through the one spelling agents read; an error never quotes the
//! input; a MAC check never panics, and only a digest made with the key verifies.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stratum_ntp::packet::Packet;
use stratum_ntp::symmetric::{MacCheck, SymmetricKeys};

const KEYS: &str = "1 AES128 HEX:000102030405060708090a0b0c0d0e0f\n2 SHA1 ASCII:sha1-key\n3 MD5 md5-key\n";

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    if which & 1 == 0 {
        let Ok(text) = std::str::from_utf8(rest) else {
            return;
        };
        match SymmetricKeys::parse(text) {
            Ok(keys) => {
                let again = SymmetricKeys::parse(&keys.to_key_file()).expect("our spelling parses");
                assert_eq!(again, keys, "the spelling agents read holds other keys");
            }
            Err(error) => {
                // Messages are fixed words and numbers: nothing longer than a number of the
                // input's shows up in them.
                let message = error.to_string();
                for word in text.split_whitespace().filter(|w| w.len() > 16) {
                    assert!(!message.contains(word), "{message} quotes {word}");
                }
            }
        }
        return;
    }
    let keys = SymmetricKeys::parse(KEYS).expect("static");
    let Ok(view) = Packet::parse(rest) else {
        return;
    };
    if let MacCheck::Valid { key_id } = keys.check(rest, view.mac) {
        // A valid MAC is what signing the same bytes gives.
        let mac = view.mac.expect("valid means present");
        let signed_len = rest.len() - mac.len();
        let mut buffer = [0u8; 2048];
        let Some(slot) = buffer.get_mut(..rest.len()) else {
            return;
        };
        slot.copy_from_slice(rest);
        let len = keys.sign(key_id, &mut buffer, signed_len).expect("the key exists");
        assert_eq!(&buffer[..len], rest, "a MAC verified that signing does not produce");
    }
});
