//! Multicast pieces for one LAN segment: the master sends a version's objects once to every
//! node that joined its session; loss is repaired with RaptorQ symbols, not NAKs; what a node
//! still lacks afterwards it fetches over TCP.
//!
//! ```text
//! block     objects in manifest order, whole, as stored (zstd):
//!           [digest 32][raw_len u32][zlen u32][zlen bytes] ... about BLOCK_TARGET bytes
//! symbols   RaptorQ (RFC 6330) of one block: its source symbols, then repair symbols
//!           (`repair_percent` of them, at least one), SYMBOL bytes each
//! datagram  [magic "SIM1"][session u64][block u32][block length u32][payload id 4]
//!                                                      header, in the clear, the AAD
//!           AEAD(symbol)                               sealed
//! end       block = END, sealed payload: the number of blocks sent (u32), a few times
//! ```
//!
//! - Every datagram is sealed with ChaCha20-Poly1305 under the session's key, which the master
//!   hands each node over its authenticated (TLS) session. A host on the segment without the
//!   key can neither read the image nor inject a symbol; the nonce is the block and payload id,
//!   unique within a session.
//! - A node that holds the key could still send symbols that decode to garbage: each object
//!   of a decoded block is checked against its digest by the caller before it is used, as
//!   from a relay, and the manifest always comes from the master, signed.
//! - Receivers bound what a datagram can make them hold: a block is at most [`MAX_BLOCK`]
//!   bytes, at most [`MAX_OPEN`] blocks are being decoded at once, and the coding parameters
//!   are derived from the block length alone (never taken from the packet).

use raptorq::{Decoder, Encoder, EncodingPacket, ObjectTransmissionInformation, PayloadId};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use si_proto::Digest;
use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

pub const MAGIC: [u8; 4] = *b"SIM1";
/// Bytes of one RaptorQ symbol: a datagram stays under 1472 bytes (a 1500-byte MTU).
pub const SYMBOL: u16 = 1408;
/// Header: magic, session, block, block length, RaptorQ payload id.
pub const HEADER: usize = 4 + 8 + 4 + 4 + 4;
pub const TAG: usize = 16;
/// The largest datagram a session sends.
pub const MAX_DATAGRAM: usize = HEADER + SYMBOL as usize + TAG;
/// A block closes once it holds this many bytes.
pub const BLOCK_TARGET: usize = 1 << 20;
/// Receivers refuse longer blocks (a block holds at least one whole object).
pub const MAX_BLOCK: u32 = 4 << 20;
/// Blocks being decoded at once; past it the oldest open one is given up (its objects come
/// over TCP).
pub const MAX_OPEN: usize = 16;
/// The block number of the end datagram.
pub const END: u32 = u32::MAX;
pub const KEY_LEN: usize = 32;
/// One object's entry in a block, before its bytes.
const PIECE_HEAD: usize = 32 + 4 + 4;

/// Why a datagram was not used. None of these stop a receiver: it counts and goes on.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    #[error("datagram of {0} bytes is too short")]
    Short(usize),
    #[error("not an si multicast datagram")]
    Magic,
    #[error("datagram of another session")]
    OtherSession,
    #[error("datagram does not authenticate under the session key")]
    Forged,
    #[error("block length {0} out of range")]
    BadLength(u32),
    #[error("symbol does not fit its block: {0}")]
    BadSymbol(String),
}

/// A session's key, sealing and opening datagrams.
pub struct Sealer {
    key: LessSafeKey,
    session: u64,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sealer(session {:016x}, key redacted)", self.session)
    }
}

/// A fresh random key and session number.
pub fn new_session() -> anyhow::Result<(u64, Vec<u8>)> {
    use ring::rand::SecureRandom;
    let rng = ring::rand::SystemRandom::new();
    let mut key = vec![0u8; KEY_LEN];
    let mut id = [0u8; 8];
    rng.fill(&mut key)
        .and_then(|_| rng.fill(&mut id))
        .map_err(|_| anyhow::anyhow!("no randomness for a multicast session key"))?;
    Ok((u64::from_be_bytes(id), key))
}

