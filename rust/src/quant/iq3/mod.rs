//! IQ3_XXS and IQ3_S: groups of 4 weights snapped to a 256- (XXS) or 512-entry (S) grid of 3-bit
//! magnitudes, with explicit signs and a 4-bit scale per 32 weights.
//!
//! Quantization follows ggml's `quantize_row_iq3_xxs_impl` / `quantize_row_iq3_s_impl`: for each
//! sub-block, try a range of scales, round every group of 4 to 3-bit levels and, where that point
//! is not on the grid, take the best of its precomputed grid neighbours (`iq3xs_init_impl`).

use std::sync::OnceLock;

use super::iq_tables::{IQ3S_GRID, IQ3XXS_GRID};
use super::util::nearest_int;

pub mod iq3_s;
pub mod iq3_xxs;

pub use iq3_s::IQ3_S_KERNELS;
pub use iq3_xxs::IQ3_XXS_KERNELS;

/// Largest 3-bit level (levels are 2l + 1 for l in 0..8).
const KMAX_Q: i32 = 8;

/// A grid with ggml's lookup structures for quantizing onto it.
pub(crate) struct Iq3Grid {
    /// Grid points as 4 odd levels 2l + 1 (1..=15).
    pub points: Vec<[i8; 4]>,
    /// Per 12-bit point (3 bits per element): its grid index, or -(offset + 1) of its neighbour
    /// list in `neighbours` when off the grid.
    pub map: Vec<i32>,
    /// Neighbour lists: a count, then that many grid indices.
    pub neighbours: Vec<u16>,
    /// The same lists laid out for 8-wide SIMD.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // read by the AVX2 search only
    pub lanes: NeighbourLanes,
}

/// Neighbour lists in structure-of-arrays form, each padded to a multiple of 8 entries (NaN levels).
pub(crate) struct NeighbourLanes {
    /// `level[i][at + j]`: element i of neighbour j, as f32 (the odd level 2l + 1).
    pub level: [Vec<f32>; 4],
    /// `index[at + j]`: grid index of neighbour j.
    pub index: Vec<u16>,
    /// Per map key: where its list starts, and its length (0 for points on the grid).
    pub at: Vec<u32>,
    pub len: Vec<u16>,
}

impl NeighbourLanes {
    fn build(points: &[[i8; 4]], map: &[i32], neighbours: &[u16]) -> NeighbourLanes {
        let mut nl = NeighbourLanes {
            level: std::array::from_fn(|_| vec![]),
            index: vec![],
            at: vec![0; map.len()],
            len: vec![0; map.len()],
        };
        for (u, m) in map.iter().enumerate() {
            if *m >= 0 {
                continue;
            }
            let start = (-m - 1) as usize;
            let list = &neighbours[start + 1..start + 1 + neighbours[start] as usize];
            nl.at[u] = nl.index.len() as u32;
            nl.len[u] = list.len() as u16;
            let padded = list.len().next_multiple_of(8);
            // Padding repeats the first index with NaN levels, whose distance never wins.
            for j in 0..padded {
                let gi = list.get(j).copied();
                nl.index.push(gi.unwrap_or(list[0]));
                for (i, lv) in nl.level.iter_mut().enumerate() {
                    lv.push(gi.map_or(f32::NAN, |g| points[g as usize][i] as f32));
                }
            }
        }
        nl
    }
}

