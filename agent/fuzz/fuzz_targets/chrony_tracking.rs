//! chronyd's tracking reply as the agent reads it from a node's command port: whatever comes
//! back on that socket (another program may hold port 323). Never panics; a reply accepted is
//! a version-6 tracking reply to this sequence, and every figure it yields is finite.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stratum_agent::host_daemons::chrony::{TRACKING_REPLY_LEN, parse_tracking_reply};

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let (sequence, reply) = data.split_at(4);
    let sequence = u32::from_be_bytes([sequence[0], sequence[1], sequence[2], sequence[3]]);
    if let Ok(t) = parse_tracking_reply(reply, sequence) {
        assert!(reply.len() >= TRACKING_REPLY_LEN);
        assert_eq!(reply[0], 6);
        assert_eq!(&reply[16..20], &sequence.to_be_bytes());
        for x in [
            t.system_offset_seconds,
            t.last_offset_seconds,
            t.rms_offset_seconds,
            t.frequency_ppm,
            t.root_distance_seconds(),
        ] {
            assert!(x.is_finite(), "{t:?}");
        }
        let _ = t.reference();
    }
});
