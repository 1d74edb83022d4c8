//! Parse arbitrary datagrams; whatever parses must re-encode byte for byte, and its
//! extension fields must tile the extension region exactly.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stratum_ntp::packet::{HEADER_LEN, Packet};

fuzz_target!(|data: &[u8]| {
    let Ok(view) = Packet::parse(data) else {
        return;
    };
    let mut out = [0u8; 2048];
    if data.len() <= out.len() {
        let written = view.encode_into(&mut out).expect("buffer is large enough");
        assert_eq!(&out[..written], data, "re-encoding differs from input");
    }
    let fields_len: usize = view.extension_fields().map(|f| f.value.len() + 4).sum();
    assert_eq!(fields_len, view.extension_bytes.len());
    assert_eq!(view.wire_len(), data.len());
    assert_eq!(view.header.to_bytes()[..], data[..HEADER_LEN]);
    let _ = view.header.kiss_code();
});
