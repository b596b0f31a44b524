//! XTS-AES-256 on AES-NI: eight blocks in flight through the 14 rounds, whitening fused into
//! the first and last round. Used when the CPU has AES-NI; [`super::Xts`] falls back to the
//! `aes` crate otherwise. Checked against that path, `xts-mode` and IEEE 1619 in the tests.

use std::arch::x86_64::{
    __m128i, _mm_add_epi32, _mm_aesdec_si128, _mm_aesdeclast_si128, _mm_aesenc_si128,
    _mm_aesenclast_si128, _mm_aesimc_si128, _mm_aeskeygenassist_si128, _mm_and_si128,
    _mm_loadu_si128, _mm_set_epi32, _mm_setzero_si128, _mm_shuffle_epi32, _mm_slli_si128,
    _mm_srai_epi32, _mm_storeu_si128, _mm_xor_si128,
};

/// Blocks processed side by side: enough to keep the AES units busy.
const LANES: usize = 8;

/// Expanded round keys of the data cipher (both directions) and the tweak cipher.
pub struct Keys {
    enc: [__m128i; 15],
    dec: [__m128i; 15],
    tweak: [__m128i; 15],
}

impl Drop for Keys {
    fn drop(&mut self) {
        for k in self
            .enc
            .iter_mut()
            .chain(self.dec.iter_mut())
            .chain(self.tweak.iter_mut())
        {
            // SAFETY: `k` is a valid, aligned __m128i owned by `self`; a volatile write keeps
            // the compiler from dropping the wipe.
            unsafe { std::ptr::write_volatile(k, zero()) };
        }
    }
}

fn zero() -> __m128i {
    // SAFETY: SSE2 is part of the x86_64 baseline.
    unsafe { _mm_setzero_si128() }
}

impl Keys {
    /// Expands the two AES-256 keys.
    ///
    /// # Safety
    /// The CPU must have AES-NI (`is_x86_feature_detected!("aes")`).
    #[target_feature(enable = "aes")]
    pub unsafe fn new(data_key: &[u8; 32], tweak_key: &[u8; 32]) -> Keys {
        let enc = expand(data_key);
        let mut dec = [zero(); 15];
        dec[0] = enc[14];
        for i in 1..14 {
            dec[i] = _mm_aesimc_si128(enc[14 - i]);
        }
        dec[14] = enc[0];
        Keys {
            enc,
            dec,
            tweak: expand(tweak_key),
        }
    }
}

/// The AES-256 key schedule (Intel's AES-NI white paper, figure 28).
#[target_feature(enable = "aes")]
fn expand(key: &[u8; 32]) -> [__m128i; 15] {
    #[target_feature(enable = "aes")]
    fn assist1(t1: __m128i, t2: __m128i) -> __m128i {
        let t2 = _mm_shuffle_epi32::<0xff>(t2);
        let mut t1 = t1;
        let mut t4 = _mm_slli_si128::<4>(t1);
        t1 = _mm_xor_si128(t1, t4);
        t4 = _mm_slli_si128::<4>(t4);
        t1 = _mm_xor_si128(t1, t4);
        t4 = _mm_slli_si128::<4>(t4);
        t1 = _mm_xor_si128(t1, t4);
        _mm_xor_si128(t1, t2)
    }
    #[target_feature(enable = "aes")]
    fn assist2(t1: __m128i, t3: __m128i) -> __m128i {
        let t2 = _mm_shuffle_epi32::<0xaa>(_mm_aeskeygenassist_si128::<0>(t1));
        let mut t3 = t3;
        let mut t4 = _mm_slli_si128::<4>(t3);
        t3 = _mm_xor_si128(t3, t4);
        t4 = _mm_slli_si128::<4>(t4);
        t3 = _mm_xor_si128(t3, t4);
        t4 = _mm_slli_si128::<4>(t4);
        t3 = _mm_xor_si128(t3, t4);
        _mm_xor_si128(t3, t2)
    }
    let mut rk = [zero(); 15];
    // SAFETY: both halves of `key` are 16 readable bytes; loadu takes unaligned pointers.
    let (mut t1, mut t3) = unsafe {
        (
            _mm_loadu_si128(key.as_ptr().cast()),
            _mm_loadu_si128(key.as_ptr().add(16).cast()),
        )
    };
    rk[0] = t1;
    rk[1] = t3;
    // Each step makes two round keys, the last one only the first of them.
    macro_rules! step {
        ($i:expr, $rcon:expr) => {
            t1 = assist1(t1, _mm_aeskeygenassist_si128::<$rcon>(t3));
            rk[$i] = t1;
            t3 = assist2(t1, t3);
            rk[$i + 1] = t3;
        };
    }
    step!(2, 0x01);
    step!(4, 0x02);
    step!(6, 0x04);
    step!(8, 0x08);
    step!(10, 0x10);
    step!(12, 0x20);
    rk[14] = assist1(t1, _mm_aeskeygenassist_si128::<0x40>(t3));
    rk
}

