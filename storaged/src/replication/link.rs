//! The link's messages on a byte stream (a TLS connection): [`Link::send`] encodes and
//! writes a frame; [`Link::queue`] encodes one after those already queued and
//! [`Link::flush`] writes them all at once (one TLS record and one system call per batch,
//! not per frame); [`Link::recv`] reads until a whole frame is there and decodes it. What the
//! peer sends is checked by [`super::wire::decode`]; the read buffer grows at most to one
//! frame ([`wire::MAX_PAYLOAD`] and its header) and one read's chunk, since a header is judged
//! before its payload is waited for.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::wire::{self, Message};

/// Bytes asked of the stream per read.
const READ_CHUNK: usize = 64 << 10;

/// Errors on the link.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O error on the replication link")]
    Io(#[from] std::io::Error),
    #[error("malformed frame from the peer")]
    Wire(#[from] wire::Error),
    #[error("the peer closed the link in the middle of a frame")]
    Truncated,
}

/// One end of a replication link.
pub struct Link<S> {
    stream: S,
    /// Bytes read: `buf[start..filled]` is what is not decoded yet. Reads go into
    /// `buf[filled..]`, so a `recv` dropped while it waits (in a `select!`) loses nothing:
    /// what lies past `filled` is not data.
    buf: Vec<u8>,
    start: usize,
    filled: usize,
    /// Where in `buf` the frame the last `recv` decoded lies.
    last: std::ops::Range<usize>,
    /// Frames encoded and not yet written.
    out: Vec<u8>,
    /// Bytes sent and received since the last [`take_counts`](Self::take_counts).
    sent: u64,
    received: u64,
}

impl<S> Link<S> {
    /// A link on `stream`: both ways, or one half of a split stream (`tokio::io::split`), its
    /// reading half only receiving and its writing half only sending.
    pub fn new(stream: S) -> Self {
        Link {
            stream,
            buf: Vec::new(),
            start: 0,
            filled: 0,
            last: 0..0,
            out: Vec::new(),
            sent: 0,
            received: 0,
        }
    }

    /// Bytes sent and received since the last call.
    pub fn take_counts(&mut self) -> (u64, u64) {
        (
            std::mem::take(&mut self.sent),
            std::mem::take(&mut self.received),
        )
    }

    /// Zeroes what the link's buffers held (a `Create` carries a volume's key).
    pub fn wipe(&mut self) {
        use zeroize::Zeroize;
        self.buf.zeroize();
        self.out.zeroize();
        (self.start, self.filled, self.last) = (0, 0, 0..0);
    }

    /// Bytes queued and not yet flushed.
    pub fn queued(&self) -> usize {
        self.out.len()
    }

    /// The frame of the message the last [`recv`](Self::recv) returned, as it came in (until
    /// the next `recv`).
    pub fn last_frame(&self) -> &[u8] {
        self.buf.get(self.last.clone()).unwrap_or_default()
    }
}

impl<S: AsyncWrite + Unpin> Link<S> {
    /// Sends one message, after any queued before it.
    pub async fn send(&mut self, msg: &Message) -> Result<(), Error> {
        self.queue(msg)?;
        self.flush().await
    }

    /// Encodes one message after those queued; nothing is written until [`flush`](Self::flush).
    pub fn queue(&mut self, msg: &Message) -> Result<(), Error> {
        wire::encode(msg, &mut self.out)?;
        Ok(())
    }

    /// Writes every queued message. Dropped while it waits, it leaves the stream at an
    /// unknown point of a frame: the link is then of no further use.
    pub async fn flush(&mut self) -> Result<(), Error> {
        if self.out.is_empty() {
            return Ok(());
        }
        self.stream.write_all(&self.out).await?;
        self.stream.flush().await?;
        self.sent += self.out.len() as u64;
        self.out.clear();
        Ok(())
    }

    /// Closes the sending side (TLS close_notify, then the TCP FIN).
    pub async fn shutdown(&mut self) {
        let _ = self.stream.shutdown().await;
    }
}

impl<S: AsyncRead + Unpin> Link<S> {
    /// The next message; `None` when the peer closed the link between frames.
    pub async fn recv(&mut self) -> Result<Option<Message>, Error> {
        loop {
            if let Some((msg, used)) = wire::decode(&self.buf[self.start..self.filled])? {
                self.last = self.start..self.start + used;
                self.start += used;
                if self.start == self.filled {
                    (self.start, self.filled) = (0, 0);
                }
                return Ok(Some(msg));
            }
            // Room for a chunk past what is kept: where there is none, the undecoded tail
            // moves to the front, and only a frame longer than the buffer grows it; so it
            // stays about one frame and one chunk long.
            if self.buf.len() < self.filled + READ_CHUNK && self.start > 0 {
                self.buf.copy_within(self.start..self.filled, 0);
                (self.start, self.filled) = (0, self.filled - self.start);
            }
            if self.buf.len() < self.filled + READ_CHUNK {
                self.buf.resize(self.filled + READ_CHUNK, 0);
            }
            let n = self.stream.read(&mut self.buf[self.filled..]).await?;
            self.filled += n;
            self.received += n as u64;
            if n == 0 {
                return if self.filled == 0 {
                    Ok(None)
                } else {
                    Err(Error::Truncated)
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn messages_cross_a_stream_whole_and_a_close_mid_frame_is_an_error() {
        let (a, b) = tokio::io::duplex(1024);
        let mut a = Link::new(a);
        let mut b = Link::new(b);
        let big = Message::Write {
            seq: 7,
            offset: 4096,
            data: vec![0xa5; 300_000],
        };
        let send = async {
            a.send(&Message::Ping { time_unix_ns: 1 }).await.unwrap();
            a.send(&big).await.unwrap();
            a.shutdown().await;
        };
        let recv = async {
            let first = b.recv().await.unwrap();
            let second = b.recv().await.unwrap();
            let end = b.recv().await.unwrap();
            (first, second, end)
        };
        let ((), (first, second, end)) = tokio::join!(send, recv);
        assert_eq!(first, Some(Message::Ping { time_unix_ns: 1 }));
        assert_eq!(second, Some(big));
        assert_eq!(end, None);

        // Queued frames go out together at the flush, whole and in order.
        let (a, b) = tokio::io::duplex(1 << 20);
        let (mut a, mut b) = (Link::new(a), Link::new(b));
        let frames: Vec<Message> = (0..50)
            .map(|i| Message::Write {
                seq: i,
                offset: i * 4096,
                data: vec![i as u8; 4096],
            })
            .collect();
        for f in &frames {
            a.queue(f).unwrap();
        }
        assert_eq!(a.take_counts().0, 0, "nothing written before the flush");
        assert!(a.queued() > 50 * 4096);
        a.flush().await.unwrap();
        assert_eq!(a.queued(), 0);
        for f in &frames {
            assert_eq!(b.recv().await.unwrap().as_ref(), Some(f));
            // Each message's frame is there as it came, for the applier to stage as it is.
            let mut encoded = Vec::new();
            wire::encode(f, &mut encoded).unwrap();
            assert_eq!(b.last_frame(), &encoded[..]);
        }

        let (mut a, b) = tokio::io::duplex(1024);
        let mut b = Link::new(b);
        let mut frame = Vec::new();
        wire::encode(&Message::Ping { time_unix_ns: 2 }, &mut frame).unwrap();
        a.write_all(&frame[..frame.len() - 1]).await.unwrap();
        drop(a);
        assert!(matches!(b.recv().await, Err(Error::Truncated)));
    }
}
