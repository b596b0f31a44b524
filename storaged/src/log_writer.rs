//! The daemon's log output: lines go to a bounded queue that one thread writes to stderr, so
//! no thread that logs (a data-path worker above all) ever waits for stderr. When stderr stalls
//! and the queue is full, lines are dropped and counted; the writer reports the count when it
//! can write again.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;

/// Lines queued for stderr at most.
pub const QUEUE_LINES: usize = 4096;

/// A `MakeWriter` for tracing-subscriber whose writes never block.
#[derive(Clone)]
pub struct LogWriter {
    queue: SyncSender<Vec<u8>>,
    dropped: Arc<AtomicU64>,
    /// Lines queued and not yet written.
    pending: Arc<AtomicU64>,
}

impl LogWriter {
    /// Starts the thread that writes queued lines to `out`.
    pub fn start(out: impl Write + Send + 'static) -> std::io::Result<Self> {
        let (queue, lines) = sync_channel(QUEUE_LINES);
        let writer = LogWriter {
            queue,
            dropped: Arc::new(AtomicU64::new(0)),
            pending: Arc::new(AtomicU64::new(0)),
        };
        let (dropped, pending) = (writer.dropped.clone(), writer.pending.clone());
        std::thread::Builder::new()
            .name("log".into())
            .spawn(move || write_lines(lines, out, &dropped, &pending))?;
        Ok(writer)
    }

    /// Waits up to `timeout` for the queued lines to be written (before the process exits).
    pub fn drain(&self, timeout: std::time::Duration) {
        let deadline = std::time::Instant::now() + timeout;
        while self.pending.load(Ordering::Acquire) > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

fn write_lines(
    lines: Receiver<Vec<u8>>,
    mut out: impl Write,
    dropped: &AtomicU64,
    pending: &AtomicU64,
) {
    for line in lines {
        let lost = dropped.swap(0, Ordering::Relaxed);
        if lost > 0 {
            let _ = writeln!(
                out,
                "storaged: {lost} log lines dropped while stderr was full"
            );
        }
        let _ = out.write_all(&line);
        let _ = out.flush();
        pending.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One event's line, sent to the queue when complete.
pub struct Line {
    buf: Vec<u8>,
    writer: LogWriter,
}

impl Write for Line {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let line = std::mem::take(&mut self.buf);
        self.writer.pending.fetch_add(1, Ordering::AcqRel);
        match self.writer.queue.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Disconnected(_)) => {
                self.writer.pending.fetch_sub(1, Ordering::AcqRel);
            }
            Err(TrySendError::Full(_)) => {
                self.writer.pending.fetch_sub(1, Ordering::AcqRel);
                self.writer.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = Line;
    fn make_writer(&'a self) -> Line {
        Line {
            buf: Vec::with_capacity(256),
            writer: self.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::sync::{Condvar, Mutex};
    use tracing_subscriber::fmt::MakeWriter;

    /// Whether the output is released, and what it got.
    type Output = Mutex<(bool, Vec<u8>)>;

    /// An output that blocks until released, then records what it got.
    #[derive(Clone, Default)]
    struct Stalled(Arc<(Output, Condvar)>);

    impl Write for Stalled {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            let (lock, cv) = &*self.0;
            let mut s = cv.wait_while(lock.lock().unwrap(), |s| !s.0).unwrap();
            s.1.extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_output_drops_lines_instead_of_blocking_and_reports_the_count() {
        let out = Stalled::default();
        let writer = LogWriter::start(out.clone()).unwrap();
        // The output takes nothing: every write still returns at once.
        for i in 0..QUEUE_LINES + 100 {
            let mut line = writer.make_writer();
            writeln!(line, "line {i}").unwrap();
        }
        assert!(writer.dropped.load(Ordering::Relaxed) >= 99);
        {
            let (lock, cv) = &*out.0;
            lock.lock().unwrap().0 = true;
            cv.notify_all();
        }
        writer.drain(std::time::Duration::from_secs(10));
        let mut line = writer.make_writer();
        writeln!(line, "after").unwrap();
        drop(line);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let text = String::from_utf8(out.0 .0.lock().unwrap().1.clone()).unwrap();
            if text.contains("after") {
                assert!(text.contains("log lines dropped while stderr was full"));
                assert!(text.contains("line 0\n"));
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{text}");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}