fn header(session: u64, block: u32, len: u32, payload: [u8; 4]) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..4].copy_from_slice(&MAGIC);
    h[4..12].copy_from_slice(&session.to_be_bytes());
    h[12..16].copy_from_slice(&block.to_be_bytes());
    h[16..20].copy_from_slice(&len.to_be_bytes());
    h[20..24].copy_from_slice(&payload);
    h
}

fn nonce(block: u32, payload: [u8; 4]) -> Nonce {
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(&block.to_be_bytes());
    n[4..8].copy_from_slice(&payload);
    Nonce::assume_unique_for_key(n)
}

/// What a datagram carries, once opened.
#[derive(Debug, PartialEq, Eq)]
pub enum Datagram {
    Symbol {
        block: u32,
        len: u32,
        payload: [u8; 4],
        symbol: Vec<u8>,
    },
    End {
        blocks: u32,
    },
}

impl Sealer {
    pub fn new(session: u64, key: &[u8]) -> anyhow::Result<Sealer> {
        let k = UnboundKey::new(&CHACHA20_POLY1305, key)
            .map_err(|_| anyhow::anyhow!("a multicast key is {KEY_LEN} bytes"))?;
        Ok(Sealer {
            key: LessSafeKey::new(k),
            session,
        })
    }

    fn seal(&self, block: u32, len: u32, payload: [u8; 4], body: &[u8]) -> Vec<u8> {
        let h = header(self.session, block, len, payload);
        let mut out = Vec::with_capacity(HEADER + body.len() + TAG);
        out.extend_from_slice(&h);
        let mut sealed = Vec::with_capacity(body.len() + TAG);
        sealed.extend_from_slice(body);
        self.key
            .seal_in_place_append_tag(nonce(block, payload), Aad::from(&h), &mut sealed)
            .expect("ChaCha20-Poly1305 seals any length a datagram has");
        out.extend_from_slice(&sealed);
        out
    }

    /// One symbol of `block` (whose length is `len`).
    pub fn seal_symbol(&self, block: u32, len: u32, p: &EncodingPacket) -> Vec<u8> {
        self.seal(block, len, p.payload_id().serialize(), p.data())
    }

    /// The end of the session: `blocks` were sent.
    pub fn seal_end(&self, blocks: u32) -> Vec<u8> {
        self.seal(END, 0, [0; 4], &blocks.to_be_bytes())
    }

    /// Opens a datagram of this session; anything else is an error, never a panic.
    pub fn open(&self, d: &[u8]) -> Result<Datagram, PacketError> {
        if d.len() < HEADER + TAG {
            return Err(PacketError::Short(d.len()));
        }
        if d[..4] != MAGIC {
            return Err(PacketError::Magic);
        }
        let be32 = |o: usize| u32::from_be_bytes([d[o], d[o + 1], d[o + 2], d[o + 3]]);
        let session = u64::from_be_bytes(d[4..12].try_into().expect("8 bytes"));
        if session != self.session {
            return Err(PacketError::OtherSession);
        }
        let (block, len) = (be32(12), be32(16));
        let payload: [u8; 4] = d[20..24].try_into().expect("4 bytes");
        let mut sealed = d[HEADER..].to_vec();
        let plain = self
            .key
            .open_in_place(nonce(block, payload), Aad::from(&d[..HEADER]), &mut sealed)
            .map_err(|_| PacketError::Forged)?;
        let body = &*plain;
        if block == END {
            let b: [u8; 4] = body
                .try_into()
                .map_err(|_| PacketError::BadSymbol("end datagram".into()))?;
            return Ok(Datagram::End {
                blocks: u32::from_be_bytes(b),
            });
        }
        if len == 0 || len > MAX_BLOCK {
            return Err(PacketError::BadLength(len));
        }
        if body.len() != SYMBOL as usize {
            return Err(PacketError::BadSymbol(format!(
                "{} bytes, not {SYMBOL}",
                body.len()
            )));
        }
        Ok(Datagram::Symbol {
            block,
            len,
            payload,
            symbol: body.to_vec(),
        })
    }
}

