//! The SIMD kernels of the forward loop on x86_64: several commands classified at once.
//!
//! Each kernel does what [`forwards`](super::forwards) does, group by group (4 commands with
//! AVX-512, 2 with AVX2): one mask test of every lane against its opcode's rejected bits (RES0,
//! SSEC, what the physical SMMU lacks) and the value checks as one variable shift into a table
//! of invalid values (ATC_INV's SIZE, the range encoding of TLBI_NH_VA/VAA), for every lane at
//! once. Every group is then patched with one VMID blend and stored with one vector store; a SID
//! command (ATC_INV, CFGI_CD, CFGI_CD_ALL) keeps its vSID there, and its position goes on a list
//! without a branch. After a block of groups the listed commands get their pSIDs from the radix
//! table (scalar, [`patch_sids`](super::patch_sids)): a branch per lane on whether it is a SID
//! command mispredicted on a guest's random mix. A group with any lane that
//! is not a plain forward (another opcode, a failed check) goes to the scalar loop, which stops
//! at that lane with the outcome it would have had alone; so do the last commands of a batch
//! that do not fill a group, and an unbound vSID ends the forwards at its lane.
//!
//! The tables are built from the scalar rules, so the two cannot disagree on what a rule says.

use super::{forwards, patch_sids, Rule, SimdRow, SimdTables, NUM_SCALE_MASK, SID_BLOCK};
use crate::command::RawCommand;
use core::arch::x86_64::*;

/// The CPU features the AVX-512 kernel uses (`vpermi2b` is AVX512_VBMI).
pub(super) fn avx512_detected() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vbmi")
        && is_x86_feature_detected!("bmi2")
}

/// The CPU features the AVX2 kernel uses.
pub(super) fn avx2_detected() -> bool {
    is_x86_feature_detected!("avx2")
}

/// 64 bytes of `t` as a vector.
#[target_feature(enable = "avx512f")]
#[inline]
fn ld512<T>(t: &[T]) -> __m512i {
    assert!(core::mem::size_of_val(t) >= 64);
    // SAFETY: the caller runs with AVX512F (this fn's target feature, checked by
    // `avx512_detected` before any kernel is selected); `t` has at least 64 readable bytes
    // (asserted) and `loadu` needs no alignment.
    unsafe { _mm512_loadu_si512(t.as_ptr().cast()) }
}

/// The AVX-512 kernel's tables and constants, in registers for the length of a call.
struct Avx512 {
    cls: [__m512i; 2],
    reject: [__m512i; 2],
    bad: [__m512i; 2],
    patch: [__m512i; 2],
    vmid: __m512i,
    /// Per 16-byte command: (d0 lane, d1 lane).
    odd: __m512i,
    shifts: __m512i,
    fields: __m512i,
    num_scale: __m512i,
    sixteen: __m512i,
    one: __m512i,
    sid_flag: __m512i,
}

impl Avx512 {
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn new(t: &SimdTables, vmid: u64) -> Avx512 {
        let ns = NUM_SCALE_MASK as i64;
        Avx512 {
            cls: [ld512(&t.cls[..64]), ld512(&t.cls[64..])],
            reject: [ld512(&t.reject[..8]), ld512(&t.reject[8..])],
            bad: [ld512(&t.bad[..8]), ld512(&t.bad[8..])],
            patch: [ld512(&t.patch[..8]), ld512(&t.patch[8..])],
            vmid: _mm512_set1_epi64(vmid as i64),
            odd: _mm512_set_epi64(1, 0, 1, 0, 1, 0, 1, 0),
            shifts: _mm512_set_epi64(8, 0, 8, 0, 8, 0, 8, 0),
            fields: _mm512_set_epi64(0xf, 0x3f, 0xf, 0x3f, 0xf, 0x3f, 0xf, 0x3f),
            num_scale: _mm512_set_epi64(0, ns, 0, ns, 0, ns, 0, ns),
            sixteen: _mm512_set1_epi64(16),
            one: _mm512_set1_epi64(1),
            sid_flag: _mm512_set1_epi64(i64::from(SimdTables::SID)),
        }
    }

