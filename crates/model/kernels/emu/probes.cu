// Kernels that run one piece of the kernel sources or of the emulator alone, so that
// crates/model/tests/emulated.rs can check it apart from any kernel that uses it: a warp-matrix
// instruction wrapper of flash.cu (Mma<T>::run, ldm_x4) with registers in and out as plain arrays,
// against the fragment layouts as documented; a read one past shared memory, which the sanitizers
// must see; fused.cu's wide loads and stores, which the emulator's alignment check must stop off
// their alignment. Compiled into the harness only, never for a GPU.

// d (lane l's four f32 accumulators at d[4l..4l+4), C in, D out) += a . b, with lane l's A
// registers at a[4l..4l+4) and B registers at b[2l..2l+2).
template <typename T>
__device__ void probe_mma(const uint32_t* a, const uint32_t* b, float* d) {
    const int l = threadIdx.x;
    uint32_t ar[4] = {a[4 * l], a[4 * l + 1], a[4 * l + 2], a[4 * l + 3]};
    uint32_t br[2] = {b[2 * l], b[2 * l + 1]};
    float dr[4] = {d[4 * l], d[4 * l + 1], d[4 * l + 2], d[4 * l + 3]};
    Mma<T>::run(dr, ar, br);
    for (int i = 0; i < 4; i++) d[4 * l + i] = dr[i];
}
extern "C" __global__ void probe_mma_bf16(const uint32_t* a, const uint32_t* b, float* d) {
    probe_mma<__nv_bfloat16>(a, b, d);
}
extern "C" __global__ void probe_mma_f16(const uint32_t* a, const uint32_t* b, float* d) {
    probe_mma<__half>(a, b, d);
}

// ldmatrix.x4 (trans != 0: .trans) of four 8x8 matrices of 16-bit values: m holds 32 rows of 8,
// matrix j's row r at row 8j + r, staged into shared memory rows padded to 24 elements; lane
// 8j + r gives that row's address. Lane l's four registers go to out[4l..4l+4).
extern "C" __global__ void probe_ldmatrix(const uint16_t* m, uint32_t* out, int trans) {
    __shared__ __align__(16) uint16_t s[32 * 24];
    const int l = threadIdx.x;
    for (int c = 0; c < 8; c++) s[l * 24 + c] = m[l * 8 + c];
    __syncthreads();
    uint32_t r[4];
    if (trans) {
        ldm_x4<true>(r, s + l * 24);
    } else {
        ldm_x4<false>(r, s + l * 24);
    }
    for (int j = 0; j < 4; j++) out[4 * l + j] = r[j];
}

// ldmatrix.x2 (ldm_x2, not transposed) on the same staging: lanes 0-15 give matrices 0 and 1
// (lanes 16-31 the rows of matrices 2 and 3, which the instruction ignores). Lane l's two
// registers go to out[2l..2l+2).
extern "C" __global__ void probe_ldmatrix_x2(const uint16_t* m, uint32_t* out) {
    __shared__ __align__(16) uint16_t s[32 * 24];
    const int l = threadIdx.x;
    for (int c = 0; c < 8; c++) s[l * 24 + c] = m[l * 8 + c];
    __syncthreads();
    uint32_t r[2];
    ldm_x2(r, s + l * 24);
    out[2 * l] = r[0];
    out[2 * l + 1] = r[1];
}

// Stages 32 floats in shared memory and reads them back `shift` places on, through a pointer as
// the kernels address shared memory (where no array bound is in sight): with shift 1 the last
// lane reads one past the array, which PATCHLM_EMU_SANITIZE's AddressSanitizer must report
// (tests/emulated.rs checks that the sanitizer sees into the kernels).
extern "C" __global__ void probe_shared_shift(const float* in, float* out, int shift) {
    __shared__ float s[32];
    const int l = threadIdx.x;
    s[l] = in[l];
    __syncthreads();
    const float* row = s + shift;
    out[l] = row[l];
}

// fused.cu's wide accesses on their own: one thread reads from in + in_at and writes to out + out_at
// four elements (load4 / store4, `pack` 0) or a 16-byte pack (load_pack / store_pack, `pack` 1).
// Off its alignment each must end the run through the emulator's check (EMU_ALIGNED), which the
// emulated tests rely on to see a kernel take a wide path where it may not.
template <typename T>
__device__ void probe_wide(const T* in, T* out, int in_at, int out_at, int pack) {
    float f[Pack16<T>::N];
    if (pack) {
        load_pack(in + in_at, f);
        store_pack(out + out_at, f);
    } else {
        load4(in + in_at, f);
        store4(out + out_at, f);
    }
}
extern "C" __global__ void probe_wide_f32(const float* in, float* out, int in_at, int out_at, int pack) {
    probe_wide<float>(in, out, in_at, out_at, pack);
}
extern "C" __global__ void probe_wide_bf16(const __nv_bfloat16* in, __nv_bfloat16* out, int in_at, int out_at,
                                           int pack) {
    probe_wide<__nv_bfloat16>(in, out, in_at, out_at, pack);
}
