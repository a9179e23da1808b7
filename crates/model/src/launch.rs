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

/// One block of 1024 threads: the prefix sum of the sorted embedding backward (`embedding_scan`).
pub fn scan() -> Launch {
    Launch::x(1, 1024)
}

/// One block of one warpgroup (128 threads): kernels/hopper.cu's probe.
pub fn warpgroup() -> Launch {
    Launch::x(1, 128)
}

/// A block per row of `rows`, `threads` threads each.
pub fn block_rows(rows: usize, threads: u32) -> Launch {
    Launch::x(rows, threads)
}

/// A warp per row: [`WARP_ROWS_PER_BLOCK`] rows in a block of 256 threads.
pub fn warp_rows(rows: usize) -> Launch {
    Launch::x(rows.div_ceil(WARP_ROWS_PER_BLOCK), 32 * WARP_ROWS_PER_BLOCK as u32)
}

/// A block per row of `len` items with a thread per `per_thread` of them, rounded up to whole
/// warps and capped at `max_threads`.
fn row_blocks(rows: usize, len: usize, per_thread: usize, max_threads: u32) -> Launch {
    block_rows(rows, threads_for(len.div_ceil(per_thread)).min(max_threads))
}

/// The block-per-row RMSNorm kernels (`rms_fwd_*`, `rms_dx_*`) on `rows` rows of `d`: a thread
/// per element, up to 1024.
pub fn rms_rows(rows: usize, d: usize) -> Launch {
    row_blocks(rows, d, 1, 1024)
}

/// The block-per-row causal softmax (`causal_softmax_fwd_*`, `causal_softmax_bwd_*`) on rows of
/// `s` scores: a thread per 4 scores, up to 512.
pub fn softmax_rows(rows: usize, s: usize) -> Launch {
    row_blocks(rows, s, 4, 512)
}

