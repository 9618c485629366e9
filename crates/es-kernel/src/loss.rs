//! Softmax cross-entropy and accuracy of logits, computed after the float guard is released.
//!
//! The fitness feeds ranks that must agree on every machine of a cluster, so `exp` and `ln`
//! come from the pure-Rust `libm` crate, never the platform's (glibc picks code paths per CPU).

/// Cross-entropy `logsumexp(o) - o[label]` in f64. A network whose logits are not finite has
/// diverged: its loss is `+inf` (the worst fitness), never NaN.
pub fn cross_entropy(logits: &[f32], label: usize) -> f64 {
    assert!(
        label < logits.len(),
        "label {label} out of range for {} logits",
        logits.len()
    );
    if logits.iter().any(|o| !o.is_finite()) {
        return f64::INFINITY;
    }
    let max = row_max(logits);
    let sum: f64 = logits.iter().map(|&o| libm::exp(o as f64 - max)).sum();
    max + libm::log(sum) - logits[label] as f64
}

/// The largest logit, in f64 (from which the loss's exponentials are taken).
pub fn row_max(logits: &[f32]) -> f64 {
    logits
        .iter()
        .fold(f64::NEG_INFINITY, |m, &o| m.max(o as f64))
}

/// Replaces each `x` of `values` by `libm::exp(x)`, bit for bit, eight at a time on AVX-512
/// and four at a time on AVX2 (the widest [`MathPath`] this CPU has).
///
/// The loss takes ten exponentials per sample and evaluation, which made `libm::exp` about
/// 8% of a training generation on AVX-512 machines and 15% on an AVX2 one (perf, session 10).
/// The vector paths perform `libm::exp`'s own operations (FreeBSD's `e_exp.c`: reduction by
/// `k·ln2` in two parts, the degree-5 rational approximation, scaling by `2^k`) in the same
/// order, with no FMA, so each lane rounds exactly as the scalar code does. Off that code's
/// main path, the lanes where libm returns at once (`1 + x` for `|x| ≤ 2^-28`, +0 below
/// −745.13) get the same in the vector; the rest (`|x| ≥ 708.39` otherwise, NaN) are
/// recomputed by `libm::exp` itself. (Every sample's largest logit gives `exp(0)`: on the
/// scalar fallback, that was one libm call per sample, 1% of a generation.)
pub fn exp_in_place(values: &mut [f64]) {
    MathPath::widest().exp_in_place(values);
}

/// Replaces each `x` of `values` by `libm::log(x)`, bit for bit, four at a time where the CPU
/// has AVX2 (the loss takes one per sample and evaluation: 3% of a training generation on an
/// AVX2 machine before). Like [`exp_in_place`], the vector path performs libm's own
/// operations (FreeBSD's `e_log.c`) in its order, and leaves to `libm::log` the values off its
/// main path (zero, subnormal, negative, infinite, NaN).
pub fn ln_in_place(values: &mut [f64]) {
    MathPath::widest().ln_in_place(values);
}

/// One implementation of [`exp_in_place`] and [`ln_in_place`]; all give libm's bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MathPath {
    /// libm's `exp` and `log` on each value.
    Scalar,
    /// Four lanes of `__m256d`.
    Avx2,
    /// Eight lanes of `__m512d` for `exp`; the AVX2 code for `log`.
    Avx512,
}

impl MathPath {
    /// The paths this CPU can run, scalar first.
    pub fn supported() -> Vec<MathPath> {
        [MathPath::Scalar, MathPath::Avx2, MathPath::Avx512]
            .into_iter()
            .filter(|path| path.is_supported())
            .collect()
    }

    /// Whether this CPU has the path's instructions.
    pub fn is_supported(self) -> bool {
        match self {
            MathPath::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            MathPath::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            #[cfg(target_arch = "x86_64")]
            MathPath::Avx512 => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx2")
            }
            #[cfg(not(target_arch = "x86_64"))]
            MathPath::Avx2 | MathPath::Avx512 => false,
        }
    }

    /// The fastest supported path (detected once).
    pub fn widest() -> MathPath {
        static WIDEST: std::sync::OnceLock<MathPath> = std::sync::OnceLock::new();
        *WIDEST.get_or_init(|| {
            *MathPath::supported()
                .last()
                .expect("scalar is always there")
        })
    }

    /// [`ln_in_place`] on this path. AVX-512 machines take the AVX2 code: one logarithm per
    /// sample is too few to repay a second, wider copy.
    ///
    /// # Panics
    /// If this CPU lacks the path's instructions (see [`MathPath::supported`]).
    pub fn ln_in_place(self, values: &mut [f64]) {
        assert!(
            self.is_supported(),
            "math path {self:?} needs instructions this CPU lacks"
        );
        match self {
            MathPath::Scalar => {
                for x in values {
                    *x = libm::log(*x);
                }
            }
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX2 is present (asserted above; every AVX-512 CPU has it too).
            MathPath::Avx2 | MathPath::Avx512 => unsafe { ln_avx2::ln_in_place(values) },
            #[cfg(not(target_arch = "x86_64"))]
            MathPath::Avx2 | MathPath::Avx512 => unreachable!("not supported off x86_64"),
        }
    }

    /// [`exp_in_place`] on this path.
    ///
    /// # Panics
    /// If this CPU lacks the path's instructions (see [`MathPath::supported`]).
    pub fn exp_in_place(self, values: &mut [f64]) {
        assert!(
            self.is_supported(),
            "math path {self:?} needs instructions this CPU lacks"
        );
        match self {
            MathPath::Scalar => {
                for x in values {
                    *x = libm::exp(*x);
                }
            }
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX2 is present (asserted above).
            MathPath::Avx2 => unsafe { exp_avx2::exp_in_place(values) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX-512F is present (asserted above).
            MathPath::Avx512 => unsafe { exp_avx512::exp_in_place(values) },
            #[cfg(not(target_arch = "x86_64"))]
            MathPath::Avx2 | MathPath::Avx512 => unreachable!("not supported off x86_64"),
        }
    }
}

