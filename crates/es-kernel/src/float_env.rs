//! The one audited place that changes the CPU's floating-point environment.
//!
//! `ftz` mode needs every f32 operation of the forward pass to flush denormal inputs and
//! results to zero, which on x86-64 is MXCSR's DAZ (0x0040) and FTZ (0x8000) bits and on
//! aarch64 FPCR.FZ (bit 24). Rust documents changing these bits as undefined behaviour for code
//! the compiler can see: LLVM assumes the default environment, so it may constant-fold or move
//! float operations across the change. The rules that keep this sound here:
//!
//! 1. The environment is changed only by [`with_float_env`], which sets it, calls the given
//!    function, and restores the previous state on the way out (also on unwind, through a
//!    drop guard).
//! 2. That function is the kernel entry point, marked `#[inline(never)]`: its float operations
//!    live in another function body, which the compiler cannot hoist across the opaque `asm!`
//!    that changes the state, because both are calls with side effects.
//! 3. Every operand inside is runtime data (parameters, pixels, activations), so there is
//!    nothing for the compiler to constant-fold under the wrong assumption. The few constants
//!    (scales `2^±e`) are exact powers of two whose products the kernels never fold.
//! 4. The golden tests decide: every kernel run under this guard is compared bit for bit with
//!    the scalar reference, which flushes explicitly and needs no environment at all.
//!
//! `seed` mode also runs under the guard, with the flush bits *cleared*, so that it computes
//! with gradual underflow even if the calling thread had FTZ set.

use crate::Arithmetic;

/// Whether this CPU architecture lets [`with_float_env`] set flush-to-zero.
pub const FLUSH_SUPPORTED: bool = cfg!(any(target_arch = "x86_64", target_arch = "aarch64"));

/// Runs `f` with the float environment that `mode`'s matrix products need (flush on for
/// [`Arithmetic::Ftz`], off for [`Arithmetic::Seed`] and [`Arithmetic::Ieee`]) and restores
/// the previous environment.
///
/// `f` must be a call into a non-inlined kernel whose operands are runtime data (module doc).
///
/// # Panics
/// On architectures other than x86-64 and aarch64 in `ftz` mode (see [`FLUSH_SUPPORTED`]).
#[inline(never)]
pub fn with_float_env<R>(mode: Arithmetic, f: impl FnOnce() -> R) -> R {
    let _restore = imp::Restore::set(mode == Arithmetic::Ftz);
    f()
}

#[cfg(target_arch = "x86_64")]
mod imp {
    use std::arch::asm;

    const DAZ: u32 = 0x0040;
    const FTZ: u32 = 0x8000;

    fn read() -> u32 {
        let mut csr: u32 = 0;
        // SAFETY: stmxcsr stores the 32-bit MXCSR into the pointed-to u32, which is live and
        // writable; SSE is part of the x86-64 baseline.
        unsafe { asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack, preserves_flags)) };
        csr
    }

    fn write(csr: u32) {
        // SAFETY: ldmxcsr loads a value read from MXCSR with only the DAZ/FTZ bits changed,
        // both defined on every x86-64 CPU with SSE2 (DAZ since the Pentium 4; all x86-64
        // CPUs have it). Soundness of running float code under it: module doc.
        unsafe { asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack, preserves_flags)) };
    }

    pub(super) struct Restore(u32);

    impl Restore {
        pub(super) fn set(flush: bool) -> Restore {
            Restore::set_bits(flush, flush)
        }

        /// FTZ and DAZ chosen separately; only the tests of the seed document's examples,
        /// which assume flushing of results alone, set them apart.
        pub(super) fn set_bits(ftz: bool, daz: bool) -> Restore {
            let old = read();
            let mut new = old & !(DAZ | FTZ);
            if ftz {
                new |= FTZ;
            }
            if daz {
                new |= DAZ;
            }
            write(new);
            Restore(old)
        }
    }

    impl Drop for Restore {
        fn drop(&mut self) {
            write(self.0);
        }
    }

    /// The current DAZ/FTZ state, for tests.
    #[cfg(test)]
    pub(super) fn flushing() -> bool {
        read() & (DAZ | FTZ) == DAZ | FTZ
    }
}

#[cfg(target_arch = "aarch64")]
mod imp {
    use std::arch::asm;

    const FZ: u64 = 1 << 24;

    fn read() -> u64 {
        let fpcr: u64;
        // SAFETY: reading FPCR has no side effects and is allowed at EL0.
        unsafe { asm!("mrs {}, fpcr", out(reg) fpcr, options(nomem, nostack, preserves_flags)) };
        fpcr
    }

    fn write(fpcr: u64) {
        // SAFETY: writes back a value read from FPCR with only FZ changed; FZ flushes denormal
        // inputs and results of single and double precision operations. Module doc.
        unsafe { asm!("msr fpcr, {}", in(reg) fpcr, options(nomem, nostack, preserves_flags)) };
    }

