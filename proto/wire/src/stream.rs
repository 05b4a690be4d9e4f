//! One byte stream, buffered both ways, with its traffic counted.
//!
//! The si protocol reads and writes one stream (TCP today, TLS tomorrow), so nothing here
//! splits or clones it: [`BufStream`] keeps a read buffer and a write buffer over the same
//! stream, and [`Counted`] counts the bytes that pass in each direction.

use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

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
}

impl<S> Counted<S> {
    pub fn new(inner: S) -> Counted<S> {
        Counted {
            inner,
            traffic: Traffic::default(),
        }
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
        let n = self.inner.read(buf)?;
        self.traffic.read.fetch_add(n as u64, Ordering::Relaxed);
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
}
