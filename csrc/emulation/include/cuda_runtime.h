// Stand-in for the CUDA runtime header: compiles CUDA device code as host C++ that runs on the
// CPU emulator (csrc/emulation/emu_runtime.cpp). Put csrc/emulation/include first on the
// include path; launches `k<<<...>>>(...)` must be rewritten first (emulated_op.py).
#pragma once

#include "emu/types.h"
#include "emu/runtime.h"
#include "emu/intrinsics.h"
#include "emu/api.h"