impl Iq3Grid {
    /// `iq3xs_init_impl`: each off-grid point's neighbours are the grid points at the `nwant`
    /// smallest squared distances (all points tied at those distances), in (distance, index) order.
    fn build(points: Vec<[i8; 4]>, nwant: usize) -> Iq3Grid {
        const KMAP_SIZE: usize = 4096;
        let mut map = vec![-1i32; KMAP_SIZE];
        for (i, p) in points.iter().enumerate() {
            let mut u = 0usize;
            for (k, v) in p.iter().enumerate() {
                u |= (((v - 1) / 2) as usize) << (3 * k);
            }
            map[u] = i as i32;
        }
        let mut neighbours = vec![];
        let mut dist2: Vec<(i32, usize)> = Vec::with_capacity(points.len());
        // Coordinates in separate columns so the distance loop vectorises.
        let cols: [Vec<i32>; 4] =
            std::array::from_fn(|k| points.iter().map(|p| p[k] as i32).collect());
        let mut d2_all = vec![0i32; points.len()];
        for (u, entry) in map.iter_mut().enumerate() {
            if *entry >= 0 {
                continue;
            }
            d2_all.fill(0);
            for (k, col) in cols.iter().enumerate() {
                let pos = 2 * ((u >> (3 * k)) & 7) as i32 + 1;
                for (d, c) in d2_all.iter_mut().zip(col) {
                    *d += (c - pos) * (c - pos);
                }
            }
            // Only the points within the nwant smallest distinct distances matter: find that
            // cut-off first, then sort just those by (distance, index) as ggml's qsort orders them.
            let mut smallest = [i32::MAX; 3];
            for &d in &d2_all {
                if d <= smallest[nwant - 1] {
                    if let Some(pos) = smallest[..nwant].iter().position(|s| d <= *s) {
                        if smallest[pos] != d {
                            smallest[pos..nwant].rotate_right(1);
                            smallest[pos] = d;
                        }
                    }
                }
            }
            let cut = smallest[nwant - 1];
            dist2.clear();
            dist2.extend(
                d2_all
                    .iter()
                    .enumerate()
                    .filter(|(_, d)| **d <= cut)
                    .map(|(j, d)| (*d, j)),
            );
            dist2.sort_unstable();
            *entry = -(neighbours.len() as i32 + 1);
            let start = neighbours.len();
            neighbours.push(0);
            let (mut d2, mut nhave) = (dist2[0].0, 1);
            for &(d, j) in &dist2 {
                if d > d2 {
                    if nhave == nwant {
                        break;
                    }
                    d2 = d;
                    nhave += 1;
                }
                neighbours.push(j as u16);
            }
            neighbours[start] = (neighbours.len() - start - 1) as u16;
        }
        let lanes = NeighbourLanes::build(&points, &map, &neighbours);
        Iq3Grid {
            points,
            map,
            neighbours,
            lanes,
        }
    }

    /// The neighbour list of an off-grid point whose map entry is `m` (< 0).
    #[inline]
    pub fn neighbours_of(&self, m: i32) -> &[u16] {
        let start = (-m - 1) as usize;
        let n = self.neighbours[start] as usize;
        &self.neighbours[start + 1..start + 1 + n]
    }

    /// Packs 4 levels l (0..8) into the 12-bit map key.
    #[inline]
    pub fn key(l: &[i8]) -> usize {
        l[0] as usize | (l[1] as usize) << 3 | (l[2] as usize) << 6 | (l[3] as usize) << 9
    }
}

/// IQ3_XXS's grid: ggml stores dequantization magnitudes (4, 12, ..., 52, 62); quantization works
/// on the levels 2l + 1 they stand for.
pub(crate) fn grid_xxs() -> &'static Iq3Grid {
    static GRID: OnceLock<Iq3Grid> = OnceLock::new();
    GRID.get_or_init(|| {
        const MAGNITUDES: [u8; 8] = [0x04, 0x0c, 0x14, 0x1c, 0x24, 0x2c, 0x34, 0x3e];
        let points = IQ3XXS_GRID
            .iter()
            .map(|g| {
                std::array::from_fn(|k| {
                    let m = (g >> (8 * k)) as u8;
                    2 * MAGNITUDES
                        .iter()
                        .position(|v| *v == m)
                        .expect("iq3xxs_grid byte") as i8
                        + 1
                })
            })
            .collect();
        Iq3Grid::build(points, 2)
    })
}

/// IQ3_S's grid: its stored magnitudes already are the odd levels 1..=15.
pub(crate) fn grid_s() -> &'static Iq3Grid {
    static GRID: OnceLock<Iq3Grid> = OnceLock::new();
    GRID.get_or_init(|| {
        let points = IQ3S_GRID
            .iter()
            .map(|g| std::array::from_fn(|k| (g >> (8 * k)) as u8 as i8))
            .collect();
        Iq3Grid::build(points, 3)
    })
}

/// `iq3_find_best_neighbour`: the neighbour minimising Σ w·(scale·q - x)², first one on ties.
/// Writes its levels to `l` and returns its index. ggml aborts when no distance is below f32::MAX
/// (only reachable through overflow); we keep the first neighbour instead.
#[inline]
pub(crate) fn find_best_neighbour(
    g: &Iq3Grid,
    nb: &[u16],
    xval: &[f32],
    weight: &[f32],
    scale: f32,
    l: &mut [i8],
) -> usize {
    let mut best_d2 = f32::MAX;
    let mut best = nb[0] as usize;
    for &j in nb {
        let p = &g.points[j as usize];
        let mut d2 = 0f32;
        for i in 0..4 {
            let diff = scale * p[i] as f32 - xval[i];
            d2 += weight[i] * diff * diff;
        }
        if d2 < best_d2 {
            best_d2 = d2;
            best = j as usize;
        }
    }
    let p = &g.points[best];
    for i in 0..4 {
        l[i] = (p[i] - 1) / 2;
    }
    best
}

