//! A vhost-user-blk backend written by hand, for tests of vmm's vhost-user frontend where the
//! backend must fail in ways storaged never does (a request refused halfway through a device's
//! activation). It serves one connection on a thread and records every request it gets, for
//! the test to check what vmm sent. The counterpart of [`crate::raw_frontend`], which plays
//! the frontend to storaged.

use std::io::{Read, Write};
use std::path::Path;

// vhost-user request codes the backend looks at, or a test looks for in what it got.
pub const GET_FEATURES: u32 = 1;
pub const GET_VRING_BASE: u32 = 11;
pub const SET_VRING_KICK: u32 = 12;
pub const GET_PROTOCOL_FEATURES: u32 = 15;
pub const SET_VRING_ENABLE: u32 = 18;
pub const GET_CONFIG: u32 = 24;

/// Listens on `socket` and serves one connection on a thread, speaking the protocol by hand: it offers
/// VERSION_1, MQ with two queues, and the CONFIG, MQ and REPLY_ACK protocol features; answers
/// every request as a working backend would, except those `refuse` picks, which it acks with
/// a failure. Descriptors that come with a message are closed unread. The thread returns, once
/// vmm hangs up, every request it got (code and payload).
pub fn start(
    socket: &Path,
    refuse: fn(u32, &[u8]) -> bool,
) -> std::thread::JoinHandle<Vec<(u32, Vec<u8>)>> {
    const REPLY: u32 = 0x1 | 0x4; // version 1, reply
    const NEED_REPLY: u32 = 0x8;
    let listener = std::os::unix::net::UnixListener::bind(socket).unwrap();
    std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut seen = Vec::new();
        let mut hdr = [0u8; 12];
        while conn.read_exact(&mut hdr).is_ok() {
            let word = |i: usize| u32::from_le_bytes(hdr[i * 4..i * 4 + 4].try_into().unwrap());
            let (code, flags, size) = (word(0), word(1), word(2));
            let mut payload = vec![0u8; size as usize];
            conn.read_exact(&mut payload).unwrap();
            let body: Option<Vec<u8>> = match code {
                // VERSION_1, MQ, VHOST_USER_F_PROTOCOL_FEATURES.
                GET_FEATURES => Some(((1u64 << 32) | (1 << 12) | (1 << 30)).to_le_bytes().into()),
                // MQ, REPLY_ACK, CONFIG.
                GET_PROTOCOL_FEATURES => Some((0x1u64 | 0x8 | 0x200).to_le_bytes().into()),
                GET_CONFIG => {
                    // The request's offset, size and flags, then the config space: 2048
                    // sectors, num_queues (offset 34) 2.
                    let len = u32::from_le_bytes(payload[4..8].try_into().unwrap()) as usize;
                    let mut config = vec![0u8; len];
                    config[..8].copy_from_slice(&2048u64.to_le_bytes());
                    config[34..36].copy_from_slice(&2u16.to_le_bytes());
                    Some([&payload[..12], &config].concat())
                }
                // The ring's index, and where it stopped: 0.
                GET_VRING_BASE => Some([&payload[..4], &[0u8; 4][..]].concat()),
                _ if flags & NEED_REPLY != 0 => {
                    Some(u64::from(refuse(code, &payload)).to_le_bytes().into())
                }
                _ => None,
            };
            if let Some(body) = body {
                let mut reply = Vec::new();
                for w in [code, REPLY, body.len() as u32] {
                    reply.extend_from_slice(&w.to_le_bytes());
                }
                reply.extend_from_slice(&body);
                conn.write_all(&reply).unwrap();
            }
            seen.push((code, payload));
        }
        seen
    })
}
