//! Invariant: errors are fine, panics are bugs. Any byte string fed to the frame decoder gives
//! a frame, "need more", or an error; never a panic, never an allocation beyond MAX_FRAME.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = si_proto::frame::decode_frame(data);
    let _ = si_proto::frame::read_frame(&mut &data[..]);
    let _ = si_proto::frame::decode_msg(data);
});
