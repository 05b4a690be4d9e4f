//! Invariant: a manifest from anywhere decodes to a validated manifest or an error; no panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = si_proto::Manifest::decode(data);
});
