//! The link's messages on a byte stream (a TLS connection): [`Link::send`] encodes and
//! writes a frame, [`Link::recv`] reads until a whole frame is there and decodes it. What the
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
    buf: Vec<u8>,
    out: Vec<u8>,
    /// What one read fills, before it joins `buf`: a `recv` dropped while it waits (in a
    /// `select!`) loses nothing and leaves `buf` whole.
    chunk: Vec<u8>,
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
            out: Vec::new(),
            chunk: Vec::new(),
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
        self.chunk.zeroize();
    }
}

impl<S: AsyncWrite + Unpin> Link<S> {
    /// Sends one message.
    pub async fn send(&mut self, msg: &Message) -> Result<(), Error> {
        self.out.clear();
        wire::encode(msg, &mut self.out)?;
        self.stream.write_all(&self.out).await?;
        self.stream.flush().await?;
        self.sent += self.out.len() as u64;
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
            if let Some((msg, used)) = wire::decode(&self.buf)? {
                self.buf.drain(..used);
                return Ok(Some(msg));
            }
            self.chunk.resize(READ_CHUNK, 0);
            let n = self.stream.read(&mut self.chunk).await?;
            self.buf.extend_from_slice(&self.chunk[..n]);
            self.received += n as u64;
            if n == 0 {
                return if self.buf.is_empty() {
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

        let (mut a, b) = tokio::io::duplex(1024);
        let mut b = Link::new(b);
        let mut frame = Vec::new();
        wire::encode(&Message::Ping { time_unix_ns: 2 }, &mut frame).unwrap();
        a.write_all(&frame[..frame.len() - 1]).await.unwrap();
        drop(a);
        assert!(matches!(b.recv().await, Err(Error::Truncated)));
    }
}
