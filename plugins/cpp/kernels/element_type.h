// The kernels' element type codes, shared with the plugins' host code (no functions, no includes).
#pragma once

namespace tc
{

// Element types of x / metric / cls_attention. fp16 and bf16 travel as their raw 16 bits.
enum ElementType : int
{
    kF32 = 0,
    kF16 = 1,
    kBF16 = 2,
};

} // namespace tc
