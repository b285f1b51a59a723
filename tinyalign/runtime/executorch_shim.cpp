// A C ABI over ExecuTorch's C++ Module, so that Python can run a .pte with numpy buffers
// through ctypes, without torch.
//
// Why: ExecuTorch's own Python bindings (executorch.runtime / portable_lib, 1.5.1 and main as of
// 2026-08) import torch, accept only torch.Tensor inputs and return torch.Tensor outputs. The
// wheel's native libraries (lib/libexecutorch*.so) do not depend on libtorch, and the wheel ships
// the headers to build against them (lib/cmake/executorch/executorch-config.cmake). This file is
// compiled on first use by tinyalign/runtime/executorch_native.py; it links the runtime, the
// optimized + portable kernels, the quantized kernels and the XNNPACK backend, whose static
// initializers register themselves when the library loads.
//
// Every call returns 0 on success or -1 with a message in the caller's buffer; nothing throws
// across the C boundary. One handle = one loaded program with its own planned memory per method,
// so a method's mutable buffers (the KV cache) persist between calls on the same handle.

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>

using executorch::aten::ScalarType;
using executorch::extension::TensorPtr;
using executorch::extension::from_blob;
using executorch::extension::module::Module;
using executorch::runtime::Error;
using executorch::runtime::EValue;

namespace {

struct Handle {
  std::unique_ptr<Module> module;
  std::vector<std::string> names;
  std::vector<EValue> outputs;
};

void set_error(char* err, int errlen, const std::string& msg) {
  if (err != nullptr && errlen > 0) {
    std::strncpy(err, msg.c_str(), static_cast<size_t>(errlen) - 1);
    err[errlen - 1] = '\0';
  }
}

std::string code(Error e) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "0x%x", static_cast<unsigned>(e));
  return buf;
}

}  // namespace

extern "C" {

// Tags of an output (tae_output): 0 none, 1 tensor, 2 int, 3 double, 4 bool, 5 other.
int tae_version() { return 1; }

void* tae_open(const char* path, char* err, int errlen) {
  try {
    auto h = std::make_unique<Handle>();
    h->module = std::make_unique<Module>(std::string(path), Module::LoadMode::Mmap);
    Error e = h->module->load();
    if (e != Error::Ok) {
      set_error(err, errlen, "cannot load the ExecuTorch program " + std::string(path) + " (error " + code(e) + ")");
      return nullptr;
    }
    auto names = h->module->method_names();
    if (!names.ok()) {
      set_error(err, errlen, "cannot list the methods of " + std::string(path));
      return nullptr;
    }
    h->names.assign(names->begin(), names->end());
    return h.release();
  } catch (const std::exception& ex) {
    set_error(err, errlen, std::string("cannot load the ExecuTorch program: ") + ex.what());
    return nullptr;
  }
}

void tae_close(void* handle) { delete static_cast<Handle*>(handle); }

int tae_num_methods(void* handle) { return static_cast<int>(static_cast<Handle*>(handle)->names.size()); }

const char* tae_method_name(void* handle, int i) {
  auto* h = static_cast<Handle*>(handle);
  return (i >= 0 && i < static_cast<int>(h->names.size())) ? h->names[i].c_str() : nullptr;
}

// Run `method` on n inputs. Input i is a C-contiguous tensor of ScalarType dtypes[i] with
// ndims[i] dims (sizes packed one after another in `sizes`) at data[i]; the buffers must stay
// alive for the call only. Returns the number of outputs (read them with tae_output before the
// next call on this handle) or -1.
int tae_run(void* handle, const char* method, int n, const int* dtypes, const int* ndims, const int64_t* sizes,
            void* const* data, char* err, int errlen) {
  auto* h = static_cast<Handle*>(handle);
  try {
    std::vector<TensorPtr> keep;
    std::vector<EValue> inputs;
    keep.reserve(n);
    inputs.reserve(n);
    const int64_t* s = sizes;
    for (int i = 0; i < n; ++i) {
      std::vector<executorch::aten::SizesType> shape(s, s + ndims[i]);
      s += ndims[i];
      keep.push_back(from_blob(data[i], std::move(shape), static_cast<ScalarType>(dtypes[i])));
      inputs.emplace_back(keep.back());
    }
    h->outputs.clear();
    auto result = h->module->execute(std::string(method), inputs);
    if (!result.ok()) {
      set_error(err, errlen, "ExecuTorch method '" + std::string(method) + "' failed (error " +
                                 code(result.error()) + "); check the input shapes against the bundle manifest");
      return -1;
    }
    h->outputs = std::move(*result);
    return static_cast<int>(h->outputs.size());
  } catch (const std::exception& ex) {
    set_error(err, errlen, "ExecuTorch method '" + std::string(method) + "' failed: " + ex.what());
    return -1;
  }
}

// Describe output i of the last run. For a tensor: dtype, ndim, sizes (up to 16) and a pointer to
// its data (valid until the next run on this handle) with its byte size; for a scalar: the value.
int tae_output(void* handle, int i, int* tag, int* dtype, int* ndim, int64_t* sizes, const void** data,
               int64_t* nbytes, int64_t* ival, double* dval) {
  auto* h = static_cast<Handle*>(handle);
  if (i < 0 || i >= static_cast<int>(h->outputs.size())) return -1;
  const EValue& v = h->outputs[i];
  *tag = 5;
  if (v.isNone()) {
    *tag = 0;
  } else if (v.isTensor()) {
    const auto& t = v.toTensor();
    if (t.dim() > 16) return -1;
    *tag = 1;
    *dtype = static_cast<int>(t.scalar_type());
    *ndim = static_cast<int>(t.dim());
    for (int d = 0; d < t.dim(); ++d) sizes[d] = t.size(d);
    *data = t.const_data_ptr();
    *nbytes = static_cast<int64_t>(t.nbytes());
  } else if (v.isInt()) {
    *tag = 2;
    *ival = v.toInt();
  } else if (v.isDouble()) {
    *tag = 3;
    *dval = v.toDouble();
  } else if (v.isBool()) {
    *tag = 4;
    *ival = v.toBool() ? 1 : 0;
  }
  return 0;
}

}  // extern "C"
