// Runs a mixer-compile artifact from C++ with nothing but the TVM runtime: loads model.so
// and weights.params, classifies a batch of images and prints the top-5 classes with their
// logits.
//
//   mixer_infer ARTIFACT_DIR [IMAGE.bin] [--batch N]
//
// IMAGE.bin holds one or more images as raw float32 in NCHW order (3*H*W values each, already
// normalised the way the model expects). Without it a deterministic test image is used:
// x[i] = ((i * 7919) % 255) / 127.5 - 1 over the flattened C*H*W values. The batch is N, else
// the number of images in the file when it holds several, else the smallest batch the
// artifact serves; its slots are filled with the file's images in turn.
//
// Batch ranges: an artifact built with `--batch MIN-MAX` serves any batch in the range; its
// metadata's "batch" record lists the entry functions (one static batch each: main_b1,
// main_b2, ..., main_bMAX). A batch of N runs as N's decomposition over them, largest first
// (11 = 8+2+1), and the logits land in one output buffer. A batch outside the range is refused
// naming the range. An artifact without the record has one entry, main, at its input batch.
//
// Output: for each distinct input image, one line per class, best first: "<class index>
// <logit>" (logit with 9 significant digits, so that it round-trips float32); with several
// images each block starts with a line "# image I". On stderr: how the batch was split.
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
#include <filesystem>
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

// The batches an artifact serves and the entry function of each static batch.
struct Entries {
  int64_t min = 0, max = 0;
  std::vector<std::pair<int64_t, std::string>> entries;  // ascending batch

  // The entry batches that make up a batch of n, largest first.
  std::vector<size_t> Split(int64_t n) const {
    std::vector<size_t> pieces;
    for (size_t i = entries.size(); i-- > 0;) {
      while (entries[i].first <= n) {
        pieces.push_back(i);
        n -= entries[i].first;
      }
    }
    if (n != 0) throw std::runtime_error("the artifact's batch entries cannot make up this batch");
    return pieces;
  }
};

