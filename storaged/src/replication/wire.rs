//! The replication link's wire format: frames, and the messages they carry.
//!
//! Pure code, no I/O: the link appends what it reads to a buffer and calls [`decode`] until it
//! returns `Ok(None)` (more bytes needed), and [`encode`]s each message it sends. Everything
//! [`decode`] reads is peer-controlled: any malformed frame is an [`Error`] that says what was
//! wrong, never a panic, and nothing is allocated beyond the declared payload length, which is
//! at most [`MAX_PAYLOAD`]. [`encode`] refuses what [`decode`] would refuse, so a frame this side
//! sends is one the peer accepts. A header or checksum error leaves the stream's framing
//! unknown: nothing after it can be decoded.
//!
//! # Frame
//!
//! A 16-byte header, then the payload. All integers are little-endian.
//!
//! | bytes  | field          | value                                                         |
//! |--------|----------------|---------------------------------------------------------------|
//! | 0..4   | magic          | `b"SRPL"`                                                     |
//! | 4      | version        | u8, [`VERSION`] (1)                                           |
//! | 5      | type           | u8, [`MessageType`]: 1..=18                                   |
//! | 6..8   | flags          | u16, 0 in version 1                                           |
//! | 8..12  | payload length | u32, at most [`MAX_PAYLOAD`] (4 MiB + 4 KiB)                  |
//! | 12..16 | checksum       | u32, CRC32C of the header (this field as zeros) then payload  |
//! | 16..   | payload        | the message's fields, in the order listed below               |
//!
//! Magic, version, flags and length are checked as soon as the 16 header bytes are there, so a
//! bad header is reported without waiting for the payload it announces. The type is checked
//! after the checksum, so that an unknown type is one the peer sent, not a corrupted byte.
//!
//! Field encodings: `u8`..`u64` fixed-width; `bool` one byte, 0 or 1; `id` 16 raw bytes (a
//! UUID); `string` u16 length then UTF-8, at most [`MAX_STRING`] bytes; `data` u32 length then
//! bytes, at most [`MAX_DATA`] bytes; `spec` a [`VolumeSpec`]: string name, string id, u64
//! size, u32 block_size, string tier, bool encrypted, u16 num_queues. A payload must end exactly after its last field.
//!
//! # Messages
//!
//! | type | message       | payload                                                                   |
//! |------|---------------|---------------------------------------------------------------------------|
//! | 1    | `Hello`       | id relationship, u8 role (1 primary, 2 secondary), u64 generation, u64 shared_seq, bool diverged, bool won, u64 epoch, bool consistent, string listen, spec volume, bool all_regions, data regions (at most [`MAX_BITMAP`]) |
//! | 2    | `Create`      | id relationship, spec volume, u8 dek present (0, 1), data dek if present (at most [`MAX_KEY`]) |
//! | 3    | `Accepted`    | id relationship                                                           |
//! | 4    | `Refused`     | u16 status, string reason                                                 |
//! | 5    | `Write`       | u64 seq, u64 offset, data                                                 |
//! | 6    | `Zero`        | u64 seq, u64 offset, u64 len, bool discard                                |
//! | 7    | `Cut`         | u64 epoch, u64 seq, u64 time_unix_ns                                      |
//! | 8    | `Committed`   | u64 epoch                                                                 |
//! | 9    | `Staged`      | u64 seq                                                                   |
//! | 10   | `ResyncBegin` | u64 epoch, u64 regions, u64 bytes                                         |
//! | 11   | `Region`      | u64 offset, data                                                          |
//! | 12   | `ResyncEnd`   | u64 epoch, u64 seq, u64 time_unix_ns                                      |
//! | 13   | `Resize`      | u64 size                                                                  |
//! | 14   | `Ping`        | u64 time_unix_ns                                                          |
//! | 15   | `Pong`        | u64 time_unix_ns                                                          |
//! | 16   | `Goodbye`     | string reason                                                             |
//! | 17   | `Promote`     | id relationship, u64 generation, u64 seq                                  |
//! | 18   | `End`         | id relationship                                                           |
//!
//! `Write` and `Region` need `offset + data length`, `Zero` `offset + len`, to fit in a u64;
//! whether a range lies inside the volume is for the caller to check, as is every other meaning
//! of a value (a block size, a sequence number). What each message means is on [`Message`].

use zeroize::{Zeroize, ZeroizeOnDrop};

/// The first four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"SRPL";
/// The protocol version this side speaks.
pub const VERSION: u8 = 1;
/// Bytes of a frame header.
pub const HEADER_LEN: usize = 16;
/// Largest `data` field: a write or resync region of 4 MiB.
pub const MAX_DATA: usize = 4 << 20;
/// Largest payload: a `Write` of [`MAX_DATA`] bytes and room for its fields.
pub const MAX_PAYLOAD: u32 = (4 << 20) + 4096;
/// Largest `string` field, in bytes of UTF-8.
pub const MAX_STRING: usize = 1024;
/// Largest dirty-region bitmap in a `Hello`: 16 TiB of 1 MiB regions. A side whose map is
/// larger sends `all_regions` instead.
pub const MAX_BITMAP: usize = 2 << 20;
/// Largest key in a `Create` (XTS-AES-256's is [`crate::crypto::DEK_LEN`], 64 bytes).
pub const MAX_KEY: usize = 256;

const ID_LEN: usize = 16;
const SPEC_MAX: usize = 2 + MAX_STRING + 2 + MAX_STRING + 8 + 4 + 2 + MAX_STRING + 1 + 2;
// Every message whose fields are within their limits fits in a frame.
const _: () = assert!(8 + 8 + 4 + MAX_DATA <= MAX_PAYLOAD as usize);
const _: () = assert!(
    ID_LEN + 1 + 8 + 8 + 1 + 1 + 8 + 1 + 2 + MAX_STRING + SPEC_MAX + 1 + 4 + MAX_BITMAP
        <= MAX_PAYLOAD as usize
);
const _: () = assert!(ID_LEN + SPEC_MAX + 1 + 4 + MAX_KEY <= MAX_PAYLOAD as usize);