/// How a type runs the shared per-sub-block search.
#[derive(Clone, Copy)]
pub(crate) struct SearchParams {
    /// Trial scales (2·kMaxQ - 1 + is·0.2)/max for is in -nstep..=nstep.
    pub nstep: i32,
    /// IQ3_XXS starts with every group "on grid" and re-fits only off-grid groups afterwards;
    /// IQ3_S starts with none and re-fits all of them.
    pub xxs: bool,
}

/// One 32-weight sub-block as the search sees it.
pub(crate) struct SubBlock<'a> {
    /// Magnitudes (in IQ3_XXS one per group of 8 may be negative, to fix the sign parity).
    pub xval: &'a [f32; 32],
    /// Importance of each weight, and its square root (used for the neighbour distances).
    pub weight: &'a [f32; 32],
    pub waux: &'a [f32; 32],
    /// The largest of `xval`.
    pub max: f32,
}

/// The per-sub-block search: returns the scale and writes the levels (0..8) to `l`.
pub(crate) type SearchFn = fn(g: &Iq3Grid, p: SearchParams, sb: &SubBlock, l: &mut [i8; 32]) -> f32;

/// Levels of group `k` at inverse scale `id`, clamped to 0..8, and their map key.
#[inline]
fn round_group(xval: &[f32], id: f32, l: &mut [i8]) -> usize {
    for i in 0..4 {
        let v = nearest_int(0.5 * (id * xval[i] - 1.0));
        l[i] = v.clamp(0, KMAX_Q - 1) as i8;
    }
    Iq3Grid::key(l)
}

/// Σ w·x·q and Σ w·q² for levels `l` (q = 2l + 1).
#[inline]
fn level_sums(xval: &[f32; 32], weight: &[f32; 32], l: &[i8; 32]) -> (f32, f32) {
    let (mut sumqx, mut sumq2) = (0f32, 0f32);
    for i in 0..32 {
        let w = weight[i];
        let q = (2 * l[i] as i32 + 1) as f32;
        sumqx += w * xval[i] * q;
        sumq2 += w * q * q;
    }
    (sumqx, sumq2)
}

/// Scalar search, the spec.
pub(crate) fn search_ref(g: &Iq3Grid, p: SearchParams, sb: &SubBlock, l: &mut [i8; 32]) -> f32 {
    let SubBlock {
        xval,
        weight,
        waux,
        max,
    } = *sb;
    let mut laux = [0i8; 32];
    let mut on_grid = [p.xxs; 8];
    let mut on_grid_aux = [false; 8];
    let mut best = 0f32;
    let mut scale = max / (2 * KMAX_Q - 1) as f32;
    for is in -p.nstep..=p.nstep {
        let id = ((2 * KMAX_Q - 1) as f32 + is as f32 * 0.2) / max;
        let this_scale = 1.0 / id;
        for k in 0..8 {
            let u = round_group(&xval[4 * k..], id, &mut laux[4 * k..4 * k + 4]);
            let m = g.map[u];
            on_grid_aux[k] = m >= 0;
            if m < 0 {
                find_best_neighbour(
                    g,
                    g.neighbours_of(m),
                    &xval[4 * k..],
                    &waux[4 * k..],
                    this_scale,
                    &mut laux[4 * k..4 * k + 4],
                );
            }
        }
        let (sumqx, sumq2) = level_sums(xval, weight, &laux);
        if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
            scale = sumqx / sumq2;
            best = scale * sumqx;
            *l = laux;
            on_grid = on_grid_aux;
        }
    }
    refit(g, p, sb, scale, &on_grid, l)
}

/// The second pass: re-round the groups (IQ3_XXS: only the off-grid ones) at the best scale,
/// then re-fit the scale by least squares.
#[inline]
pub(crate) fn refit(
    g: &Iq3Grid,
    p: SearchParams,
    sb: &SubBlock,
    mut scale: f32,
    on_grid: &[bool; 8],
    l: &mut [i8; 32],
) -> f32 {
    let SubBlock {
        xval, weight, waux, ..
    } = *sb;
    if on_grid.iter().any(|o| !o) && scale > 0.0 {
        let id = 1.0 / scale;
        for k in 0..8 {
            if p.xxs && on_grid[k] {
                continue;
            }
            let lk = &mut l[4 * k..4 * k + 4];
            let u = round_group(&xval[4 * k..], id, lk);
            let m = g.map[u];
            let gi = if m < 0 {
                find_best_neighbour(
                    g,
                    g.neighbours_of(m),
                    &xval[4 * k..],
                    &waux[4 * k..],
                    scale,
                    lk,
                )
            } else {
                m as usize
            };
            for (o, v) in lk.iter_mut().zip(g.points[gi]) {
                *o = (v - 1) / 2;
            }
        }
        let (sumqx, sumq2) = level_sums(xval, weight, l);
        if sumq2 > 0.0 {
            scale = sumqx / sumq2;
        }
    }
    scale
}

