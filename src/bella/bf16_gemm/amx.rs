//! The same product with Intel AMX (Sapphire Rapids and later Xeons): `tdpbf16ps` multiplies a
//! 16 × 32 tile of bf16 activations by a 32 × 16 tile of bf16 weights into 16 × 16 f32 sums,
//! 16 384 operations an instruction where `vdpbf16ps` does 64. On this project's Xeon machine
//! `vdpbf16ps` ran no faster than f32 multiply-adds (~200 GFLOP/s on two cores) while torch's
//! oneDNN reached ~2 100 GFLOP/s with AMX, which is what `--dtype bf16` is measured against.
//!
//! Layout: `x` is padded to whole tiles (rows to 32, `k` to 32) and packed once per call as
//! `[row tile][k tile][16 rows][32 values]`, each tile 1 KiB and contiguous. Parallel tasks own
//! [`NP`] output features; a task packs its features of `W` block by block along `k` ([`KC`]
//! values, 128 KiB) as `[32-feature group][k tile][half][16 pairs][16 features]`, the pairs of
//! consecutive `k` values side by side as `tdpbf16ps` reads them, and passes every block of 32
//! rows over one group (32 KiB, in L1) before the next. The micro-kernel holds 32 rows × 32
//! features in four accumulator tiles and, per `k` tile, loads two tiles of `x` and two of `W`
//! for four `tdpbf16ps`. Partial sums between `k` blocks live in the task's f32 buffer; only the
//! result is rounded to bf16.
//!
//! The instructions are written with `asm!` (Rust has no stable AMX intrinsics). Linux hands a
//! process the 8 KiB of tile state only after `arch_prctl(ARCH_REQ_XCOMP_PERM)`; [`ready`] asks
//! once and the kernel is used only when the answer was yes.

use half::bf16;
use std::sync::OnceLock;

/// Output features per parallel task.
const NP: usize = 128;

/// `k` values per cache block of a task's weights: `NP × KC` bf16 = 128 KiB, 32 KiB a group.
const KC: usize = 512;

/// Whether this CPU has AMX-BF16 and Linux let this process use the tiles (asked once).
pub fn ready() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    *READY.get_or_init(|| {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
            let has = std::arch::x86_64::__cpuid(0).eax >= 7 && {
                let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
                edx & (1 << 22) != 0 && edx & (1 << 24) != 0
            };
            const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
            const XFEATURE_XTILEDATA: libc::c_long = 18;
            // SAFETY: a plain system call with integer arguments; it only changes which
            // register state this process may use.
            has && unsafe {
                libc::syscall(
                    libc::SYS_arch_prctl,
                    ARCH_REQ_XCOMP_PERM,
                    XFEATURE_XTILEDATA,
                ) == 0
            }
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        {
            false
        }
    })
}

/// `y [n, out] = x [n, k] · w [out, k]ᵀ` with AMX. Only call where [`ready`] said yes.
pub fn product(x: &[bf16], n: usize, w: &[bf16], out: usize, k: usize) -> Vec<bf16> {
    use rayon::prelude::*;
    let tiles_k = k.div_ceil(32);
    let blocks = n.div_ceil(32);
    let a = pack_x(x, n, k, blocks * 2, tiles_k);
    // Panel-major: task `t` holds `[n][NP]` (its features of every row); transposed at the end.
    let mut yp = vec![bf16::ZERO; out.div_ceil(NP) * n * NP];
    yp.par_chunks_mut(n * NP).enumerate().for_each_init(
        || (vec![0u32; NP * KC / 2], vec![0f32; blocks * 32 * NP]),
        |(panel, acc), (t, chunk)| {
            let first = t * NP;
            // SAFETY: `ready()` was checked by the caller.
            let tiles = unsafe { kernel::Tiles::configure() };
            for kt in (0..tiles_k).step_by(KC / 32) {
                let nk = (KC / 32).min(tiles_k - kt);
                pack_w(w, k, first, kt, nk, panel);
                // One group of the weights (16 KiB) stays in L1 while every block of rows
                // passes it.
                for g in 0..NP / 32 {
                    let wg = &panel[g * nk * 512..][..nk * 512];
                    for b in 0..blocks {
                        let a0 = &a[((2 * b) * tiles_k + kt) * 512..][..nk * 512];
                        let a1 = &a[((2 * b + 1) * tiles_k + kt) * 512..][..nk * 512];
                        let c = &mut acc[b * 32 * NP + g * 32..][..31 * NP + 32];
                        // SAFETY: configured above; the slices hold `nk` tiles of 1 KiB each,
                        // and `c` 32 rows of 32 sums at a stride of NP.
                        unsafe { kernel::block(a0, a1, wg, nk, c, NP, kt == 0) };
                    }
                }
            }
            drop(tiles);
            for (r, row) in chunk.chunks_mut(NP).enumerate() {
                for (y, s) in row.iter_mut().zip(&acc[r * NP..(r + 1) * NP]) {
                    *y = bf16::from_f32(*s);
                }
            }
        },
    );
    super::from_panels(&yp, n, out, NP)
}

