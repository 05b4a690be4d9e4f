//! One byte stream, buffered both ways, with its traffic counted.
//!
//! The si protocol reads and writes one stream (TCP today, TLS tomorrow), so nothing here
//! splits or clones it: [`BufStream`] keeps a read buffer and a write buffer over the same
//! stream, and [`Counted`] counts the bytes that pass in each direction and can cap the rate
//! it reads at ([`Counted::limit_read`]: a node's bandwidth cap, which slows the sender through
//! TCP's own flow control).

use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes read and written through a [`Counted`] stream; clones share the counts.
#[derive(Clone, Debug, Default)]
pub struct Traffic {
    read: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
}

impl Traffic {
    pub fn read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }
}

/// A stream that counts what passes through it.
pub struct Counted<S> {
    inner: S,
    traffic: Traffic,
    pace: Option<Pace>,
}

/// A read-rate cap: a token bucket that holds at most [`Pace::BURST`] of credit.
#[derive(Debug)]
struct Pace {
    bytes_per_sec: u64,
    /// When the bytes read so far are paid for at the cap.
    due: Instant,
}

impl Pace {
    /// How far ahead of the cap a reader may get after an idle spell.
    const BURST: Duration = Duration::from_millis(100);

    /// Most bytes one read may take: a tenth of a second at the cap (at least 4 KiB), so the
    /// pauses stay short and the rate even.
    fn slice(&self) -> usize {
        usize::try_from(self.bytes_per_sec / 10)
            .unwrap_or(usize::MAX)
            .max(4096)
    }

    /// The pause owed for `n` more bytes read now.
    fn owe(&mut self, n: usize, now: Instant) -> Duration {
        let floor = now.checked_sub(Pace::BURST).unwrap_or(now);
        let cost = Duration::from_secs_f64(n as f64 / self.bytes_per_sec as f64);
        self.due = self.due.max(floor) + cost;
        self.due.saturating_duration_since(now)
    }
}

impl<S> Counted<S> {
    pub fn new(inner: S) -> Counted<S> {
        Counted {
            inner,
            traffic: Traffic::default(),
            pace: None,
        }
    }
    /// Reads at most `bytes_per_sec` on average from now on (0: no cap). Reads pause as they
    /// go; the sender, its window full, waits.
    pub fn limit_read(&mut self, bytes_per_sec: u64) {
        self.pace = (bytes_per_sec > 0).then(|| Pace {
            bytes_per_sec,
            due: Instant::now(),
        });
    }
    /// A handle on the counts that stays valid after the stream is gone.
    pub fn traffic(&self) -> Traffic {
        self.traffic.clone()
    }
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: Read> Read for Counted<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(pace) = &mut self.pace else {
            let n = self.inner.read(buf)?;
            self.traffic.read.fetch_add(n as u64, Ordering::Relaxed);
            return Ok(n);
        };
        let take = buf.len().min(pace.slice());
        let n = self.inner.read(&mut buf[..take])?;
        self.traffic.read.fetch_add(n as u64, Ordering::Relaxed);
        let wait = pace.owe(n, Instant::now());
        if !wait.is_zero() {
            // The cap itself: this read is paid for before the next one.
            std::thread::sleep(wait);
        }
        Ok(n)
    }
}

impl<S: Write> Write for Counted<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.traffic.written.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The write side's buffer, readable straight through to the stream.
struct WriteBuffered<S: Write>(BufWriter<S>);

impl<S: Read + Write> Read for WriteBuffered<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.get_mut().read(buf)
    }
}

/// A stream with a read buffer and a write buffer. Writes wait in their buffer until
/// [`flush`](Write::flush) (or until it fills), as with `BufWriter`.
pub struct BufStream<S: Read + Write> {
    inner: BufReader<WriteBuffered<S>>,
}

impl<S: Read + Write> BufStream<S> {
    pub fn new(stream: S) -> BufStream<S> {
        BufStream::with_capacities(64 << 10, 64 << 10, stream)
    }
    pub fn with_capacities(read: usize, write: usize, stream: S) -> BufStream<S> {
        BufStream {
            inner: BufReader::with_capacity(
                read,
                WriteBuffered(BufWriter::with_capacity(write, stream)),
            ),
        }
    }
    pub fn get_ref(&self) -> &S {
        self.inner.get_ref().0.get_ref()
    }
    pub fn get_mut(&mut self) -> &mut S {
        self.inner.get_mut().0.get_mut()
    }
}

impl<S: Read + Write> Read for BufStream<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

impl<S: Read + Write> BufRead for BufStream<S> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.inner.fill_buf()
    }
    fn consume(&mut self, n: usize) {
        self.inner.consume(n)
    }
}

impl<S: Read + Write> Write for BufStream<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.get_mut().0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.get_mut().0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loopback "stream": reads come from `rx`, writes go to `tx`.
    struct Mem {
        rx: io::Cursor<Vec<u8>>,
        tx: Vec<u8>,
        writes: usize,
    }
    impl Read for Mem {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            self.rx.read(b)
        }
    }
    impl Write for Mem {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.writes += 1;
            self.tx.write(b)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn buffers_both_ways_and_counts() {
        let mem = Mem {
            rx: io::Cursor::new(b"hello world".to_vec()),
            tx: Vec::new(),
            writes: 0,
        };
        let c = Counted::new(mem);
        let traffic = c.traffic();
        let mut s = BufStream::new(c);
        for _ in 0..100 {
            s.write_all(b"ab").unwrap();
        }
        assert_eq!(s.get_ref().get_ref().writes, 0, "writes wait for a flush");
        s.flush().unwrap();
        assert_eq!(s.get_ref().get_ref().writes, 1);
        assert_eq!(traffic.written(), 200);
        let mut got = String::new();
        s.read_to_string(&mut got).unwrap();
        assert_eq!(got, "hello world");
        assert_eq!(traffic.read(), 11);
    }

    /// The cap holds on average: 600 KB through a 2 MB/s cap takes at least 0.3 s less the
    /// burst, however the reads are sized; without a cap the same reads do not pause.
    #[test]
    fn a_read_cap_paces_the_reads() {
        let data = vec![7u8; 600_000];
        let mem = || Mem {
            rx: io::Cursor::new(data.clone()),
            tx: Vec::new(),
            writes: 0,
        };
        let mut c = Counted::new(mem());
        c.limit_read(2_000_000);
        let mut s = BufStream::with_capacities(1 << 20, 4096, c);
        let start = Instant::now();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        let took = start.elapsed();
        assert_eq!(got, data);
        assert!(
            took >= Duration::from_millis(300) - Pace::BURST,
            "600 KB at 2 MB/s in {took:?}"
        );

        // The pacer's arithmetic: credit is at most one burst, and a pause is owed once the
        // reader is ahead of the cap.
        let t0 = Instant::now();
        let mut p = Pace {
            bytes_per_sec: 1_000_000,
            due: t0,
        };
        assert_eq!(p.slice(), 100_000);
        // Idle a long time: only a burst of credit, so 100 KB is free, the next 100 KB not.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(p.owe(100_000, later), Duration::ZERO);
        assert_eq!(p.owe(100_000, later), Duration::from_millis(100));
        assert_eq!(
            Pace {
                bytes_per_sec: 1,
                due: t0
            }
            .slice(),
            4096
        );
    }
}
