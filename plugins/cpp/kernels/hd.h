// Shared by the CUDA kernels (nvcc, NVRTC) and the host test harness (g++): no system includes, so NVRTC
// compiles the kernel files as they are and g++ needs no CUDA toolkit.
#pragma once

// Outside CUDA the execution-space keywords mean nothing; CUDA's own headers honour these definitions
// (crt/host_defines.h only defines __host__/__device__ when they are not defined yet).
#if !defined(__CUDACC__)
#ifndef __host__
#define __host__
#endif
#ifndef __device__
#define __device__
#endif
#endif

#define TC_HD __host__ __device__ inline

#include "element_type.h"

namespace tc
{

// fp16 and bf16 as their raw 16 bits: no cuda_fp16.h, so the same code compiles under g++, nvcc and NVRTC
// without extra headers.
struct f16
{
    unsigned short bits;
};
struct bf16
{
    unsigned short bits;
};

TC_HD unsigned int float_bits(float f)
{
#if defined(__CUDA_ARCH__)
    return __float_as_uint(f);
#else
    unsigned int u;
    __builtin_memcpy(&u, &f, sizeof u);
    return u;
#endif
}

TC_HD float bits_float(unsigned int u)
{
#if defined(__CUDA_ARCH__)
    return __uint_as_float(u);
#else
    float f;
    __builtin_memcpy(&f, &u, sizeof f);
    return f;
#endif
}

// Correctly rounded square root on both sides (nvcc's and NVRTC's default sqrtf is IEEE-rounded too).
TC_HD float sqrt_f(float v)
{
#if defined(__CUDA_ARCH__)
    return sqrtf(v);
#else
    return __builtin_sqrtf(v);
#endif
}

// IEEE half <-> float, round to nearest even. The device uses the hardware conversion; the host the same
// rounding in software (tests compare it with NumPy's float16).
TC_HD float f16_to_float(unsigned short h)
{
#if defined(__CUDA_ARCH__)
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#else
    unsigned int sign = (unsigned int) (h & 0x8000u) << 16;
    unsigned int exponent = (h >> 10) & 0x1fu;
    unsigned int mantissa = h & 0x3ffu;
    if (exponent == 0x1fu)
    {
        return bits_float(sign | 0x7f800000u | (mantissa << 13)); // inf, nan
    }
    if (exponent == 0)
    {
        // zero or subnormal: mantissa * 2^-24, exact in float
        float magnitude = (float) mantissa * bits_float(0x33800000u);
        return sign ? -magnitude : magnitude;
    }
    return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
#endif
}

TC_HD unsigned short float_to_f16(float f)
{
#if defined(__CUDA_ARCH__)
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#else
    unsigned int u = float_bits(f);
    unsigned short sign = (unsigned short) ((u >> 16) & 0x8000u);
    unsigned int magnitude = u & 0x7fffffffu;
    if (magnitude >= 0x7f800000u) // inf or nan (keep nan quiet and non-zero)
    {
        return (unsigned short) (sign | 0x7c00u | (magnitude > 0x7f800000u ? 0x200u : 0u));
    }
    if (magnitude >= 0x477ff000u) // rounds to >= 65520: overflow to inf
    {
        return (unsigned short) (sign | 0x7c00u);
    }
    if (magnitude < 0x38800000u) // below the smallest normal half (2^-14): subnormal or zero
    {
        if (magnitude < 0x33000000u) // below half the smallest subnormal (2^-25): zero
        {
            return sign;
        }
        unsigned int exponent = magnitude >> 23;
        unsigned int mantissa = (magnitude & 0x7fffffu) | 0x800000u;
        unsigned int shift = 126u - exponent; // 14..24: half subnormal = mantissa >> shift
        unsigned int value = mantissa >> shift;
        unsigned int rest = mantissa & ((1u << shift) - 1u);
        unsigned int halfway = 1u << (shift - 1u);
        if (rest > halfway || (rest == halfway && (value & 1u)))
        {
            ++value;
        }
        return (unsigned short) (sign | value);
    }
    // normal: rebias the exponent, round the 13 dropped mantissa bits to nearest even
    unsigned int value = magnitude - 0x38000000u;
    value += 0xfffu + ((value >> 13) & 1u);
    return (unsigned short) (sign | (value >> 13));
#endif
}

TC_HD float bf16_to_float(unsigned short b)
{
    return bits_float((unsigned int) b << 16);
}

TC_HD unsigned short float_to_bf16(float f)
{
    unsigned int u = float_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u)
    {
        return (unsigned short) ((u >> 16) | 0x40u); // quiet nan
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short) (u >> 16);
}

TC_HD float to_float(float v)
{
    return v;
}
TC_HD float to_float(f16 v)
{
    return f16_to_float(v.bits);
}
TC_HD float to_float(bf16 v)
{
    return bf16_to_float(v.bits);
}

template <typename E>
struct FromFloat;
template <>
struct FromFloat<float>
{
    TC_HD static float convert(float v)
    {
        return v;
    }
};
template <>
struct FromFloat<f16>
{
    TC_HD static f16 convert(float v)
    {
        return f16{float_to_f16(v)};
    }
};
template <>
struct FromFloat<bf16>
{
    TC_HD static bf16 convert(float v)
    {
        return bf16{float_to_bf16(v)};
    }
};

template <typename E>
TC_HD E from_float(float v)
{
    return FromFloat<E>::convert(v);
}

// Scratch is carved from one buffer of 4-byte words (floats and ints), per batch row.
TC_HD float* words_as_floats(int* words)
{
    return reinterpret_cast<float*>(words);
}

} // namespace tc