Entries ReadEntries(const ffi::json::Value& meta, int64_t input_batch) {
  Entries e;
  const ffi::json::Object object = meta.cast<ffi::json::Object>();
  auto it = object.find(ffi::String("batch"));
  if (it == object.end() || (*it).second == nullptr) {
    e.min = e.max = input_batch;
    e.entries.emplace_back(input_batch, "main");
    return e;
  }
  const ffi::json::Value& batch = (*it).second;
  e.min = Get(batch, "min").cast<int64_t>();
  e.max = Get(batch, "max").cast<int64_t>();
  std::vector<int64_t> sizes = Shape(Get(batch, "entries"));
  ffi::json::Array names = Get(batch, "functions").cast<ffi::json::Array>();
  if (names.size() != sizes.size()) throw std::runtime_error("metadata.json: batch.entries and batch.functions differ");
  for (size_t i = 0; i < sizes.size(); ++i) e.entries.emplace_back(sizes[i], std::string(names[i].cast<ffi::String>()));
  return e;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> positional;
  int64_t batch = 0;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--batch" && i + 1 < argc) {
      char* end = nullptr;
      batch = std::strtoll(argv[++i], &end, 10);
      if (*end != '\0' || batch < 1) {
        std::fprintf(stderr, "error: --batch takes a positive integer, got '%s'\n", argv[i]);
        return 2;
      }
    } else {
      positional.push_back(a);
    }
  }
  if (positional.empty() || positional.size() > 2) {
    std::fprintf(stderr, "usage: %s ARTIFACT_DIR [IMAGE.bin] [--batch N]\n", argv[0]);
    return 2;
  }
  const std::string dir = positional[0];
  setenv("TVM_NUM_THREADS", std::to_string(std::thread::hardware_concurrency()).c_str(), /*overwrite=*/0);
  try {
    if (!std::filesystem::is_directory(dir))
      throw std::runtime_error("'" + dir + "' is not a directory; give the artifact directory mixer-compile wrote (-o)");
    if (!std::filesystem::is_regular_file(dir + "/metadata.json"))
      throw std::runtime_error("'" + dir + "' holds no metadata.json, so it is no mixer-compile artifact; give the "
                               "directory a compile wrote (-o)");
    ffi::String error;
    ffi::json::Value meta = ffi::json::Parse(ReadFile(dir + "/metadata.json"), &error);
    if (!error.empty()) throw std::runtime_error("metadata.json: " + std::string(error));
    if (Get(Get(meta, "target"), "kind").cast<ffi::String>() == "cuda")
      throw std::runtime_error("this example runs CPU artifacts only");
    const std::vector<int64_t> in_shape = Shape(Get(Get(meta, "input"), "shape"));
    const int64_t per_image = std::accumulate(in_shape.begin() + 1, in_shape.end(), int64_t{1},
                                              std::multiplies<int64_t>());
    const Entries entries = ReadEntries(meta, in_shape[0]);

    // The images: the file's (one or more), or the generated one.
    std::vector<float> images;
    if (positional.size() == 2) {
      std::string raw = ReadFile(positional[1]);
      const size_t one = static_cast<size_t>(per_image) * sizeof(float);
      if (raw.empty() || raw.size() % one != 0)
        throw std::runtime_error(positional[1] + " holds " + std::to_string(raw.size()) + " bytes; expected " +
                                 std::to_string(one) + " (one float32 NCHW image) or a multiple of it");
      images.resize(raw.size() / sizeof(float));
      std::copy(raw.begin(), raw.end(), reinterpret_cast<char*>(images.data()));
    } else {
      images.resize(static_cast<size_t>(per_image));
      for (size_t i = 0; i < images.size(); ++i) images[i] = ((i * 7919) % 255) / 127.5f - 1.0f;
    }
    const int64_t distinct = static_cast<int64_t>(images.size()) / per_image;
    if (batch == 0) batch = distinct > 1 ? distinct : entries.min;
    if (batch < entries.min || batch > entries.max) {
      const std::string range = entries.min == entries.max ? "batch " + std::to_string(entries.max)
                                                           : "batches " + std::to_string(entries.min) + "-" +
                                                                 std::to_string(entries.max);
      throw std::runtime_error("batch " + std::to_string(batch) + " is outside what this artifact serves (" + range +
                               ")");
    }

    // The library holds the Relax VM executable; the VM is created over it on the CPU.
    ffi::Module lib = ffi::Module::LoadFromFile(dir + "/model.so");
    ffi::Module vm = lib->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
    vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, kPooledAllocator);

    // The weights, in the order the entry functions take them after the image.
    std::vector<ffi::Tensor> weights;
    if (Get(meta, "files").cast<ffi::json::Object>().count(ffi::String("weights.params"))) {
      auto load_params = ffi::Function::GetGlobalRequired("runtime.LoadParamsFromFile");
      auto params = load_params(ffi::String(dir + "/weights.params")).cast<ffi::Map<ffi::String, ffi::Tensor>>();
      for (const ffi::Any& name : Get(meta, "params").cast<ffi::json::Array>())
        weights.push_back(params.at(name.cast<ffi::String>()));
    }

    // The batch, split over the entries; each piece's logits are copied into one buffer.
    DLDevice cpu{kDLCPU, 0};
    std::vector<float> logits;
    int64_t classes = 0, at = 0;
    std::string split;
    for (size_t piece : entries.Split(batch)) {
      const auto& [size, function] = entries.entries[piece];
      std::vector<int64_t> shape = in_shape;
      shape[0] = size;
      ffi::Tensor image = ffi::Tensor::FromNDAlloc(AlignedCPUAlloc(), ffi::ShapeView(shape.data(), shape.size()),
                                                   DLDataType{kDLFloat, 32, 1}, cpu);
      float* data = static_cast<float*>(image.data_ptr());
      for (int64_t b = 0; b < size; ++b) {
        const float* source = images.data() + ((at + b) % distinct) * per_image;
        std::copy(source, source + per_image, data + b * per_image);
      }
      std::vector<ffi::AnyView> packed;
      packed.emplace_back(image);
      for (const ffi::Tensor& w : weights) packed.emplace_back(w);
      ffi::Any result;
      vm->GetFunction(ffi::String(function)).value().CallPacked(packed.data(), static_cast<int32_t>(packed.size()),
                                                                &result);
      ffi::Tensor out = result.cast<ffi::Tensor>();
      classes = out.shape()[out.ndim() - 1];
      logits.resize(static_cast<size_t>(batch * classes));
      const float* first = static_cast<const float*>(out.data_ptr());
      std::copy(first, first + size * classes, logits.begin() + at * classes);
      split += (split.empty() ? "" : "+") + std::to_string(size);
      at += size;
    }
    std::fprintf(stderr, "batch %lld = %s\n", static_cast<long long>(batch), split.c_str());

    const int64_t shown = std::min(distinct, batch);
    for (int64_t img = 0; img < shown; ++img) {
      if (shown > 1) std::printf("%s# image %lld\n", img ? "\n" : "", static_cast<long long>(img));
      const float* row = logits.data() + img * classes;
      std::vector<int64_t> order(static_cast<size_t>(classes));
      std::iota(order.begin(), order.end(), 0);
      const size_t k = std::min<size_t>(5, order.size());
      std::partial_sort(order.begin(), order.begin() + k, order.end(),
                        [&](int64_t a, int64_t b) { return row[a] > row[b]; });
      for (size_t i = 0; i < k; ++i) std::printf("%lld %.9g\n", static_cast<long long>(order[i]), row[order[i]]);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