    /// Four commands `x` checked at once: `None` if any is not a plain forward (another
    /// opcode, a rejected bit, an invalid SIZE or range encoding); else the four with their
    /// VMIDs (a SID command's class patches nothing, so its vSID stays for `patch_sids`) and
    /// bit `lane` set for each SID command.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,bmi2")]
    #[inline]
    fn group(&self, x: __m512i) -> Option<(__m512i, u32)> {
        // Each command's class (byte 0 of its d0 lane; opcode bit 7 is a rejected bit), then
        // `class * 2 + word` in every lane: the index into the per-class tables.
        let c = _mm512_permutex2var_epi8(self.cls[0], x, self.cls[1]);
        let idx = _mm512_or_si512(_mm512_unpacklo_epi64(c, c), self.odd);
        let reject = _mm512_permutex2var_epi64(self.reject[0], idx, self.reject[1]);
        // The value checks: bit `SIZE` (d0 lane) and bit `TG << 2 | TTL | NUM/SCALE << 4`
        // (d1 lane) of the class's table of invalid values. Class 0 (not a plain forward) has
        // every bit set.
        let d1 = _mm512_unpackhi_epi64(x, x);
        let v = _mm512_and_si512(_mm512_srlv_epi64(d1, self.shifts), self.fields);
        let ns = _mm512_test_epi64_mask(x, self.num_scale) << 1;
        let v = _mm512_mask_or_epi64(v, ns, v, self.sixteen);
        let bad = _mm512_permutex2var_epi64(self.bad[0], idx, self.bad[1]);
        let invalid = _mm512_srlv_epi64(bad, v);
        if _mm512_test_epi64_mask(x, reject) | _mm512_test_epi64_mask(invalid, self.one) != 0 {
            return None;
        }
        let patch = _mm512_permutex2var_epi64(self.patch[0], idx, self.patch[1]);
        // VMID where the class has one (0xCA: patch ? vmid : x).
        let y = _mm512_ternarylogic_epi64(patch, self.vmid, x, 0xca);
        // The SID commands: bit `2 * lane` (their d0 lanes) gathered to bit `lane`.
        let sid = _mm512_mask_test_epi64_mask(0x55, idx, self.sid_flag);
        Some((y, _pext_u32(u32::from(sid), 0x55)))
    }
}

