//! The tile-interleaved copy of a layer's planes that the rows-in-lanes loop reads
//! (`docs/KERNELS.md`, rows in lanes).

use std::ops::Range;

use super::{PlaneLinear, TILE};

/// Planes laid out so that one 64-bit word holds a 16-row × 4-column block of a tile: word
/// `j` of tile `t` (plane `p`) has bit `4i + c` = the plane's bit of row `16t + i`, column
/// `4j + c`. A GF(2) transpose of `R` such words gives 64 codes already in the order
/// `vpdpbusd` wants when a vector lane holds one row, so the decode loop needs no horizontal
/// reduction (`docs/KERNELS.md`, rows in lanes). Full tiles only; each plane has the size of
/// its row-major original, so a tile starts at the same offset in both.
pub(super) struct QuadPlanes {
    words: Vec<u64>,
    /// Bytes per plane.
    pub(super) plane_len: usize,
    pub(super) planes: u32,
}

impl QuadPlanes {
    /// The words as bytes, as the kernel reads them (little-endian: word bit `k` is bit
    /// `k % 8` of byte `k / 8`, as in a row-major plane word).
    pub(super) fn bytes(&self) -> &[u8] {
        // SAFETY: any u64 is eight valid bytes; the length is the words' size.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr() as *const u8, self.words.len() * 8) }
    }

    /// Plane `p`'s bit of (`row`, `col`), `row` in a full tile, for rows of `row_bytes`.
    pub(super) fn bit(&self, p: usize, row: usize, col: usize, row_bytes: usize) -> u64 {
        let w = self.words[p * (self.plane_len / 8) + (row / TILE) * 2 * row_bytes + col / 4];
        (w >> (4 * (row % TILE) + col % 4)) & 1
    }

    /// Re-lays out the first `planes` of `l`'s row-major planes, tile by tile in parallel,
    /// handing each plane's replaced byte range to `release` once it is copied.
    pub(super) fn build(l: &PlaneLinear, planes: u32, release: &mut dyn FnMut(Range<usize>)) -> QuadPlanes {
        use rayon::prelude::*;
        let tiles = l.rows / TILE;
        let per_tile = 2 * l.row_bytes; // words: one per 4 columns
        let plane_words = tiles * per_tile;
        let mut words = vec![0u64; plane_words * planes as usize];
        let bytes = (*l.store).as_ref();
        for (p, plane) in words.chunks_mut(plane_words).enumerate() {
            let start = l.planes[p].start;
            plane.par_chunks_mut(per_tile).enumerate().for_each(|(t, w)| {
                quad_tile(&bytes[start + t * TILE * l.row_bytes..][..TILE * l.row_bytes], l.row_bytes, w);
            });
            release(start..start + plane_words * 8);
        }
        QuadPlanes { words, plane_len: plane_words * 8, planes }
    }
}

/// One tile of one plane, row-major (`TILE` rows of `row_bytes`), into its `2·row_bytes`
/// block words.
fn quad_tile(src: &[u8], row_bytes: usize, w: &mut [u64]) {
    for (i, row) in src.chunks_exact(row_bytes).enumerate() {
        for (b, &v) in row.iter().enumerate() {
            w[2 * b] |= u64::from(v & 0x0F) << (4 * i);
            w[2 * b + 1] |= u64::from(v >> 4) << (4 * i);
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    #[test]
    fn interleaved_words_hold_each_blocks_bits() {
        // Two tiles of 16 rows, 72 bytes a row (576 columns): word j of tile t has bit 4i + c
        // = the row-major bit of row 16t + i, column 4j + c.
        let mut rng = StdRng::seed_from_u64(9);
        let rb = 72;
        let src: Vec<u8> = (0..2 * TILE * rb).map(|_| rng.random()).collect();
        for t in 0..2 {
            let mut w = vec![0u64; 2 * rb];
            quad_tile(&src[t * TILE * rb..(t + 1) * TILE * rb], rb, &mut w);
            for i in 0..TILE {
                for col in 0..8 * rb {
                    let want = (src[(TILE * t + i) * rb + col / 8] >> (col % 8)) & 1;
                    assert_eq!((w[col / 4] >> (4 * i + col % 4)) & 1, want as u64, "tile {t} row {i} col {col}");
                }
            }
        }
    }
}