/// The loop of every vector path: `vector` computes each whole group of `N` values in place
/// and returns a mask of the lanes it left to `scalar` (off libm's main path); the last
/// values, fewer than `N`, are padded with `pad` (a value on the main path) for one more
/// call. Inlined into each `#[target_feature]` function, whose closure inherits its features.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn lanes_in_place<const N: usize>(
    values: &mut [f64],
    pad: f64,
    scalar: fn(f64) -> f64,
    mut vector: impl FnMut(&mut [f64; N]) -> u32,
) {
    let mut chunks = values.chunks_exact_mut(N);
    for chunk in &mut chunks {
        let lanes: &mut [f64; N] = chunk.try_into().expect("chunks of N");
        in_lanes(lanes, scalar, &mut vector);
    }
    let rest = chunks.into_remainder();
    if !rest.is_empty() {
        let mut padded = [pad; N];
        padded[..rest.len()].copy_from_slice(rest);
        let special = vector(&mut padded);
        off_main_path(&mut padded[..rest.len()], special, scalar);
        rest.copy_from_slice(&padded[..rest.len()]);
    }
}

/// `vector` on the `N` values of `lanes` in place, then `scalar` on the lanes it left
/// (off libm's main path). Inlined like [`lanes_in_place`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn in_lanes<const N: usize>(
    lanes: &mut [f64; N],
    scalar: fn(f64) -> f64,
    vector: impl FnOnce(&mut [f64; N]) -> u32,
) {
    let special = vector(lanes);
    off_main_path(lanes, special, scalar);
}

/// `scalar` on the lanes marked in `special`, which still hold their inputs: the vector code
/// leaves them.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn off_main_path(lanes: &mut [f64], special: u32, scalar: fn(f64) -> f64) {
    if special != 0 {
        for (i, v) in lanes.iter_mut().enumerate() {
            if special & (1 << i) != 0 {
                *v = scalar(*v);
            }
        }
    }
}

/// libm's (FreeBSD's) `exp` constants and branch thresholds, shared by the vector paths
/// (`log` uses the same two-part ln2).
#[cfg(target_arch = "x86_64")]
mod exp_constants {
    // The constants, by the bits libm's source gives beside them.
    pub(super) const LN2HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
    pub(super) const LN2LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);
    pub(super) const INVLN2: f64 = f64::from_bits(0x3ff7_1547_652b_82fe);
    pub(super) const P1: f64 = f64::from_bits(0x3fc5_5555_5555_553e);
    pub(super) const P2: f64 = f64::from_bits(0xbf66_c16c_16be_bd93);
    pub(super) const P3: f64 = f64::from_bits(0x3f11_566a_af25_de2c);
    pub(super) const P4: f64 = f64::from_bits(0xbebb_bd41_c5d2_6bf1);
    pub(super) const P5: f64 = f64::from_bits(0x3e66_3769_72be_a4d0);

    /// High words of `|x|` where libm's branches change: at and above `BIG` (`|x| ≥ 708.39`)
    /// and at or below `TINY` (`|x| ≤ 2^-28`) it takes a special path; above `HALF_LN2`
    /// (`0.5·ln2`) it reduces by `k ≠ 0`, from `ONE_HALF_LN2` (`1.5·ln2`) on with `k` from
    /// `x / ln2`, below that with `k = ±1`.
    pub(super) const BIG: u64 = 0x4086232b;
    /// Below this libm's `exp` returns +0 (its `x < -745.13321910194110842` test: these are
    /// that literal's bits): like `1 + x` at or below `TINY`, a result the vector paths give
    /// themselves.
    pub(super) const UNDERFLOW: f64 = f64::from_bits(0xc087_4910_d52d_3051);
    pub(super) const TINY: u64 = 0x3e300000;
    pub(super) const HALF_LN2: u64 = 0x3fd62e42;
    pub(super) const ONE_HALF_LN2: u64 = 0x3ff0a2b2;
}

#[cfg(target_arch = "x86_64")]
mod exp_avx2 {
    use super::exp_constants::*;
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX2 must be present.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn exp_in_place(values: &mut [f64]) {
        super::lanes_in_place::<4>(values, 0.0, libm::exp, |lanes| exp_lanes(lanes));
    }

    /// [`exp4`] of `lanes` in place; returns the mask of the lanes it left as they are.
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(super) fn exp_lanes(lanes: &mut [f64; 4]) -> u32 {
        // SAFETY: `lanes` holds the 4 f64 the load and the store touch.
        let x = unsafe { _mm256_loadu_pd(lanes.as_ptr()) };
        let (y, special) = exp4(x);
        // SAFETY: as above.
        unsafe { _mm256_storeu_pd(lanes.as_mut_ptr(), y) };
        special as u32
    }

    /// All-ones lanes where the high word of `|x|` (`abs_bits >> 32`) is at least `high`.
    /// AVX2 compares 64-bit lanes signed only, which is right here: `abs_bits` has no sign.
    #[target_feature(enable = "avx2")]
    fn at_least(abs_bits: __m256i, high: u64) -> __m256i {
        _mm256_cmpgt_epi64(abs_bits, _mm256_set1_epi64x((high << 32) as i64 - 1))
    }

