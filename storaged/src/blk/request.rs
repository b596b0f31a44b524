//! Parsing and validating virtio-blk requests.
//!
//! A request is a descriptor chain: device-readable descriptors (the 16-byte header, then data
//! for writes), followed by device-writable ones (data for reads, then the 1-byte status). With
//! VIRTIO_F_VERSION_1 the driver may frame these any way it likes, so the parser works on byte
//! ranges, not on descriptor boundaries: the header is the first 16 readable bytes, the status the
//! last writable byte, and the data whatever lies between.
//!
//! Everything here is guest-controlled. A chain that has no writable byte cannot be answered and
//! is returned to the driver with a used length of 0 ([`Parsed::Drop`]); any other malformed or
//! out-of-range request is answered with `VIRTIO_BLK_S_IOERR`, and an unknown type with
//! `VIRTIO_BLK_S_UNSUPP` ([`Parsed::Reject`]). Nothing that fails these checks reaches the disk.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// virtio-blk sectors are always 512 bytes, whatever the block size.
pub const SECTOR_SHIFT: u32 = 9;
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;
/// Length of the serial returned by GET_ID.
pub const ID_BYTES: usize = 20;
const HEADER_LEN: u64 = 16;
/// Largest read or write accepted. Linux sends at most `max_sectors_kb` (1280 KiB by default);
/// the limit keeps one hostile request from pinning, or bouncing, gigabytes.
pub const MAX_TRANSFER: u64 = 32 << 20;
const DISCARD_SEGMENT_LEN: u64 = 16;

/// Why a request was refused. Counted in metrics and logged at debug level.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("Descriptor chain has no device-writable byte for the status")]
    NoStatus,
    #[error("Device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    #[error("Header is {0} bytes, shorter than 16")]
    ShortHeader(u64),
    #[error("Unknown request type {0}")]
    UnknownType(u32),
    #[error("Data buffers have the wrong direction for request type {0}")]
    WrongDirection(u32),
    #[error("Request of {0} bytes exceeds the {MAX_TRANSFER}-byte limit")]
    TooLarge(u64),
    #[error("Read or write of no data")]
    EmptyTransfer,
    #[error("Request has {0} data segments, more than the {1} allowed")]
    TooManySegments(usize, u32),
    #[error("Length {0} is not a multiple of the {1}-byte block size")]
    UnalignedLength(u64, u32),
    #[error("Sector {0} is not aligned to the {1}-byte block size")]
    UnalignedSector(u64, u32),
    #[error("Sectors {0}..+{1} lie past the end of the volume ({2} sectors)")]
    OutOfRange(u64, u64, u64),
    #[error("Write to a read-only volume")]
    ReadOnly,
    #[error("Discard or write-zeroes payload of {0} bytes is not a whole number of 16-byte segments, or is empty")]
    BadSegmentPayload(u64),
    #[error("Discard or write-zeroes range of {0} sectors exceeds the limit of {1}")]
    RangeTooLarge(u64, u64),
    #[error("Unsupported flags {0:#x} in a discard or write-zeroes segment")]
    UnsupportedFlags(u32),
    #[error("Guest memory at {0:#x} is not mapped")]
    BadAddress(u64),
}

/// One descriptor of a chain, as the chain iterator gives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainDesc {
    pub addr: GuestAddress,
    pub len: u32,
    pub writable: bool,
}

/// A contiguous range of guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestRange {
    pub addr: GuestAddress,
    pub len: u32,
}

/// The volume's shape, against which requests are checked.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub capacity_sectors: u64,
    pub read_only: bool,
    pub seg_max: u32,
    /// Logical block size offered to the guest (a multiple of 512).
    pub block_size: u32,
    pub max_discard_seg: u32,
    pub max_discard_sectors: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
}

/// A byte range of the volume, for discard and write-zeroes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteRange {
    pub offset: u64,
    pub len: u64,
    /// Write-zeroes may deallocate (VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP).
    pub unmap: bool,
}