/// Tweak × α in GF(2^128): each 32-bit lane shifted left, carries moved one lane up, the
/// carry out of bit 127 folded back as 0x87.
#[target_feature(enable = "aes")]
fn double(t: __m128i) -> __m128i {
    let carry = _mm_and_si128(_mm_srai_epi32::<31>(t), _mm_set_epi32(0x87, 1, 1, 1));
    _mm_xor_si128(_mm_add_epi32(t, t), _mm_shuffle_epi32::<0x93>(carry))
}

#[target_feature(enable = "aes")]
fn encrypt_block(rk: &[__m128i; 15], b: __m128i) -> __m128i {
    let mut x = _mm_xor_si128(b, rk[0]);
    for k in &rk[1..14] {
        x = _mm_aesenc_si128(x, *k);
    }
    _mm_aesenclast_si128(x, rk[14])
}

/// XTS over one data unit of `n` blocks with tweak `index`, from `src` to `dst` (the same
/// pointer for in place). Reads and writes go through raw pointers, 16 bytes at a time, so
/// either side may be guest memory that the guest can change meanwhile.
///
/// # Safety
/// The CPU must have AES-NI (`keys` could only be made on one that does); `src` must be
/// readable and `dst` writable for `n × 16` bytes; they are the same or do not overlap.
#[target_feature(enable = "aes")]
pub unsafe fn xts(keys: &Keys, src: *const u8, dst: *mut u8, n: usize, index: u128, decrypt: bool) {
    let rk = if decrypt { &keys.dec } else { &keys.enc };
    let bytes = index.to_le_bytes();
    // SAFETY: 16 readable bytes.
    let mut t = encrypt_block(&keys.tweak, unsafe {
        _mm_loadu_si128(bytes.as_ptr().cast())
    });
    let round = |x: __m128i, k: __m128i| {
        if decrypt {
            _mm_aesdec_si128(x, k)
        } else {
            _mm_aesenc_si128(x, k)
        }
    };
    let last = |x: __m128i, k: __m128i| {
        if decrypt {
            _mm_aesdeclast_si128(x, k)
        } else {
            _mm_aesenclast_si128(x, k)
        }
    };
    let mut i = 0;
    while i + LANES <= n {
        let mut tw = [zero(); LANES];
        let mut x = [zero(); LANES];
        for l in 0..LANES {
            tw[l] = t;
            t = double(t);
            // SAFETY: block i + l < n is inside `src` (the caller's contract).
            let b = unsafe { _mm_loadu_si128(src.add((i + l) * 16).cast()) };
            x[l] = _mm_xor_si128(b, _mm_xor_si128(tw[l], rk[0]));
        }
        for k in &rk[1..14] {
            for v in x.iter_mut() {
                *v = round(*v, *k);
            }
        }
        for l in 0..LANES {
            let out = _mm_xor_si128(last(x[l], rk[14]), tw[l]);
            // SAFETY: block i + l < n is inside `dst` (the caller's contract).
            unsafe { _mm_storeu_si128(dst.add((i + l) * 16).cast(), out) };
        }
        i += LANES;
    }
    while i < n {
        // SAFETY: block i < n is inside `src`.
        let b = unsafe { _mm_loadu_si128(src.add(i * 16).cast()) };
        let mut x = _mm_xor_si128(_mm_xor_si128(b, t), rk[0]);
        for k in &rk[1..14] {
            x = round(x, *k);
        }
        let out = _mm_xor_si128(last(x, rk[14]), t);
        // SAFETY: block i < n is inside `dst`.
        unsafe { _mm_storeu_si128(dst.add(i * 16).cast(), out) };
        t = double(t);
        i += 1;
    }
}