/// How much a receiving socket may queue: a block's worth of datagrams several times over,
/// so a receiver busy decoding does not lose what arrives meanwhile.
pub const RECEIVE_BUFFER: usize = 16 << 20;

/// The sending socket: bound to `iface` (the master's address on the segment), sending on that
/// interface only, one hop (`ttl` 1 keeps the stream on the segment).
pub fn sender_socket(iface: Ipv4Addr, ttl: u32) -> anyhow::Result<UdpSocket> {
    use anyhow::Context;
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)
        .context("a UDP socket")?;
    s.bind(&SocketAddr::from((iface, 0)).into())
        .with_context(|| format!("binding the multicast sender to {iface}"))?;
    s.set_multicast_if_v4(&iface)
        .with_context(|| format!("sending multicast on {iface}"))?;
    s.set_multicast_ttl_v4(ttl)?;
    s.set_multicast_loop_v4(false)?;
    Ok(s.into())
}

/// A socket receiving `group` on the interface whose address is `iface`, with a queue of
/// [`RECEIVE_BUFFER`] (forced past the system's limit where the process may).
pub fn receiver_socket(group: SocketAddrV4, iface: Ipv4Addr) -> anyhow::Result<UdpSocket> {
    use anyhow::Context;
    anyhow::ensure!(
        group.ip().is_multicast(),
        "{} is not a multicast address",
        group.ip()
    );
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)
        .context("a UDP socket")?;
    s.set_reuse_address(true)?;
    // Bound to the group's address: datagrams to other groups on the port are not ours.
    s.bind(&SocketAddr::V4(group).into())
        .with_context(|| format!("binding {group}"))?;
    s.join_multicast_v4(group.ip(), &iface)
        .with_context(|| format!("joining {} on {iface}", group.ip()))?;
    if rustix::net::sockopt::set_socket_recv_buffer_size_force(&s, RECEIVE_BUFFER).is_err() {
        let _ = s.set_recv_buffer_size(RECEIVE_BUFFER);
    }
    Ok(s.into())
}

/// RaptorQ's source blocks are kept this small: its coding cost grows much faster than the
/// block (measured here: 1 MiB as one source block took 1.5 s to encode, as eight of 128 KiB
/// 11 ms).
pub const SOURCE_BLOCK: u32 = 128 << 10;

/// The coding parameters of a block of `len` bytes (1..=[`MAX_BLOCK`]), the same on both
/// ends: source blocks of at most [`SOURCE_BLOCK`], one sub-block, 8-byte alignment.
pub fn coding(len: u32) -> ObjectTransmissionInformation {
    let z = len
        .div_ceil(SOURCE_BLOCK)
        .clamp(1, MAX_BLOCK / SOURCE_BLOCK) as u8;
    ObjectTransmissionInformation::new(len as u64, SYMBOL, z, 1, 8)
}

/// Appends one object (its compressed bytes as stored) to a block.
pub fn push_piece(block: &mut Vec<u8>, d: &Digest, raw_len: u32, z: &[u8]) {
    block.extend_from_slice(&d.0);
    block.extend_from_slice(&raw_len.to_be_bytes());
    block.extend_from_slice(&(z.len() as u32).to_be_bytes());
    block.extend_from_slice(z);
}

/// One object of a decoded block: not yet verified.
#[derive(Debug, PartialEq, Eq)]
pub struct Piece<'a> {
    pub digest: Digest,
    pub raw_len: u32,
    pub z: &'a [u8],
}

/// The objects of a decoded block; a malformed block is an error.
pub fn pieces(block: &[u8]) -> anyhow::Result<Vec<Piece<'_>>> {
    let mut out = Vec::new();
    let mut rest = block;
    while !rest.is_empty() {
        if rest.len() < PIECE_HEAD {
            anyhow::bail!("block ends inside an object's header");
        }
        let digest = Digest(rest[..32].try_into().expect("32 bytes"));
        let raw_len = u32::from_be_bytes(rest[32..36].try_into().expect("4 bytes"));
        let zlen = u32::from_be_bytes(rest[36..40].try_into().expect("4 bytes")) as usize;
        if raw_len > si_proto::limits::MAX_OBJECT {
            anyhow::bail!("object {digest} of {raw_len} bytes exceeds the object limit");
        }
        let body = &rest[PIECE_HEAD..];
        if zlen > body.len() {
            anyhow::bail!("object {digest} runs past the end of its block");
        }
        out.push(Piece {
            digest,
            raw_len,
            z: &body[..zlen],
        });
        rest = &body[zlen..];
    }
    Ok(out)
}

