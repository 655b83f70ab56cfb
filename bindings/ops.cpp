// Bindings of the lora / kron / film kernels. Python passes raw pointers (tensor.data_ptr()), sizes
// and, on the GPU, the current stream; it has already checked shapes, dtypes, devices and
// contiguity. Here: pointer/size sanity checks that name the argument, then dispatch CPU or CUDA.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "bem/common.h"
#include "bem/film.h"
#include "bem/kron.h"
#include "bem/lora.h"
#include "registry.h"
#ifdef BEM_WITH_CUDA
#include "bem/cuda_ops.h"
#endif

namespace py = pybind11;

namespace {

// `device` is −1 for the CPU, else the CUDA device ordinal the tensors live on.
constexpr int kCpu = -1;

void require(bool ok, const char* arg, const std::string& what) {
  if (!ok) throw bem::ArgumentError(arg, what);
}

bem::DType to_dtype(int code) {
  require(code >= 0 && code <= 2, "dtype", "expected 0 (float32), 1 (bfloat16) or 2 (float16), got " +
                                               std::to_string(code));
  return static_cast<bem::DType>(code);
}

void require_device(int device) {
  require(device >= kCpu, "device", "expected -1 (cpu) or a CUDA device ordinal");
#ifdef BEM_WITH_CUDA
  if (device != kCpu) bem::cuda::set_device(device);
#else
  require(device == kCpu, "device", "bem was built without CUDA kernels (rebuild with BEM_CUDA=ON)");
#endif
}

template <typename T> const T* cptr(uintptr_t p) { return reinterpret_cast<const T*>(p); }
template <typename T> T* mptr(uintptr_t p) { return reinterpret_cast<T*>(p); }
void* vptr(uintptr_t p) { return reinterpret_cast<void*>(p); }

void check_lora_sizes(int64_t tokens, int64_t d_in, int64_t d_out, int64_t rank, int64_t active,
                      int64_t experts) {
  require(tokens >= 1, "x", "expected at least one token, got " + std::to_string(tokens));
  require(d_in >= 1, "x", "expected d_in >= 1");
  require(d_out >= 1, "B", "expected d_out >= 1");
  require(rank >= 1, "A", "expected rank >= 1");
  require(active >= 1 && active <= rank, "rank_index",
          "expected 1 <= k <= r, got k=" + std::to_string(active) + ", r=" + std::to_string(rank));
  require(experts >= 1, "A", "expected at least one expert");
}

// The forward's parameters from the binding's arguments (checks the pointers are not null).
bem::LoraForwardParams lora_params(int64_t tokens, int64_t d_in, int64_t d_out, int64_t rank, int64_t active,
                                   int64_t experts, int dtype, float scale, uintptr_t x, int64_t ld_x, uintptr_t A,
                                   uintptr_t B, uintptr_t expert_index, uintptr_t rank_index, uintptr_t rank_gate,
                                   uintptr_t y, int64_t ld_y, bool accumulate) {
  require(x && A && B && y, "x/A/B/y", "null data pointer");
  bem::LoraForwardParams p;
  p.tokens = tokens; p.d_in = d_in; p.d_out = d_out; p.rank = rank; p.active = active;
  p.experts = experts; p.dtype = to_dtype(dtype); p.scale = scale;
  p.x = vptr(x); p.ld_x = ld_x; p.A = vptr(A); p.B = vptr(B);
  p.expert_index = cptr<int64_t>(expert_index); p.rank_index = cptr<int64_t>(rank_index);
  p.rank_gate = cptr<float>(rank_gate);
  p.y = vptr(y); p.ld_y = ld_y; p.accumulate = accumulate;
  return p;
}

bool lora_forward(int device, uintptr_t stream, uintptr_t nonfinite_flag, int64_t tokens,
                  int64_t d_in, int64_t d_out, int64_t rank, int64_t active, int64_t experts,
                  int dtype, float scale, uintptr_t x, int64_t ld_x, uintptr_t A, uintptr_t B,
                  uintptr_t expert_index, uintptr_t rank_index, uintptr_t rank_gate, uintptr_t y,
                  int64_t ld_y, bool accumulate, uintptr_t shrink_out) {
  require_device(device);
  check_lora_sizes(tokens, d_in, d_out, rank, active, experts);
  require(ld_x >= d_in, "x", "row stride smaller than d_in");
  require(ld_y >= d_out, "y", "row stride smaller than d_out");
  bem::LoraForwardParams p = lora_params(tokens, d_in, d_out, rank, active, experts, dtype, scale, x, ld_x, A, B,
                                         expert_index, rank_index, rank_gate, y, ld_y, accumulate);
  p.shrink_out = mptr<float>(shrink_out);
  py::gil_scoped_release nogil;
  if (device == kCpu) return bem::lora_forward_cpu(p);  // validates the indices itself
#ifdef BEM_WITH_CUDA
  bem::cuda::lora_forward(p, mptr<int>(nonfinite_flag), vptr(stream));
#endif
  (void)stream; (void)nonfinite_flag;
  return true;
}

// The CPU inference fast path of bem.ops.lora_delta (contiguous x and y, no shrink output): fewer
// arguments to convert, and the GIL kept for calls too small to be worth releasing it (a
// decode-sized call takes about a microsecond; other Python threads wait no longer than that).
constexpr int64_t kKeepGilMacs = int64_t{1} << 16;

bool lora_forward_cpu(int64_t tokens, int64_t d_in, int64_t d_out, int64_t rank, int64_t active,
                      int64_t experts, int dtype, float scale, uintptr_t x, uintptr_t A, uintptr_t B,
                      uintptr_t expert_index, uintptr_t rank_index, uintptr_t rank_gate, uintptr_t y,
                      bool accumulate) {
  const bem::LoraForwardParams p = lora_params(tokens, d_in, d_out, rank, active, experts, dtype, scale, x, d_in, A,
                                               B, expert_index, rank_index, rank_gate, y, d_out, accumulate);
  const double macs = static_cast<double>(tokens) * static_cast<double>(active) * static_cast<double>(d_in + d_out);
  if (macs < static_cast<double>(kKeepGilMacs)) return bem::lora_forward_cpu(p);  // checks the sizes too
  py::gil_scoped_release nogil;
  return bem::lora_forward_cpu(p);
}

void lora_backward(int device, uintptr_t stream, int64_t tokens, int64_t d_in, int64_t d_out,
                   int64_t rank, int64_t active, int64_t experts, int dtype, float scale,
                   uintptr_t x, uintptr_t A, uintptr_t B, uintptr_t expert_index,
                   uintptr_t rank_index, uintptr_t rank_gate, uintptr_t shrink, uintptr_t grad_y,
                   uintptr_t grad_x, uintptr_t grad_A, uintptr_t grad_B, uintptr_t grad_gate) {
  require_device(device);
  check_lora_sizes(tokens, d_in, d_out, rank, active, experts);
  require(x && A && B && grad_y, "x/A/B/grad_y", "null data pointer");
  bem::LoraBackwardParams p;
  p.tokens = tokens; p.d_in = d_in; p.d_out = d_out; p.rank = rank; p.active = active;
  p.experts = experts; p.dtype = to_dtype(dtype); p.scale = scale;
  p.x = vptr(x); p.A = vptr(A); p.B = vptr(B);
  p.expert_index = cptr<int64_t>(expert_index); p.rank_index = cptr<int64_t>(rank_index);
  p.rank_gate = cptr<float>(rank_gate); p.shrink = cptr<float>(shrink); p.grad_y = vptr(grad_y);
  p.grad_x = vptr(grad_x); p.grad_A = mptr<float>(grad_A); p.grad_B = mptr<float>(grad_B);
  p.grad_gate = mptr<float>(grad_gate);
  py::gil_scoped_release nogil;
  if (device == kCpu) {
    bem::lora_backward_cpu(p);
    return;
  }
#ifdef BEM_WITH_CUDA
  bem::cuda::lora_backward(p, vptr(stream));
#endif
  (void)stream;
}

void check_kron_sizes(int64_t tokens, int64_t o1, int64_t i1, int64_t o2, int64_t i2) {
  require(tokens >= 1, "x", "expected at least one token, got " + std::to_string(tokens));
  require(o1 >= 1 && i1 >= 1, "A", "expected a non-empty (o1, i1) matrix");
  require(o2 >= 1 && i2 >= 1, "B", "expected a non-empty (o2, i2) matrix");
}

bool kron_forward(int device, uintptr_t stream, uintptr_t nonfinite_flag, int64_t tokens,
                  int64_t o1, int64_t i1, int64_t o2, int64_t i2, int dtype, float scale,
                  uintptr_t x, uintptr_t A, uintptr_t B, uintptr_t y, int64_t ld_y,
                  bool accumulate) {
  require_device(device);
  check_kron_sizes(tokens, o1, i1, o2, i2);
  require(x && A && B && y, "x/A/B/y", "null data pointer");
  require(ld_y >= o1 * o2, "y", "row stride smaller than d_out");
  bem::KronForwardParams p;
  p.tokens = tokens; p.o1 = o1; p.i1 = i1; p.o2 = o2; p.i2 = i2;
  p.dtype = to_dtype(dtype); p.scale = scale;
  p.x = vptr(x); p.A = vptr(A); p.B = vptr(B); p.y = vptr(y); p.ld_y = ld_y;
  p.accumulate = accumulate;
  py::gil_scoped_release nogil;
  if (device == kCpu) return bem::kron_forward_cpu(p);
#ifdef BEM_WITH_CUDA
  bem::cuda::kron_forward(p, mptr<int>(nonfinite_flag), vptr(stream));
#endif
  (void)stream; (void)nonfinite_flag;
  return true;
}

void kron_backward(int device, uintptr_t stream, int64_t tokens, int64_t o1, int64_t i1,
                   int64_t o2, int64_t i2, int dtype, float scale, uintptr_t x, uintptr_t A,
                   uintptr_t B, uintptr_t grad_y, uintptr_t grad_x, uintptr_t grad_A,
                   uintptr_t grad_B) {
  require_device(device);
  check_kron_sizes(tokens, o1, i1, o2, i2);
  require(x && A && B && grad_y, "x/A/B/grad_y", "null data pointer");
  bem::KronBackwardParams p;
  p.tokens = tokens; p.o1 = o1; p.i1 = i1; p.o2 = o2; p.i2 = i2;
  p.dtype = to_dtype(dtype); p.scale = scale;
  p.x = vptr(x); p.A = vptr(A); p.B = vptr(B); p.grad_y = vptr(grad_y);
  p.grad_x = vptr(grad_x); p.grad_A = mptr<float>(grad_A); p.grad_B = mptr<float>(grad_B);
  py::gil_scoped_release nogil;
  if (device == kCpu) {
    bem::kron_backward_cpu(p);
    return;
  }
#ifdef BEM_WITH_CUDA
  bem::cuda::kron_backward(p, vptr(stream));
#endif
  (void)stream;
}

double spectral_norm(uintptr_t m, int64_t rows, int64_t cols, double tol, int max_iter) {
  require(m != 0, "matrix", "null data pointer");
  require(rows >= 1 && cols >= 1, "matrix", "expected a non-empty matrix");
  require(tol > 0, "tol", "expected > 0");
  require(max_iter >= 1, "max_iter", "expected >= 1");
  py::gil_scoped_release nogil;
  return bem::spectral_norm_cpu(cptr<float>(m), rows, cols, tol, max_iter);
}

void check_film_sizes(int64_t rows, int64_t d, int64_t groups) {
  require(rows >= 1, "x", "expected at least one row");
  require(d >= 1, "x", "expected a non-empty feature dimension");
  require(groups >= 1 && rows % groups == 0, "gamma",
          "number of γ/β rows must divide the rows of x");
}

bool film_forward(int device, uintptr_t stream, uintptr_t nonfinite_flag, int64_t rows, int64_t d,
                  int64_t groups, int dtype, float gamma_lo, float gamma_hi, float beta_bound,
                  uintptr_t x, uintptr_t gamma, uintptr_t beta, uintptr_t y) {
  require_device(device);
  check_film_sizes(rows, d, groups);
  require(x && gamma && beta && y, "x/gamma/beta/y", "null data pointer");
  bem::FilmForwardParams p;
  p.rows = rows; p.d = d; p.groups = groups; p.dtype = to_dtype(dtype);
  p.gamma_lo = gamma_lo; p.gamma_hi = gamma_hi; p.beta_bound = beta_bound;
  p.x = vptr(x); p.gamma = vptr(gamma); p.beta = vptr(beta); p.y = vptr(y);
  py::gil_scoped_release nogil;
  if (device == kCpu) return bem::film_forward_cpu(p);
#ifdef BEM_WITH_CUDA
  bem::cuda::film_forward(p, mptr<int>(nonfinite_flag), vptr(stream));
#endif
  (void)stream; (void)nonfinite_flag;
  return true;
}

void film_backward(int device, uintptr_t stream, int64_t rows, int64_t d, int64_t groups, int dtype,
                   float gamma_lo, float gamma_hi, float beta_bound, uintptr_t x, uintptr_t gamma,
                   uintptr_t beta, uintptr_t grad_y, uintptr_t grad_x, uintptr_t grad_gamma,
                   uintptr_t grad_beta) {
  require_device(device);
  check_film_sizes(rows, d, groups);
  require(x && gamma && beta && grad_y, "x/gamma/beta/grad_y", "null data pointer");
  bem::FilmBackwardParams p;
  p.rows = rows; p.d = d; p.groups = groups; p.dtype = to_dtype(dtype);
  p.gamma_lo = gamma_lo; p.gamma_hi = gamma_hi; p.beta_bound = beta_bound;
  p.x = vptr(x); p.gamma = vptr(gamma); p.beta = vptr(beta); p.grad_y = vptr(grad_y);
  p.grad_x = vptr(grad_x); p.grad_gamma = mptr<float>(grad_gamma);
  p.grad_beta = mptr<float>(grad_beta);
  py::gil_scoped_release nogil;
  if (device == kCpu) {
    bem::film_backward_cpu(p);
    return;
  }
#ifdef BEM_WITH_CUDA
  bem::cuda::film_backward(p, vptr(stream));
#endif
  (void)stream;
}

}  // namespace