/// What was wrong with a frame, received or about to be sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("Bad magic {0:02x?}, expected \"SRPL\"")]
    BadMagic([u8; 4]),
    #[error("Unsupported protocol version {0}, this side speaks {VERSION}")]
    UnsupportedVersion(u8),
    #[error("Nonzero flags {0:#06x} in a version 1 frame")]
    NonzeroFlags(u16),
    #[error("Payload of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    PayloadTooLong(u64),
    #[error("Checksum mismatch: the frame says {expected:#010x}, its bytes give {actual:#010x}")]
    ChecksumMismatch { expected: u32, actual: u32 },
    #[error("Unknown message type {0}")]
    UnknownType(u8),
    #[error("{message:?} payload ends inside its {field} field")]
    Truncated {
        message: MessageType,
        field: &'static str,
    },
    #[error("{message:?} payload has {len} bytes after its last field")]
    TrailingBytes { message: MessageType, len: usize },
    #[error("{field} of {message:?} is not valid UTF-8")]
    InvalidUtf8 {
        message: MessageType,
        field: &'static str,
    },
    #[error("{field} of {message:?} is {len} bytes, more than the {limit} allowed")]
    TooLong {
        message: MessageType,
        field: &'static str,
        len: u64,
        limit: usize,
    },
    #[error("{message:?} range at offset {offset:#x} of {len} bytes overflows u64")]
    RangeOverflow {
        message: MessageType,
        offset: u64,
        len: u64,
    },
    #[error("{field} of {message:?} is {value}, which is not allowed")]
    InvalidValue {
        message: MessageType,
        field: &'static str,
        value: u64,
    },
}

/// The type byte of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageType {
    Hello = 1,
    Create = 2,
    Accepted = 3,
    Refused = 4,
    Write = 5,
    Zero = 6,
    Cut = 7,
    Committed = 8,
    Staged = 9,
    ResyncBegin = 10,
    Region = 11,
    ResyncEnd = 12,
    Resize = 13,
    Ping = 14,
    Pong = 15,
    Goodbye = 16,
    Promote = 17,
    End = 18,
}

impl MessageType {
    /// The type with this number, if there is one.
    pub fn from_u8(value: u8) -> Option<MessageType> {
        use MessageType::*;
        Some(match value {
            1 => Hello,
            2 => Create,
            3 => Accepted,
            4 => Refused,
            5 => Write,
            6 => Zero,
            7 => Cut,
            8 => Committed,
            9 => Staged,
            10 => ResyncBegin,
            11 => Region,
            12 => ResyncEnd,
            13 => Resize,
            14 => Ping,
            15 => Pong,
            16 => Goodbye,
            17 => Promote,
            18 => End,
            _ => return None,
        })
    }
}

/// Which side of a relationship a storaged is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Role {
    Primary = 1,
    Secondary = 2,
}

impl From<Role> for super::ReplicationRole {
    fn from(r: Role) -> Self {
        match r {
            Role::Primary => super::ReplicationRole::Primary,
            Role::Secondary => super::ReplicationRole::Secondary,
        }
    }
}

/// A volume as the link describes it to the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    pub name: String,
    /// The volume's id (a UUID's text), kept by the secondary: the guest's serial stays the
    /// same across a failover.
    pub id: String,
    /// Bytes.
    pub size: u64,
    pub block_size: u32,
    pub tier: String,
    pub encrypted: bool,
    pub num_queues: u16,
}

/// A volume's raw data-encryption key as a `Create` carries it. Zeroed when dropped; its
/// `Debug` prints `<redacted>`, never the bytes.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct DekBytes(Vec<u8>);

