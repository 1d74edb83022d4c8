//! Arbitrary datagrams at both ends of NTS: the server's request check and the client's
//! response check must never panic, and nothing an attacker can write without the keys may
//! authenticate. The first byte picks whether the rest is spliced into a valid request, into a
//! valid response or taken as is, so the fuzzer reaches the AEAD paths, not only the parser.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rand::SeedableRng;
use rand::rngs::StdRng;
use stratum_ntp::nts::ef::{
    AuthenticatedRequest, ClientRequest, ServerVerdict, build_response, verify_request,
    verify_response,
};
use stratum_ntp::nts::{AeadKey, CookieJar, CookieKeys, MasterKey, SessionKeys};
use stratum_ntp::packet::{HEADER_LEN, Packet};

/// One valid exchange, built once (deterministically) so that each run spends its time on
/// the checks under test rather than on building the fixture again.
struct Exchange {
    keys: CookieKeys,
    session: SessionKeys,
    request: ClientRequest,
    authenticated: AuthenticatedRequest,
    response: Vec<u8>,
}

fn exchange() -> &'static Exchange {
    static EXCHANGE: OnceLock<Exchange> = OnceLock::new();
    EXCHANGE.get_or_init(|| {
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
        let cookies = (0..4).map(|_| keys.seal(&session, &mut rng)).collect();
        let mut jar = CookieJar::new(session.clone(), cookies);
        let mut header_bytes = [0u8; HEADER_LEN];
        header_bytes[0] = 0x23; // v4, client
        let header = Packet::parse(&header_bytes).expect("a v4 header").header;
        let request = ClientRequest::build(&header, &mut jar, &mut rng).expect("a cookie");
        let ServerVerdict::Authenticated(authenticated) = verify_request(&request.datagram, &keys)
        else {
            panic!("a valid request did not authenticate");
        };
        let mut reply = [0u8; HEADER_LEN];
        reply[0] = 0x24;
        let response = build_response(&reply, &authenticated, &keys, &mut rng);
        Exchange {
            keys,
            session,
            request,
            authenticated,
            response,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let x = exchange();
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
            let datagram = splice(&x.request.datagram);
            if let ServerVerdict::Authenticated(a) = verify_request(&datagram, &x.keys) {
                // Only the untouched request authenticates: nothing may follow its authenticator.
                assert_eq!(datagram, x.request.datagram, "forged request authenticated");
                assert_eq!(a.unique_id, x.authenticated.unique_id);
            }
        }
        1 => {
            let datagram = splice(&x.response);
            if verify_response(&datagram, &x.request.unique_id, &x.session.s2c).is_ok() {
                assert_eq!(datagram, x.response, "forged response verified");
            }
        }
        _ => {
            let _ = verify_request(rest, &x.keys);
            assert!(verify_response(rest, &x.request.unique_id, &x.session.s2c).is_err());
        }
    }
});
