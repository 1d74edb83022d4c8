//! Decode arbitrary bytes as an NTS-KE message; whatever decodes must re-encode to records
//! that decode the same, and both sides of the negotiation must answer it without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stratum_ntp::nts::ke::{
    MAX_MESSAGE_LEN, Negotiation, client_agreement, decode_message, encode_message,
    server_negotiate,
};

fuzz_target!(|data: &[u8]| {
    let Ok(Some((records, used))) = decode_message(data) else {
        return;
    };
    assert!(used <= data.len() && used <= MAX_MESSAGE_LEN);
    let encoded = encode_message(&records);
    let (again, again_used) = decode_message(&encoded)
        .expect("our encoding decodes")
        .expect("our encoding is complete");
    assert_eq!(again, records, "re-encoded records differ");
    assert_eq!(again_used, encoded.len());
    if let Ok(agreement) = client_agreement(&records) {
        assert!(!agreement.cookies.is_empty() && agreement.cookies.len() <= 8);
    }
    if let Negotiation::Refused(answer) = server_negotiate(&records) {
        assert!(decode_message(&encode_message(&answer)).is_ok_and(|m| m.is_some()));
    }
});