impl DekBytes {
    pub fn new(bytes: Vec<u8>) -> DekBytes {
        DekBytes(bytes)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for DekBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// One message of the replication link. Sequence numbers count the primary's records (writes
/// and zeroed ranges) of one relationship; epochs group them into consistent points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// The first frame of each side: who it is, and where its copy of the volume stands.
    Hello {
        relationship: [u8; 16],
        role: Role,
        generation: u64,
        /// The last record both sides are known to hold.
        shared_seq: u64,
        /// A primary: whether it changed the volume with no link to its secondary since they
        /// were last level (see `dirty.rs`).
        diverged: bool,
        /// A primary: whether an operator resolved a split brain in its favour, and the
        /// relationship has not been level since.
        won: bool,
        /// The last epoch this side's image is at (a secondary's last commit).
        epoch: u64,
        /// Whether that image is consistent (false before an initial sync has ended).
        consistent: bool,
        /// The sender's own replication address, `HOST:PORT` (empty: it accepts no peer), for
        /// the other side to reach it later (after a role change).
        listen: String,
        volume: VolumeSpec,
        /// A secondary that was a primary: the regions it changed that its new primary may
        /// not have, as a dirty map's bitmap (`dirty.rs`); or, when that does not fit in
        /// [`MAX_BITMAP`], `all_regions`.
        all_regions: bool,
        regions: Vec<u8>,
    },
    /// Primary → peer: create the secondary volume; `dek` is its raw key if it is encrypted.
    Create {
        relationship: [u8; 16],
        volume: VolumeSpec,
        dek: Option<DekBytes>,
    },
    /// The answer to `Hello` or `Create` that goes on with the relationship.
    Accepted {
        relationship: [u8; 16],
    },
    /// The answer to `Hello` or `Create` that ends it, with a status code and why.
    Refused {
        status: u16,
        reason: String,
    },
    /// One completed write, as stored (ciphertext for an encrypted volume).
    Write {
        seq: u64,
        offset: u64,
        data: Vec<u8>,
    },
    /// A completed discard (`discard`) or write-zeroes range.
    Zero {
        seq: u64,
        offset: u64,
        len: u64,
        discard: bool,
    },
    /// The end of `epoch`: every record up to `seq` belongs to it; the primary's wall clock at
    /// the cut.
    Cut {
        epoch: u64,
        seq: u64,
        time_unix_ns: u64,
    },
    /// Secondary → primary: `epoch` is durable in the secondary's image.
    Committed {
        epoch: u64,
    },
    /// Secondary → primary (sync mode): every record up to `seq` is durably staged.
    Staged {
        seq: u64,
    },
    /// A resync starts: `regions` counts the `Region` frames that follow, `bytes` their data.
    ResyncBegin {
        epoch: u64,
        regions: u64,
        bytes: u64,
    },
    /// One range of the volume during a resync.
    Region {
        offset: u64,
        data: Vec<u8>,
    },
    /// The resync is complete; the fields are those of a `Cut`.
    ResyncEnd {
        epoch: u64,
        seq: u64,
        time_unix_ns: u64,
    },
    /// The volume is now `size` bytes.
    Resize {
        size: u64,
    },
    Ping {
        time_unix_ns: u64,
    },
    /// The answer to a `Ping`, with the `Ping`'s time.
    Pong {
        time_unix_ns: u64,
    },
    /// The sender closes the link, and says why.
    Goodbye {
        reason: String,
    },
    /// Primary → secondary, in a switchover: the secondary, level with the primary at `seq`,
    /// becomes the primary of `generation`; answered `Accepted` or `Refused`.
    Promote {
        relationship: [u8; 16],
        generation: u64,
        seq: u64,
    },
    /// The relationship is ended: the peer's volume leaves it (and keeps its data).
    End {
        relationship: [u8; 16],
    },
}

impl Message {
    pub fn message_type(&self) -> MessageType {
        match self {
            Message::Hello { .. } => MessageType::Hello,
            Message::Create { .. } => MessageType::Create,
            Message::Accepted { .. } => MessageType::Accepted,
            Message::Refused { .. } => MessageType::Refused,
            Message::Write { .. } => MessageType::Write,
            Message::Zero { .. } => MessageType::Zero,
            Message::Cut { .. } => MessageType::Cut,
            Message::Committed { .. } => MessageType::Committed,
            Message::Staged { .. } => MessageType::Staged,
            Message::ResyncBegin { .. } => MessageType::ResyncBegin,
            Message::Region { .. } => MessageType::Region,
            Message::ResyncEnd { .. } => MessageType::ResyncEnd,
            Message::Resize { .. } => MessageType::Resize,
            Message::Ping { .. } => MessageType::Ping,
            Message::Pong { .. } => MessageType::Pong,
            Message::Goodbye { .. } => MessageType::Goodbye,
            Message::Promote { .. } => MessageType::Promote,
            Message::End { .. } => MessageType::End,
        }
    }
}

/// Bytes of `msg`'s frame, header included (for a message within the limits, which [`encode`]
/// checks).
pub fn encoded_len(msg: &Message) -> usize {
    fn spec(v: &VolumeSpec) -> usize {
        2 + v.name.len() + 2 + v.id.len() + 8 + 4 + 2 + v.tier.len() + 1 + 2
    }
    let payload = match msg {
        Message::Hello {
            volume,
            listen,
            regions,
            ..
        } => {
            ID_LEN
                + 1
                + 8
                + 8
                + 1
                + 1
                + 8
                + 1
                + 2
                + listen.len()
                + spec(volume)
                + 1
                + 4
                + regions.len()
        }
        Message::Create { volume, dek, .. } => {
            ID_LEN + spec(volume) + 1 + dek.as_ref().map_or(0, |k| 4 + k.0.len())
        }
        Message::Accepted { .. } => ID_LEN,
        Message::Refused { reason, .. } => 2 + 2 + reason.len(),
        Message::Write { data, .. } => 8 + 8 + 4 + data.len(),
        Message::Zero { .. } => 8 + 8 + 8 + 1,
        Message::Cut { .. } | Message::ResyncBegin { .. } | Message::ResyncEnd { .. } => 24,
        Message::Committed { .. }
        | Message::Staged { .. }
        | Message::Resize { .. }
        | Message::Ping { .. }
        | Message::Pong { .. } => 8,
        Message::Region { data, .. } => 8 + 4 + data.len(),
        Message::Goodbye { reason } => 2 + reason.len(),
        Message::Promote { .. } => ID_LEN + 16,
        Message::End { .. } => ID_LEN,
    };
    HEADER_LEN + payload
}

/// Appends `msg`'s frame to `out`: one reservation, then header, fields and data in one pass.
/// A message with a field over its limit, or a range that overflows, is refused and leaves
/// `out` as it was.
pub fn encode(msg: &Message, out: &mut Vec<u8>) -> Result<(), Error> {
    let start = out.len();
    out.reserve(encoded_len(msg).min(HEADER_LEN + MAX_PAYLOAD as usize));
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(msg.message_type() as u8);
    // Flags, payload length and checksum, the last two filled in below.
    out.extend_from_slice(&[0; 10]);
    let payload_len = write_payload(
        &mut Writer {
            out,
            message: msg.message_type(),
        },
        msg,
    )
    .and_then(|()| {
        let len = out.len() - start - HEADER_LEN;
        u32::try_from(len)
            .ok()
            .filter(|&l| l <= MAX_PAYLOAD)
            .ok_or(Error::PayloadTooLong(len as u64))
    });
    let payload_len = match payload_len {
        Ok(len) => len,
        Err(e) => {
            out.truncate(start);
            return Err(e);
        }
    };
    let frame = &mut out[start..];
    frame[8..12].copy_from_slice(&payload_len.to_le_bytes());
    let crc = crc32c::crc32c(frame);
    frame[12..16].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Decodes the frame at the start of `buf`: `Ok(None)` if `buf` does not hold all of it yet,
/// or the message and the bytes of `buf` it took. A bad header is reported as soon as `buf`
/// holds its 16 bytes.
pub fn decode(buf: &[u8]) -> Result<Option<(Message, usize)>, Error> {
    let Some((header, rest)) = buf.split_first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let [m0, m1, m2, m3, version, msg_type, f0, f1, l0, l1, l2, l3, c0, c1, c2, c3] = *header;
    if [m0, m1, m2, m3] != MAGIC {
        return Err(Error::BadMagic([m0, m1, m2, m3]));
    }
    if version != VERSION {
        return Err(Error::UnsupportedVersion(version));
    }
    let flags = u16::from_le_bytes([f0, f1]);
    if flags != 0 {
        return Err(Error::NonzeroFlags(flags));
    }
    let payload_len = u32::from_le_bytes([l0, l1, l2, l3]);
    if payload_len > MAX_PAYLOAD {
        return Err(Error::PayloadTooLong(payload_len.into()));
    }
    let Some(payload) = rest.get(..payload_len as usize) else {
        return Ok(None);
    };
    let expected = u32::from_le_bytes([c0, c1, c2, c3]);
    let mut zeroed = *header;
    zeroed[12..].fill(0);
    let actual = crc32c::crc32c_append(crc32c::crc32c(&zeroed), payload);
    if actual != expected {
        return Err(Error::ChecksumMismatch { expected, actual });
    }
    let message = MessageType::from_u8(msg_type).ok_or(Error::UnknownType(msg_type))?;
    let mut r = Reader {
        buf: payload,
        message,
    };
    let msg = read_payload(&mut r)?;
    r.finish()?;
    Ok(Some((msg, HEADER_LEN + payload.len())))
}

fn write_payload(w: &mut Writer<'_>, msg: &Message) -> Result<(), Error> {
    match msg {
        Message::Hello {
            relationship,
            role,
            generation,
            shared_seq,
            diverged,
            won,
            epoch,
            consistent,
            listen,
            volume,
            all_regions,
            regions,
        } => {
            w.bytes(relationship);
            w.u8(*role as u8);
            w.u64(*generation);
            w.u64(*shared_seq);
            w.bool(*diverged);
            w.bool(*won);
            w.u64(*epoch);
            w.bool(*consistent);
            w.string("listen", listen)?;
            w.spec(volume)?;
            w.bool(*all_regions);
            w.data("regions", regions, MAX_BITMAP)?;
        }
        Message::Create {
            relationship,
            volume,
            dek,
        } => {
            w.bytes(relationship);
            w.spec(volume)?;
            w.bool(dek.is_some());
            if let Some(k) = dek {
                w.data("dek", &k.0, MAX_KEY)?;
            }
        }
        Message::Accepted { relationship } => w.bytes(relationship),
        Message::Refused { status, reason } => {
            w.u16(*status);
            w.string("reason", reason)?;
        }
        Message::Write { seq, offset, data } => {
            check_range(w.message, *offset, data.len() as u64)?;
            w.u64(*seq);
            w.u64(*offset);
            w.data("data", data, MAX_DATA)?;
        }
        Message::Zero {
            seq,
            offset,
            len,
            discard,
        } => {
            check_range(w.message, *offset, *len)?;
            w.u64(*seq);
            w.u64(*offset);
            w.u64(*len);
            w.bool(*discard);
        }
        Message::Cut {
            epoch,
            seq,
            time_unix_ns,
        }
        | Message::ResyncEnd {
            epoch,
            seq,
            time_unix_ns,
        } => {
            w.u64(*epoch);
            w.u64(*seq);
            w.u64(*time_unix_ns);
        }
        Message::ResyncBegin {
            epoch,
            regions,
            bytes,
        } => {
            w.u64(*epoch);
            w.u64(*regions);
            w.u64(*bytes);
        }
        Message::Region { offset, data } => {
            check_range(w.message, *offset, data.len() as u64)?;
            w.u64(*offset);
            w.data("data", data, MAX_DATA)?;
        }
        Message::Committed { epoch } => w.u64(*epoch),
        Message::Staged { seq } => w.u64(*seq),
        Message::Resize { size } => w.u64(*size),
        Message::Ping { time_unix_ns } | Message::Pong { time_unix_ns } => w.u64(*time_unix_ns),
        Message::Goodbye { reason } => w.string("reason", reason)?,
        Message::Promote {
            relationship,
            generation,
            seq,
        } => {
            w.bytes(relationship);
            w.u64(*generation);
            w.u64(*seq);
        }
        Message::End { relationship } => w.bytes(relationship),
    }
    Ok(())
}

// Each struct expression reads its fields in the order they are written, which is the order
// on the wire: Rust evaluates a struct expression's fields in source order.
fn read_payload(r: &mut Reader<'_>) -> Result<Message, Error> {
    Ok(match r.message {
        MessageType::Hello => Message::Hello {
            relationship: r.bytes("relationship")?,
            role: match r.u8("role")? {
                1 => Role::Primary,
                2 => Role::Secondary,
                v => return Err(r.invalid("role", v.into())),
            },
            generation: r.u64("generation")?,
            shared_seq: r.u64("shared_seq")?,
            diverged: r.bool("diverged")?,
            won: r.bool("won")?,
            epoch: r.u64("epoch")?,
            consistent: r.bool("consistent")?,
            listen: r.string("listen")?,
            volume: r.spec()?,
            all_regions: r.bool("all_regions")?,
            regions: r.data("regions", MAX_BITMAP)?,
        },
        MessageType::Create => Message::Create {
            relationship: r.bytes("relationship")?,
            volume: r.spec()?,
            dek: match r.bool("dek presence")? {
                true => Some(DekBytes(r.data("dek", MAX_KEY)?)),
                false => None,
            },
        },
        MessageType::Accepted => Message::Accepted {
            relationship: r.bytes("relationship")?,
        },
        MessageType::Refused => Message::Refused {
            status: r.u16("status")?,
            reason: r.string("reason")?,
        },
        MessageType::Write => {
            let seq = r.u64("seq")?;
            let offset = r.u64("offset")?;
            let data = r.data("data", MAX_DATA)?;
            check_range(r.message, offset, data.len() as u64)?;
            Message::Write { seq, offset, data }
        }
        MessageType::Zero => {
            let seq = r.u64("seq")?;
            let offset = r.u64("offset")?;
            let len = r.u64("len")?;
            check_range(r.message, offset, len)?;
            Message::Zero {
                seq,
                offset,
                len,
                discard: r.bool("discard")?,
            }
        }
        MessageType::Cut => Message::Cut {
            epoch: r.u64("epoch")?,
            seq: r.u64("seq")?,
            time_unix_ns: r.u64("time_unix_ns")?,
        },
        MessageType::Committed => Message::Committed {
            epoch: r.u64("epoch")?,
        },
        MessageType::Staged => Message::Staged { seq: r.u64("seq")? },
        MessageType::ResyncBegin => Message::ResyncBegin {
            epoch: r.u64("epoch")?,
            regions: r.u64("regions")?,
            bytes: r.u64("bytes")?,
        },
        MessageType::Region => {
            let offset = r.u64("offset")?;
            let data = r.data("data", MAX_DATA)?;
            check_range(r.message, offset, data.len() as u64)?;
            Message::Region { offset, data }
        }
        MessageType::ResyncEnd => Message::ResyncEnd {
            epoch: r.u64("epoch")?,
            seq: r.u64("seq")?,
            time_unix_ns: r.u64("time_unix_ns")?,
        },
        MessageType::Resize => Message::Resize {
            size: r.u64("size")?,
        },
        MessageType::Ping => Message::Ping {
            time_unix_ns: r.u64("time_unix_ns")?,
        },
        MessageType::Pong => Message::Pong {
            time_unix_ns: r.u64("time_unix_ns")?,
        },
        MessageType::Goodbye => Message::Goodbye {
            reason: r.string("reason")?,
        },
        MessageType::Promote => Message::Promote {
            relationship: r.bytes("relationship")?,
            generation: r.u64("generation")?,
            seq: r.u64("seq")?,
        },
        MessageType::End => Message::End {
            relationship: r.bytes("relationship")?,
        },
    })
}

fn check_range(message: MessageType, offset: u64, len: u64) -> Result<(), Error> {
    match offset.checked_add(len) {
        Some(_) => Ok(()),
        None => Err(Error::RangeOverflow {
            message,
            offset,
            len,
        }),
    }
}

/// Appends fields to a frame being encoded, refusing those over their limits.
struct Writer<'a> {
    out: &'a mut Vec<u8>,
    message: MessageType,
}

impl Writer<'_> {
    fn bytes(&mut self, b: &[u8]) {
        self.out.extend_from_slice(b);
    }

