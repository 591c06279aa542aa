//! ggml's grid-search state for the 8-dimensional i-quant grids (`iq2xs_init_impl`): the grid
//! points, a map from every reachable 8×{0,1,2} pattern to its grid index, and, for patterns off
//! the grid, the list of nearest grid points to try. Shared by IQ2_XXS/IQ2_XS/IQ2_S and IQ1_S/IQ1_M.
//!
//! Also the neighbour search itself (`iq2_find_best_neighbour`, and the list scan of
//! `iq1_find_best_neighbour2`, which is the same weighted distance with other level values), as a
//! scalar reference and an AVX2 twin that gives the same index.

/// ggml's kmap_size: patterns are 8 two-bit fields, the largest reachable one is 0xAAAA.
const MAP_SIZE: usize = 43692;

/// Eight neighbours of one list for the AVX2 search: per lane, the neighbour's pattern (8 levels,
/// 2 bits each, coordinate i at bit 2i) in the low 16 bits and its grid index in the high 16.
/// Lanes past the list's end repeat its last entry.
#[derive(Clone, Copy)]
#[repr(align(32))]
pub(crate) struct NeighbourChunk([u32; 8]);

impl NeighbourChunk {
    #[inline]
    fn index(&self, lane: usize) -> u16 {
        (self.0[lane] >> 16) as u16
    }
}

/// `map` entries: the grid index, or OFF_GRID | count << 22 | first chunk of the neighbour list.
const OFF_GRID: u32 = 1 << 31;
/// Patterns with a level of 3, which no quantizer makes.
const UNREACHABLE: u32 = u32::MAX;

pub(crate) struct GridSearch {
    /// Grid points as their 8 levels l in 0..=2 (ggml stores 2l+1).
    points: Vec<[u8; 8]>,
    /// Pattern -> grid index, or where its neighbour list is (one load finds everything).
    map: Vec<u32>,
    /// Neighbour lists (nearest first, ties by index) in chunks of 8.
    chunks: Vec<NeighbourChunk>,
}

impl GridSearch {
    /// Builds the state for a grid given by its packed patterns (ggml's kgrid_*), keeping the
    /// `nwant` nearest distinct (squared Euclidean) distances of each off-grid pattern.
    pub(crate) fn new(kgrid: &[u16], nwant: usize) -> Self {
        let points: Vec<[u8; 8]> = kgrid
            .iter()
            .map(|&g| std::array::from_fn(|k| ((g >> (2 * k)) & 3) as u8))
            .collect();
        let mut map = vec![UNREACHABLE; MAP_SIZE];
        for (i, &g) in kgrid.iter().enumerate() {
            map[g as usize] = i as u32;
        }
        let mut chunks: Vec<NeighbourChunk> = Vec::new();
        // Squared distances in level units: ggml's coordinates 2l+1 give 4× these, same order.
        let mut dist2 = vec![0u8; points.len()];
        // Per coordinate and pattern level, every point's squared level difference
        // (coordinate-major, so the distance sum vectorises over points).
        let squares: [[Vec<u8>; 3]; 8] = std::array::from_fn(|k| {
            std::array::from_fn(|l| {
                points
                    .iter()
                    .map(|p| p[k].abs_diff(l as u8).pow(2))
                    .collect()
            })
        });
        let mut list: Vec<u16> = Vec::new();
        for u in 0..MAP_SIZE {
            let levels: [u8; 8] = std::array::from_fn(|k| ((u >> (2 * k)) & 3) as u8);
            // Only patterns of levels 0..=2 can occur: every quantizer clamps to that range.
            if map[u] != UNREACHABLE || levels.iter().any(|&l| l > 2) {
                continue;
            }
            dist2.copy_from_slice(&squares[0][levels[0] as usize]);
            for k in 1..8 {
                for (d, &sq) in dist2.iter_mut().zip(&squares[k][levels[k] as usize]) {
                    *d += sq;
                }
            }
            // The nwant smallest distinct distances; ggml's qsort on (d2, index) lists exactly the
            // points within them, ordered by distance and then index.
            let (mut threshold, mut lowest) = (0u8, 0u8);
            for _ in 0..nwant {
                let next = dist2
                    .iter()
                    .map(|&d| if d >= lowest { d } else { u8::MAX })
                    .min()
                    .unwrap_or(u8::MAX);
                if next == u8::MAX {
                    break;
                }
                threshold = next;
                lowest = next + 1;
            }
            list.clear();
            list.extend((0..dist2.len() as u16).filter(|&j| dist2[j as usize] <= threshold));
            list.sort_by_key(|&j| dist2[j as usize]);
            debug_assert!(!list.is_empty() && list.len() < 512 && chunks.len() < 1 << 22);
            map[u] = OFF_GRID | (list.len() as u32) << 22 | chunks.len() as u32;
            for part in list.chunks(8) {
                chunks.push(NeighbourChunk(std::array::from_fn(|lane| {
                    let j = part[lane.min(part.len() - 1)];
                    kgrid[j as usize] as u32 | (j as u32) << 16
                })));
            }
        }
        GridSearch {
            points,
            map,
            chunks,
        }
    }

