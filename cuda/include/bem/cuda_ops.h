// GPU launchers for the kernels of cpp/include/bem/{lora,kron,film}.h: same parameter structs,
// pointers are device pointers, `stream` is a cudaStream_t passed as void* so that callers need no
// CUDA headers. Launchers are asynchronous and throw std::runtime_error on a launch error.
#pragma once
#include <string>

#include "bem/film.h"
#include "bem/kron.h"
#include "bem/lora.h"

namespace bem::cuda {

// Number of visible devices, 0 when there is no driver or no device (never throws).
int device_count();
// Makes `index` this thread's current device for bem's own CUDA runtime (which is not torch's:
// bem links the runtime statically), so launches go to the device the tensors live on.
void set_device(int index);
// "name (sm_XY, N MiB)" of device `index`, for `bem info`.
std::string device_description(int index);

// Index validity is the caller's job on the GPU (bem checks it with torch before launching).
// `nonfinite_flag` (device int32, may be null) is set to 1 when a written value is not finite.
void lora_forward(const LoraForwardParams& p, int* nonfinite_flag, void* stream);
void lora_backward(const LoraBackwardParams& p, void* stream);
void kron_forward(const KronForwardParams& p, int* nonfinite_flag, void* stream);
void kron_backward(const KronBackwardParams& p, void* stream);
void film_forward(const FilmForwardParams& p, int* nonfinite_flag, void* stream);
void film_backward(const FilmBackwardParams& p, void* stream);

}  // namespace bem::cuda