/// Forwards commands from the start of `input` while each is forwarded as it is, input i to
/// output i, with `base + i` as its provenance; returns how many. Four commands per step.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,bmi2")]
// The scalar `forwards` arguments, plus the tables.
#[allow(clippy::too_many_arguments)]
pub(super) fn forwards_avx512(
    rules: &[Rule; 256],
    t: &SimdTables,
    vmid: u64,
    input: &[RawCommand],
    out: &mut [RawCommand],
    prov: &mut [u32],
    base: u32,
    lookup: &impl Fn(u32) -> Option<u32>,
) -> usize {
    let len = input.len().min(out.len()).min(prov.len());
    let k = Avx512::new(t, vmid);
    let lanes = _mm_set_epi32(3, 2, 1, 0);
    let four = _mm_set1_epi32(4);
    let basev = _mm_set1_epi32(base as i32);
    // Positions of the SID commands written with their vSID still in place, patched by
    // `patch_sids` after the block that holds them: a branch per lane on whether it is a SID
    // command mispredicted on a guest's mix (a third of them, in no order a predictor learns:
    // 5.3 ns a command on a long random mix, against 1.9 ns on the 4,096 commands a
    // benchmark repeated), while this list's loop mispredicts once per block.
    let mut sids = [0u32; SID_BLOCK + 4];
    let whole = len - len % 4;
    let mut n = 0;
    while n < whole {
        let end = whole.min(n + SID_BLOCK);
        let (mut cnt, mut stopped) = (0, false);
        let mut at = _mm_add_epi32(_mm_set1_epi32(n as i32), lanes);
        for ((cmds, o), p) in input[n..end]
            .chunks_exact(4)
            .zip(out[n..end].chunks_exact_mut(4))
            .zip(prov[n..end].chunks_exact_mut(4))
        {
            let Some((y, sid)) = k.group(ld512(cmds)) else {
                stopped = true;
                break;
            };
            assert!(o.len() == 4 && p.len() == 4);
            // SAFETY: AVX512F was detected before this kernel was selected; `o` is 4
            // commands, 64 writable bytes (asserted), and `storeu` needs no alignment.
            unsafe { _mm512_storeu_si512(o.as_mut_ptr().cast(), y) };
            // SAFETY: SSE2 is part of x86_64; `p` is 4 u32s, 16 writable bytes (asserted).
            unsafe { _mm_storeu_si128(p.as_mut_ptr().cast(), _mm_add_epi32(at, basev)) };
            // The SID commands' positions, appended without a branch. A block lists 64 at
            // most, so `cnt + 4` fits.
            let packed = _mm_maskz_compress_epi32(sid as __mmask8, at);
            let slot = &mut sids[cnt..cnt + 4];
            // SAFETY: SSE2; `slot` is 4 u32s, 16 writable bytes.
            unsafe { _mm_storeu_si128(slot.as_mut_ptr().cast(), packed) };
            cnt += sid.count_ones() as usize;
            at = _mm_add_epi32(at, four);
            n += 4;
        }
        if let Err(j) = patch_sids(&sids[..cnt], out, lookup) {
            return j;
        }
        if stopped {
            break;
        }
    }
    n + forwards(
        rules,
        vmid,
        &input[n..len],
        &mut out[n..len],
        &mut prov[n..len],
        base.wrapping_add(n as u32),
        lookup,
    )
}

/// 16 bytes of `t` as a vector.
#[target_feature(enable = "avx2")]
#[inline]
fn ld128(t: &[u64; 2]) -> __m128i {
    // SAFETY: `t` is 16 readable bytes; `loadu` needs no alignment; SSE2 is part of x86_64.
    unsafe { _mm_loadu_si128(t.as_ptr().cast()) }
}

/// Two 16-byte halves as one vector.
#[target_feature(enable = "avx2")]
#[inline]
fn pair(lo: &[u64; 2], hi: &[u64; 2]) -> __m256i {
    _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(ld128(lo)), ld128(hi))
}

/// The AVX2 kernel's constants, in registers for the length of a call.
struct Avx2 {
    vmid: __m256i,
    shifts: __m256i,
    fields: __m256i,
    num_scale: __m256i,
    sixteen: __m256i,
}

impl Avx2 {
    #[target_feature(enable = "avx2")]
    #[inline]
    fn new(vmid: u64) -> Avx2 {
        let ns = NUM_SCALE_MASK as i64;
        Avx2 {
            vmid: _mm256_set1_epi64x(vmid as i64),
            shifts: _mm256_set_epi64x(8, 0, 8, 0),
            fields: _mm256_set_epi64x(0xf, 0x3f, 0xf, 0x3f),
            num_scale: _mm256_set_epi64x(ns, 0, ns, 0),
            sixteen: _mm256_set_epi64x(16, 0, 16, 0),
        }
    }

