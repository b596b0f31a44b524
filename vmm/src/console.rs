//! The serial console's output. A guest writes its console a byte per vCPU exit, under the
//! port bus lock, and must never wait on the host for it:
//!
//! - [`Console`], the 16550's output, copies the byte into a [`ConsoleBuffer`] of at most
//!   [`BUFFER_BYTES`], under a mutex held for that copy only. When the buffer is full, the
//!   oldest bytes waiting are dropped and counted: a guest that writes faster than its sink
//!   takes loses the middle of what it wrote, not its last lines (a panic's), and no time.
//! - [`ConsoleWriter::run`], on a thread of its own (started with the vCPUs, in
//!   [`crate::vm`]), waits for bytes, lets more come for up to [`LINGER`] (a guest's line
//!   comes a byte per exit: this makes it one write, not one per byte), takes everything
//!   waiting, writes it to the sink and flushes, then waits for more: a reader following the
//!   console sees each line within about a millisecond. A sink that stalls (a stdout nobody
//!   reads) stalls only this thread.
//! - A file sink is a [`RotatingFile`]: once it holds its `max` bytes it is renamed `PATH.1`
//!   (replacing the one before) and a new `PATH` started, so a guest's console takes at most
//!   twice `--serial-log-max` of the host's disk.
//! - At the VM's end, [`ConsoleBuffer::close`] lets the writer write what waits, and waits
//!   for it for as long as the sink takes bytes; a sink that takes none for [`STALL`] is
//!   given up on. Bytes dropped or left unwritten are logged then.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Most bytes waiting for the writer.
pub const BUFFER_BYTES: usize = 1 << 20;
/// How long the writer lets bytes gather before it writes them, when fewer than
/// [`LINGER_BYTES`] wait.
pub const LINGER: Duration = Duration::from_millis(1);
/// Bytes waiting that the writer writes without lingering.
pub const LINGER_BYTES: usize = 4 << 10;
/// How long the VM's end waits for a sink that takes no bytes.
pub const STALL: Duration = Duration::from_secs(1);
/// Default size of the serial log file before it is rotated (`--serial-log-max`).
pub const DEFAULT_LOG_MAX: u64 = 16 << 20;
/// Least `--serial-log-max` accepted.
pub const MIN_LOG_MAX: u64 = 4 << 10;

/// Errors opening the serial log file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot open the serial log {0}")]
    Open(PathBuf, #[source] io::Error),
}

struct State {
    /// Bytes the guest wrote that the writer has not taken yet.
    pending: VecDeque<u8>,
    /// Bytes the writer took and has not got through to the sink yet.
    in_flight: usize,
    /// Bytes that never reached the sink: dropped from a full buffer, or refused by the sink.
    dropped: u64,
    /// When the guest wrote its first byte (for the benchmarks' time to first output).
    first_byte: Option<Instant>,
    /// The VM ended: the writer writes what waits and stops; later bytes are ignored.
    closed: bool,
    /// The writer waits for bytes: the next one wakes it.
    writer_waiting: bool,
    /// The writer has stopped, everything written.
    done: bool,
    /// When the writer last got bytes through to the sink.
    progress: Instant,
}

/// The bytes between the guest's serial port and the writer thread.
pub struct ConsoleBuffer {
    state: Mutex<State>,
    /// Bytes arrived, or the buffer closed: what the writer waits for.
    more: Condvar,
    /// The writer got bytes through, or stopped: what [`ConsoleBuffer::close`] waits for.
    written: Condvar,
    capacity: usize,
}