/// What the device is asked to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Operation {
    /// Read `len` bytes at `offset` into the data buffers.
    Read {
        offset: u64,
        len: u64,
    },
    /// Write `len` bytes at `offset` from the data buffers.
    Write {
        offset: u64,
        len: u64,
    },
    Flush,
    /// Write the volume's serial into the data buffers (at most `len` bytes of it).
    GetId {
        len: u64,
    },
    Discard(Vec<ByteRange>),
    WriteZeroes(Vec<ByteRange>),
}

impl Operation {
    /// Short label, used as the `op` metric label.
    pub fn label(&self) -> &'static str {
        crate::metrics::OPS[crate::metrics::op_index(self)]
    }
}

/// A validated request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub op: Operation,
    /// Guest buffers of the data (reads: device-writable; writes: device-readable).
    pub data: Vec<GuestRange>,
    pub status: GuestAddress,
}

/// Outcome of parsing a chain.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    Request(Request),
    /// Answer with this status (1 byte written) without touching the disk.
    Reject {
        status: GuestAddress,
        code: u8,
        error: RequestError,
    },
    /// No status byte to write: return the chain with used length 0.
    Drop(RequestError),
}

/// Splits `ranges` after skipping `skip` bytes: what remains, as guest ranges.
fn skip_bytes(ranges: &[GuestRange], mut skip: u64) -> Vec<GuestRange> {
    let mut out = Vec::with_capacity(ranges.len());
    for r in ranges {
        let len = u64::from(r.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        // skip < len, so this stays inside the descriptor; a descriptor that wraps the address
        // space is refused later when its memory is looked up.
        out.push(GuestRange {
            addr: GuestAddress(r.addr.0.wrapping_add(skip)),
            len: (len - skip) as u32,
        });
        skip = 0;
    }
    out
}

/// Reads `buf.len()` bytes starting at the beginning of `ranges`.
pub(crate) fn gather<M: GuestMemory + ?Sized>(
    mem: &M,
    ranges: &[GuestRange],
    buf: &mut [u8],
) -> Result<(), RequestError> {
    let mut done = 0;
    for r in ranges {
        if done == buf.len() {
            break;
        }
        let n = (buf.len() - done).min(r.len as usize);
        mem.read_slice(&mut buf[done..done + n], r.addr)
            .map_err(|_| RequestError::BadAddress(r.addr.0))?;
        done += n;
    }
    Ok(())
}

fn total(ranges: &[GuestRange]) -> u64 {
    ranges.iter().map(|r| u64::from(r.len)).sum()
}

/// Parses and validates one descriptor chain.
pub fn parse<M: GuestMemory + ?Sized>(
    mem: &M,
    descs: impl IntoIterator<Item = ChainDesc>,
    limits: &Limits,
) -> Parsed {
    let mut readable = Vec::new();
    let mut writable = Vec::new();
    let mut misordered = false;
    for d in descs {
        if d.len == 0 {
            continue;
        }
        let r = GuestRange {
            addr: d.addr,
            len: d.len,
        };
        if d.writable {
            writable.push(r);
        } else {
            if !writable.is_empty() {
                misordered = true;
            }
            readable.push(r);
        }
    }

    // The status byte: the last writable byte of the chain.
    let Some(last) = writable.pop() else {
        return Parsed::Drop(RequestError::NoStatus);
    };
    // A range that wraps the address space has no valid last byte: nothing can be answered.
    let Some(status) = last.addr.0.checked_add(u64::from(last.len) - 1) else {
        return Parsed::Drop(RequestError::BadAddress(last.addr.0));
    };
    let status = GuestAddress(status);
    if last.len > 1 {
        writable.push(GuestRange {
            addr: last.addr,
            len: last.len - 1,
        });
    }
    let reject = |code: u32, error| Parsed::Reject {
        status,
        code: code as u8,
        error,
    };
    if misordered {
        return reject(VIRTIO_BLK_S_IOERR, RequestError::ReadableAfterWritable);
    }
    let readable_len = total(&readable);
    if readable_len < HEADER_LEN {
        return reject(VIRTIO_BLK_S_IOERR, RequestError::ShortHeader(readable_len));
    }
    let mut header = [0u8; HEADER_LEN as usize];
    if let Err(e) = gather(mem, &readable, &mut header) {
        return reject(VIRTIO_BLK_S_IOERR, e);
    }
    let req_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut sector_bytes = [0u8; 8];
    sector_bytes.copy_from_slice(&header[8..16]);
    let sector = u64::from_le_bytes(sector_bytes);
    let out_data = skip_bytes(&readable, HEADER_LEN);
    let in_data = writable;

    let result = match req_type {
        VIRTIO_BLK_T_IN => {
            if !out_data.is_empty() {
                Err((VIRTIO_BLK_S_IOERR, RequestError::WrongDirection(req_type)))
            } else {
                rw_request(sector, in_data, limits, false)
                    .map(|(offset, len, data)| (Operation::Read { offset, len }, data))
            }
        }
        VIRTIO_BLK_T_OUT => {
            if !in_data.is_empty() {
                Err((VIRTIO_BLK_S_IOERR, RequestError::WrongDirection(req_type)))
            } else {
                rw_request(sector, out_data, limits, true)
                    .map(|(offset, len, data)| (Operation::Write { offset, len }, data))
            }
        }
        VIRTIO_BLK_T_FLUSH => Ok((Operation::Flush, Vec::new())),
        VIRTIO_BLK_T_GET_ID => {
            if !out_data.is_empty() || in_data.is_empty() {
                Err((VIRTIO_BLK_S_IOERR, RequestError::WrongDirection(req_type)))
            } else {
                let len = total(&in_data);
                Ok((Operation::GetId { len }, in_data))
            }
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            if !in_data.is_empty() {
                Err((VIRTIO_BLK_S_IOERR, RequestError::WrongDirection(req_type)))
            } else {
                let discard = req_type == VIRTIO_BLK_T_DISCARD;
                segment_request(mem, &out_data, limits, discard).map(|ranges| {
                    let op = if discard {
                        Operation::Discard(ranges)
                    } else {
                        Operation::WriteZeroes(ranges)
                    };
                    (op, Vec::new())
                })
            }
        }
        other => Err((VIRTIO_BLK_S_UNSUPP, RequestError::UnknownType(other))),
    };
    match result {
        Ok((op, data)) => Parsed::Request(Request { op, data, status }),
        Err((code, error)) => reject(code, error),
    }
}

fn check_range(sector: u64, sectors: u64, limits: &Limits) -> Result<(), (u32, RequestError)> {
    match sector.checked_add(sectors) {
        Some(end) if end <= limits.capacity_sectors => Ok(()),
        _ => Err((
            VIRTIO_BLK_S_IOERR,
            RequestError::OutOfRange(sector, sectors, limits.capacity_sectors),
        )),
    }
}

type RwParts = (u64, u64, Vec<GuestRange>);

fn rw_request(
    sector: u64,
    data: Vec<GuestRange>,
    limits: &Limits,
    write: bool,
) -> Result<RwParts, (u32, RequestError)> {
    if write && limits.read_only {
        return Err((VIRTIO_BLK_S_IOERR, RequestError::ReadOnly));
    }
    if data.len() > limits.seg_max as usize {
        return Err((
            VIRTIO_BLK_S_IOERR,
            RequestError::TooManySegments(data.len(), limits.seg_max),
        ));
    }
    let len = total(&data);
    if len == 0 {
        return Err((VIRTIO_BLK_S_IOERR, RequestError::EmptyTransfer));
    }
    if len > MAX_TRANSFER {
        return Err((VIRTIO_BLK_S_IOERR, RequestError::TooLarge(len)));
    }
    let bs = u64::from(limits.block_size);
    if !len.is_multiple_of(bs) {
        return Err((
            VIRTIO_BLK_S_IOERR,
            RequestError::UnalignedLength(len, limits.block_size),
        ));
    }
    if !(sector << SECTOR_SHIFT).is_multiple_of(bs) {
        return Err((
            VIRTIO_BLK_S_IOERR,
            RequestError::UnalignedSector(sector, limits.block_size),
        ));
    }
    check_range(sector, len >> SECTOR_SHIFT, limits)?;
    Ok((sector << SECTOR_SHIFT, len, data))
}

fn segment_request<M: GuestMemory + ?Sized>(
    mem: &M,
    payload: &[GuestRange],
    limits: &Limits,
    discard: bool,
) -> Result<Vec<ByteRange>, (u32, RequestError)> {
    if limits.read_only {
        return Err((VIRTIO_BLK_S_IOERR, RequestError::ReadOnly));
    }
    let len = total(payload);
    let count = len / DISCARD_SEGMENT_LEN;
    let max_seg = if discard {
        limits.max_discard_seg
    } else {
        limits.max_write_zeroes_seg
    };
    if len == 0 || !len.is_multiple_of(DISCARD_SEGMENT_LEN) || count > u64::from(max_seg) {
        return Err((VIRTIO_BLK_S_IOERR, RequestError::BadSegmentPayload(len)));
    }
    let mut bytes = vec![0u8; len as usize];
    gather(mem, payload, &mut bytes).map_err(|e| (VIRTIO_BLK_S_IOERR, e))?;
    let max = u64::from(if discard {
        limits.max_discard_sectors
    } else {
        limits.max_write_zeroes_sectors
    });
    let bs_sectors = u64::from(limits.block_size) >> SECTOR_SHIFT;
    let mut ranges = Vec::with_capacity(count as usize);
    for seg in bytes.chunks_exact(DISCARD_SEGMENT_LEN as usize) {
        let mut s = [0u8; 8];
        s.copy_from_slice(&seg[0..8]);
        let sector = u64::from_le_bytes(s);
        let num = u64::from(u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]));
        let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
        let allowed = if discard {
            0
        } else {
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        };
        if flags & !allowed != 0 {
            return Err((VIRTIO_BLK_S_UNSUPP, RequestError::UnsupportedFlags(flags)));
        }
        if num > max {
            return Err((VIRTIO_BLK_S_IOERR, RequestError::RangeTooLarge(num, max)));
        }
        if sector % bs_sectors != 0 || num % bs_sectors != 0 {
            return Err((
                VIRTIO_BLK_S_IOERR,
                RequestError::UnalignedSector(sector, limits.block_size),
            ));
        }
        check_range(sector, num, limits)?;
        ranges.push(ByteRange {
            offset: sector << SECTOR_SHIFT,
            len: num << SECTOR_SHIFT,
            unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
        });
    }
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
    const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn limits() -> Limits {
        Limits {
            capacity_sectors: 2048,
            read_only: false,
            seg_max: 4,
            block_size: 512,
            max_discard_seg: 2,
            max_discard_sectors: 1024,
            max_write_zeroes_sectors: 1024,
            max_write_zeroes_seg: 2,
        }
    }

    fn header(m: &GuestMemoryMmap, at: u64, t: u32, sector: u64) -> ChainDesc {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&t.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        m.write_slice(&h, GuestAddress(at)).unwrap();
        ro(at, 16)
    }

    fn ro(addr: u64, len: u32) -> ChainDesc {
        ChainDesc {
            addr: GuestAddress(addr),
            len,
            writable: false,
        }
    }

    fn wr(addr: u64, len: u32) -> ChainDesc {
        ChainDesc {
            addr: GuestAddress(addr),
            len,
            writable: true,
        }
    }

    fn rejected(p: Parsed) -> (u8, RequestError) {
        match p {
            Parsed::Reject { code, error, .. } => (code, error),
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn parses_read_with_data_and_status() {
        let m = mem();
        let d = [
            header(&m, 0, VIRTIO_BLK_T_IN, 8),
            wr(0x1000, 4096),
            wr(0x3000, 1),
        ];
        let Parsed::Request(r) = parse(&m, d, &limits()) else {
            panic!()
        };
        assert_eq!(
            r.op,
            Operation::Read {
                offset: 4096,
                len: 4096
            }
        );
        assert_eq!(
            r.data,
            [GuestRange {
                addr: GuestAddress(0x1000),
                len: 4096
            }]
        );
        assert_eq!(r.status, GuestAddress(0x3000));
    }

    #[test]
    fn parses_any_layout_header_with_data_and_data_with_status() {
        let m = mem();
        // Header and write data in one descriptor, status sharing nothing.
        let h = header(&m, 0x100, VIRTIO_BLK_T_OUT, 0);
        let d = [ro(h.addr.0, 16 + 1024), wr(0x5000, 1)];
        let Parsed::Request(r) = parse(&m, d, &limits()) else {
            panic!()
        };
        assert_eq!(
            r.op,
            Operation::Write {
                offset: 0,
                len: 1024
            }
        );
        assert_eq!(
            r.data,
            [GuestRange {
                addr: GuestAddress(0x110),
                len: 1024
            }]
        );
        // Read data and status in one descriptor.
        let d = [header(&m, 0, VIRTIO_BLK_T_IN, 0), wr(0x2000, 513)];
        let Parsed::Request(r) = parse(&m, d, &limits()) else {
            panic!()
        };
        assert_eq!(
            r.op,
            Operation::Read {
                offset: 0,
                len: 512
            }
        );
        assert_eq!(r.status, GuestAddress(0x2000 + 512));
    }

    #[test]
    fn rejects_reads_and_writes_of_no_data() {
        let m = mem();
        for t in [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT] {
            let d = [header(&m, 0, t, 0), wr(0x1000, 1)];
            assert_eq!(
                rejected(parse(&m, d, &limits())),
                (IOERR, RequestError::EmptyTransfer)
            );
        }
    }

    #[test]
    fn drops_chain_without_status_byte() {
        let m = mem();
        let d = [header(&m, 0, VIRTIO_BLK_T_OUT, 0), ro(0x1000, 512)];
        assert_eq!(
            parse(&m, d, &limits()),
            Parsed::Drop(RequestError::NoStatus)
        );
        assert_eq!(
            parse(&m, [], &limits()),
            Parsed::Drop(RequestError::NoStatus)
        );
    }

    #[test]
    fn rejects_short_header() {
        let m = mem();
        let d = [ro(0, 8), wr(0x1000, 1)];
        assert_eq!(
            rejected(parse(&m, d, &limits())),
            (IOERR, RequestError::ShortHeader(8))
        );
    }

    #[test]
    fn rejects_readable_after_writable() {
        let m = mem();
        let d = [
            header(&m, 0, VIRTIO_BLK_T_IN, 0),
            wr(0x1000, 512),
            ro(0x2000, 16),
            wr(0x3000, 1),
        ];
        assert_eq!(
            rejected(parse(&m, d, &limits())),
            (IOERR, RequestError::ReadableAfterWritable)
        );
    }

    #[test]
    fn rejects_wrong_data_direction() {
        let m = mem();
        // A read whose data buffer is device-readable.
        let d = [
            header(&m, 0, VIRTIO_BLK_T_IN, 0),
            ro(0x1000, 512),
            wr(0x3000, 1),
        ];
        assert_eq!(
            rejected(parse(&m, d, &limits())).1,
            RequestError::WrongDirection(0)
        );
        // A write whose data buffer is device-writable.
        let d = [
            header(&m, 0, VIRTIO_BLK_T_OUT, 0),
            wr(0x1000, 512),
            wr(0x3000, 1),
        ];
        assert_eq!(
            rejected(parse(&m, d, &limits())).1,
            RequestError::WrongDirection(1)
        );
    }

    #[test]
    fn rejects_too_many_segments() {
        let m = mem();
        let mut d = vec![header(&m, 0, VIRTIO_BLK_T_IN, 0)];
        d.extend((0..5).map(|i| wr(0x1000 + i * 0x1000, 512)));
        d.push(wr(0x9000, 1));
        assert_eq!(
            rejected(parse(&m, d, &limits())),
            (IOERR, RequestError::TooManySegments(5, 4))
        );
    }

    #[test]
    fn rejects_unknown_type_as_unsupported() {
        let m = mem();
        let d = [header(&m, 0, 0xdead, 0), wr(0x1000, 1)];
        assert_eq!(
            rejected(parse(&m, d, &limits())),
            (UNSUPP, RequestError::UnknownType(0xdead))
        );
    }

    #[test]
    fn rejects_io_past_the_end_including_overflowing_sectors() {
        let m = mem();
        let d = [
            header(&m, 0, VIRTIO_BLK_T_IN, 2047),
            wr(0x1000, 1024),
            wr(0x3000, 1),
        ];
        assert_eq!(
            rejected(parse(&m, d, &limits())).1,
            RequestError::OutOfRange(2047, 2, 2048)
        );
        let d = [
            header(&m, 0, VIRTIO_BLK_T_OUT, u64::MAX),
            ro(0x1000, 512),
            wr(0x3000, 1),
        ];
        assert!(matches!(
            rejected(parse(&m, d, &limits())).1,
            RequestError::OutOfRange(..)
        ));
        // Exactly up to the end is fine.
        let d = [
            header(&m, 0, VIRTIO_BLK_T_IN, 2046),
            wr(0x1000, 1024),
            wr(0x3000, 1),
        ];
        assert!(matches!(parse(&m, d, &limits()), Parsed::Request(_)));
    }

    #[test]
    fn rejects_partial_sectors_and_unaligned_blocks() {
        let m = mem();
        let d = [
            header(&m, 0, VIRTIO_BLK_T_IN, 0),
            wr(0x1000, 100),
            wr(0x3000, 1),
        ];
        assert_eq!(
            rejected(parse(&m, d, &limits())).1,
            RequestError::UnalignedLength(100, 512)
        );
        let l = Limits {
            block_size: 4096,
            ..limits()
        };
        let d = [
            header(&m, 0, VIRTIO_BLK_T_IN, 1),
            wr(0x1000, 4096),
            wr(0x3000, 1),
        ];
        assert_eq!(
            rejected(parse(&m, d, &l)).1,
            RequestError::UnalignedSector(1, 4096)
        );
    }

    #[test]
    fn rejects_writes_to_read_only_volume_but_serves_reads() {
        let m = mem();
        let l = Limits {
            read_only: true,
            ..limits()
        };
        let d = [
            header(&m, 0, VIRTIO_BLK_T_OUT, 0),
            ro(0x1000, 512),
            wr(0x3000, 1),
        ];
        assert_eq!(rejected(parse(&m, d, &l)), (IOERR, RequestError::ReadOnly));
        let d = [
            header(&m, 0, VIRTIO_BLK_T_IN, 0),
            wr(0x1000, 512),
            wr(0x3000, 1),
        ];
        assert!(matches!(parse(&m, d, &l), Parsed::Request(_)));
    }

    fn segment(m: &GuestMemoryMmap, at: u64, sector: u64, num: u32, flags: u32) {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&num.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        m.write_slice(&s, GuestAddress(at)).unwrap();
    }

    #[test]
    fn parses_discard_and_write_zeroes_segments() {
        let m = mem();
        segment(&m, 0x1000, 8, 16, 0);
        segment(&m, 0x1010, 64, 8, 0);
        let d = [
            header(&m, 0, VIRTIO_BLK_T_DISCARD, 0),
            ro(0x1000, 32),
            wr(0x3000, 1),
        ];
        let Parsed::Request(r) = parse(&m, d, &limits()) else {
            panic!()
        };
        assert_eq!(
            r.op,
            Operation::Discard(vec![
                ByteRange {
                    offset: 4096,
                    len: 8192,
                    unmap: false
                },
                ByteRange {
                    offset: 32768,
                    len: 4096,
                    unmap: false
                },
            ])
        );
        segment(&m, 0x1000, 0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        let d = [
            header(&m, 0, VIRTIO_BLK_T_WRITE_ZEROES, 0),
            ro(0x1000, 16),
            wr(0x3000, 1),
        ];
        let Parsed::Request(r) = parse(&m, d, &limits()) else {
            panic!()
        };
        assert_eq!(
            r.op,
            Operation::WriteZeroes(vec![ByteRange {
                offset: 0,
                len: 4096,
                unmap: true
            }])
        );
    }

    #[test]
    fn rejects_bad_discard_payloads() {
        let m = mem();
        let disc = |len: u32| {
            [
                header(&m, 0, VIRTIO_BLK_T_DISCARD, 0),
                ro(0x1000, len),
                wr(0x3000, 1),
            ]
        };
        segment(&m, 0x1000, 0, 8, 0);
        assert_eq!(
            rejected(parse(&m, disc(15), &limits())).1,
            RequestError::BadSegmentPayload(15)
        );
        // More segments than max_discard_seg.
        assert_eq!(
            rejected(parse(&m, disc(48), &limits())).1,
            RequestError::BadSegmentPayload(48)
        );
        let d = [header(&m, 0, VIRTIO_BLK_T_DISCARD, 0), wr(0x3000, 1)];
        assert_eq!(
            rejected(parse(&m, d, &limits())).1,
            RequestError::BadSegmentPayload(0)
        );
        // Flags on a discard are unsupported; past the end is an I/O error.
        segment(&m, 0x1000, 0, 8, 1);
        assert_eq!(
            rejected(parse(&m, disc(16), &limits())),
            (UNSUPP, RequestError::UnsupportedFlags(1))
        );
        segment(&m, 0x1000, 2040, 16, 0);
        assert_eq!(
            rejected(parse(&m, disc(16), &limits())).1,
            RequestError::OutOfRange(2040, 16, 2048)
        );
        segment(&m, 0x1000, 0, 2000, 0);
        assert_eq!(
            rejected(parse(&m, disc(16), &limits())).1,
            RequestError::RangeTooLarge(2000, 1024)
        );
    }

    #[test]
    fn get_id_needs_a_writable_buffer() {
        let m = mem();
        let d = [
            header(&m, 0, VIRTIO_BLK_T_GET_ID, 0),
            wr(0x1000, 20),
            wr(0x3000, 1),
        ];
        let Parsed::Request(r) = parse(&m, d, &limits()) else {
            panic!()
        };
        assert_eq!(r.op, Operation::GetId { len: 20 });
        let d = [header(&m, 0, VIRTIO_BLK_T_GET_ID, 0), wr(0x3000, 1)];
        assert_eq!(
            rejected(parse(&m, d, &limits())).1,
            RequestError::WrongDirection(8)
        );
    }

    #[test]
    fn rejects_huge_transfers_and_wrapping_addresses() {
        let m = mem();
        let l = Limits {
            capacity_sectors: 1 << 40,
            seg_max: 128,
            ..limits()
        };
        // 16 descriptors of 4 GiB - 512 bytes, all aliasing the same guest memory.
        let mut d = vec![header(&m, 0, VIRTIO_BLK_T_IN, 0)];
        d.extend((0..16).map(|_| wr(0x1000, u32::MAX - 511)));
        d.push(wr(0x3000, 1));
        assert!(matches!(
            rejected(parse(&m, d, &l)).1,
            RequestError::TooLarge(_)
        ));
        // A status descriptor that wraps the address space cannot be answered.
        let d = [header(&m, 0, VIRTIO_BLK_T_IN, 0), wr(u64::MAX - 1, 16)];
        assert!(matches!(
            parse(&m, d, &limits()),
            Parsed::Drop(RequestError::BadAddress(_))
        ));
        // A header descriptor that wraps is an error, not a panic.
        let d = [ro(u64::MAX - 7, 4096), wr(0x3000, 1)];
        assert!(matches!(
            rejected(parse(&m, d, &limits())).1,
            RequestError::BadAddress(_)
        ));
    }

    #[test]
    fn unmapped_header_is_an_io_error_not_a_panic() {
        let m = mem();
        let d = [ro(0x7fff_0000, 16), wr(0x3000, 1)];
        assert!(matches!(
            rejected(parse(&m, d, &limits())).1,
            RequestError::BadAddress(_)
        ));
    }
}