/// RMSNorm's weight gradient (`rms_dw_*`) over `rows` rows of `d`: grid (⌈d / 256⌉, chunks) of
/// 256 threads, the rows cut into up to 256 chunks whose partial sums meet in f32 atomics.
/// Returns the launch and the rows per chunk (the kernel's last argument).
pub fn rms_dw(rows: usize, d: usize) -> (Launch, usize) {
    let chunks = rows.clamp(1, 256);
    (Launch { grid: (d.div_ceil(256) as u32, chunks as u32, 1), block: (256, 1, 1) }, rows.div_ceil(chunks))
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

/// Query rows of the wide mma.sync forward kernel's blocks (`flash_mma_fwdw_*`: 4 warps of
/// two blocks of 16 rows).
pub const FLASH_WIDE_ROWS: usize = 128;

/// The wide flash forward kernel on `rows` query rows of `heads` heads: grid
/// (⌈rows / [`FLASH_WIDE_ROWS`]⌉, heads), 128 threads.
pub fn flash_wide(rows: usize, heads: usize) -> Launch {
    Launch { grid: (rows.div_ceil(FLASH_WIDE_ROWS) as u32, heads as u32, 1), block: (128, 1, 1) }
}

/// Keys of the wide mma.sync backward kernels' blocks (`flash_mma_dkvw_*`, `flash_mma_dkvqw_*`:
/// 8 warps of 16 keys; head size 64).
pub const FLASH_WIDE_KEYS: usize = 128;

/// The wide flash backward kernels on `keys` key rows of `heads` heads: grid
/// (⌈keys / [`FLASH_WIDE_KEYS`]⌉, heads), 256 threads.
pub fn flash_wide_bwd(keys: usize, heads: usize) -> Launch {
    Launch { grid: (keys.div_ceil(FLASH_WIDE_KEYS) as u32, heads as u32, 1), block: (256, 1, 1) }
}

/// Bytes of dynamic shared memory the wide flash backward kernels take (16-bit dtypes, head size
/// 64; kernels/flash.cu `DkvSmem`): three buffers of a (q, dO) tile pair of 32 rows, the k tile,
/// with `dq` the dS^T tile, all rows padded by 8 elements, and three buffers' 32 (lse, delta)
/// pairs. Above 48 KB (with `dq`) the launcher raises the kernel's limit.
pub fn flash_wide_bwd_smem(dq: bool) -> u32 {
    const BQ: usize = 32;
    const LD: usize = 64 + 8;
    let elems = 6 * BQ * LD + FLASH_WIDE_KEYS * LD + if dq { FLASH_WIDE_KEYS * (BQ + 8) } else { 0 };
    (elems * 2 + 3 * BQ * 8) as u32
}

/// Bytes of dynamic shared memory the wgmma one-pass flash backward takes (`flash_wg_dkvq_bf16_64`;
/// kernels/hopper.cu `WgDkvSmem`): two buffers of a (q, dO) tile pair of 64 rows, the block's k
/// tile and a dS^T tile (64 x 64 bf16 each, unpadded core matrices), and two buffers' 64 (lse,
/// delta) pairs. Above 48 KB: the launcher raises the kernel's limit.
pub fn flash_wg_dkvq_smem() -> u32 {
    const TILE: usize = 64 * 64;
    ((4 * TILE + 2 * TILE) * 2 + 2 * 64 * 8) as u32
}

/// Query rows of the two-warpgroup wgmma forward and dq kernels' blocks (`flash_wg_fwdw_*`,
/// `flash_wg_dqw_*`: 64 rows a warpgroup).
pub const FLASH_WG_WIDE_ROWS: usize = 128;

/// The two-warpgroup wgmma forward and dq kernels on `rows` query rows of `heads` heads: grid
/// (⌈rows / [`FLASH_WG_WIDE_ROWS`]⌉, heads), 256 threads.
pub fn flash_wg_wide(rows: usize, heads: usize) -> Launch {
    Launch { grid: (rows.div_ceil(FLASH_WG_WIDE_ROWS) as u32, heads as u32, 1), block: (256, 1, 1) }
}

/// Bytes of dynamic shared memory the two-warpgroup wgmma dq kernel takes (`flash_wg_dqw_bf16_64`;
/// kernels/hopper.cu `WgDqSmem`): its q and dO tiles of 128 rows and two buffers of a (k, v) tile
/// pair of 64 keys (head size 64, bf16, unpadded core matrices). Above 48 KB: the launcher raises
/// the kernel's limit.
pub fn flash_wg_dqw_smem() -> u32 {
    const HD: usize = 64;
    ((2 * FLASH_WG_WIDE_ROWS * HD + 2 * 2 * 64 * HD) * 2) as u32
}

/// Elements per thread block of the multi-tensor kernels (`multi_*`).
pub const MULTI_CHUNK: usize = 16384;

/// The multi-tensor kernels on `blocks` blocks (see [`multi_table`]) of 512 threads.
pub fn multi(blocks: usize) -> Launch {
    Launch::x(blocks, 512)
}

/// The table the multi-tensor kernels read (see kernels/fused.cu), from five words per tensor
/// (`entries`, the element count in word 3): the first block of each tensor when each is cut
/// into chunks of [`MULTI_CHUNK`] elements, then the total, then the entries. Returns it and the
/// number of blocks.
pub fn multi_table(entries: &[[u64; 5]]) -> (Vec<u64>, usize) {
    let sizes: Vec<usize> = entries.iter().map(|e| e[3] as usize).collect();
    let mut table = multi_first(&sizes, MULTI_CHUNK);
    let blocks = table.last().copied().unwrap_or(0) as usize;
    table.extend(entries.iter().flatten());
    (table, blocks)
}

/// The first block of each tensor of `sizes` elements cut into chunks of `chunk`, then the total
/// number of blocks.
fn multi_first(sizes: &[usize], chunk: usize) -> Vec<u64> {
    let mut first = Vec::with_capacity(sizes.len() + 1);
    let mut b = 0u64;
    for &n in sizes {
        first.push(b);
        b += n.div_ceil(chunk) as u64;
    }
    first.push(b);
    first
}

/// The tensor that owns block `b` (the kernels' `multi_owner`, same search): the largest `i`
/// with `first[i] <= b` among the tensors (`first` without its final total).
#[cfg(test)]
fn multi_owner(first: &[u64], b: u64) -> usize {
    let (mut lo, mut hi) = (0usize, first.len() - 2);
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if first[mid] <= b {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
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
            assert_eq!(rms_rows(rows, 768), Launch { grid: (rows as u32, 1, 1), block: (768, 1, 1) });
            assert_eq!(softmax_rows(rows, 1024).block.0, 256);
            // The weight gradient's chunks (row i in chunk i / per; trailing chunks may be
            // empty): every row in one, every column in a block.
            for d in [1usize, 256, 257, 768] {
                let (l, per) = rms_dw(rows, d);
                let chunks = l.grid.1 as usize;
                assert!(chunks * per >= rows && chunks <= 256 && per >= 1, "{rows} rows");
                assert!(l.grid.0 as usize * l.block.0 as usize >= d && (l.grid.0 as usize - 1) * 256 < d);
            }
        }
        assert_eq!(
            (rms_rows(3, 5000).block.0, softmax_rows(3, 5000).block.0, softmax_rows(3, 5).block.0),
            (1024, 512, 32)
        );
        assert_eq!(elems(0).grid.0, 1, "an empty launch still has a block");
        assert_eq!((threads_for(1), threads_for(33), threads_for(5000)), (32, 64, 1024));
        assert_eq!(cross_entropy(5, 50304).block.0, 512);
        assert_eq!(cross_entropy(5, 40).block.0, 64);
        assert_eq!(heads(8192, 2304), Launch { grid: (8192, 1, 1), block: (288, 1, 1) });
        assert_eq!(heads(0, 24).grid.0, 1, "an empty launch still has a block");
    }

    /// Every element of every tensor is visited exactly once when each block b covers chunk
    /// `b - first[owner(b)]` of its owner, as the multi-tensor kernels do; empty tensors own no
    /// block.
    #[test]
    fn multi_table_covers_every_element_once() {
        for (sizes, chunk) in [
            (vec![5usize, 0, 17, 16, 1, 0, 0, 33], 4usize),
            (vec![0, 0, 3], 4),
            (vec![4096, 1, 4095, 8193], 4096),
            (vec![1], 7),
        ] {
            let first = multi_first(&sizes, chunk);
            assert_eq!(first.len(), sizes.len() + 1);
            let total: usize = sizes.iter().map(|n| n.div_ceil(chunk)).sum();
            assert_eq!(first[sizes.len()] as usize, total);
            let mut seen: Vec<Vec<u32>> = sizes.iter().map(|&n| vec![0; n]).collect();
            for b in 0..first[sizes.len()] {
                let i = multi_owner(&first, b);
                assert!(sizes[i] > 0, "block {b} went to empty tensor {i} ({sizes:?})");
                let lo = (b - first[i]) as usize * chunk;
                assert!(lo < sizes[i], "block {b} starts past tensor {i}");
                for x in &mut seen[i][lo..(lo + chunk).min(sizes[i])] {
                    *x += 1;
                }
            }
            for (i, s) in seen.iter().enumerate() {
                assert!(s.iter().all(|&c| c == 1), "tensor {i} of {sizes:?}: visits {s:?}");
            }
        }
    }
}