    fn u8(&mut self, v: u8) {
        self.out.push(v);
    }

    fn u16(&mut self, v: u16) {
        self.bytes(&v.to_le_bytes());
    }

    fn u32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes());
    }

    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }

    fn bool(&mut self, v: bool) {
        self.u8(v.into());
    }

    fn check_len(&self, field: &'static str, len: usize, limit: usize) -> Result<(), Error> {
        if len > limit {
            return Err(Error::TooLong {
                message: self.message,
                field,
                len: len as u64,
                limit,
            });
        }
        Ok(())
    }

    fn string(&mut self, field: &'static str, s: &str) -> Result<(), Error> {
        self.check_len(field, s.len(), MAX_STRING)?;
        // At most MAX_STRING, checked just above.
        self.u16(s.len() as u16);
        self.bytes(s.as_bytes());
        Ok(())
    }

    fn data(&mut self, field: &'static str, d: &[u8], limit: usize) -> Result<(), Error> {
        self.check_len(field, d.len(), limit)?;
        // At most MAX_DATA, checked just above.
        self.u32(d.len() as u32);
        self.bytes(d);
        Ok(())
    }

    fn spec(&mut self, v: &VolumeSpec) -> Result<(), Error> {
        self.string("volume.name", &v.name)?;
        self.string("volume.id", &v.id)?;
        self.u64(v.size);
        self.u32(v.block_size);
        self.string("volume.tier", &v.tier)?;
        self.bool(v.encrypted);
        self.u16(v.num_queues);
        Ok(())
    }
}