    /// `exp` of the lanes on libm's main path, the other lanes (the returned bits) left as
    /// they are. The steps and their order are `exp_avx512::exp8`'s.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn exp4(x: __m256d) -> (__m256d, i32) {
        let bits = _mm256_castpd_si256(x);
        let abs_bits = _mm256_and_si256(bits, _mm256_set1_epi64x(i64::MAX));
        let all_ones = _mm256_set1_epi64x(-1);
        let tiny = _mm256_castsi256_pd(_mm256_xor_si256(at_least(abs_bits, TINY + 1), all_ones));
        let underflow = _mm256_cmp_pd::<_CMP_LT_OQ>(x, _mm256_set1_pd(UNDERFLOW));
        let special = _mm256_andnot_pd(underflow, _mm256_castsi256_pd(at_least(abs_bits, BIG)));
        let reduce = _mm256_castsi256_pd(at_least(abs_bits, HALF_LN2 + 1));
        let from_quotient = _mm256_castsi256_pd(at_least(abs_bits, ONE_HALF_LN2));
        let negative = _mm256_castsi256_pd(_mm256_cmpgt_epi64(_mm256_setzero_si256(), bits));
        // k = (int)(INVLN2·x ± 0.5) from 1.5·ln2 on, 1 − 2·sign between, 0 below 0.5·ln2.
        let half = _mm256_blendv_pd(_mm256_set1_pd(0.5), _mm256_set1_pd(-0.5), negative);
        let quotient = _mm256_round_pd::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(
            _mm256_add_pd(_mm256_mul_pd(_mm256_set1_pd(INVLN2), x), half),
        );
        let unit = _mm256_blendv_pd(_mm256_set1_pd(1.0), _mm256_set1_pd(-1.0), negative);
        let k = _mm256_blendv_pd(unit, quotient, from_quotient);
        // +0 where libm does not reduce, like AVX-512's zeroing move.
        let k = _mm256_and_pd(k, reduce);
        // Below 0.5·ln2, libm uses hi = x, lo = 0: which `x − 0·LN2HI` and `0·LN2LO` are.
        let hi = _mm256_sub_pd(x, _mm256_mul_pd(k, _mm256_set1_pd(LN2HI)));
        let lo = _mm256_mul_pd(k, _mm256_set1_pd(LN2LO));
        let r = _mm256_sub_pd(hi, lo);
        let xx = _mm256_mul_pd(r, r);
        // P1 + xx·(P2 + xx·(P3 + xx·(P4 + xx·P5))), innermost first.
        let mut poly = _mm256_set1_pd(P5);
        for p in [P4, P3, P2, P1] {
            poly = _mm256_add_pd(_mm256_set1_pd(p), _mm256_mul_pd(xx, poly));
        }
        let c = _mm256_sub_pd(r, _mm256_mul_pd(xx, poly));
        let ratio = _mm256_div_pd(_mm256_mul_pd(r, c), _mm256_sub_pd(_mm256_set1_pd(2.0), c));
        let y = _mm256_add_pd(
            _mm256_set1_pd(1.0),
            _mm256_add_pd(_mm256_sub_pd(ratio, lo), hi),
        );
        // y·2^k, one multiplication as in libm's `scalbn` for |k| ≤ 1022 (2^0 = 1 for k = 0).
        let k_int = _mm256_cvtepi32_epi64(_mm256_cvttpd_epi32(k));
        let scale = _mm256_castsi256_pd(_mm256_slli_epi64::<52>(_mm256_add_epi64(
            k_int,
            _mm256_set1_epi64x(1023),
        )));
        let result = _mm256_mul_pd(y, scale);
        // libm's own results off the main path: 1 + x when tiny, +0 below UNDERFLOW.
        let result = _mm256_blendv_pd(result, _mm256_add_pd(_mm256_set1_pd(1.0), x), tiny);
        let result = _mm256_andnot_pd(underflow, result);
        (
            _mm256_blendv_pd(result, x, special),
            _mm256_movemask_pd(special),
        )
    }
}

#[cfg(target_arch = "x86_64")]
mod ln_avx2 {
    use std::arch::x86_64::*;

    // ln2 in two parts, the same split as `exp`'s.
    use super::exp_constants::{LN2HI, LN2LO};

    // libm's (FreeBSD's) constants, by the bits its source gives beside them.
    const LG1: f64 = f64::from_bits(0x3fe5_5555_5555_5593);
    const LG2: f64 = f64::from_bits(0x3fd9_9999_9997_fa04);
    const LG3: f64 = f64::from_bits(0x3fd2_4924_9422_9359);
    const LG4: f64 = f64::from_bits(0x3fcc_71c5_1d8e_78af);
    const LG5: f64 = f64::from_bits(0x3fc7_4664_96cb_03de);
    const LG6: f64 = f64::from_bits(0x3fc3_9a09_d078_c69f);
    const LG7: f64 = f64::from_bits(0x3fc2_f112_df3e_5244);
    /// High words of x: below `NORMAL` (zero, subnormal) and from `NOT_FINITE` on (inf, NaN,
    /// and every negative x, whose high word has its sign bit) libm takes a special path.
    const NORMAL: i64 = 0x0010_0000;
    const NOT_FINITE: i64 = 0x7ff0_0000;
    /// libm's shift of the high word that puts the reduced x in [√2/2, √2).
    const SQRT_HALF_HIGH: i64 = 0x3fe6_a09e;
    /// 2^52 + 2^51: an integer k added to its bits gives the double 2^52 + 2^51 + k.
    const ROUNDING_MAGIC: f64 = 6_755_399_441_055_744.0;