/// Rows of `x` up to which [`few_rows`] applies (one tile's columns).
const FEW_ROWS: usize = 16;

/// Output features per parallel task of [`few_rows`].
const FEW_NP: usize = 256;

/// Whether [`few_rows`] takes `n` rows of `[out, k]` weights: whole tiles of `W`.
pub fn few_rows_fit(n: usize, out: usize, k: usize) -> bool {
    (1..=FEW_ROWS).contains(&n) && k.is_multiple_of(32) && out.is_multiple_of(32)
}

/// `y [n, out] = x [n, k] · w [out, k]ᵀ` for a few rows (decoding: one per particle), as
/// `yᵀ = W · xᵀ`: `W` is the tiles' left operand, 16 features × 32 values read in place from
/// its rows, so the weights stream from memory once and are never packed (a step is bound by
/// memory, as for one row); `xᵀ` is packed once into the right operand's pair layout, its
/// columns the rows of `x`. Only where [`ready`] said yes and [`few_rows_fit`].
pub fn few_rows(x: &[bf16], n: usize, w: &[bf16], out: usize, k: usize) -> Vec<bf16> {
    use rayon::prelude::*;
    debug_assert!(few_rows_fit(n, out, k));
    let tiles_k = k / 32;
    // xᵀ: tile t holds [16 pairs][16 columns], column c = row c of x (zero past n).
    let mut xb = vec![0u32; tiles_k * 256];
    for (c, row) in x.chunks(k).enumerate().take(n) {
        for (i, two) in row.chunks(2).enumerate() {
            let (t, p) = (i / 16, i % 16);
            xb[t * 256 + p * 16 + c] = super::pair(two);
        }
    }
    // Feature-major per task: [features][n], transposed into `y` at the end.
    let mut yt = vec![0f32; out * n];
    yt.par_chunks_mut(FEW_NP * n)
        .enumerate()
        .for_each(|(task, chunk)| {
            let first = task * FEW_NP;
            let mut c = [0f32; 2 * 16 * 16];
            // SAFETY: `ready()` was checked by the caller.
            let tiles = unsafe { kernel::Tiles::configure() };
            for (g, pair) in chunk.chunks_mut(32 * n).enumerate() {
                let f = first + 32 * g;
                let rows = &w[f * k..(f + 32) * k];
                // SAFETY: configured above; `rows` holds 32 whole rows of `k` (a multiple of
                // 32) values, `xb` `tiles_k` tiles of 1 KiB.
                unsafe { kernel::weight_rows(rows, k, &xb, tiles_k, &mut c) };
                for (i, out) in pair.chunks_mut(n).enumerate() {
                    out.copy_from_slice(&c[i * 16..i * 16 + n]);
                }
            }
            drop(tiles);
        });
    let mut y = vec![bf16::ZERO; n * out];
    for (f, values) in yt.chunks(n).enumerate() {
        for (r, v) in values.iter().enumerate() {
            y[r * out + f] = bf16::from_f32(*v);
        }
    }
    y
}

/// `x` `[n, k]` as `row_tiles × tiles_k` tiles of 16 rows × 32 values (zero past its ends).
fn pack_x(x: &[bf16], n: usize, k: usize, row_tiles: usize, tiles_k: usize) -> Vec<bf16> {
    let mut a = vec![bf16::ZERO; row_tiles * tiles_k * 512];
    for (r, row) in x.chunks(k).enumerate().take(n) {
        let (rt, i) = (r / 16, r % 16);
        for (kt, values) in row.chunks(32).enumerate() {
            let at = (rt * tiles_k + kt) * 512 + i * 32;
            a[at..at + values.len()].copy_from_slice(values);
        }
    }
    a
}

