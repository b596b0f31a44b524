//! A delay line for a namespace's outgoing packets, for kernels without `sch_netem`: iptables
//! sends what leaves by the veth into NFQUEUE 0, and a thread of this process, in that
//! namespace and bound to the queue over netlink (`NETLINK_NETFILTER`), is told of each packet
//! (its id only: copy mode META; GSO packets whole) and accepts it `delay` after it came.
//! Packets are accepted in the order they came (one batch verdict accepts every packet up to
//! an id), so the link keeps its order as netem's delay does. The rule has `--queue-bypass`
//! and the queue is fail-open: a packet no thread waits for, or one the queue has no room
//! for, passes without the delay rather than being dropped.
//!
//! The thread runs under `SCHED_FIFO` where it may: a wire does not wait for a CPU. Left to
//! the normal scheduler behind two daemons and a writer on a small machine, it releases
//! packets late and in bursts, and a sender's congestion control (BBR, which measures the
//! delivery rate) takes the starved thread for the link's bandwidth: a 50 MB/s link carried
//! 3 MB/s.
//!
//! The netlink messages are `nlmsghdr`, `nfgenmsg` (the queue number big-endian), then
//! attributes, as `linux/netfilter/nfnetlink_queue.h` lays them out.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The queue every namespace uses (queues are per namespace).
const QUEUE: u16 = 0;

const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_QUEUE: u16 = 3;
const NFQNL_MSG_PACKET: u16 = 0;
const NFQNL_MSG_CONFIG: u16 = 2;
const NFQNL_MSG_VERDICT_BATCH: u16 = 3;
const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQA_CFG_MASK: u16 = 4;
const NFQA_CFG_FLAGS: u16 = 5;
const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_COPY_META: u8 = 1;
const NFQA_CFG_F_FAIL_OPEN: u32 = 1;
const NFQA_CFG_F_GSO: u32 = 4;
const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NF_ACCEPT: u32 = 1;
const NLA_TYPE_MASK: u16 = 0x3fff;
const SOL_NETLINK: i32 = 270;
const NETLINK_NO_ENOBUFS: i32 = 5;

