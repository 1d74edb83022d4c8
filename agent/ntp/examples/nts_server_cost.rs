//! What the server side of one NTS request costs in `stratum-ntp` alone: open the cookie,
//! verify the request, seal a fresh cookie and the authenticated response (the four AES-SIV
//! operations of RFC 8915 §5.7), with no sockets. For instruction counts, which do not depend
//! on what else the machine runs:
//!
//! ```text
//! cargo build --release -p stratum-ntp --example nts_server_cost
//! valgrind --tool=callgrind target/release/examples/nts_server_cost 20000
//! callgrind_annotate callgrind.out.<pid> | head -40
//! ```
//!
//! Without valgrind it prints the wall time per request, which is only a rough figure; the
//! comparison with chronyd is `make bench`'s NTS rows.
#![allow(clippy::expect_used)]

use rand::SeedableRng;
use rand::rngs::StdRng;
use stratum_ntp::nts::ef::{ClientRequest, ServerVerdict, build_response, verify_request};
use stratum_ntp::nts::{AeadKey, CookieJar, CookieKeys, MasterKey, SessionKeys};
use stratum_ntp::packet::{HEADER_LEN, Packet};
use stratum_ntp::time::NtpTimestamp;

fn main() {
    let requests: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(100_000);
    let mut rng = StdRng::seed_from_u64(1);
    // As the agent holds them: the TimeService's master key, bound to one tenant.
    let master = MasterKey {
        id: 1,
        key: AeadKey::from_bytes([3; 32]),
    };
    let cookie_keys = CookieKeys::new(master, None).bound_to(b"team-a/ntp");
    let session = SessionKeys {
        c2s: AeadKey::from_bytes([1; 32]),
        s2c: AeadKey::from_bytes([2; 32]),
    };
    // The header the agent's own sources send.
    let header = Packet::client_request(6, NtpTimestamp::ZERO);
    // A client's steady state: a full jar, so one cookie and no placeholders per request.
    let datagrams: Vec<Vec<u8>> = (0..64)
        .map(|_| {
            let cookies = vec![cookie_keys.seal(&session, &mut rng); 8];
            let mut jar = CookieJar::new(session.clone(), cookies);
            ClientRequest::build(&header, &mut jar, &mut rng)
                .expect("a full jar")
                .datagram
        })
        .collect();
    let reply = [0u8; HEADER_LEN];
    let started = std::time::Instant::now();
    let mut bytes = 0;
    for datagram in datagrams.iter().cycle().take(requests) {
        let ServerVerdict::Authenticated(request) = verify_request(datagram, &cookie_keys) else {
            panic!("a request built with the server's own cookie did not authenticate");
        };
        bytes += build_response(&reply, &request, &cookie_keys, &mut rng).len();
    }
    let elapsed = started.elapsed();
    println!(
        "{requests} requests, {:.3} µs each (wall), {} bytes per response",
        elapsed.as_secs_f64() * 1e6 / requests.max(1) as f64,
        bytes / requests.max(1)
    );
}
