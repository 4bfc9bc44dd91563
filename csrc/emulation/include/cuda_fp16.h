// Stand-in for CUDA's fp16 header (__half, __half2 and conversions): see emu/half.h.
#pragma once
#include <cuda_runtime.h>
#include "emu/half.h"