namespace bem_bindings {

void bind_ops(py::module_& m) {
  // Positional arguments only: these are called on every op invocation, and keyword parsing
  // costs more than the decode-sized kernels themselves.
  m.def("lora_forward", &lora_forward,
        "lora_forward(device, stream, nonfinite_flag, T, d_in, d_out, r, k, E, dtype, scale, x, "
        "ld_x, A, B, expert_index, rank_index, rank_gate, y, ld_y, accumulate, shrink_out) -> "
        "bool (all outputs finite; always True on CUDA, which reports through nonfinite_flag)");
  m.def("lora_forward_cpu", &lora_forward_cpu,
        "lora_forward_cpu(T, d_in, d_out, r, k, E, dtype, scale, x, A, B, expert_index, rank_index, "
        "rank_gate, y, accumulate) -> bool: contiguous x and y on the CPU (the inference fast path)");
  m.def("lora_backward", &lora_backward,
        "lora_backward(device, stream, T, d_in, d_out, r, k, E, dtype, scale, x, A, B, "
        "expert_index, rank_index, rank_gate, shrink, grad_y, grad_x, grad_A, grad_B, grad_gate)");
  m.def("kron_forward", &kron_forward,
        "kron_forward(device, stream, nonfinite_flag, T, o1, i1, o2, i2, dtype, scale, x, A, B, "
        "y, ld_y, accumulate) -> bool");
  m.def("kron_backward", &kron_backward,
        "kron_backward(device, stream, T, o1, i1, o2, i2, dtype, scale, x, A, B, grad_y, grad_x, "
        "grad_A, grad_B)");
  m.def("spectral_norm", &spectral_norm,
        "spectral_norm(ptr, rows, cols, tol, max_iter) -> largest singular value (fp32 CPU matrix)");
  m.def("film_forward", &film_forward,
        "film_forward(device, stream, nonfinite_flag, rows, d, groups, dtype, gamma_lo, gamma_hi, "
        "beta_bound, x, gamma, beta, y) -> bool");
  m.def("film_backward", &film_backward,
        "film_backward(device, stream, rows, d, groups, dtype, gamma_lo, gamma_hi, beta_bound, x, "
        "gamma, beta, grad_y, grad_x, grad_gamma, grad_beta)");
}

}  // namespace bem_bindings
