//! The host's C allocator, set up for training ([`keep_freed_memory`]).

/// Asks the C allocator to keep freed memory for reuse instead of returning large blocks to the
/// operating system, and says whether it could. Call it once, early (the xtask binary does).
///
/// Why: a CPU training step allocates and frees the same large tensors every step (the logits of
/// a 16 × 128 batch over an 8192-token vocabulary are 67 MB, and the matmul writing them zeroes
/// them first). glibc gives each block above its mapping threshold (at most 32 MB) a mapping of
/// its own and unmaps it on free, so every step page-faults those tensors in again from pages the
/// kernel zero-fills. With glibc this sets `M_MMAP_MAX` to 0 (blocks come from the heap, which a
/// freed block returns to) and turns heap trimming off. Measured with `xtask bench model`
/// (preset small, 16 × 128, 2 threads, f32): about 12 % more tokens/s in the token phase and in
/// the patch phase. The cost: the process keeps its high-water mark of heap memory until it
/// exits (a training loop's working set repeats each step, so it does not grow).
///
/// Elsewhere (not glibc on Linux) nothing is done and `false` is returned. `PATCHLM_KEEP_FREED=0`
/// in the environment also leaves the allocator alone.
pub fn keep_freed_memory() -> bool {
    if std::env::var_os("PATCHLM_KEEP_FREED").is_some_and(|v| v == "0") {
        return false;
    }
    glibc_keep_freed()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn glibc_keep_freed() -> bool {
    // SAFETY: mallopt only changes the allocator's tunables; both parameters exist in every
    // glibc, and each call returns 1 on success or 0 when it refuses the value.
    unsafe { libc::mallopt(libc::M_MMAP_MAX, 0) == 1 && libc::mallopt(libc::M_TRIM_THRESHOLD, -1) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn glibc_keep_freed() -> bool {
    false
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    /// Minor page faults of the calling thread so far.
    fn faults() -> i64 {
        // SAFETY: getrusage writes one plain struct that lives on this stack.
        unsafe {
            let mut u: libc::rusage = std::mem::zeroed();
            assert_eq!(libc::getrusage(libc::RUSAGE_THREAD, &mut u), 0);
            u.ru_minflt
        }
    }

    /// Faults taken by filling a fresh 40 MB block (above glibc's largest mapping threshold,
    /// 32 MB) that a block of the same size was freed just before.
    fn faults_of_a_reused_block() -> i64 {
        const N: usize = 40 << 20;
        drop(std::hint::black_box(vec![1u8; N]));
        let before = faults();
        let v = std::hint::black_box(vec![2u8; N]);
        let taken = faults() - before;
        assert_eq!(v[N - 1], 2);
        taken
    }

    /// With the allocator told to keep freed memory, the second 40 MB block is served from the
    /// memory the first one left, with (almost) none of the 10,240 page faults a fresh mapping
    /// takes; in a thread of its own (its own arena), as the trainer's threads are.
    #[test]
    fn a_freed_large_block_is_reused_without_page_faults() {
        assert!(super::keep_freed_memory());
        let taken = std::thread::spawn(faults_of_a_reused_block).join().expect("the test thread ran");
        assert!(taken < 1000, "{taken} page faults refilling a reused 40 MB block");
    }
}