/// How fast and how redundantly a session is sent.
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    /// Bytes a second on the wire (datagrams, headers included).
    pub rate: u64,
    /// Repair symbols, in percent of a block's source symbols (at least one a block).
    pub repair_percent: u32,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SendStats {
    pub blocks: u32,
    pub datagrams: u64,
    pub bytes: u64,
    pub repair: u64,
}

/// Sends a paced stream of datagrams from `sock` to `dest`.
pub struct Sender<'a> {
    sock: &'a UdpSocket,
    dest: SocketAddr,
    sealer: &'a Sealer,
    pace: Pace,
    start: Instant,
    pub stats: SendStats,
}

impl<'a> Sender<'a> {
    pub fn new(sock: &'a UdpSocket, dest: SocketAddr, sealer: &'a Sealer, pace: Pace) -> Self {
        Sender {
            sock,
            dest,
            sealer,
            pace,
            start: Instant::now(),
            stats: SendStats::default(),
        }
    }

    fn put(&mut self, d: &[u8]) -> std::io::Result<()> {
        // Pacing: the datagram goes out once the rate allows it (a millisecond of slack).
        if self.pace.rate > 0 {
            let due = self.start
                + Duration::from_secs_f64(self.stats.bytes as f64 / self.pace.rate as f64);
            let now = Instant::now();
            if due > now + Duration::from_millis(1) {
                std::thread::sleep(due - now);
            }
        }
        let mut tries = 0;
        loop {
            match self.sock.send_to(d, self.dest) {
                Ok(_) => break,
                // The interface queue is full: give it a moment rather than drop.
                Err(e)
                    if e.raw_os_error() == Some(rustix::io::Errno::NOBUFS.raw_os_error())
                        && tries < 100 =>
                {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => return Err(e),
            }
        }
        self.stats.datagrams += 1;
        self.stats.bytes += d.len() as u64;
        Ok(())
    }

    /// Encodes and sends one block: its source symbols, then its repair symbols.
    pub fn block(&mut self, data: &[u8]) -> anyhow::Result<()> {
        anyhow::ensure!(
            !data.is_empty() && data.len() <= MAX_BLOCK as usize,
            "a block of {} bytes",
            data.len()
        );
        let len = data.len() as u32;
        let enc = Encoder::new(data, coding(len));
        let n = self.stats.blocks;
        for b in enc.get_block_encoders() {
            let source = b.source_packets();
            let repair = (source.len() as u32 * self.pace.repair_percent)
                .div_ceil(100)
                .max(1);
            for p in source {
                self.put(&self.sealer.seal_symbol(n, len, &p))?;
            }
            for p in b.repair_packets(0, repair) {
                self.put(&self.sealer.seal_symbol(n, len, &p))?;
                self.stats.repair += 1;
            }
        }
        self.stats.blocks += 1;
        Ok(())
    }

    /// Ends the session (the end datagram three times, in case one is lost).
    pub fn finish(mut self) -> anyhow::Result<SendStats> {
        let end = self.sealer.seal_end(self.stats.blocks);
        for _ in 0..3 {
            self.put(&end)?;
        }
        Ok(self.stats)
    }
}

/// What a receiver saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReceiveStats {
    pub datagrams: u64,
    pub bytes: u64,
    /// Datagrams not used: not of this session, forged, malformed, or for a block done.
    pub ignored: u64,
    pub blocks: u32,
    /// Blocks given up undecoded (too many open at once, or the session ended first).
    pub abandoned: u32,
    /// Blocks the sender said it sent (0 if its end was not heard).
    pub sent: u32,
}

/// Decodes a session's blocks from its datagrams.
pub struct Receiver {
    sealer: Sealer,
    open: HashMap<u32, (u32, Decoder)>,
    done: HashSet<u32>,
    pub stats: ReceiveStats,
    pub ended: bool,
}

