//! PROXY protocol headers (v1 lines and v2 binary headers with TLVs) from arbitrary bytes:
//! nothing panics, and an address is returned only from a header that holds it where the format
//! puts it.
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use wskeep::proxy_protocol::{parse_v1, parse_v2, V2_MAX_BODY, V2_SIGNATURE};

fuzz_target!(|data: &[u8]| {
    if let Ok(source) = parse_v1(data) {
        assert!(data.len() <= 107 && data.starts_with(b"PROXY ") && data.ends_with(b"\r\n"));
        if let Some(addr) = source {
            let line = std::str::from_utf8(data).expect("a parsed line is text");
            let fields: Vec<&str> = line.trim_end().split(' ').collect();
            assert_eq!(fields.len(), 6, "{line}");
            assert_eq!(fields[2].parse::<IpAddr>().ok(), Some(addr.ip()), "{line}");
            assert_eq!(fields[4], addr.port().to_string(), "{line}");
        }
    }
    // The same bytes behind a v2 signature, so the fuzzer need not find it.
    let mut header = V2_SIGNATURE.to_vec();
    header.extend_from_slice(data);
    for candidate in [data, &header[..]] {
        if let Ok(source) = parse_v2(candidate) {
            assert!(candidate.starts_with(&V2_SIGNATURE));
            let len = usize::from(u16::from_be_bytes([candidate[14], candidate[15]]));
            assert!(len <= V2_MAX_BODY && candidate.len() == 16 + len);
            assert_eq!(candidate[12] >> 4, 2, "version 2 only");
            if let Some(addr) = source {
                assert_eq!(candidate[12] & 0x0f, 1, "an address only from a PROXY command");
                let carried: IpAddr = match candidate[13] {
                    0x11 => <[u8; 4]>::try_from(&candidate[16..20]).unwrap().into(),
                    0x21 => <[u8; 16]>::try_from(&candidate[16..32]).unwrap().into(),
                    other => panic!("an address from family byte {other:#x}"),
                };
                assert_eq!(carried, addr.ip());
            }
        }
    }
});