/// XTS with VAES on 512-bit registers: sixteen blocks (four registers of four) in flight, for
/// units whose block count is a multiple of sixteen; [`xts`] does the rest.
pub mod wide {
    use std::arch::x86_64::{
        __m128i, __m512i, _mm512_aesdec_epi128, _mm512_aesdeclast_epi128, _mm512_aesenc_epi128,
        _mm512_aesenclast_epi128, _mm512_broadcast_i32x4, _mm512_castsi128_si512,
        _mm512_inserti32x4, _mm512_loadu_si512, _mm512_mask_blend_epi64, _mm512_shuffle_epi32,
        _mm512_slli_epi64, _mm512_srli_epi64, _mm512_storeu_si512, _mm512_xor_si512,
        _mm_loadu_si128, _MM_PERM_BADC,
    };

    use super::{double, encrypt_block, Keys};

    /// Tweaks × α^4, four at a time: each 128-bit lane shifted left by four bits, the four
    /// bits leaving the low half carried into the high half, the four leaving the top folded
    /// back as their carry-less product with 0x87.
    #[target_feature(enable = "avx512f")]
    fn mul_alpha4(t: __m512i) -> __m512i {
        let shifted = _mm512_slli_epi64::<4>(t);
        // Top four bits of each half, moved to the other half of the lane.
        let carry = _mm512_shuffle_epi32::<_MM_PERM_BADC>(_mm512_srli_epi64::<60>(t));
        // For the low half: carry(x)·(x^7+x^2+x+1), carry-less (no overlap beyond XOR).
        let reduced = _mm512_xor_si512(
            _mm512_xor_si512(carry, _mm512_slli_epi64::<1>(carry)),
            _mm512_xor_si512(_mm512_slli_epi64::<2>(carry), _mm512_slli_epi64::<7>(carry)),
        );
        // Even 64-bit elements are low halves (take the reduction), odd ones high halves
        // (take the plain carry from the low half).
        _mm512_xor_si512(shifted, _mm512_mask_blend_epi64(0xaa, reduced, carry))
    }

    /// See [`super::xts`]; `n` must be a multiple of 16.
    ///
    /// # Safety
    /// As for [`super::xts`], and the CPU must have AVX-512F and VAES.
    #[target_feature(enable = "aes,avx512f,vaes")]
    pub unsafe fn xts(
        keys: &Keys,
        src: *const u8,
        dst: *mut u8,
        n: usize,
        index: u128,
        decrypt: bool,
    ) {
        debug_assert!(n.is_multiple_of(16));
        let rk128 = if decrypt { &keys.dec } else { &keys.enc };
        let mut rk = [_mm512_broadcast_i32x4(rk128[0]); 15];
        for (wide, narrow) in rk.iter_mut().zip(rk128.iter()) {
            *wide = _mm512_broadcast_i32x4(*narrow);
        }
        let bytes = index.to_le_bytes();
        // SAFETY: 16 readable bytes.
        let t0: __m128i = encrypt_block(&keys.tweak, unsafe {
            _mm_loadu_si128(bytes.as_ptr().cast())
        });
        let t1 = double(t0);
        let t2 = double(t1);
        let t3 = double(t2);
        let mut tw = _mm512_castsi128_si512(t0);
        tw = _mm512_inserti32x4::<1>(tw, t1);
        tw = _mm512_inserti32x4::<2>(tw, t2);
        tw = _mm512_inserti32x4::<3>(tw, t3);
        let mut i = 0;
        while i < n {
            let mut t = [tw; 4];
            for l in 1..4 {
                t[l] = mul_alpha4(t[l - 1]);
            }
            tw = mul_alpha4(t[3]);
            let mut x = [tw; 4];
            for l in 0..4 {
                // SAFETY: blocks i + 4l .. i + 4l + 4 are inside `src` (i + 16 <= n).
                let b = unsafe { _mm512_loadu_si512(src.add((i + 4 * l) * 16).cast()) };
                x[l] = _mm512_xor_si512(b, _mm512_xor_si512(t[l], rk[0]));
            }
            for k in &rk[1..14] {
                for v in x.iter_mut() {
                    *v = if decrypt {
                        _mm512_aesdec_epi128(*v, *k)
                    } else {
                        _mm512_aesenc_epi128(*v, *k)
                    };
                }
            }
            for l in 0..4 {
                let last = if decrypt {
                    _mm512_aesdeclast_epi128(x[l], rk[14])
                } else {
                    _mm512_aesenclast_epi128(x[l], rk[14])
                };
                // SAFETY: as for the load, in `dst`.
                unsafe {
                    _mm512_storeu_si512(
                        dst.add((i + 4 * l) * 16).cast(),
                        _mm512_xor_si512(last, t[l]),
                    )
                };
            }
            i += 16;
        }
    }
}