/// Features `first..first + NP` (zero past `w`'s rows) and `k` tiles `kt..kt + nk` of `w`
/// `[rows, k]` into `panel` as `[NP / 32][nk][2][16 pairs][16 features]` pairs.
fn pack_w(w: &[bf16], k: usize, first: usize, kt: usize, nk: usize, panel: &mut [u32]) {
    let rows = w.len() / k;
    let bits = |f: usize, i: usize| -> u32 {
        if first + f < rows && i < k {
            w[(first + f) * k + i].to_bits() as u32
        } else {
            0
        }
    };
    // Every value of the block inside `w`: read pairs without checks.
    let inside = first + NP <= rows && (kt + nk) * 32 <= k;
    for (i, sixteen) in panel[..NP * nk * 16].chunks_mut(256).enumerate() {
        // Tile i = (g·nk + t)·2 + h: 16 pairs of 16 features.
        let (g, t, h) = (i / (2 * nk), i / 2 % nk, i % 2);
        let f = g * 32 + h * 16;
        let c = (kt + t) * 32;
        if inside {
            for (p, dst) in sixteen.chunks_exact_mut(16).enumerate() {
                for (j, v) in dst.iter_mut().enumerate() {
                    let at = (first + f + j) * k + c + 2 * p;
                    *v = w[at].to_bits() as u32 | (w[at + 1].to_bits() as u32) << 16;
                }
            }
        } else {
            for (p, dst) in sixteen.chunks_exact_mut(16).enumerate() {
                for (j, v) in dst.iter_mut().enumerate() {
                    *v = bits(f + j, c + 2 * p) | bits(f + j, c + 2 * p + 1) << 16;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use half::bf16;
    use std::arch::asm;

    /// Every tile 16 rows × 64 bytes (palette 1).
    #[repr(C, align(64))]
    struct TileConfig([u8; 64]);

    static CONFIG: TileConfig = {
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut t = 0;
        while t < 8 {
            c[16 + 2 * t] = 64;
            c[48 + t] = 16;
            t += 1;
        }
        TileConfig(c)
    };

    /// The kernel's tile shapes on this thread while it lives; then the thread's own again.
    /// candle's quantized products configure the tiles once per thread and expect to find
    /// their shapes there later: released, the next one is an illegal instruction; left with
    /// other shapes, it would compute with them.
    pub struct Tiles {
        /// What the thread had configured (all zeros, palette 0, where nothing was).
        had: TileConfig,
    }

    impl Tiles {
        /// Keeps the thread's tile configuration and loads the kernel's.
        ///
        /// # Safety
        /// AMX-BF16 present and granted ([`super::ready`]).
        pub unsafe fn configure() -> Self {
            let mut had = TileConfig([0; 64]);
            asm!("sttilecfg [{}]", in(reg) &mut had, options(nostack));
            asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly));
            Self { had }
        }
    }

    impl Drop for Tiles {
        fn drop(&mut self) {
            // SAFETY: `configure` ran, so AMX is present and granted. Palette 0 is no
            // configuration: the tile state is released as it was; any other is the one the
            // thread had, stored by `sttilecfg`, so valid for `ldtilecfg`.
            unsafe {
                if self.had.0[0] == 0 {
                    asm!("tilerelease", options(nostack, nomem));
                } else {
                    asm!("ldtilecfg [{}]", in(reg) &self.had, options(nostack, readonly));
                }
            }
        }
    }

    /// `c[32 rows × 32 features, row stride ld]` (+)= the `nk` tiles of two 16-row blocks of
    /// `x` times one 32-feature group of `W`: tiles 0–3 sum, 4–5 hold `x`, 6–7 hold `W`.
    ///
    /// # Safety
    /// a [`Tiles`] lives on this thread; `a0`, `a1`, `w` hold `nk` tiles of
    /// 1 KiB (`w`: two per `k` tile); `c` holds 31·ld + 32 values.
    pub unsafe fn block(
        a0: &[bf16],
        a1: &[bf16],
        w: &[u32],
        nk: usize,
        c: &mut [f32],
        ld: usize,
        zero: bool,
    ) {
        debug_assert!(a0.len() == nk * 512 && a1.len() == nk * 512 && w.len() == nk * 512);
        debug_assert!(c.len() == 31 * ld + 32);
        let stride = ld * 4;
        let c0 = c.as_mut_ptr();
        let c1 = c0.add(16);
        let c2 = c0.add(16 * ld);
        let c3 = c2.add(16);
        if zero {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
        } else {
            asm!(
                "tileloadd tmm0, [{c0} + {s}*1]",
                "tileloadd tmm1, [{c1} + {s}*1]",
                "tileloadd tmm2, [{c2} + {s}*1]",
                "tileloadd tmm3, [{c3} + {s}*1]",
                c0 = in(reg) c0, c1 = in(reg) c1, c2 = in(reg) c2, c3 = in(reg) c3,
                s = in(reg) stride,
                options(nostack, readonly)
            );
        }
        for t in 0..nk {
            asm!(
                "tileloadd tmm4, [{a0} + {s}*1]",
                "tileloadd tmm5, [{a1} + {s}*1]",
                "tileloadd tmm6, [{w0} + {s}*1]",
                "tileloadd tmm7, [{w1} + {s}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a0.as_ptr().add(t * 512),
                a1 = in(reg) a1.as_ptr().add(t * 512),
                w0 = in(reg) w.as_ptr().add(t * 512),
                w1 = in(reg) w.as_ptr().add(t * 512 + 256),
                s = in(reg) 64usize,
                options(nostack, readonly)
            );
        }
        asm!(
            "tilestored [{c0} + {s}*1], tmm0",
            "tilestored [{c1} + {s}*1], tmm1",
            "tilestored [{c2} + {s}*1], tmm2",
            "tilestored [{c3} + {s}*1], tmm3",
            c0 = in(reg) c0, c1 = in(reg) c1, c2 = in(reg) c2, c3 = in(reg) c3,
            s = in(reg) stride,
            options(nostack)
        );
    }

    /// `c[32 features][16 columns]` = 32 rows of `W` (`k` values each, read in place) times
    /// the `tiles_k` packed tiles of `xᵀ`: tiles 0–1 sum, 2–3 hold `W`, 4 holds `xᵀ`.
    ///
    /// # Safety
    /// a [`Tiles`] lives on this thread; `w` holds 32 rows of `k`
    /// values, `k == 32·tiles_k`; `x` holds `tiles_k` tiles of 1 KiB.
    pub unsafe fn weight_rows(w: &[bf16], k: usize, x: &[u32], tiles_k: usize, c: &mut [f32; 512]) {
        debug_assert!(w.len() == 32 * k && k == 32 * tiles_k && x.len() == tiles_k * 256);
        let stride = k * 2;
        let (w0, w1) = (w.as_ptr(), w.as_ptr().add(16 * k));
        asm!("tilezero tmm0", "tilezero tmm1", options(nostack, nomem));
        for t in 0..tiles_k {
            asm!(
                "tileloadd tmm4, [{x} + {s64}*1]",
                "tileloadd tmm2, [{w0} + {s}*1]",
                "tileloadd tmm3, [{w1} + {s}*1]",
                "tdpbf16ps tmm0, tmm2, tmm4",
                "tdpbf16ps tmm1, tmm3, tmm4",
                x = in(reg) x.as_ptr().add(t * 256),
                w0 = in(reg) w0.add(t * 32),
                w1 = in(reg) w1.add(t * 32),
                s64 = in(reg) 64usize,
                s = in(reg) stride,
                options(nostack, readonly)
            );
        }
        asm!(
            "tilestored [{c0} + {s}*1], tmm0",
            "tilestored [{c1} + {s}*1], tmm1",
            c0 = in(reg) c.as_mut_ptr(),
            c1 = in(reg) c.as_mut_ptr().add(256),
            s = in(reg) 64usize,
            options(nostack)
        );
    }
}

/// Off x86-64 [`ready`] is false, so nothing calls these.
#[cfg(not(target_arch = "x86_64"))]
mod kernel {
    use half::bf16;

    pub struct Tiles;

    impl Tiles {
        pub unsafe fn configure() -> Self {
            unreachable!("AMX is x86-64 only");
        }
    }

    pub unsafe fn block(
        _: &[bf16],
        _: &[bf16],
        _: &[u32],
        _: usize,
        _: &mut [f32],
        _: usize,
        _: bool,
    ) {
        unreachable!("AMX is x86-64 only");
    }

    pub unsafe fn weight_rows(_: &[bf16], _: usize, _: &[u32], _: usize, _: &mut [f32; 512]) {
        unreachable!("AMX is x86-64 only");
    }
}