impl Receiver {
    pub fn new(sealer: Sealer) -> Receiver {
        Receiver {
            sealer,
            open: HashMap::new(),
            done: HashSet::new(),
            stats: ReceiveStats::default(),
            ended: false,
        }
    }

    /// Takes one datagram; returns a block once it decodes.
    pub fn accept(&mut self, d: &[u8]) -> Result<Option<(u32, Vec<u8>)>, PacketError> {
        self.stats.datagrams += 1;
        self.stats.bytes += d.len() as u64;
        let r = self.accept_inner(d);
        if r.is_err() {
            self.stats.ignored += 1;
        }
        r
    }

    fn accept_inner(&mut self, d: &[u8]) -> Result<Option<(u32, Vec<u8>)>, PacketError> {
        let (block, len, payload, symbol) = match self.sealer.open(d)? {
            Datagram::End { blocks } => {
                self.ended = true;
                self.stats.sent = blocks;
                self.stats.abandoned += self.open.len() as u32;
                self.open.clear();
                return Ok(None);
            }
            Datagram::Symbol {
                block,
                len,
                payload,
                symbol,
            } => (block, len, payload, symbol),
        };
        if self.done.contains(&block) {
            self.stats.ignored += 1;
            return Ok(None);
        }
        let oti = coding(len);
        let id = PayloadId::deserialize(&payload);
        if id.source_block_number() >= oti.source_blocks() {
            return Err(PacketError::BadSymbol("source block out of range".into()));
        }
        if !self.open.contains_key(&block) && self.open.len() >= MAX_OPEN {
            let oldest = *self.open.keys().min().expect("the map is full");
            self.open.remove(&oldest);
            self.stats.abandoned += 1;
        }
        let (want_len, dec) = self
            .open
            .entry(block)
            .or_insert_with(|| (len, Decoder::new(oti)));
        if *want_len != len {
            return Err(PacketError::BadSymbol(format!(
                "block {block} said {len} bytes, earlier {want_len}"
            )));
        }
        let packet = EncodingPacket::new(id, symbol);
        // The decoder is not ours to trust with hostile input from a key holder: a panic in
        // it gives the block up rather than the node.
        let got = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| dec.decode(packet)));
        match got {
            Ok(None) => Ok(None),
            Ok(Some(data)) => {
                self.open.remove(&block);
                self.done.insert(block);
                self.stats.blocks += 1;
                Ok(Some((block, data)))
            }
            Err(_) => {
                self.open.remove(&block);
                self.stats.abandoned += 1;
                Err(PacketError::BadSymbol(format!(
                    "block {block} did not decode"
                )))
            }
        }
    }

    /// Reads `sock` until the session ends (its end datagram, or nothing for `idle` once
    /// something came, or nothing at all by `first`), handing each decoded block to `block`.
    /// An error from `block` stops the receiver.
    pub fn run(
        &mut self,
        sock: &UdpSocket,
        first: Instant,
        idle: Duration,
        mut block: impl FnMut(u32, Vec<u8>) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let mut buf = vec![0u8; MAX_DATAGRAM + 64];
        let mut last: Option<Instant> = None;
        sock.set_read_timeout(Some(Duration::from_millis(200)))?;
        while !self.ended {
            let now = Instant::now();
            match last {
                Some(t) if now.duration_since(t) > idle => break,
                None if now > first => break,
                _ => {}
            }
            let n = match sock.recv(&mut buf) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(anyhow::Error::new(e).context("receiving multicast")),
            };
            match self.accept(&buf[..n]) {
                Ok(Some((b, data))) => {
                    last = Some(Instant::now());
                    block(b, data)?;
                }
                Ok(None) => last = Some(Instant::now()),
                Err(PacketError::OtherSession | PacketError::Magic | PacketError::Short(_)) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "multicast datagram ignored");
                }
            }
        }
        if !self.open.is_empty() {
            self.stats.abandoned += self.open.len() as u32;
            self.open.clear();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealer() -> Sealer {
        Sealer::new(7, &[9u8; KEY_LEN]).unwrap()
    }

    /// A block of `n` pseudo-random objects.
    fn block(n: usize, seed: u64) -> (Vec<u8>, Vec<(Digest, Vec<u8>)>) {
        let mut x = seed;
        let mut b = Vec::new();
        let mut objs = Vec::new();
        for i in 0..n {
            let len = 1000 + (i * 7919) % 60_000;
            let z: Vec<u8> = (0..len)
                .map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (x >> 56) as u8
                })
                .collect();
            let d = Digest::of(&z);
            push_piece(&mut b, &d, len as u32, &z);
            objs.push((d, z));
        }
        (b, objs)
    }

    /// Every datagram a block is sent as, with `repair_percent` repair symbols.
    fn datagrams(s: &Sealer, n: u32, data: &[u8], repair_percent: u32) -> Vec<Vec<u8>> {
        let len = data.len() as u32;
        let enc = Encoder::new(data, coding(len));
        let mut out = Vec::new();
        for b in enc.get_block_encoders() {
            let repair = (b.source_packets().len() as u32 * repair_percent)
                .div_ceil(100)
                .max(1);
            for p in b
                .source_packets()
                .iter()
                .chain(&b.repair_packets(0, repair))
            {
                out.push(s.seal_symbol(n, len, p));
            }
        }
        out
    }

    #[test]
    fn a_block_survives_one_percent_loss() {
        let s = sealer();
        let (data, objs) = block(40, 1);
        assert!(data.len() > 512 << 10, "{}", data.len());
        let all = datagrams(&s, 0, &data, 5);
        assert!(all.iter().all(|d| d.len() <= MAX_DATAGRAM));
        let mut r = Receiver::new(sealer());
        let mut x = 12345u64;
        let (mut lost, mut got) = (0, None);
        for d in &all {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            if (x >> 33).is_multiple_of(100) {
                lost += 1;
                continue;
            }
            if let Some(b) = r.accept(d).unwrap() {
                got = Some(b);
                break;
            }
        }
        assert!(lost > 0, "the test dropped nothing");
        let (n, decoded) = got.expect("the block decoded despite the loss");
        assert_eq!(n, 0);
        assert_eq!(decoded, data);
        let ps = pieces(&decoded).unwrap();
        assert_eq!(ps.len(), objs.len());
        for (p, (d, z)) in ps.iter().zip(&objs) {
            assert_eq!(p.digest, *d);
            assert_eq!(p.z, &z[..]);
        }
    }

    #[test]
    fn too_much_loss_gives_the_block_up() {
        let s = sealer();
        let (data, _) = block(10, 2);
        let all = datagrams(&s, 0, &data, 5);
        let mut r = Receiver::new(sealer());
        // A tenth of the symbols lost: more than the repair symbols make up for.
        for (i, d) in all.iter().enumerate() {
            if i % 10 != 3 {
                assert_eq!(r.accept(d).unwrap(), None);
            }
        }
        r.accept(&s.seal_end(1)).unwrap();
        assert!(r.ended);
        assert_eq!(r.stats.blocks, 0);
        assert_eq!(r.stats.abandoned, 1);
        assert_eq!(r.stats.sent, 1);
    }

    #[test]
    fn forged_foreign_and_malformed_datagrams_are_refused() {
        let s = sealer();
        let (data, _) = block(2, 3);
        let good = datagrams(&s, 0, &data, 5).remove(0);
        let r = sealer();
        assert!(matches!(r.open(&good), Ok(Datagram::Symbol { .. })));
        // A flipped bit anywhere: in the header (the AAD) or in the sealed part.
        for at in [5, 13, 17, 21, HEADER + 1, good.len() - 1] {
            let mut bad = good.clone();
            bad[at] ^= 1;
            let e = r.open(&bad).unwrap_err();
            assert!(
                matches!(e, PacketError::Forged | PacketError::OtherSession),
                "{at}: {e}"
            );
        }
        // Another key, the same session number.
        let other = Sealer::new(7, &[1u8; KEY_LEN]).unwrap();
        assert_eq!(other.open(&good), Err(PacketError::Forged));
        // Another session.
        let mut x = good.clone();
        x[11] ^= 1;
        assert_eq!(r.open(&x), Err(PacketError::OtherSession));
        for n in 0..HEADER + TAG {
            assert_eq!(r.open(&good[..n]), Err(PacketError::Short(n)));
        }
        assert_eq!(r.open(&[0u8; 200]), Err(PacketError::Magic));
        // Sealed right but with a length out of range, or a short symbol.
        let p = EncodingPacket::new(PayloadId::new(0, 0), vec![0; SYMBOL as usize]);
        let huge = s.seal_symbol(0, MAX_BLOCK + 1, &p);
        assert_eq!(r.open(&huge), Err(PacketError::BadLength(MAX_BLOCK + 1)));
        let short = EncodingPacket::new(PayloadId::new(0, 0), vec![0; 10]);
        assert!(matches!(
            r.open(&s.seal_symbol(0, 100, &short)),
            Err(PacketError::BadSymbol(_))
        ));
        // A source block number the block's coding does not have.
        let sbn = EncodingPacket::new(PayloadId::new(3, 0), vec![0; SYMBOL as usize]);
        let mut rx = Receiver::new(sealer());
        assert!(matches!(
            rx.accept(&s.seal_symbol(0, 5000, &sbn)),
            Err(PacketError::BadSymbol(_))
        ));
        // A length that changes within a block.
        let mut rx = Receiver::new(sealer());
        assert_eq!(rx.accept(&s.seal_symbol(4, 5000, &p)), Ok(None));
        assert!(matches!(
            rx.accept(&s.seal_symbol(4, 6000, &p)),
            Err(PacketError::BadSymbol(_))
        ));
    }

    #[test]
    fn open_blocks_are_bounded() {
        let s = sealer();
        let p = EncodingPacket::new(PayloadId::new(0, 0), vec![0; SYMBOL as usize]);
        let mut r = Receiver::new(sealer());
        for b in 0..(MAX_OPEN as u32 + 5) {
            assert_eq!(r.accept(&s.seal_symbol(b, 1 << 20, &p)), Ok(None));
        }
        assert_eq!(r.open.len(), MAX_OPEN);
        assert_eq!(r.stats.abandoned, 5);
        assert!(!r.open.contains_key(&0), "the oldest went first");
    }

    #[test]
    fn malformed_blocks_are_errors() {
        let (data, _) = block(3, 4);
        assert_eq!(pieces(&data).unwrap().len(), 3);
        for cut in [1, 20, PIECE_HEAD + 5, data.len() - 1] {
            assert!(pieces(&data[..cut]).is_err(), "{cut}");
        }
        let mut big = Vec::new();
        push_piece(&mut big, &Digest::default(), u32::MAX, b"x");
        assert!(pieces(&big).is_err());
        assert!(pieces(&[]).unwrap().is_empty());
    }

    /// The sender and receiver over loopback UDP (unicast: the coding, pacing and end are the
    /// same as on a group).
    #[test]
    fn a_paced_session_over_loopback() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let _ = rustix::net::sockopt::set_socket_recv_buffer_size_force(&rx, RECEIVE_BUFFER);
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let dest = rx.local_addr().unwrap();
        let (a, _) = block(30, 5);
        let (b, _) = block(5, 6);
        let t = std::thread::spawn(move || {
            let s = sealer();
            let mut snd = Sender::new(
                &tx,
                dest,
                &s,
                Pace {
                    rate: 8 << 20,
                    repair_percent: 5,
                },
            );
            snd.block(&a).unwrap();
            snd.block(&b).unwrap();
            snd.finish().unwrap()
        });
        let mut r = Receiver::new(sealer());
        let mut got = Vec::new();
        r.run(
            &rx,
            Instant::now() + Duration::from_secs(10),
            Duration::from_secs(5),
            |n, d| {
                got.push((n, d.len()));
                Ok(())
            },
        )
        .unwrap();
        let sent = t.join().unwrap();
        assert!(r.ended);
        assert_eq!(sent.blocks, 2);
        assert_eq!(r.stats.sent, 2);
        assert_eq!(got.len(), 2, "{got:?} {:?}", r.stats);
    }
}