    /// # Safety
    /// AVX2 must be present.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn ln_in_place(values: &mut [f64]) {
        super::lanes_in_place::<4>(values, 2.0, libm::log, |lanes| ln_lanes(lanes));
    }

    /// [`ln4`] of `lanes` in place; returns the mask of the lanes it left as they are.
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(super) fn ln_lanes(lanes: &mut [f64; 4]) -> u32 {
        // SAFETY: `lanes` holds the 4 f64 the load and the store touch.
        let x = unsafe { _mm256_loadu_pd(lanes.as_ptr()) };
        let (y, special) = ln4(x);
        // SAFETY: as above.
        unsafe { _mm256_storeu_pd(lanes.as_mut_ptr(), y) };
        special as u32
    }

    /// `log` of the lanes on libm's main path, the other lanes (the returned bits) left as
    /// they are. Each step is a line of libm's `log`, in its order.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn ln4(x: __m256d) -> (__m256d, i32) {
        let bits = _mm256_castpd_si256(x);
        // hx: the high word, in the low half of each lane (so never negative as an i64).
        let hx = _mm256_srli_epi64::<32>(bits);
        // libm also returns +0 early for exactly 1, which the main path below gives too
        // (f = 0, k = 0): the loss's sums are often exactly 1, so they stay in the vector.
        let special = _mm256_castsi256_pd(_mm256_or_si256(
            _mm256_cmpgt_epi64(_mm256_set1_epi64x(NORMAL), hx),
            _mm256_cmpgt_epi64(hx, _mm256_set1_epi64x(NOT_FINITE - 1)),
        ));
        // hx += 0x3ff00000 − 0x3fe6a09e; k = (hx >> 20) − 0x3ff;
        // hx = (hx & 0x000fffff) + 0x3fe6a09e; x = hx:low word.
        let hx = _mm256_add_epi64(hx, _mm256_set1_epi64x(0x3ff0_0000 - SQRT_HALF_HIGH));
        let k = _mm256_sub_epi64(_mm256_srli_epi64::<20>(hx), _mm256_set1_epi64x(0x3ff));
        let hx = _mm256_add_epi64(
            _mm256_and_si256(hx, _mm256_set1_epi64x(0x000f_ffff)),
            _mm256_set1_epi64x(SQRT_HALF_HIGH),
        );
        let reduced = _mm256_castsi256_pd(_mm256_or_si256(
            _mm256_slli_epi64::<32>(hx),
            _mm256_and_si256(bits, _mm256_set1_epi64x(0xffff_ffff)),
        ));
        let f = _mm256_sub_pd(reduced, _mm256_set1_pd(1.0));
        let hfsq = _mm256_mul_pd(_mm256_mul_pd(_mm256_set1_pd(0.5), f), f);
        let s = _mm256_div_pd(f, _mm256_add_pd(_mm256_set1_pd(2.0), f));
        let z = _mm256_mul_pd(s, s);
        let w = _mm256_mul_pd(z, z);
        let t1 = _mm256_mul_pd(
            w,
            _mm256_add_pd(
                _mm256_set1_pd(LG2),
                _mm256_mul_pd(
                    w,
                    _mm256_add_pd(_mm256_set1_pd(LG4), _mm256_mul_pd(w, _mm256_set1_pd(LG6))),
                ),
            ),
        );
        let t2 = _mm256_mul_pd(
            z,
            _mm256_add_pd(
                _mm256_set1_pd(LG1),
                _mm256_mul_pd(
                    w,
                    _mm256_add_pd(
                        _mm256_set1_pd(LG3),
                        _mm256_mul_pd(
                            w,
                            _mm256_add_pd(
                                _mm256_set1_pd(LG5),
                                _mm256_mul_pd(w, _mm256_set1_pd(LG7)),
                            ),
                        ),
                    ),
                ),
            ),
        );
        let r = _mm256_add_pd(t2, t1);
        // dk = k as f64, exactly (|k| ≤ 1077), by the 2^52 + 2^51 trick: AVX2 has no
        // 64-bit integer to double conversion.
        let dk = _mm256_sub_pd(
            _mm256_castsi256_pd(_mm256_add_epi64(
                k,
                _mm256_castpd_si256(_mm256_set1_pd(ROUNDING_MAGIC)),
            )),
            _mm256_set1_pd(ROUNDING_MAGIC),
        );
        // s·(hfsq + r) + dk·LN2LO − hfsq + f + dk·LN2HI, left to right.
        let y = _mm256_mul_pd(s, _mm256_add_pd(hfsq, r));
        let y = _mm256_add_pd(y, _mm256_mul_pd(dk, _mm256_set1_pd(LN2LO)));
        let y = _mm256_sub_pd(y, hfsq);
        let y = _mm256_add_pd(y, f);
        let y = _mm256_add_pd(y, _mm256_mul_pd(dk, _mm256_set1_pd(LN2HI)));
        (_mm256_blendv_pd(y, x, special), _mm256_movemask_pd(special))
    }
}

#[cfg(target_arch = "x86_64")]
mod exp_avx512 {
    use super::exp_constants::*;
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX-512F must be present.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn exp_in_place(values: &mut [f64]) {
        super::lanes_in_place::<8>(values, 0.0, libm::exp, |lanes| exp_lanes(lanes));
    }