    /// Number of grid points.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.points.len()
    }

    /// The 8 levels (0..=2) of grid point `index`.
    #[inline]
    pub(crate) fn levels(&self, index: u16) -> &[u8; 8] {
        &self.points[index as usize]
    }

    /// Grid index of the pattern of 8 levels packed as 2-bit fields, if it lies on the grid.
    #[inline]
    pub(crate) fn lookup(&self, pattern: u16) -> Result<u16, OffGrid> {
        let m = self.map[pattern as usize];
        if m & OFF_GRID == 0 {
            Ok(m as u16)
        } else {
            debug_assert!(m != UNREACHABLE, "pattern {pattern:#x} has a level above 2");
            Err(OffGrid {
                first_chunk: m & 0x3f_ffff,
                count: (m >> 22) & 0x1ff,
            })
        }
    }

    fn list(&self, off: OffGrid) -> impl Iterator<Item = u16> + '_ {
        let n_chunks = off.count.div_ceil(8) as usize;
        let first = off.first_chunk as usize;
        self.chunks[first..first + n_chunks]
            .iter()
            .flat_map(|c| (0..8).map(|lane| c.index(lane)))
            .take(off.count as usize)
    }

    /// Reference search (ggml's `iq2_find_best_neighbour` and the list scan of
    /// `iq1_find_best_neighbour2`): the listed point minimising Σ w·(scale·q − x)², q the level
    /// values, the first one on ties. ggml aborts when no distance compares below FLT_MAX
    /// (only reachable with overflowing inputs); we take the list's first entry then.
    pub(crate) fn best_neighbour_ref(
        &self,
        off: OffGrid,
        values: &[f32; 3],
        xval: &[f32],
        weight: &[f32],
        scale: f32,
    ) -> u16 {
        let mut best_d2 = f32::MAX;
        let mut best = self.chunks[off.first_chunk as usize].index(0);
        for j in self.list(off) {
            let p = &self.points[j as usize];
            let mut d2 = 0f32;
            for i in 0..8 {
                let diff = scale * values[p[i] as usize] - xval[i];
                d2 += weight[i] * diff * diff;
            }
            if d2 < best_d2 {
                best_d2 = d2;
                best = j;
            }
        }
        best
    }

    /// Same result as `best_neighbour_ref`, on the fastest path this CPU has.
    #[inline]
    pub(crate) fn best_neighbour(
        &self,
        off: OffGrid,
        values: &[f32; 3],
        xval: &[f32],
        weight: &[f32],
        scale: f32,
    ) -> u16 {
        #[cfg(target_arch = "x86_64")]
        if crate::quant::cpu::has_avx2() {
            // Safety: AVX2 is present; the list's chunk range was built with the list.
            return unsafe { self.best_neighbour_avx2(off, values, xval, weight, scale) };
        }
        self.best_neighbour_ref(off, values, xval, weight, scale)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn best_neighbour_avx2(
        &self,
        off: OffGrid,
        values: &[f32; 3],
        xval: &[f32],
        weight: &[f32],
        scale: f32,
    ) -> u16 {
        use std::arch::x86_64::*;
        let n = off.count as usize;
        let first = off.first_chunk as usize;
        let chunks = &self.chunks[first..first + n.div_ceil(8)];
        // Each term w·(s·q − x)² exactly as the reference computes it: mul, sub, mul, mul.
        let x = _mm256_loadu_ps(xval.as_ptr());
        let w = _mm256_loadu_ps(weight[..8].as_ptr());
        let term = |v: f32| {
            let diff = _mm256_sub_ps(_mm256_set1_ps(scale * v), x);
            _mm256_mul_ps(_mm256_mul_ps(w, diff), diff)
        };
        let (t0, t1, t2) = (term(values[0]), term(values[1]), term(values[2]));
        // Tables: tab[i] holds coordinate i's terms for levels 0, 1, 2 in lanes 0..3 of both halves.
        let t01_lo = _mm256_unpacklo_ps(t0, t1); // t0[0] t1[0] t0[1] t1[1] | t0[4] t1[4] ...
        let t01_hi = _mm256_unpackhi_ps(t0, t1); // t0[2] t1[2] t0[3] t1[3] | t0[6] ...
        let t22_lo = _mm256_unpacklo_ps(t2, t2);
        let t22_hi = _mm256_unpackhi_ps(t2, t2);
        let pairs = [
            _mm256_shuffle_ps::<0b01_00_01_00>(t01_lo, t22_lo), // coordinates 0 | 4
            _mm256_shuffle_ps::<0b11_10_11_10>(t01_lo, t22_lo), // 1 | 5
            _mm256_shuffle_ps::<0b01_00_01_00>(t01_hi, t22_hi), // 2 | 6
            _mm256_shuffle_ps::<0b11_10_11_10>(t01_hi, t22_hi), // 3 | 7
        ];
        let tab: [__m256; 8] = std::array::from_fn(|i| {
            if i < 4 {
                _mm256_permute2f128_ps::<0x00>(pairs[i], pairs[i])
            } else {
                _mm256_permute2f128_ps::<0x11>(pairs[i - 4], pairs[i - 4])
            }
        });
        let mut best_d2 = f32::MAX;
        let mut best = chunks[0].index(0);
        let mut d2 = [0f32; 8];
        for (ci, c) in chunks.iter().enumerate() {
            let packed = _mm256_load_si256(c.0.as_ptr() as *const __m256i);
            // vpermilps reads the low 2 bits of each index: coordinate i's level at bit 2i.
            let mut acc = _mm256_add_ps(_mm256_setzero_ps(), _mm256_permutevar_ps(tab[0], packed));
            acc = _mm256_add_ps(
                acc,
                _mm256_permutevar_ps(tab[1], _mm256_srli_epi32::<2>(packed)),
            );
            acc = _mm256_add_ps(
                acc,
                _mm256_permutevar_ps(tab[2], _mm256_srli_epi32::<4>(packed)),
            );
            acc = _mm256_add_ps(
                acc,
                _mm256_permutevar_ps(tab[3], _mm256_srli_epi32::<6>(packed)),
            );
            acc = _mm256_add_ps(
                acc,
                _mm256_permutevar_ps(tab[4], _mm256_srli_epi32::<8>(packed)),
            );
            acc = _mm256_add_ps(
                acc,
                _mm256_permutevar_ps(tab[5], _mm256_srli_epi32::<10>(packed)),
            );
            acc = _mm256_add_ps(
                acc,
                _mm256_permutevar_ps(tab[6], _mm256_srli_epi32::<12>(packed)),
            );
            acc = _mm256_add_ps(
                acc,
                _mm256_permutevar_ps(tab[7], _mm256_srli_epi32::<14>(packed)),
            );
            let below =
                _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_LT_OQ>(acc, _mm256_set1_ps(best_d2)));
            if below != 0 {
                _mm256_storeu_ps(d2.as_mut_ptr(), acc);
                let lanes = (n - 8 * ci).min(8);
                for lane in 0..lanes {
                    if d2[lane] < best_d2 {
                        best_d2 = d2[lane];
                        best = c.index(lane);
                    }
                }
            }
        }
        best
    }
}

/// Where an off-grid pattern's neighbour list is.
#[derive(Clone, Copy, Debug)]
pub(crate) struct OffGrid {
    first_chunk: u32,
    count: u32,
}
