//! Launch geometry of the CUDA kernels in `kernels/`: how many blocks of how many threads each
//! kind of kernel gets. Plain arithmetic, compiled with or without the `cuda` feature, so that the
//! CUDA launchers in [`crate::ops`] and the emulated kernel tests (`tests/emulated.rs`, which run
//! the same kernels on the CPU) use one definition; a change here reaches both.
//!
//! Not part of the crate's stable API (hidden from the docs): it changes with the kernels.

/// A launch: grid and block dimensions (x, y, z).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    /// Blocks per dimension.
    pub grid: (u32, u32, u32),
    /// Threads per block per dimension.
    pub block: (u32, u32, u32),
}

impl Launch {
    fn x(blocks: usize, threads: u32) -> Self {
        Launch { grid: (blocks as u32, 1, 1), block: (threads, 1, 1) }
    }
}

/// Rows of a warp-per-row kernel (`*_w_*`: RMSNorm, causal softmax, flash statistics) in each
/// block of 256 threads.
pub const WARP_ROWS_PER_BLOCK: usize = 8;

/// Rows of the flash attention kernels' blocks (query rows for the forward and dq, key rows for
/// dk / dv).
pub const FLASH_ROWS: usize = 64;

/// Threads for `n` work items, rounded up to whole warps, within 32..=1024.
pub fn threads_for(n: usize) -> u32 {
    (n.div_ceil(32) * 32).clamp(32, 1024) as u32
}

/// An element-wise kernel with a grid-stride loop over `n` items: blocks of 1024 threads, one
/// item per thread (as cudarc's `LaunchConfig::for_num_elems`).
pub fn elems(n: usize) -> Launch {
    Launch::x(n.div_ceil(1024).max(1), 1024)
}

/// A block per row of `rows`, `threads` threads each.
pub fn block_rows(rows: usize, threads: u32) -> Launch {
    Launch::x(rows, threads)
}

/// A warp per row: [`WARP_ROWS_PER_BLOCK`] rows in a block of 256 threads.
pub fn warp_rows(rows: usize) -> Launch {
    Launch::x(rows.div_ceil(WARP_ROWS_PER_BLOCK), 32 * WARP_ROWS_PER_BLOCK as u32)
}

/// The multi-target cross-entropy kernels (`ce_*`): a block per row of `vocab` logits, up to 512
/// threads.
pub fn cross_entropy(rows: usize, vocab: usize) -> Launch {
    block_rows(rows, threads_for(vocab).min(512))
}

/// The layout kernels (`heads_from_rows`, `rows_from_heads`) on `rows` rows of `cols` columns: a
/// block per row, a thread per 16-byte pack of a 16-bit dtype (8 columns), up to 512.
pub fn heads(rows: usize, cols: usize) -> Launch {
    block_rows(rows.max(1), threads_for(cols.div_ceil(8)).min(512))
}

/// The flash attention kernels on `rows` rows of `heads` (batch × heads) heads: grid
/// (⌈rows / [`FLASH_ROWS`]⌉, heads); the tensor-core kernels have 4 warps of 16 rows, the
/// CUDA-core ones a thread per row.
pub fn flash(rows: usize, heads: usize, tensor_core: bool) -> Launch {
    Launch {
        grid: (rows.div_ceil(FLASH_ROWS) as u32, heads as u32, 1),
        block: (if tensor_core { 128 } else { FLASH_ROWS as u32 }, 1, 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every row (item) is covered by exactly the blocks the kernels assume.
    #[test]
    fn launches_cover_their_rows() {
        for rows in [1usize, 7, 8, 9, 63, 64, 65, 1000] {
            let w = warp_rows(rows);
            assert!(w.grid.0 as usize * 8 >= rows && (w.grid.0 as usize - 1) * 8 < rows, "{rows}");
            assert_eq!(w.block, (256, 1, 1));
            let f = flash(rows, 3, true);
            assert!(f.grid.0 as usize * 64 >= rows && (f.grid.0 as usize - 1) * 64 < rows, "{rows}");
            assert_eq!((f.grid.1, f.block.0, flash(rows, 3, false).block.0), (3, 128, 64));
            let e = elems(rows);
            assert!(e.grid.0 as usize * 1024 >= rows && e.block.0 == 1024);
        }
        assert_eq!(elems(0).grid.0, 1, "an empty launch still has a block");
        assert_eq!((threads_for(1), threads_for(33), threads_for(5000)), (32, 64, 1024));
        assert_eq!(cross_entropy(5, 50304).block.0, 512);
        assert_eq!(cross_entropy(5, 40).block.0, 64);
        assert_eq!(heads(8192, 2304), Launch { grid: (8192, 1, 1), block: (288, 1, 1) });
        assert_eq!(heads(0, 24).grid.0, 1, "an empty launch still has a block");
    }
}