    /// [`exp8`] of `lanes` in place; returns the mask of the lanes it left as they are.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(super) fn exp_lanes(lanes: &mut [f64; 8]) -> u32 {
        // SAFETY: `lanes` holds the 8 f64 the load and the store touch.
        let x = unsafe { _mm512_loadu_pd(lanes.as_ptr()) };
        let (y, special) = exp8(x);
        // SAFETY: as above.
        unsafe { _mm512_storeu_pd(lanes.as_mut_ptr(), y) };
        special as u32
    }

    /// Lanes whose high word of `|x|` (`abs_bits >> 32`) is at least `high`.
    #[target_feature(enable = "avx512f")]
    fn at_least(abs_bits: __m512i, high: u64) -> __mmask8 {
        _mm512_cmpge_epu64_mask(abs_bits, _mm512_set1_epi64((high << 32) as i64))
    }

    /// `exp` of the lanes on libm's main path, the other lanes (the mask) left as they are.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn exp8(x: __m512d) -> (__m512d, __mmask8) {
        let bits = _mm512_castpd_si512(x);
        let abs_bits = _mm512_and_si512(bits, _mm512_set1_epi64(i64::MAX));
        // libm's `hx >= H` on the high word hx of |x| is `at_least(H)`; `hx > H` is
        // `at_least(H + 1)`.
        let tiny = !at_least(abs_bits, TINY + 1);
        let underflow = _mm512_cmp_pd_mask::<_CMP_LT_OQ>(x, _mm512_set1_pd(UNDERFLOW));
        let special = at_least(abs_bits, BIG) & !underflow;
        let reduce = at_least(abs_bits, HALF_LN2 + 1);
        let from_quotient = at_least(abs_bits, ONE_HALF_LN2);
        let negative = _mm512_cmplt_epi64_mask(bits, _mm512_setzero_si512());
        // k = (int)(INVLN2·x ± 0.5) from 1.5·ln2 on, 1 − 2·sign between, 0 below 0.5·ln2.
        let half = _mm512_mask_blend_pd(negative, _mm512_set1_pd(0.5), _mm512_set1_pd(-0.5));
        let quotient = _mm512_roundscale_pd::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(
            _mm512_add_pd(_mm512_mul_pd(_mm512_set1_pd(INVLN2), x), half),
        );
        let unit = _mm512_mask_blend_pd(negative, _mm512_set1_pd(1.0), _mm512_set1_pd(-1.0));
        let k = _mm512_mask_blend_pd(from_quotient, unit, quotient);
        let k = _mm512_maskz_mov_pd(reduce, k);
        // Below 0.5·ln2, libm uses hi = x, lo = 0: which `x − 0·LN2HI` and `0·LN2LO` are.
        let hi = _mm512_sub_pd(x, _mm512_mul_pd(k, _mm512_set1_pd(LN2HI)));
        let lo = _mm512_mul_pd(k, _mm512_set1_pd(LN2LO));
        let r = _mm512_sub_pd(hi, lo);
        let xx = _mm512_mul_pd(r, r);
        // P1 + xx·(P2 + xx·(P3 + xx·(P4 + xx·P5))), innermost first.
        let mut poly = _mm512_set1_pd(P5);
        for p in [P4, P3, P2, P1] {
            poly = _mm512_add_pd(_mm512_set1_pd(p), _mm512_mul_pd(xx, poly));
        }
        let c = _mm512_sub_pd(r, _mm512_mul_pd(xx, poly));
        let ratio = _mm512_div_pd(_mm512_mul_pd(r, c), _mm512_sub_pd(_mm512_set1_pd(2.0), c));
        let y = _mm512_add_pd(
            _mm512_set1_pd(1.0),
            _mm512_add_pd(_mm512_sub_pd(ratio, lo), hi),
        );
        // y·2^k, one multiplication as in libm's `scalbn` for |k| ≤ 1022 (2^0 = 1 for k = 0).
        let k_int = _mm512_cvtepi32_epi64(_mm512_cvttpd_epi32(k));
        let scale = _mm512_castsi512_pd(_mm512_slli_epi64::<52>(_mm512_add_epi64(
            k_int,
            _mm512_set1_epi64(1023),
        )));
        let result = _mm512_mul_pd(y, scale);
        // libm's own results off the main path: 1 + x when tiny, +0 below UNDERFLOW.
        let result = _mm512_mask_blend_pd(tiny, result, _mm512_add_pd(_mm512_set1_pd(1.0), x));
        let result = _mm512_maskz_mov_pd(!underflow, result);
        (_mm512_mask_blend_pd(special, result, x), special)
    }
}

/// Index of the largest logit; the first one on ties.
pub fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    for (i, &o) in logits.iter().enumerate() {
        if o > logits[best] {
            best = i;
        }
    }
    best
}

/// What one parameter vector scored on one batch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Evaluation {
    /// Minus the mean softmax cross-entropy: the quantity ES maximises.
    pub fitness: f64,
    /// Samples whose largest logit is the label: reported, never optimised silently.
    pub correct: usize,
    pub samples: usize,
}

impl Evaluation {
    /// Scores `samples × classes` logits against `labels`: bit for bit the sum, in sample
    /// order, of each sample's [`cross_entropy`], on the widest [`MathPath`] of this CPU.
    pub fn from_logits(logits: &[f32], labels: &[u8], classes: usize) -> Evaluation {
        Evaluation::from_logits_on(MathPath::widest(), logits, labels, classes)
    }

