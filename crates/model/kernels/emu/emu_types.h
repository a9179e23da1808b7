// bf16 and f16 storage types of the CPU stand-in for CUDA (see cuda_emu.h): 16-bit patterns with
// CUDA's conversions (round to nearest even; NaN stays NaN).
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>

struct __nv_bfloat16 {
    uint16_t bits;
};
struct __half {
    uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 h) {
    uint32_t u = (uint32_t)h.bits << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {(uint16_t)((u >> 16) | 0x40)};
    u += 0x7fffu + ((u >> 16) & 1u);
    return {(uint16_t)(u >> 16)};
}

inline float __half2float(__half h) {
    uint32_t sign = (uint32_t)(h.bits & 0x8000) << 16, exp = (h.bits >> 10) & 0x1f, man = h.bits & 0x3ff, u;
    if (exp == 0x1f) {
        u = sign | 0x7f800000u | (man << 13);
    } else if (exp == 0) {
        float f = ldexpf((float)man, -24);
        return sign ? -f : f;
    } else {
        u = sign | ((exp + 112) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}
inline __half __float2half(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return {(uint16_t)(sign | 0x7e00)};
    if (a >= 0x477ff000u) return {(uint16_t)(sign | 0x7c00)};  // rounds to infinity
    if (a < 0x38800000u) {                                     // subnormal or zero in f16
        float m = fabsf(f) * 16777216.0f;                       // units of 2^-24
        float r = nearbyintf(m);                                 // ties to even (default mode)
        return {(uint16_t)(sign | (uint16_t)r)};
    }
    uint32_t e = (a >> 23) - 112, man = a & 0x7fffff;
    uint32_t h = (e << 10) | (man >> 13), rest = man & 0x1fff;
    if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) h++;
    return {(uint16_t)(sign | h)};
}
