// Stand-in for CUDA's bf16 header (__nv_bfloat16, __nv_bfloat162 and conversions): see
// emu/half.h. As in CUDA, it brings the fp16 types along.
#pragma once
#include <cuda_runtime.h>
#include "emu/half.h"