    pub(super) struct Restore(u64);

    impl Restore {
        pub(super) fn set(flush: bool) -> Restore {
            let old = read();
            write(if flush { old | FZ } else { old & !FZ });
            Restore(old)
        }
    }

    impl Drop for Restore {
        fn drop(&mut self) {
            write(self.0);
        }
    }

    #[cfg(test)]
    pub(super) fn flushing() -> bool {
        read() & FZ != 0
    }
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
mod imp {
    pub(super) struct Restore;

    impl Restore {
        pub(super) fn set(flush: bool) -> Restore {
            assert!(
                !flush,
                "ftz arithmetic needs x86-64 or aarch64: this architecture's flush-to-zero control is not supported"
            );
            Restore
        }
    }

    #[cfg(test)]
    pub(super) fn flushing() -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hint::black_box;

    const MIN: f32 = f32::MIN_POSITIVE;

    /// The examples of the seed document, computed on runtime data inside the guard.
    #[inline(never)]
    fn distributive(a: f32, b: f32, c: f32) -> (f32, f32) {
        let a = black_box(a);
        let b = black_box(b);
        let c = black_box(c);
        ((a + b) * c, a * c + b * c)
    }

    #[inline(never)]
    fn associative(a: f32, b: f32, c: f32) -> (f32, f32) {
        let a = black_box(a);
        let b = black_box(b);
        let c = black_box(c);
        ((a + b) + c, (b + c) + a)
    }

    #[test]
    fn seed_document_examples_under_the_guard() {
        // (a+b)·c vs a·c + b·c with a = 0.4·min, b = 0.5·min, c = 1/min: the seed document's
        // numbers assume flush-to-zero on results only. a + b = 0.9·min is denormal and
        // flushes, so the left side is 0 while a·c + b·c = 0.9.
        #[cfg(target_arch = "x86_64")]
        {
            let _ftz_only = imp::Restore::set_bits(true, false);
            let (lhs, rhs) = distributive(0.4 * MIN, 0.5 * MIN, 1.0 / MIN);
            drop(_ftz_only);
            assert_eq!(lhs, 0.0);
            assert!((rhs - 0.9).abs() < 1e-6, "{rhs}");
        }
        // Our `ftz` mode also sets DAZ, so those denormal *constants* read as zero and both
        // sides are 0; in the network denormal inputs cannot occur (every value comes out of
        // a flushing operation). The same nonlinearity with normal inputs:
        // a = 1.4·min, b = -1.0·min: a + b = 0.4·min flushes, a·c + b·c = 0.4.
        let (lhs, rhs) =
            with_float_env(Arithmetic::Ftz, || distributive(1.4 * MIN, -MIN, 1.0 / MIN));
        assert_eq!(lhs, 0.0);
        assert!((rhs - 0.4).abs() < 1e-6, "{rhs}");
        let (lhs, rhs) = with_float_env(Arithmetic::Ftz, || {
            distributive(0.4 * MIN, 0.5 * MIN, 1.0 / MIN)
        });
        assert_eq!((lhs, rhs), (0.0, 0.0), "DAZ reads denormal inputs as 0");
        // With gradual underflow the sum is exact and both sides agree.
        let (lhs, rhs) = with_float_env(Arithmetic::Seed, || {
            distributive(0.4 * MIN, 0.5 * MIN, 1.0 / MIN)
        });
        assert!(
            (lhs - 0.9).abs() < 1e-6 && (rhs - 0.9).abs() < 1e-6,
            "{lhs} {rhs}"
        );

        // (a+b)+c vs (b+c)+a with a = 2.5·min, b = -1.6·min, c = min: a + b = 0.9·min and
        // b + c = -0.6·min are denormal and flush, leaving min on one side and 2.5·min on the
        // other.
        let (l, r) = with_float_env(Arithmetic::Ftz, || associative(2.5 * MIN, -1.6 * MIN, MIN));
        assert_eq!(l, MIN);
        assert_eq!(r, 2.5 * MIN);
        let (l, r) = with_float_env(Arithmetic::Seed, || associative(2.5 * MIN, -1.6 * MIN, MIN));
        assert_eq!(l, r, "without flushing these sums are exact");
    }

    #[test]
    fn guard_restores_previous_state() {
        if !FLUSH_SUPPORTED {
            return;
        }
        assert!(!imp::flushing());
        with_float_env(Arithmetic::Ftz, || {
            assert!(imp::flushing());
            with_float_env(Arithmetic::Seed, || assert!(!imp::flushing()));
            assert!(imp::flushing());
        });
        assert!(!imp::flushing());
        let result = std::panic::catch_unwind(|| {
            with_float_env(Arithmetic::Ftz, || panic!("kernel failed"));
        });
        assert!(result.is_err());
        assert!(
            !imp::flushing(),
            "a panic inside the guard restores the state"
        );
    }
}