impl ConsoleBuffer {
    /// A buffer of at most `capacity` waiting bytes (at least one).
    pub fn new(capacity: usize) -> Arc<ConsoleBuffer> {
        Arc::new(ConsoleBuffer {
            state: Mutex::new(State {
                pending: VecDeque::new(),
                in_flight: 0,
                dropped: 0,
                first_byte: None,
                closed: false,
                writer_waiting: false,
                done: false,
                progress: Instant::now(),
            }),
            more: Condvar::new(),
            written: Condvar::new(),
            capacity: capacity.max(1),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues what the guest wrote; never waits for the sink.
    fn push(&self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let mut s = self.lock();
        s.first_byte.get_or_insert_with(Instant::now);
        if s.closed {
            return;
        }
        // More than the buffer holds: only its end can be kept.
        let skipped = bytes.len().saturating_sub(self.capacity);
        let bytes = &bytes[skipped..];
        // Room for it: at most all that waits goes.
        let over = (s.pending.len() + bytes.len()).saturating_sub(self.capacity);
        s.pending.drain(..over);
        s.dropped += (skipped + over) as u64;
        s.pending.extend(bytes);
        if std::mem::take(&mut s.writer_waiting) {
            drop(s);
            self.more.notify_one();
        }
    }

    /// When the guest wrote its first byte on the console.
    pub fn first_byte(&self) -> Option<Instant> {
        self.lock().first_byte
    }

    /// Bytes that never reached the sink so far.
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }

    /// Ends the console: the writer writes what waits, then stops. Waits for that while the
    /// sink takes bytes, at most `stall` without any; returns the bytes left unwritten.
    pub fn close(&self, stall: Duration) -> usize {
        let mut s = self.lock();
        s.closed = true;
        s.progress = Instant::now();
        self.more.notify_all();
        let unwritten = loop {
            if s.done {
                break 0;
            }
            let waited = s.progress.elapsed();
            if waited >= stall {
                break s.pending.len() + s.in_flight;
            }
            s = self
                .written
                .wait_timeout(s, stall - waited)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        };
        if s.dropped > 0 {
            tracing::warn!(
                dropped_bytes = s.dropped,
                "serial console: bytes the guest wrote that never reached the output"
            );
        }
        if unwritten > 0 {
            tracing::warn!(
                unwritten_bytes = unwritten,
                stall_ms = stall.as_millis() as u64,
                "serial console: the output took nothing for the stall time; giving up on it"
            );
        }
        unwritten
    }
}

/// The 16550's output: what the guest writes goes into the [`ConsoleBuffer`].
pub struct Console(Arc<ConsoleBuffer>);

impl Console {
    /// The 16550's output into `buffer`.
    pub fn new(buffer: Arc<ConsoleBuffer>) -> Console {
        Console(buffer)
    }
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }

    /// The writer thread flushes; the vCPU does not wait for it.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Drains a [`ConsoleBuffer`] into the console's sink (see the module doc).
pub struct ConsoleWriter {
    buffer: Arc<ConsoleBuffer>,
    sink: Box<dyn Write + Send>,
}

impl ConsoleWriter {
    /// A writer of `buffer` into `sink`; [`ConsoleWriter::run`] is its thread.
    pub fn new(buffer: Arc<ConsoleBuffer>, sink: Box<dyn Write + Send>) -> ConsoleWriter {
        ConsoleWriter { buffer, sink }
    }

    /// Writes what the guest writes until the buffer is closed and empty.
    pub fn run(mut self) {
        let mut batch = Vec::new();
        let mut drops_reported = false;
        let mut failing = false;
        loop {
            let dropped = {
                let mut s = self.buffer.lock();
                while s.pending.is_empty() && !s.closed {
                    s.writer_waiting = true;
                    s = self.buffer.more.wait(s).unwrap_or_else(|p| p.into_inner());
                }
                s.writer_waiting = false;
                if !s.closed && s.pending.len() < LINGER_BYTES {
                    // Only a close cuts this wait short.
                    s = (self.buffer.more)
                        .wait_timeout(s, LINGER)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
                if s.pending.is_empty() {
                    s.done = true;
                    self.buffer.written.notify_all();
                    return;
                }
                batch.clear();
                batch.extend(s.pending.drain(..));
                s.in_flight = batch.len();
                s.dropped
            };
            if dropped > 0 && !drops_reported {
                drops_reported = true;
                tracing::warn!(
                    "serial console: dropping bytes the guest wrote (the output does not keep \
                     up, or refuses them)"
                );
            }
            self.write_out(&batch, &mut failing);
        }
    }

    /// Writes one batch and flushes; what the sink refuses is counted as dropped (the first
    /// failure of a run of them is logged).
    fn write_out(&mut self, batch: &[u8], failing: &mut bool) {
        let mut rest = batch;
        let mut error = None;
        while !rest.is_empty() {
            match self.sink.write(rest) {
                Ok(0) => {
                    error = Some(io::Error::from(io::ErrorKind::WriteZero));
                    break;
                }
                Ok(n) => {
                    rest = &rest[n..];
                    let mut s = self.buffer.lock();
                    s.in_flight = rest.len();
                    s.progress = Instant::now();
                    self.buffer.written.notify_all();
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        if error.is_none() {
            error = self.sink.flush().err();
        }
        let mut s = self.buffer.lock();
        s.dropped += rest.len() as u64;
        s.in_flight = 0;
        s.progress = Instant::now();
        self.buffer.written.notify_all();
        drop(s);
        match error {
            Some(e) if !*failing => {
                *failing = true;
                tracing::warn!("serial console: cannot write the output: {e}");
            }
            Some(_) => {}
            None => *failing = false,
        }
    }
}

/// A log file that holds at most `max` bytes: when full it becomes `PATH.1` (replacing the
/// one before) and a new `PATH` is started. A `PATH` removed from under it is started again
/// when it would have been rotated.
pub struct RotatingFile {
    path: PathBuf,
    rotated: PathBuf,
    file: File,
    len: u64,
    max: u64,
}

impl RotatingFile {
    /// Opens `path` to append to it; what it already holds counts towards `max`.
    pub fn open(path: &Path, max: u64) -> Result<RotatingFile, Error> {
        let (file, len) = Self::open_file(path).map_err(|e| Error::Open(path.to_owned(), e))?;
        let mut rotated = path.as_os_str().to_owned();
        rotated.push(".1");
        Ok(RotatingFile {
            path: path.to_owned(),
            rotated: rotated.into(),
            file,
            len,
            max: max.max(1),
        })
    }

    fn open_file(path: &Path) -> io::Result<(File, u64)> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let len = file.metadata()?.len();
        Ok((file, len))
    }

    fn rotate(&mut self) -> io::Result<()> {
        match std::fs::rename(&self.path, &self.rotated) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        (self.file, self.len) = Self::open_file(&self.path)?;
        Ok(())
    }
}

impl Write for RotatingFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.len >= self.max {
            self.rotate()?;
        }
        let room = usize::try_from(self.max - self.len).unwrap_or(usize::MAX);
        let n = self.file.write(&buf[..buf.len().min(room)])?;
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink tests can read back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn start(
        buffer: &Arc<ConsoleBuffer>,
        sink: Box<dyn Write + Send>,
    ) -> std::thread::JoinHandle<()> {
        let writer = ConsoleWriter::new(buffer.clone(), sink);
        crate::threads::spawn(crate::threads::ThreadKind::Console, "console", move || {
            writer.run()
        })
        .unwrap()
    }

    #[test]
    fn everything_written_reaches_the_sink_by_the_close() {
        let buffer = ConsoleBuffer::new(64 << 10);
        let sink = Shared::default();
        let t = start(&buffer, Box::new(sink.clone()));
        let mut console = Console::new(buffer.clone());
        let mut want = Vec::new();
        for i in 0..5000u32 {
            // Byte by byte, as the 16550 writes, while the writer drains.
            for b in format!("line {i}\n").bytes() {
                console.write_all(&[b]).unwrap();
                want.push(b);
            }
        }
        assert_eq!(buffer.close(STALL), 0);
        t.join().unwrap();
        let got = sink.0.lock().unwrap().clone();
        assert_eq!(buffer.dropped(), 0);
        assert_eq!(got, want);
        assert!(buffer.first_byte().is_some());
    }

    #[test]
    fn a_full_buffer_drops_the_oldest_bytes_and_counts_them() {
        let buffer = ConsoleBuffer::new(8);
        let mut console = Console::new(buffer.clone());
        // No writer yet: everything waits in the buffer.
        console.write_all(b"abcdef").unwrap();
        console.write_all(b"ghij").unwrap();
        console.write_all(b"0123456789").unwrap();
        assert_eq!(buffer.dropped(), 12);
        let sink = Shared::default();
        let t = start(&buffer, Box::new(sink.clone()));
        assert_eq!(buffer.close(STALL), 0);
        t.join().unwrap();
        assert_eq!(&*sink.0.lock().unwrap(), b"23456789");
        // After the close, the guest's bytes go nowhere and are not counted.
        console.write_all(b"late").unwrap();
        assert_eq!(buffer.dropped(), 12);
    }

    #[test]
    fn a_stalled_sink_blocks_neither_the_guest_nor_the_close_for_longer_than_the_stall() {
        // A pipe nobody reads: the writer blocks once its 4 KiB are full.
        let (read_end, write_end) = crate::sys::pipe_of_size(4096).unwrap();
        let buffer = ConsoleBuffer::new(64 << 10);
        let _t = start(&buffer, Box::new(write_end));
        let mut console = Console::new(buffer.clone());
        let started = Instant::now();
        for _ in 0..(1 << 20) / 64 {
            console.write_all(&[b'x'; 64]).unwrap();
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the guest waited"
        );
        assert!(buffer.dropped() > 0);
        let closing = Instant::now();
        let unwritten = buffer.close(Duration::from_millis(200));
        assert!(unwritten > 0);
        let waited = closing.elapsed();
        assert!(waited >= Duration::from_millis(200), "{waited:?}");
        assert!(waited < Duration::from_secs(2), "{waited:?}");
        drop(read_end);
    }

    #[test]
    fn a_log_file_rotates_at_its_cap_keeping_one_older_file() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("console.log");
        let rotated = tmp.path().join("console.log.1");
        std::fs::write(&path, b"0123456789").unwrap();
        std::fs::write(&rotated, b"from an older run").unwrap();
        let mut log = RotatingFile::open(&path, 100).unwrap();
        let data: Vec<u8> = (0..250u32).map(|i| b'a' + (i % 26) as u8).collect();
        for chunk in data.chunks(30) {
            log.write_all(chunk).unwrap();
        }
        log.flush().unwrap();
        // 10 bytes there before, 250 written: rotated at 100 and at 200, 60 in the log.
        let all = [b"0123456789".as_slice(), &data].concat();
        assert_eq!(std::fs::read(&rotated).unwrap(), &all[100..200]);
        assert_eq!(std::fs::read(&path).unwrap(), &all[200..]);
    }

    #[test]
    fn a_log_file_removed_while_in_use_is_started_again_when_full() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("console.log");
        let mut log = RotatingFile::open(&path, 10).unwrap();
        log.write_all(b"0123456789").unwrap();
        std::fs::remove_file(&path).unwrap();
        log.write_all(b"abc").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"abc");
        assert!(!tmp.path().join("console.log.1").exists());
    }
}
