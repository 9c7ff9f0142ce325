// Stand-in for the header a CUDA build of torch generates and a CPU build lacks; used only by the
// CUDA compile check (CMake adds this folder when torch's own copy is missing). A CUDA torch
// ships the real one, which defines just this macro.
#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS
