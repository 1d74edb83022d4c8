//! Arbitrary datagrams at both ends of NTS: the server's request check and the client's
//! response check must never panic, and nothing an attacker can write without the keys may
//! authenticate. The first byte picks whether the rest is mutated from a valid request, a
//! valid response or taken as is, so the fuzzer reaches the AEAD paths, not only the parser.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rand::SeedableRng;
use rand::rngs::StdRng;
use stratum_ntp::nts::ef::{
    ClientRequest, ServerVerdict, build_response, verify_request, verify_response,
};
use stratum_ntp::nts::{AeadKey, CookieJar, CookieKeys, MasterKey, SessionKeys};
use stratum_ntp::packet::{HEADER_LEN, Packet};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut rng = StdRng::seed_from_u64(1);
    let keys = CookieKeys::new(
        MasterKey {
            id: 7,
            key: AeadKey::from_bytes([7; 32]),
        },
        None,
    );
    let session = SessionKeys {
        c2s: AeadKey::from_bytes([1; 32]),
        s2c: AeadKey::from_bytes([2; 32]),
    };
    let mut jar = CookieJar::new(session.clone(), vec![keys.seal(&session, &mut rng)]);
    let mut header_bytes = [0u8; HEADER_LEN];
    header_bytes[0] = 0x23; // v4, client
    let Ok(header) = Packet::parse(&header_bytes).map(|v| v.header) else {
        return;
    };
    let Some(request) = ClientRequest::build(&header, &mut jar, &mut rng) else {
        return;
    };
    let ServerVerdict::Authenticated(authenticated) = verify_request(&request.datagram, &keys)
    else {
        panic!("a valid request did not authenticate");
    };
    let mut reply = [0u8; HEADER_LEN];
    reply[0] = 0x24;
    let response = build_response(&reply, &authenticated, &keys, &mut rng);

    // Overwrite a valid message with the fuzzer's bytes from some offset on.
    let splice = |valid: &[u8]| -> Vec<u8> {
        let Some((&at, tail)) = rest.split_first() else {
            return valid.to_vec();
        };
        let at = usize::from(at).min(valid.len());
        let mut out = valid[..at].to_vec();
        out.extend_from_slice(tail);
        out
    };
    match mode % 3 {
        0 => {
            let datagram = splice(&request.datagram);
            if let ServerVerdict::Authenticated(a) = verify_request(&datagram, &keys) {
                // Only the untouched request authenticates: nothing may follow its authenticator.
                assert_eq!(datagram, request.datagram, "forged request authenticated");
                assert_eq!(a.unique_id, authenticated.unique_id);
            }
        }
        1 => {
            let datagram = splice(&response);
            if verify_response(&datagram, &request.unique_id, &session.s2c).is_ok() {
                assert_eq!(datagram, response, "forged response verified");
            }
        }
        _ => {
            let _ = verify_request(rest, &keys);
            assert!(verify_response(rest, &request.unique_id, &session.s2c).is_err());
        }
    }
});