/// A running delay line; dropping it stops the thread (packets it held are accepted).
pub struct DelayLine {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl DelayLine {
    /// Delays by `delay` every packet namespace `netns` sends out of `dev`.
    pub fn start(netns: &str, dev: &str, delay: Duration) -> Result<DelayLine, String> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let ns = netns.to_string();
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("delay-{dev}"))
            .spawn(move || {
                let bound = super::enter(&ns)
                    .map_err(|e| format!("cannot enter {ns}: {e}"))
                    .and_then(|()| Queue::bind().map_err(|e| format!("NFQUEUE bind: {e}")));
                match bound {
                    Ok(q) => {
                        realtime();
                        let _ = ready_tx.send(Ok(()));
                        q.run(delay, &stopping);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| format!("cannot start the delay thread: {e}"))?;
        let line = DelayLine {
            stop,
            thread: Some(thread),
        };
        ready_rx
            .recv()
            .map_err(|_| "the delay thread ended at start".to_string())??;
        super::run(
            "ip",
            &[
                "netns",
                "exec",
                netns,
                "iptables",
                "-w",
                "-A",
                "OUTPUT",
                "-o",
                dev,
                "-j",
                "NFQUEUE",
                "--queue-num",
                &QUEUE.to_string(),
                "--queue-bypass",
            ],
        )?;
        Ok(line)
    }
}

/// Moves the calling thread to `SCHED_FIFO`; where it cannot (no `CAP_SYS_NICE`), says so and
/// leaves it where it is.
fn realtime() {
    let param = libc::sched_param { sched_priority: 10 };
    // SAFETY: pid 0 is the calling thread; param is alive for the call.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } != 0 {
        eprintln!(
            "NOTE: the delay line runs without SCHED_FIFO ({}): under load it may carry less \
             than the link would",
            io::Error::last_os_error()
        );
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A netlink socket bound to NFQUEUE [`QUEUE`] of the calling thread's namespace.
struct Queue {
    fd: OwnedFd,
    seq: u32,
}

impl Queue {
    fn bind() -> io::Result<Queue> {
        // SAFETY: socket(2) with constant arguments; the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_NETFILTER,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a new descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: a zeroed sockaddr_nl is valid (pid 0: the kernel picks the port id).
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: addr is a sockaddr_nl of the size given, alive for the call.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        setsockopt(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 8 << 20)?;
        setsockopt(&fd, SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)?;
        let mut q = Queue { fd, seq: 0 };
        let cmd = [NFQNL_CFG_CMD_BIND, 0, 0, libc::AF_INET as u8];
        q.request(&[(NFQA_CFG_CMD, &cmd)])?;
        let mut params = [0u8; 5];
        params[4] = NFQNL_COPY_META;
        let flags = (NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_GSO).to_be_bytes();
        q.request(&[
            (NFQA_CFG_PARAMS, &params),
            (NFQA_CFG_FLAGS, &flags),
            (NFQA_CFG_MASK, &flags),
        ])?;
        Ok(q)
    }

    /// Sends a config message and waits for the kernel's acknowledgement.
    fn request(&mut self, attrs: &[(u16, &[u8])]) -> io::Result<()> {
        self.seq += 1;
        let msg = message(
            NFQNL_MSG_CONFIG,
            (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16,
            self.seq,
            attrs,
        );
        self.send(&msg)?;
        let mut buf = vec![0u8; 8192];
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            self.wait(Duration::from_millis(100));
            let n = match self.recv(&mut buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    continue
                }
                r => r?,
            };
            for (ty, seq, payload) in messages(&buf[..n]) {
                if ty == libc::NLMSG_ERROR as u16 && seq == self.seq {
                    let errno = payload
                        .get(..4)
                        .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                        .unwrap_or(-libc::EPROTO);
                    return match errno {
                        0 => Ok(()),
                        e => Err(io::Error::from_raw_os_error(-e)),
                    };
                }
            }
        }
    }

    fn send(&self, msg: &[u8]) -> io::Result<()> {
        // SAFETY: a zeroed sockaddr_nl (pid 0) is the kernel's address.
        let mut to: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        to.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: msg and to are valid for the lengths given, for the call.
        let r = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&to as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: buf is writable for its length, for the call.
        let r = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(r as usize)
    }

    /// Waits until the socket is readable or `timeout` passes.
    fn wait(&self, timeout: Duration) {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: one pollfd and a timespec, both alive for the call; no signal mask.
        unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
    }

    /// Accepts every packet up to `id`.
    fn accept_to(&self, id: u32) {
        let mut hdr = [0u8; 8];
        hdr[..4].copy_from_slice(&NF_ACCEPT.to_be_bytes());
        hdr[4..].copy_from_slice(&id.to_be_bytes());
        let msg = message(
            NFQNL_MSG_VERDICT_BATCH,
            libc::NLM_F_REQUEST as u16,
            0,
            &[(NFQA_VERDICT_HDR, &hdr)],
        );
        // A verdict that cannot be sent leaves its packets queued: the next batch, for a
        // later id, accepts them with its own.
        let _ = self.send(&msg);
    }

    /// Holds each packet `delay`, until `stop`; then accepts what it holds.
    fn run(self, delay: Duration, stop: &AtomicBool) {
        let mut held: VecDeque<(Instant, u32)> = VecDeque::new();
        let mut buf = vec![0u8; 256 << 10];
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            let timeout = held
                .front()
                .map(|(due, _)| due.saturating_duration_since(now))
                .unwrap_or(Duration::from_millis(50));
            if !timeout.is_zero() {
                self.wait(timeout);
            }
            while let Ok(n) = self.recv(&mut buf) {
                let came = Instant::now();
                for (ty, _, payload) in messages(&buf[..n]) {
                    if ty != (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET {
                        continue;
                    }
                    if let Some(id) = packet_id(payload) {
                        held.push_back((came + delay, id));
                    }
                }
            }
            let now = Instant::now();
            let mut last = None;
            while let Some(&(due, id)) = held.front() {
                if due > now {
                    break;
                }
                held.pop_front();
                last = Some(id);
            }
            if let Some(id) = last {
                self.accept_to(id);
            }
        }
        if let Some(&(_, id)) = held.back() {
            self.accept_to(id);
        }
    }
}

fn setsockopt(fd: &OwnedFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: an int option, its pointer and size valid for the call.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as u32,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An nfqueue message of type `ty` for [`QUEUE`]: header, `nfgenmsg`, attributes.
fn message(ty: u16, flags: u16, seq: u32, attrs: &[(u16, &[u8])]) -> Vec<u8> {
    let mut m = vec![0u8; 16];
    m.extend_from_slice(&[libc::AF_UNSPEC as u8, 0]);
    m.extend_from_slice(&QUEUE.to_be_bytes());
    for (kind, data) in attrs {
        let len = 4 + data.len();
        m.extend_from_slice(&(len as u16).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(data);
        m.resize(m.len().next_multiple_of(4), 0);
    }
    let len = m.len() as u32;
    m[..4].copy_from_slice(&len.to_ne_bytes());
    m[4..6].copy_from_slice(&((NFNL_SUBSYS_QUEUE << 8) | ty).to_ne_bytes());
    m[6..8].copy_from_slice(&flags.to_ne_bytes());
    m[8..12].copy_from_slice(&seq.to_ne_bytes());
    m
}

/// The netlink messages in a datagram: (type, seq, what follows the 16-byte header).
fn messages(mut buf: &[u8]) -> Vec<(u16, u32, &[u8])> {
    let mut out = Vec::new();
    while buf.len() >= 16 {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len < 16 || len > buf.len() {
            break;
        }
        let ty = u16::from_ne_bytes([buf[4], buf[5]]);
        let seq = u32::from_ne_bytes([buf[8], buf[9], buf[10], buf[11]]);
        out.push((ty, seq, &buf[16..len]));
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
    }
    out
}

/// The packet id of an `NFQNL_MSG_PACKET` (its payload after the netlink header).
fn packet_id(payload: &[u8]) -> Option<u32> {
    let mut attrs = payload.get(4..)?;
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > attrs.len() {
            return None;
        }
        if kind == NFQA_PACKET_HDR {
            let d = attrs.get(4..8)?;
            return Some(u32::from_be_bytes([d[0], d[1], d[2], d[3]]));
        }
        attrs = &attrs[len.next_multiple_of(4).min(attrs.len())..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_message_reads_back_as_one_message_with_its_attributes_aligned() {
        let msg = message(
            NFQNL_MSG_CONFIG,
            5,
            7,
            &[(NFQA_CFG_PARAMS, &[0, 0, 0, 0, 1])],
        );
        assert_eq!(
            msg.len(),
            16 + 4 + 12,
            "5 bytes of data padded to 8, plus 4"
        );
        let m = messages(&msg);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].0, (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_CONFIG);
        assert_eq!(m[0].1, 7);
    }

    #[test]
    fn the_packet_id_is_read_from_the_packet_header_attribute() {
        let mut hdr = 0x0102_0304u32.to_be_bytes().to_vec();
        hdr.extend_from_slice(&[8, 0, 3]);
        let msg = message(
            NFQNL_MSG_PACKET,
            0,
            0,
            &[(9, &[1, 2]), (NFQA_PACKET_HDR, &hdr)],
        );
        let m = messages(&msg);
        assert_eq!(packet_id(m[0].2), Some(0x0102_0304));
        assert_eq!(
            packet_id(&[0, 0, 0, 0, 200, 0, 1, 0]),
            None,
            "a length past the end"
        );
    }
}
