//! A stalled partial frame holds only what has arrived: the reader's buffer grows with the bytes
//! the peer sends, not with the length it claims, and nothing stays allocated after the error.
//! Measured with a counting allocator (this test binary's own), at the moment the reader waits.
//! `unsafe` is allowed here only for that allocator.
#![allow(unsafe_code)]

use si_proto::frame::{self, FrameError, HEADER_LEN, MAX_FRAME, READ_STEP};
use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{self, Read};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Ordering::SeqCst);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::SeqCst);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new, Ordering::SeqCst);
        LIVE.fetch_sub(l.size(), Ordering::SeqCst);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static A: Counting = Counting;

/// The tests measure one global counter: they run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// A header claiming the largest frame, then `sent` bytes of payload.
fn stalled_frame(sent: usize) -> Vec<u8> {
    let mut v = (MAX_FRAME as u32).to_le_bytes().to_vec();
    v.push(2);
    v.extend(std::iter::repeat_n(0xa5u8, sent));
    v
}

/// Hands out its bytes, then "stalls": records what is live at that moment and fails the read
/// the way a deadline would.
struct Stalling {
    data: Vec<u8>,
    pos: usize,
    live_at_stall: Option<usize>,
}

impl Read for Stalling {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.data.len() {
            self.live_at_stall = Some(LIVE.load(Ordering::SeqCst));
            return Err(io::Error::new(io::ErrorKind::TimedOut, "stalled"));
        }
        let n = buf.len().min(self.data.len() - self.pos).min(1500);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[test]
fn a_stalled_frame_holds_what_arrived_not_what_it_claims() {
    let _g = SERIAL.lock().unwrap();
    for sent in [10usize, 100 << 10, 1 << 20] {
        let mut r = Stalling {
            data: stalled_frame(sent),
            pos: 0,
            live_at_stall: None,
        };
        let base = LIVE.load(Ordering::SeqCst);
        let res = frame::read_frame(&mut r);
        assert!(matches!(res, Err(FrameError::Io(_))), "{res:?}");
        drop(res);
        let held = r.live_at_stall.unwrap().saturating_sub(base);
        // The reader holds at most twice what arrived plus one step, far below the claim.
        assert!(
            held <= 2 * sent + READ_STEP + 4096,
            "{sent} bytes sent, {held} held while stalled"
        );
        assert!(held < MAX_FRAME / 2, "{held} held");
        let after = LIVE.load(Ordering::SeqCst).saturating_sub(base);
        assert!(
            after < 4096,
            "{after} bytes still allocated after the error"
        );
    }
    // A whole frame still reads in full.
    let mut whole = stalled_frame(MAX_FRAME);
    whole.truncate(HEADER_LEN + MAX_FRAME);
    match frame::read_frame(&mut &whole[..]).unwrap() {
        Some(frame::Frame::Data(d)) => assert_eq!(d.len(), MAX_FRAME),
        other => panic!("{other:?}"),
    }
}

#[cfg(feature = "async")]
mod async_reader {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use tokio::io::{AsyncRead, ReadBuf};

    struct AsyncStalling(Stalling);

    impl AsyncRead for AsyncStalling {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let n = self.0.read(buf.initialize_unfilled())?;
            buf.advance(n);
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn the_async_reader_too() {
        let _g = SERIAL.lock().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for sent in [10usize, 300 << 10] {
            let mut r = AsyncStalling(Stalling {
                data: stalled_frame(sent),
                pos: 0,
                live_at_stall: None,
            });
            let base = LIVE.load(Ordering::SeqCst);
            let res = rt.block_on(frame::read_frame_async(&mut r));
            assert!(matches!(res, Err(FrameError::Io(_))), "{res:?}");
            drop(res);
            let held = r.0.live_at_stall.unwrap().saturating_sub(base);
            assert!(
                held <= 2 * sent + READ_STEP + 4096,
                "{sent} bytes sent, {held} held while stalled"
            );
            let after = LIVE.load(Ordering::SeqCst).saturating_sub(base);
            assert!(
                after < 4096,
                "{after} bytes still allocated after the error"
            );
        }
    }
}
