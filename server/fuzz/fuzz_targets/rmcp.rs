//! Invariant: errors are fine, panics are bugs. Any bytes a "BMC" sends back, through every
//! RMCP+ and IPMI response parser, give a value or an error.
#![no_main]
use libfuzzer_sys::fuzz_target;
use si_bmc::{ipmi, rmcp};

fuzz_target!(|data: &[u8]| {
    let _ = rmcp::decode(data, None);
    let _ = rmcp::parse_response(data);
    let _ = rmcp::parse_open_session(data);
    for cs in [3u8, 17] {
        if let Ok(cs) = rmcp::CipherSuite::from_id(cs) {
            let _ = rmcp::parse_rakp2(data, cs);
            let _ = rmcp::parse_rakp4(data, cs);
        }
    }
    let _ = ipmi::decode_sel(data);
    let _ = ipmi::decode_fru(data);
    let _ = ipmi::decode_boot_flags(data);
    if data.len() > 16 {
        let key: [u8; 16] = data[..16].try_into().unwrap();
        let _ = rmcp::decrypt(&key, &data[16..]);
    }
});