    /// [`Evaluation::from_logits`] on `path`: every path gives the same bits.
    ///
    /// The vector paths score samples side by side, one per f64 lane (eight on AVX-512, four
    /// on AVX2): each step of a sample's loss (its maximum, each exponential
    /// and the running sum of them in class order, the logarithm, the argmax) is the scalar
    /// code's own operation in its lane, so no sample's bits depend on its neighbours. Before,
    /// the batch's exponentials and logarithms ran vectorised in flat arrays, but the rest of
    /// the loss (maxima, sums, argmax, the arrays' allocation) ran one sample at a time and
    /// cost 7.5% of a recipe generation on AVX-512 (perf, session 17).
    ///
    /// # Panics
    /// If the shapes disagree, a label is not below `classes`, or this CPU lacks `path`'s
    /// instructions.
    pub fn from_logits_on(
        path: MathPath,
        logits: &[f32],
        labels: &[u8],
        classes: usize,
    ) -> Evaluation {
        assert_eq!(logits.len(), labels.len() * classes, "logits shape");
        assert!(
            labels.iter().all(|&label| (label as usize) < classes),
            "labels must be below {classes}"
        );
        assert!(
            path.is_supported(),
            "math path {path:?} needs instructions this CPU lacks"
        );
        let mut score = Score::default();
        let lanes_done = match path {
            MathPath::Scalar => 0,
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX2 is present (asserted above).
            MathPath::Avx2 => unsafe {
                sample_lanes::score_avx2(logits, labels, classes, &mut score)
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX-512F is present (asserted above).
            MathPath::Avx512 => unsafe {
                sample_lanes::score_avx512(logits, labels, classes, &mut score)
            },
            #[cfg(not(target_arch = "x86_64"))]
            MathPath::Avx2 | MathPath::Avx512 => unreachable!("not supported off x86_64"),
        };
        // The samples after the last whole group of lanes, one at a time: the definition.
        let rest = logits[lanes_done * classes..]
            .chunks_exact(classes)
            .zip(&labels[lanes_done..]);
        for (o, &label) in rest {
            score.add(
                cross_entropy(o, label as usize),
                argmax(o) == label as usize,
            );
        }
        let samples = labels.len();
        Evaluation {
            fitness: if samples == 0 {
                0.0
            } else {
                -score.loss / samples as f64
            },
            correct: score.correct,
            samples,
        }
    }

    pub fn accuracy(&self) -> f64 {
        if self.samples == 0 {
            0.0
        } else {
            self.correct as f64 / self.samples as f64
        }
    }
}

/// A batch's running loss (the sum of its samples' cross-entropies, in sample order) and
/// count of correct samples.
#[derive(Default)]
struct Score {
    loss: f64,
    correct: usize,
}

impl Score {
    #[inline]
    fn add(&mut self, cross_entropy: f64, correct: bool) {
        self.loss += cross_entropy;
        self.correct += usize::from(correct);
    }
}

/// The loss of `N` samples at once, one per lane ([`Evaluation::from_logits_on`]).
#[cfg(target_arch = "x86_64")]
mod sample_lanes {
    use super::{Score, exp_avx2, exp_avx512, in_lanes, ln_avx2};

    /// Adds the whole groups of `N` samples of `logits` to `score`, in sample order, and
    /// returns how many samples that was. `exp` and `ln` replace `N` values by libm's
    /// `exp` and `log` of each. Written lane by lane over arrays: inlined into each
    /// `#[target_feature]` wrapper below, the lane loops compile to that path's vectors.
    #[inline(always)]
    fn score_lanes<const N: usize>(
        logits: &[f32],
        labels: &[u8],
        classes: usize,
        score: &mut Score,
        exp: impl Fn(&mut [f64; N]),
        ln: impl Fn(&mut [f64; N]),
    ) -> usize {
        let groups = labels.len() / N;
        // The group's logits class by class: `columns[class][lane]`.
        let mut columns = vec![[0.0f32; N]; classes];
        for group in 0..groups {
            let rows = &logits[group * N * classes..(group + 1) * N * classes];
            let labels = &labels[group * N..(group + 1) * N];
            for (lane, row) in rows.chunks_exact(classes).enumerate() {
                for (column, &o) in columns.iter_mut().zip(row) {
                    column[lane] = o;
                }
            }
            // `cross_entropy`'s finiteness test and `row_max`, and `argmax` (its first
            // largest), class by class in every lane.
            let mut finite = [true; N];
            let mut max = [f64::NEG_INFINITY; N];
            let mut best = [0u32; N];
            let mut best_logit = columns[0];
            for (class, column) in columns.iter().enumerate() {
                for lane in 0..N {
                    let o = column[lane];
                    finite[lane] &= o.is_finite();
                    max[lane] = max[lane].max(o as f64);
                    let better = o > best_logit[lane];
                    best_logit[lane] = if better { o } else { best_logit[lane] };
                    best[lane] = if better { class as u32 } else { best[lane] };
                }
            }
            // The sum of `exp(o − max)` in class order; a lane whose logits are not all
            // finite takes exp(0) instead (its loss is +inf whatever the sum).
            let mut sum = [0.0f64; N];
            for column in &columns {
                let mut terms: [f64; N] = std::array::from_fn(|lane| {
                    if finite[lane] {
                        column[lane] as f64 - max[lane]
                    } else {
                        0.0
                    }
                });
                exp(&mut terms);
                for lane in 0..N {
                    sum[lane] += terms[lane];
                }
            }
            ln(&mut sum);
            for lane in 0..N {
                let label = labels[lane] as usize;
                let cross_entropy = if finite[lane] {
                    max[lane] + sum[lane] - columns[label][lane] as f64
                } else {
                    f64::INFINITY
                };
                score.add(cross_entropy, best[lane] as usize == label);
            }
        }
        groups * N
    }

    /// The loss of groups of four samples ([`score_lanes`]).
    ///
    /// # Safety
    /// AVX2 must be present.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn score_avx2(
        logits: &[f32],
        labels: &[u8],
        classes: usize,
        score: &mut Score,
    ) -> usize {
        score_lanes::<4>(
            logits,
            labels,
            classes,
            score,
            |values| in_lanes(values, libm::exp, |lanes| exp_avx2::exp_lanes(lanes)),
            |values| in_lanes(values, libm::log, |lanes| ln_avx2::ln_lanes(lanes)),
        )
    }