/// Per-weight importance: imatrix · sqrt(sigma2 + x²), or x² without an imatrix.
#[inline]
pub(crate) fn weights(
    xb: &[f32],
    qw: Option<&[f32]>,
    sigma2: f32,
    weight: &mut [f32; 32],
    waux: &mut [f32; 32],
) {
    match qw {
        Some(qw) => {
            for i in 0..32 {
                weight[i] = qw[i] * (sigma2 + xb[i] * xb[i]).sqrt();
            }
        }
        None => {
            for i in 0..32 {
                weight[i] = xb[i] * xb[i];
            }
        }
    }
    for i in 0..32 {
        waux[i] = weight[i].sqrt();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grids_map_their_own_points_and_neighbours_are_off_grid_only() {
        for (g, n) in [(grid_xxs(), 256), (grid_s(), 512)] {
            assert_eq!(g.points.len(), n);
            let on = g.map.iter().filter(|m| **m >= 0).count();
            assert_eq!(on, n);
            for (u, m) in g.map.iter().enumerate() {
                if *m < 0 {
                    let nb = g.neighbours_of(*m);
                    assert!(!nb.is_empty(), "point {u} has no neighbours");
                    assert!(nb.iter().all(|j| (*j as usize) < n));
                }
            }
        }
    }

    #[test]
    fn neighbour_lists_match_a_full_sort() {
        for (g, nwant) in [(grid_xxs(), 2), (grid_s(), 3)] {
            for u in (0..4096).step_by(7) {
                if g.map[u] >= 0 {
                    continue;
                }
                let pos: Vec<i32> = (0..4)
                    .map(|k| 2 * ((u >> (3 * k)) & 7) as i32 + 1)
                    .collect();
                let mut all: Vec<(i32, u16)> = g
                    .points
                    .iter()
                    .enumerate()
                    .map(|(j, p)| {
                        (
                            (0..4).map(|k| (p[k] as i32 - pos[k]).pow(2)).sum(),
                            j as u16,
                        )
                    })
                    .collect();
                all.sort();
                let mut distinct: Vec<i32> = all.iter().map(|a| a.0).collect();
                distinct.dedup();
                let want: Vec<u16> = all
                    .iter()
                    .filter(|a| a.0 <= distinct[nwant - 1])
                    .map(|a| a.1)
                    .collect();
                assert_eq!(g.neighbours_of(g.map[u]), &want[..], "key {u}");
                let nl = &g.lanes;
                let at = nl.at[u] as usize;
                assert_eq!(&nl.index[at..at + nl.len[u] as usize], &want[..]);
            }
        }
    }

    #[test]
    fn huge_values_do_not_panic() {
        // ggml aborts on these (every neighbour distance overflows); we keep the first neighbour.
        use crate::quant::BlockQuant;
        for scale in [1e15f32, 1e30, 3e38] {
            let x: Vec<f32> = crate::quant::testdata::gaussian(4, 256)
                .iter()
                .map(|v| v * scale)
                .collect();
            let w = crate::quant::testdata::importance(5, 256);
            for imatrix in [None, Some(&w[..])] {
                let (mut a, mut b) = (vec![0u8; 110], vec![0u8; 110]);
                iq3_s::Iq3S::quantize_row_ref(&x, &mut a, imatrix);
                iq3_s::Iq3S::quantize_row(&x, &mut b, imatrix);
                assert_eq!(a, b);
                let (mut a, mut b) = (vec![0u8; 98], vec![0u8; 98]);
                iq3_xxs::Iq3Xxs::quantize_row_ref(&x, &mut a, imatrix);
                iq3_xxs::Iq3Xxs::quantize_row(&x, &mut b, imatrix);
                assert_eq!(a, b);
            }
        }
    }

    #[test]
    fn ksigns_have_even_parity() {
        for (i, s) in super::super::iq_tables::KSIGNS_IQ2XS.iter().enumerate() {
            assert_eq!(*s as usize & 127, i);
            assert_eq!(s.count_ones() % 2, 0);
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