/// Takes fields off the front of a received payload; every read is bounds-checked.
struct Reader<'a> {
    buf: &'a [u8],
    message: MessageType,
}

impl<'a> Reader<'a> {
    fn truncated(&self, field: &'static str) -> Error {
        Error::Truncated {
            message: self.message,
            field,
        }
    }

    fn invalid(&self, field: &'static str, value: u64) -> Error {
        Error::InvalidValue {
            message: self.message,
            field,
            value,
        }
    }

    fn bytes<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], Error> {
        let (head, rest) = self
            .buf
            .split_first_chunk::<N>()
            .ok_or(self.truncated(field))?;
        self.buf = rest;
        Ok(*head)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, Error> {
        self.bytes(field).map(u8::from_le_bytes)
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, Error> {
        self.bytes(field).map(u16::from_le_bytes)
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, Error> {
        self.bytes(field).map(u32::from_le_bytes)
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, Error> {
        self.bytes(field).map(u64::from_le_bytes)
    }

    fn bool(&mut self, field: &'static str) -> Result<bool, Error> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(self.invalid(field, v.into())),
        }
    }

    /// `len` bytes for `field`, if its limit allows and the payload holds them.
    fn slice(&mut self, field: &'static str, len: u64, limit: usize) -> Result<&'a [u8], Error> {
        if len > limit as u64 {
            return Err(Error::TooLong {
                message: self.message,
                field,
                len,
                limit,
            });
        }
        let (head, rest) = self
            .buf
            .split_at_checked(len as usize)
            .ok_or(self.truncated(field))?;
        self.buf = rest;
        Ok(head)
    }

    fn string(&mut self, field: &'static str) -> Result<String, Error> {
        let len = self.u16(field)?;
        let bytes = self.slice(field, len.into(), MAX_STRING)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => Err(Error::InvalidUtf8 {
                message: self.message,
                field,
            }),
        }
    }

    fn data(&mut self, field: &'static str, limit: usize) -> Result<Vec<u8>, Error> {
        let len = self.u32(field)?;
        self.slice(field, len.into(), limit).map(<[u8]>::to_vec)
    }

    fn spec(&mut self) -> Result<VolumeSpec, Error> {
        Ok(VolumeSpec {
            name: self.string("volume.name")?,
            id: self.string("volume.id")?,
            size: self.u64("volume.size")?,
            block_size: self.u32("volume.block_size")?,
            tier: self.string("volume.tier")?,
            encrypted: self.bool("volume.encrypted")?,
            num_queues: self.u16("volume.num_queues")?,
        })
    }

    fn finish(self) -> Result<(), Error> {
        if !self.buf.is_empty() {
            return Err(Error::TrailingBytes {
                message: self.message,
                len: self.buf.len(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VolumeSpec {
        VolumeSpec {
            name: "db-01".into(),
            id: "6f1c2a9e-0d4b-4c1e-9a57-2b8e5d7c3f10".into(),
            size: 64 << 30,
            block_size: 4096,
            tier: "fast".into(),
            encrypted: true,
            num_queues: 4,
        }
    }

    /// One message of each type, with every field set to something other than zero.
    fn samples() -> Vec<Message> {
        let rel = *b"0123456789abcdef";
        vec![
            Message::Hello {
                relationship: rel,
                role: Role::Primary,
                generation: 3,
                shared_seq: 1 << 40,
                diverged: true,
                won: true,
                epoch: 9,
                consistent: true,
                listen: "10.0.2.5:7420".into(),
                volume: spec(),
                all_regions: true,
                regions: vec![0x81, 0, 0, 0, 0, 0, 0, 0x40],
            },
            Message::Hello {
                relationship: rel,
                role: Role::Secondary,
                generation: u64::MAX,
                shared_seq: 0,
                diverged: false,
                won: false,
                epoch: 0,
                consistent: false,
                listen: String::new(),
                volume: VolumeSpec {
                    name: "ünïcødé".into(),
                    tier: String::new(),
                    encrypted: false,
                    ..spec()
                },
                all_regions: false,
                regions: Vec::new(),
            },
            Message::Create {
                relationship: rel,
                volume: spec(),
                dek: Some(DekBytes::new((0..64).collect())),
            },
            Message::Create {
                relationship: rel,
                volume: spec(),
                dek: None,
            },
            Message::Accepted { relationship: rel },
            Message::Refused {
                status: 409,
                reason: "volume db-01 exists".into(),
            },
            Message::Write {
                seq: 17,
                offset: 8192,
                data: vec![0xa5; 4096],
            },
            Message::Zero {
                seq: 18,
                offset: 1 << 20,
                len: 1 << 30,
                discard: true,
            },
            Message::Cut {
                epoch: 5,
                seq: 18,
                time_unix_ns: 1_700_000_000_000_000_000,
            },
            Message::Committed { epoch: 5 },
            Message::Staged { seq: 18 },
            Message::ResyncBegin {
                epoch: 6,
                regions: 2,
                bytes: 8192,
            },
            Message::Region {
                offset: 4096,
                data: vec![1, 2, 3],
            },
            Message::ResyncEnd {
                epoch: 6,
                seq: 20,
                time_unix_ns: 1_700_000_000_000_000_001,
            },
            Message::Resize { size: 128 << 30 },
            Message::Ping { time_unix_ns: 42 },
            Message::Pong { time_unix_ns: 42 },
            Message::Goodbye {
                reason: "shutting down".into(),
            },
            Message::Promote {
                relationship: rel,
                generation: 4,
                seq: 1 << 33,
            },
            Message::End { relationship: rel },
        ]
    }

    fn encoded(msg: &Message) -> Vec<u8> {
        let mut out = Vec::new();
        encode(msg, &mut out).expect("sample within limits");
        out
    }

    /// A frame of `msg_type` around `payload`, with a correct length and checksum.
    fn frame(msg_type: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&MAGIC);
        f.push(VERSION);
        f.push(msg_type);
        f.extend_from_slice(&0u16.to_le_bytes());
        f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        f.extend_from_slice(&[0; 4]);
        f.extend_from_slice(payload);
        let crc = crc32c::crc32c(&f);
        f[12..16].copy_from_slice(&crc.to_le_bytes());
        f
    }

    /// A 16-byte header with the given fields and no payload after it.
    fn header(magic: [u8; 4], version: u8, flags: u16, len: u32) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(&magic);
        h.push(version);
        h.push(MessageType::Ping as u8);
        h.extend_from_slice(&flags.to_le_bytes());
        h.extend_from_slice(&len.to_le_bytes());
        h.extend_from_slice(&[0; 4]);
        h
    }

    fn small_write() -> Message {
        Message::Write {
            seq: 9,
            offset: 4096,
            data: b"sixteen bytes!!!".to_vec(),
        }
    }

    fn hello() -> Message {
        Message::Hello {
            relationship: [7; 16],
            role: Role::Primary,
            generation: 1,
            shared_seq: 2,
            diverged: true,
            won: false,
            epoch: 4,
            consistent: true,
            listen: "[fd00::1]:7420".into(),
            volume: spec(),
            all_regions: false,
            regions: vec![1],
        }
    }

    fn payload(msg: &Message) -> Vec<u8> {
        encoded(msg)[HEADER_LEN..].to_vec()
    }

    fn decode_err(f: &[u8]) -> Error {
        match decode(f) {
            Err(e) => e,
            Ok(r) => panic!("expected an error, got {r:?}"),
        }
    }

    #[test]
    fn samples_cover_every_message_type() {
        let types: std::collections::HashSet<u8> =
            samples().iter().map(|m| m.message_type() as u8).collect();
        let all: std::collections::HashSet<u8> = (1..=18).collect();
        assert_eq!(types, all);
        for t in 0..=u8::MAX {
            assert_eq!(
                MessageType::from_u8(t).map(|m| m as u8),
                all.get(&t).copied()
            );
        }
    }

    #[test]
    fn every_message_round_trips_and_consumes_its_frame() {
        for msg in samples() {
            let f = encoded(&msg);
            assert_eq!(f.len(), encoded_len(&msg), "{msg:?}");
            assert_eq!(f[5], msg.message_type() as u8);
            assert_eq!(decode(&f), Ok(Some((msg, f.len()))));
        }
    }

    #[test]
    fn frames_back_to_back_decode_one_after_the_other() {
        let mut buf = Vec::new();
        for msg in samples() {
            encode(&msg, &mut buf).unwrap();
        }
        let mut at = 0;
        for msg in samples() {
            let (got, used) = decode(&buf[at..]).unwrap().unwrap();
            assert_eq!(got, msg);
            at += used;
        }
        assert_eq!(at, buf.len());
        assert_eq!(decode(&buf[at..]), Ok(None));
    }

    #[test]
    fn frame_fed_one_byte_at_a_time_needs_more_until_complete() {
        for msg in samples() {
            let f = encoded(&msg);
            for end in 0..f.len() {
                assert_eq!(decode(&f[..end]), Ok(None), "{msg:?} at {end}");
            }
            assert_eq!(decode(&f), Ok(Some((msg, f.len()))));
        }
    }

    #[test]
    fn largest_write_fits_in_a_frame() {
        let msg = Message::Write {
            seq: 1,
            offset: 0,
            data: vec![7; MAX_DATA],
        };
        let f = encoded(&msg);
        assert!(f.len() - HEADER_LEN <= MAX_PAYLOAD as usize);
        assert_eq!(decode(&f), Ok(Some((msg, f.len()))));
    }

    #[test]
    fn corrupted_byte_anywhere_in_a_write_frame_is_an_error() {
        let msg = small_write();
        let f = encoded(&msg);
        // Zeros after the frame, so that a length corrupted upwards still finds a whole frame
        // and is checked, instead of waiting for more bytes.
        let mut buf = f.clone();
        buf.resize(f.len() + MAX_PAYLOAD as usize, 0);
        for at in 0..f.len() {
            for flip in (0..8).map(|bit| 1u8 << bit).chain([0xff]) {
                buf[at] ^= flip;
                match decode(&buf) {
                    Err(_) => {}
                    Ok(r) => panic!("byte {at} ^ {flip:#x} decoded as {r:?}"),
                }
                buf[at] ^= flip;
            }
        }
        assert_eq!(decode(&buf), Ok(Some((msg, f.len()))));
    }

    #[test]
    fn corrupted_payload_is_a_checksum_mismatch() {
        let mut f = encoded(&Message::Staged { seq: 1 });
        f[HEADER_LEN] ^= 1;
        assert!(matches!(
            decode_err(&f),
            Error::ChecksumMismatch { expected, actual } if expected != actual
        ));
    }

    #[test]
    fn header_errors_are_reported_from_the_header_alone() {
        let cases = [
            (
                header(MAGIC, VERSION, 0, u32::MAX),
                Error::PayloadTooLong(0xffff_ffff),
            ),
            (
                header(MAGIC, VERSION, 0, MAX_PAYLOAD + 1),
                Error::PayloadTooLong(u64::from(MAX_PAYLOAD) + 1),
            ),
            (header(*b"SRPM", VERSION, 0, 8), Error::BadMagic(*b"SRPM")),
            (header(MAGIC, 2, 0, 8), Error::UnsupportedVersion(2)),
            (header(MAGIC, 0, 0, 8), Error::UnsupportedVersion(0)),
            (
                header(MAGIC, VERSION, 0x8000, 8),
                Error::NonzeroFlags(0x8000),
            ),
        ];
        for (h, want) in cases {
            assert_eq!(h.len(), HEADER_LEN);
            assert_eq!(decode(&h), Err(want));
            assert_eq!(decode(&h[..HEADER_LEN - 1]), Ok(None));
        }
        // A good header waits for its whole payload.
        assert_eq!(decode(&header(MAGIC, VERSION, 0, MAX_PAYLOAD)), Ok(None));
    }

    #[test]
    fn unknown_message_type_is_refused() {
        for t in [0, 19, 0xff] {
            assert_eq!(decode_err(&frame(t, &[])), Error::UnknownType(t));
        }
    }

    #[test]
    fn payload_with_trailing_bytes_is_refused() {
        let mut p = payload(&Message::Ping { time_unix_ns: 1 });
        p.extend_from_slice(&[0, 0]);
        assert_eq!(
            decode_err(&frame(MessageType::Ping as u8, &p)),
            Error::TrailingBytes {
                message: MessageType::Ping,
                len: 2
            }
        );
    }

    #[test]
    fn truncated_field_is_refused_with_its_name() {
        let p = payload(&small_write());
        let write = MessageType::Write as u8;
        // Inside `offset`, inside the data length, inside the data.
        for (len, field) in [(12, "offset"), (18, "data"), (30, "data")] {
            assert_eq!(
                decode_err(&frame(write, &p[..len])),
                Error::Truncated {
                    message: MessageType::Write,
                    field
                }
            );
        }
        assert_eq!(
            decode_err(&frame(MessageType::Accepted as u8, &[0; 15])),
            Error::Truncated {
                message: MessageType::Accepted,
                field: "relationship"
            }
        );
    }

    #[test]
    fn unknown_role_byte_is_refused() {
        let mut p = payload(&hello());
        p[ID_LEN] = 3;
        assert_eq!(
            decode_err(&frame(MessageType::Hello as u8, &p)),
            Error::InvalidValue {
                message: MessageType::Hello,
                field: "role",
                value: 3
            }
        );
    }

    #[test]
    fn bool_other_than_zero_or_one_is_refused() {
        let mut p = payload(&Message::Zero {
            seq: 1,
            offset: 0,
            len: 4096,
            discard: true,
        });
        *p.last_mut().unwrap() = 2;
        assert_eq!(
            decode_err(&frame(MessageType::Zero as u8, &p)),
            Error::InvalidValue {
                message: MessageType::Zero,
                field: "discard",
                value: 2
            }
        );
    }

    #[test]
    fn invalid_utf8_is_refused() {
        let mut p = 2u16.to_le_bytes().to_vec();
        p.extend_from_slice(&[0xc3, 0x28]);
        assert_eq!(
            decode_err(&frame(MessageType::Goodbye as u8, &p)),
            Error::InvalidUtf8 {
                message: MessageType::Goodbye,
                field: "reason"
            }
        );
    }

    #[test]
    fn string_or_data_over_its_limit_is_refused_before_reading_it() {
        let mut p = (MAX_STRING as u16 + 1).to_le_bytes().to_vec();
        p.resize(2 + MAX_STRING + 1, b'a');
        assert_eq!(
            decode_err(&frame(MessageType::Goodbye as u8, &p)),
            Error::TooLong {
                message: MessageType::Goodbye,
                field: "reason",
                len: MAX_STRING as u64 + 1,
                limit: MAX_STRING
            }
        );
        // The declared length alone is enough: no 4 GiB are waited for, or allocated.
        let mut p = vec![0; 16];
        p.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            decode_err(&frame(MessageType::Write as u8, &p)),
            Error::TooLong {
                message: MessageType::Write,
                field: "data",
                len: u32::MAX.into(),
                limit: MAX_DATA
            }
        );
    }

    #[test]
    fn overflowing_offset_plus_length_is_refused() {
        let zero = Message::Zero {
            seq: 1,
            offset: u64::MAX - 1,
            len: 2,
            discard: false,
        };
        let write = Message::Write {
            seq: 1,
            offset: u64::MAX,
            data: vec![0],
        };
        let region = Message::Region {
            offset: u64::MAX - 2,
            data: vec![0; 3],
        };
        for (msg, offset, len) in [
            (zero, u64::MAX - 1, 2),
            (write, u64::MAX, 1),
            (region, u64::MAX - 2, 3),
        ] {
            let want = Error::RangeOverflow {
                message: msg.message_type(),
                offset,
                len,
            };
            let mut out = vec![1, 2, 3];
            assert_eq!(encode(&msg, &mut out), Err(want.clone()));
            assert_eq!(out, [1, 2, 3]);
            // The same fields, framed by hand, are refused by the decoder too.
            let mut p = Vec::new();
            match &msg {
                Message::Zero { seq, .. } => {
                    p.extend_from_slice(&seq.to_le_bytes());
                    p.extend_from_slice(&offset.to_le_bytes());
                    p.extend_from_slice(&len.to_le_bytes());
                    p.push(0);
                }
                Message::Write { seq, data, .. } => {
                    p.extend_from_slice(&seq.to_le_bytes());
                    p.extend_from_slice(&offset.to_le_bytes());
                    p.extend_from_slice(&(data.len() as u32).to_le_bytes());
                    p.extend_from_slice(data);
                }
                Message::Region { data, .. } => {
                    p.extend_from_slice(&offset.to_le_bytes());
                    p.extend_from_slice(&(data.len() as u32).to_le_bytes());
                    p.extend_from_slice(data);
                }
                _ => unreachable!(),
            }
            assert_eq!(decode_err(&frame(msg.message_type() as u8, &p)), want);
        }
    }

    #[test]
    fn encode_refuses_fields_over_their_limits_and_leaves_the_buffer() {
        let cases = [
            (
                Message::Goodbye {
                    reason: "x".repeat(MAX_STRING + 1),
                },
                "reason",
                MAX_STRING + 1,
                MAX_STRING,
            ),
            (
                Message::Write {
                    seq: 1,
                    offset: 0,
                    data: vec![0; MAX_DATA + 1],
                },
                "data",
                MAX_DATA + 1,
                MAX_DATA,
            ),
            (
                Message::Create {
                    relationship: [0; 16],
                    volume: spec(),
                    dek: Some(DekBytes::new(vec![0; MAX_KEY + 1])),
                },
                "dek",
                MAX_KEY + 1,
                MAX_KEY,
            ),
            (
                Message::Hello {
                    relationship: [0; 16],
                    role: Role::Primary,
                    generation: 0,
                    shared_seq: 0,
                    diverged: false,
                    won: false,
                    epoch: 0,
                    consistent: false,
                    listen: String::new(),
                    volume: VolumeSpec {
                        tier: "t".repeat(MAX_STRING + 1),
                        ..spec()
                    },
                    all_regions: false,
                    regions: Vec::new(),
                },
                "volume.tier",
                MAX_STRING + 1,
                MAX_STRING,
            ),
        ];
        for (msg, field, len, limit) in cases {
            let mut out = encoded(&Message::Ping { time_unix_ns: 1 });
            let before = out.clone();
            assert_eq!(
                encode(&msg, &mut out),
                Err(Error::TooLong {
                    message: msg.message_type(),
                    field,
                    len: len as u64,
                    limit
                })
            );
            assert_eq!(out, before);
        }
    }

    #[test]
    fn create_debug_never_shows_the_key() {
        let msg = Message::Create {
            relationship: [0; 16],
            volume: spec(),
            dek: Some(DekBytes::new(vec![0xab; 64])),
        };
        for s in [format!("{msg:?}"), format!("{msg:#?}")] {
            assert!(s.contains("<redacted>"), "{s}");
            assert!(!s.contains("171") && !s.contains("0xab"), "{s}");
        }
        assert!(format!("{msg:?}").contains("dek: Some(<redacted>)"));
    }

    /// xorshift64: a fixed seed, so that a failure is reproducible.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn bytes(&mut self, max: usize) -> Vec<u8> {
            let len = self.below(max + 1);
            (0..len).map(|_| self.next() as u8).collect()
        }

        fn mutate(&mut self, buf: &mut Vec<u8>) {
            for _ in 0..1 + self.below(3) {
                match self.below(4) {
                    0 if !buf.is_empty() => {
                        let at = self.below(buf.len());
                        buf[at] ^= 1 + self.below(255) as u8;
                    }
                    1 if !buf.is_empty() => {
                        let at = self.below(buf.len());
                        buf[at] = self.next() as u8;
                    }
                    2 => buf.truncate(self.below(buf.len() + 1)),
                    _ => {
                        let at = self.below(buf.len() + 1);
                        buf.insert(at, self.next() as u8);
                    }
                }
            }
        }
    }

    /// A frame that decodes must be exactly what encoding its message gives: the encoding is
    /// canonical, so nothing is silently accepted and re-sent differently.
    fn check_canonical(buf: &[u8]) {
        if let Ok(Some((msg, used))) = decode(buf) {
            assert_eq!(encoded(&msg), buf[..used], "{msg:?}");
        }
    }

    #[test]
    fn random_and_mutated_frames_never_panic() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let frames: Vec<Vec<u8>> = samples()
            .iter()
            .map(|m| {
                // Small data, so that mutations often reach the fields after it.
                let m = match m {
                    Message::Write { seq, offset, .. } => Message::Write {
                        seq: *seq,
                        offset: *offset,
                        data: vec![1, 2],
                    },
                    m => m.clone(),
                };
                encoded(&m)
            })
            .collect();
        for i in 0..20_000 {
            match i % 4 {
                // Random bytes.
                0 => check_canonical(&rng.bytes(48)),
                // Random bytes behind a valid header prefix.
                1 => {
                    let mut b = MAGIC.to_vec();
                    b.push(VERSION);
                    b.extend_from_slice(&rng.bytes(64));
                    check_canonical(&b);
                }
                // A valid frame, mutated: the checksum or the header catches it.
                2 => {
                    let mut f = frames[rng.below(frames.len())].clone();
                    rng.mutate(&mut f);
                    check_canonical(&f);
                }
                // A valid payload, mutated, under any type, with a correct checksum: the
                // payload parser must hold on its own.
                _ => {
                    let mut p = frames[rng.below(frames.len())][HEADER_LEN..].to_vec();
                    rng.mutate(&mut p);
                    check_canonical(&frame(rng.below(19) as u8, &p));
                }
            }
        }
    }
}