    /// The loss of groups of eight samples ([`score_lanes`]); the logarithms four at a time,
    /// as [`super::ln_in_place`] takes them.
    ///
    /// # Safety
    /// AVX-512F (and so AVX2) must be present.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn score_avx512(
        logits: &[f32],
        labels: &[u8],
        classes: usize,
        score: &mut Score,
    ) -> usize {
        score_lanes::<8>(
            logits,
            labels,
            classes,
            score,
            |values| in_lanes(values, libm::exp, |lanes| exp_avx512::exp_lanes(lanes)),
            |values| {
                for half in values.as_chunks_mut::<4>().0 {
                    in_lanes(half, libm::log, |lanes| ln_avx2::ln_lanes(lanes));
                }
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cross_entropy_of_uniform_logits_is_ln_classes() {
        let ce = cross_entropy(&[0.0; 10], 3);
        assert!((ce - 10f64.ln()).abs() < 1e-12);
        // Large logits do not overflow.
        let ce = cross_entropy(&[1000.0, 0.0], 0);
        assert!((0.0..1e-300).contains(&ce));
        assert_eq!(cross_entropy(&[f32::INFINITY, 0.0], 0), f64::INFINITY);
        assert_eq!(cross_entropy(&[f32::NAN, 0.0], 0), f64::INFINITY);
    }

    /// Doubles where libm's `exp` changes path, with their neighbours, and the specials.
    fn exp_edge_cases() -> Vec<f64> {
        let mut edges = vec![
            0.0,
            -0.0,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
            -f64::NAN,
        ];
        edges.extend([f64::MIN_POSITIVE, 5e-324, f64::MAX, 1.0, 0.5, 2.0]);
        // libm's overflow and underflow bounds (below -745.13 it returns 0, which the vector
        // paths give themselves), with their neighbours, of both signs.
        for bound in [709.782712893384f64, 708.3964185322641, 745.1332191019411] {
            for delta in [-2i64, -1, 0, 1, 2] {
                let x = f64::from_bits((bound.to_bits() as i64 + delta) as u64);
                edges.extend([x, -x]);
            }
        }
        // The thresholds on the high word of |x|, each with its low word 0 and all ones.
        for high in [0x4086232bu64, 0x3e300000, 0x3fd62e42, 0x3ff0a2b2] {
            for word in [(high << 32), (high << 32) | 0xffff_ffff] {
                for delta in [-2i64, -1, 0, 1, 2] {
                    let x = f64::from_bits((word as i64 + delta) as u64);
                    edges.extend([x, -x]);
                }
            }
        }
        // Halfway points of the reduction (x/ln2 near k + 0.5), where k's rounding decides.
        for k in -1030..1030 {
            let x = (k as f64 + 0.5) * std::f64::consts::LN_2;
            for delta in [-1i64, 0, 1] {
                edges.push(f64::from_bits((x.to_bits() as i64 + delta) as u64));
            }
        }
        edges
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_underflow_bound_is_libms_literal() {
        // The shortest form of libm's `-745.13321910194110842`: the same double.
        assert_eq!(exp_constants::UNDERFLOW, -745.1332191019411);
    }

    #[test]
    fn the_exponentials_of_a_batch_are_libms_bit_for_bit() {
        let mut rng = crate::kernels::tests::TestRng::new(5);
        let mut values = exp_edge_cases();
        for _ in 0..200_000 {
            let u = rng.uniform();
            values.push(match values.len() % 4 {
                // The loss's range: o − max ≤ 0, mostly within a few tens.
                0 => -40.0 * u,
                1 => 1600.0 * u - 800.0,
                2 => (u - 0.5) * 2.0 * rng.uniform() * 1e-6,
                // Any bits at all, NaNs and subnormals included.
                _ => f64::from_bits(rng.next_u64()),
            });
        }
        assert_eq!(MathPath::supported().last(), Some(&MathPath::widest()));
        // Every length up to two AVX-512 vectors and past them: the remainder path runs too.
        assert_every_path_is_libms("exp", &values, 17, MathPath::exp_in_place, libm::exp);
    }

    /// Each supported path of `function` on the first 0..=`short` values and on all of them,
    /// against `reference` (libm's scalar function) bit for bit; NaN matches any NaN.
    fn assert_every_path_is_libms(
        name: &str,
        values: &[f64],
        short: usize,
        function: fn(MathPath, &mut [f64]),
        reference: fn(f64) -> f64,
    ) {
        for path in MathPath::supported() {
            for len in (0..=short).chain([values.len()]) {
                let mut got = values[..len].to_vec();
                function(path, &mut got);
                for (x, y) in values[..len].iter().zip(&got) {
                    let want = reference(*x);
                    assert!(
                        y.to_bits() == want.to_bits() || (y.is_nan() && want.is_nan()),
                        "{path:?}: {name}({x:e} = {:#x}): {y:e} against libm's {want:e}",
                        x.to_bits()
                    );
                }
            }
        }
    }

    /// Doubles where libm's `log` changes path or reduces differently, with neighbours.
    fn ln_edge_cases() -> Vec<f64> {
        let mut edges = vec![
            0.0,
            -0.0,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
            -f64::NAN,
            f64::MIN_POSITIVE,
            5e-324,
            f64::MAX,
            -1.0,
            -f64::MIN_POSITIVE,
            1.0,
            10.0,
        ];
        // Around 1 (libm's exact 0), the powers of two and the reduction's √2/2 threshold.
        let around = [1.0, std::f64::consts::FRAC_1_SQRT_2, f64::MIN_POSITIVE];
        for x in around
            .into_iter()
            .chain((-1074..1024).map(|e| 2f64.powi(e)))
        {
            for delta in [-2i64, -1, 0, 1, 2] {
                edges.push(f64::from_bits((x.to_bits() as i64 + delta) as u64));
            }
        }
        for m in [0x3fe6_a09e_u64, 0x3fe6_a09f, 0x3ff6_a09e, 0x3ff6_a09f] {
            for word in [m << 32, (m << 32) | 0xffff_ffff] {
                edges.extend([f64::from_bits(word), f64::from_bits(word) * 1024.0]);
            }
        }
        edges
    }

    #[test]
    fn the_logarithms_of_a_batch_are_libms_bit_for_bit() {
        let mut rng = crate::kernels::tests::TestRng::new(6);
        let mut values = ln_edge_cases();
        for _ in 0..200_000 {
            let u = rng.uniform();
            values.push(match values.len() % 3 {
                // The loss's range: a sum of ten exponentials, the largest 1.
                0 => 1.0 + 9.0 * u,
                1 => f64::from_bits(rng.next_u64() >> 1),
                // Any bits at all: negatives, NaNs and subnormals included.
                _ => f64::from_bits(rng.next_u64()),
            });
        }
        // Every length up to two AVX2 vectors and past them.
        assert_every_path_is_libms("log", &values, 9, MathPath::ln_in_place, libm::log);
    }

    #[test]
    fn a_batchs_loss_is_the_sum_of_its_samples_cross_entropies() {
        let mut rng = crate::kernels::tests::TestRng::new(9);
        let shapes = [
            (0, 10),
            (1, 10),
            (7, 10),
            (8, 10),
            (9, 10),
            (33, 3),
            (5, 1),
            (16, 17),
            (150, 10),
            (11, 300),
        ];
        for (samples, classes) in shapes {
            let mut logits: Vec<f32> = (0..samples * classes)
                .map(|i| match i % 7 {
                    // Ties for argmax and equal maxima.
                    0 => (rng.normal() * 2.0).round(),
                    // Spreads wide enough that exponentials underflow to 0 and subnormals.
                    1 => rng.normal() * 1e3,
                    2 => f32::from_bits(rng.next_u64() as u32 & 0x807f_ffff),
                    // A trained network's range, where the order of the sum shows in its bits.
                    3 | 4 => rng.normal() * 3.0,
                    _ => rng.normal() * 10f32.powi((rng.uniform() * 6.0) as i32 - 2),
                })
                .collect();
            // Non-finite logits first, last and in the middle of rows, in both halves of a
            // block; and a row of equal logits.
            let specials = [
                (1, 0, f32::INFINITY),
                (2, classes - 1, f32::NAN),
                (4, classes / 2, f32::NEG_INFINITY),
                (6, 0, f32::NAN),
                (13, classes / 3, f32::INFINITY),
            ];
            for (sample, class, value) in specials {
                if sample < samples {
                    logits[sample * classes + class] = value;
                }
            }
            if samples > 3 {
                logits[3 * classes..4 * classes].fill(-0.5);
            }
            let labels: Vec<u8> = (0..samples)
                .map(|i| (i * 7 % classes.min(256)) as u8)
                .collect();
            let mut loss = 0.0;
            let mut correct = 0;
            for (o, &label) in logits.chunks_exact(classes).zip(&labels) {
                loss += cross_entropy(o, label as usize);
                correct += usize::from(argmax(o) == label as usize);
            }
            let want = if samples == 0 {
                0.0
            } else {
                -loss / samples as f64
            };
            for path in MathPath::supported() {
                let got = Evaluation::from_logits_on(path, &logits, &labels, classes);
                let what = format!("{path:?} samples={samples} classes={classes}");
                assert_eq!(got.fitness.to_bits(), want.to_bits(), "{what}");
                assert_eq!((got.correct, got.samples), (correct, samples), "{what}");
            }
        }
    }

    /// One sample whose label holds its largest logit, exactly 0: its loss is the logarithm of
    /// its sum of exponentials with nothing added, so every bit of that sum (the order of its
    /// terms included) shows in the fitness. It is scored alone, and in every lane of a batch
    /// of 8 and of 9 whose other samples lose exactly 0 (their other logits' exponentials
    /// underflow), so the batch's fitness is its loss over the batch size.
    #[test]
    fn a_single_samples_loss_shows_every_bit_of_its_sum() {
        let mut rng = crate::kernels::tests::TestRng::new(10);
        let certain = |label: usize| -> Vec<f32> {
            (0..10)
                .map(|j| if j == label { 0.0 } else { -1000.0 })
                .collect()
        };
        for round in 0..500 {
            let label = (rng.next_u64() % 10) as u8;
            let logits: Vec<f32> = (0..10)
                .map(|j| match j == label as usize {
                    true => 0.0,
                    false => -(rng.normal() * 2.0).abs(),
                })
                .collect();
            let want = -cross_entropy(&logits, label as usize);
            for path in MathPath::supported() {
                let got = Evaluation::from_logits_on(path, &logits, &[label], 10);
                assert_eq!(got.fitness.to_bits(), want.to_bits(), "{path:?} {logits:?}");
                assert_eq!(got.correct, 1, "{path:?} {logits:?}");
                for samples in [8usize, 9] {
                    let at = round % samples;
                    let mut batch = Vec::new();
                    let mut labels = Vec::new();
                    for sample in 0..samples {
                        let other = (sample * 3 % 10) as u8;
                        let (row, l) = if sample == at {
                            (logits.clone(), label)
                        } else {
                            (certain(other as usize), other)
                        };
                        batch.extend(row);
                        labels.push(l);
                    }
                    let got = Evaluation::from_logits_on(path, &batch, &labels, 10);
                    let want = want / samples as f64;
                    let what = format!("{path:?} lane {at} of {samples}: {logits:?}");
                    assert_eq!(got.fitness.to_bits(), want.to_bits(), "{what}");
                    assert_eq!(got.correct, samples, "{what}");
                }
            }
        }
    }

    #[test]
    fn evaluation_counts_and_averages() {
        let logits = [2.0, 1.0, 0.0, 5.0];
        let e = Evaluation::from_logits(&logits, &[0, 0], 2);
        assert_eq!(e.correct, 1);
        let want = -(cross_entropy(&[2.0, 1.0], 0) + cross_entropy(&[0.0, 5.0], 0)) / 2.0;
        assert_eq!(e.fitness, want);
        assert_eq!(e.accuracy(), 0.5);
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
    }
}