    /// Two commands `x` checked at once against their rows `ra` and `rb`: `None` if either is
    /// not a plain forward; else both with their VMIDs (a SID command's row patches nothing,
    /// so its vSID stays for `patch_sids`).
    #[target_feature(enable = "avx2")]
    #[inline]
    fn pair(&self, x: __m256i, ra: &SimdRow, rb: &SimdRow) -> Option<__m256i> {
        let reject = pair(&ra.reject, &rb.reject);
        // The value checks, as in the AVX-512 kernel; NUM/SCALE is tested on a copy of d0 in
        // the d1 lane.
        let d1 = _mm256_unpackhi_epi64(x, x);
        let v = _mm256_and_si256(_mm256_srlv_epi64(d1, self.shifts), self.fields);
        let d0 = _mm256_unpacklo_epi64(x, x);
        let zero = _mm256_setzero_si256();
        let no_ns = _mm256_cmpeq_epi64(_mm256_and_si256(d0, self.num_scale), zero);
        let v = _mm256_or_si256(v, _mm256_andnot_si256(no_ns, self.sixteen));
        let invalid = _mm256_srlv_epi64(pair(&ra.bad, &rb.bad), v);
        // Bit 0 of `invalid` moved to bit 63, so that one test covers both checks.
        let bad = _mm256_or_si256(
            _mm256_and_si256(x, reject),
            _mm256_slli_epi64::<63>(invalid),
        );
        if _mm256_testz_si256(bad, bad) == 0 {
            return None;
        }
        // VMID where the rule has one (the patch mask's bytes are all ones there).
        Some(_mm256_blendv_epi8(x, self.vmid, pair(&ra.patch, &rb.patch)))
    }
}

/// [`forwards_avx512`] with AVX2: two commands per step, their rules fetched by opcode.
#[target_feature(enable = "avx2")]
// The scalar `forwards` arguments, plus the tables.
#[allow(clippy::too_many_arguments)]
pub(super) fn forwards_avx2(
    rules: &[Rule; 256],
    t: &SimdTables,
    vmid: u64,
    input: &[RawCommand],
    out: &mut [RawCommand],
    prov: &mut [u32],
    base: u32,
    lookup: &impl Fn(u32) -> Option<u32>,
) -> usize {
    let len = input.len().min(out.len()).min(prov.len());
    let k = Avx2::new(vmid);
    let mut sids = [0u32; SID_BLOCK];
    let whole = len - len % 2;
    let mut n = 0;
    while n < whole {
        let end = whole.min(n + SID_BLOCK);
        let (mut cnt, mut stopped) = (0, false);
        for ((cmds, o), p) in input[n..end]
            .chunks_exact(2)
            .zip(out[n..end].chunks_exact_mut(2))
            .zip(prov[n..end].chunks_exact_mut(2))
        {
            let (a, b) = (&cmds[0], &cmds[1]);
            let ra = &t.rows[usize::from(t.class[usize::from(a.d0() as u8)] & 7)];
            let rb = &t.rows[usize::from(t.class[usize::from(b.d0() as u8)] & 7)];
            assert!(cmds.len() == 2 && o.len() == 2 && p.len() == 2);
            // SAFETY: AVX2 was detected before this kernel was selected; `cmds` is 2 commands,
            // 32 readable bytes (asserted), and `loadu` needs no alignment.
            let x = unsafe { _mm256_loadu_si256(cmds.as_ptr().cast()) };
            let Some(y) = k.pair(x, ra, rb) else {
                stopped = true;
                break;
            };
            // SAFETY: AVX2 was detected before this kernel was selected; `o` is 2 commands,
            // 32 writable bytes (asserted), and `storeu` needs no alignment.
            unsafe { _mm256_storeu_si256(o.as_mut_ptr().cast(), y) };
            p[0] = base.wrapping_add(n as u32);
            p[1] = base.wrapping_add(n as u32 + 1);
            // The SID commands' positions, appended without a branch (as the AVX-512 kernel).
            sids[cnt] = n as u32;
            cnt += usize::from(ra.sid != 0);
            sids[cnt] = n as u32 + 1;
            cnt += usize::from(rb.sid != 0);
            n += 2;
        }
        if let Err(j) = patch_sids(&sids[..cnt], out, lookup) {
            return j;
        }
        if stopped {
            break;
        }
    }
    n + forwards(
        rules,
        vmid,
        &input[n..len],
        &mut out[n..len],
        &mut prov[n..len],
        base.wrapping_add(n as u32),
        lookup,
    )
}
