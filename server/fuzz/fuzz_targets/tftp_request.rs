//! Invariant: errors are fine, panics are bugs. Any datagram on UDP 69 parses to a packet or
//! an error; a parsed request's filename normalises to a path inside the root or is refused;
//! the options it carries negotiate to values within the server's limits.
#![no_main]
use libfuzzer_sys::fuzz_target;
use si_boot::tftp::{packet, root, TftpConfig};

fuzz_target!(|data: &[u8]| {
    let Ok(p) = packet::parse(data) else {
        return;
    };
    if let packet::Packet::Request(req) = p {
        if let Ok(rel) = root::normalize(&req.filename) {
            assert!(!rel.starts_with('/') && !rel.split('/').any(|c| c == ".." || c.is_empty()));
        }
        let cfg = TftpConfig::default();
        let n = si_boot::tftp::negotiated(&cfg, &req.options, 1 << 20);
        assert!((8..=usize::from(cfg.max_blksize)).contains(&n.0) || n.0 == 512);
        assert!(n.1 >= 1 && n.1 <= u64::from(cfg.max_windowsize));
        assert!(n.2 <= cfg.max_timeout.max(cfg.timeout));
    }
});
