// Runs a mixer-compile artifact from C++ with nothing but the TVM runtime: loads model.so
// and weights.params, classifies one image and prints the top-5 classes with their logits.
//
//   mixer_infer ARTIFACT_DIR [IMAGE.bin]
//
// IMAGE.bin holds one image as raw float32 in NCHW order without the batch axis (3*H*W
// values, already normalised the way the model expects). Without it a deterministic test
// image is used: x[i] = ((i * 7919) % 255) / 127.5 - 1 over the flattened C*H*W values.
// When the module was built for a batch larger than 1, every slot gets the same image.
//
// Output: one line per class, best first: "<class index> <logit>" (logit with 9 significant
// digits, so that it round-trips float32).
//
// This only covers CPU artifacts; the Python runtime's checks of the metadata (TVM version,
// CPU features, hashes) are not repeated here.
//
// Threads: unless TVM_NUM_THREADS is set, TVM's runtime uses half the CPUs on x86 (it assumes
// two hyper-threads per core), which on a machine without SMT halves the speed. This sets it
// to every CPU the machine reports, before the thread pool starts; set it yourself to the
// physical core count on an SMT machine.
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <numeric>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

constexpr size_t kAlignment = 64;  // TVM's kernels assume 64-byte aligned tensors
constexpr int kPooledAllocator = 2;

struct AlignedCPUAlloc {
  void AllocData(DLTensor* t) {
    size_t bytes = (t->dtype.bits / 8) * t->dtype.lanes;
    for (int i = 0; i < t->ndim; ++i) bytes *= static_cast<size_t>(t->shape[i]);
    t->data = std::aligned_alloc(kAlignment, (bytes + kAlignment - 1) / kAlignment * kAlignment);
    if (t->data == nullptr) throw std::bad_alloc();
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

ffi::json::Value Get(const ffi::json::Value& object, const char* key) {
  return object.cast<ffi::json::Object>().at(ffi::String(key));
}

std::vector<int64_t> Shape(const ffi::json::Value& list) {
  std::vector<int64_t> out;
  for (const ffi::Any& v : list.cast<ffi::json::Array>()) out.push_back(v.cast<int64_t>());
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || argc > 3) {
    std::fprintf(stderr, "usage: %s ARTIFACT_DIR [IMAGE.bin]\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  setenv("TVM_NUM_THREADS", std::to_string(std::thread::hardware_concurrency()).c_str(), /*overwrite=*/0);
  try {
    ffi::String error;
    ffi::json::Value meta = ffi::json::Parse(ReadFile(dir + "/metadata.json"), &error);
    if (!error.empty()) throw std::runtime_error("metadata.json: " + std::string(error));
    if (Get(Get(meta, "target"), "kind").cast<ffi::String>() == "cuda")
      throw std::runtime_error("this example runs CPU artifacts only");
    const std::vector<int64_t> in_shape = Shape(Get(Get(meta, "input"), "shape"));
    const int64_t per_image = std::accumulate(in_shape.begin() + 1, in_shape.end(), int64_t{1},
                                              std::multiplies<int64_t>());

    // The library holds the Relax VM executable; the VM is created over it on the CPU.
    ffi::Module lib = ffi::Module::LoadFromFile(dir + "/model.so");
    ffi::Module vm = lib->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
    vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, kPooledAllocator);
    ffi::Function main_fn = vm->GetFunction("main").value();

    // The weights, in the order main() takes them after the image.
    std::vector<ffi::Tensor> args;
    DLDevice cpu{kDLCPU, 0};
    ffi::Tensor image = ffi::Tensor::FromNDAlloc(AlignedCPUAlloc(), ffi::ShapeView(in_shape.data(), in_shape.size()),
                                                 DLDataType{kDLFloat, 32, 1}, cpu);
    std::vector<float> one(static_cast<size_t>(per_image));
    if (argc == 3) {
      std::string raw = ReadFile(argv[2]);
      if (raw.size() != one.size() * sizeof(float))
        throw std::runtime_error(std::string(argv[2]) + " holds " + std::to_string(raw.size()) +
                                 " bytes; expected " + std::to_string(one.size() * sizeof(float)) +
                                 " (one float32 NCHW image)");
      std::copy(raw.begin(), raw.end(), reinterpret_cast<char*>(one.data()));
    } else {
      for (size_t i = 0; i < one.size(); ++i) one[i] = ((i * 7919) % 255) / 127.5f - 1.0f;
    }
    float* data = static_cast<float*>(image.data_ptr());
    for (int64_t b = 0; b < in_shape[0]; ++b) std::copy(one.begin(), one.end(), data + b * per_image);
    args.push_back(image);

    if (Get(meta, "files").cast<ffi::json::Object>().count(ffi::String("weights.params"))) {
      auto load_params = ffi::Function::GetGlobalRequired("runtime.LoadParamsFromFile");
      auto params = load_params(ffi::String(dir + "/weights.params")).cast<ffi::Map<ffi::String, ffi::Tensor>>();
      for (const ffi::Any& name : Get(meta, "params").cast<ffi::json::Array>())
        args.push_back(params.at(name.cast<ffi::String>()));
    }

    std::vector<ffi::AnyView> packed(args.begin(), args.end());
    ffi::Any result;
    main_fn.CallPacked(packed.data(), static_cast<int32_t>(packed.size()), &result);
    ffi::Tensor logits = result.cast<ffi::Tensor>();

    const int64_t classes = logits.shape()[logits.ndim() - 1];
    const float* first = static_cast<const float*>(logits.data_ptr());
    std::vector<int64_t> order(static_cast<size_t>(classes));
    std::iota(order.begin(), order.end(), 0);
    const size_t k = std::min<size_t>(5, order.size());
    std::partial_sort(order.begin(), order.begin() + k, order.end(),
                      [&](int64_t a, int64_t b) { return first[a] > first[b]; });
    for (size_t i = 0; i < k; ++i) std::printf("%lld %.9g\n", static_cast<long long>(order[i]), first[order[i]]);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
