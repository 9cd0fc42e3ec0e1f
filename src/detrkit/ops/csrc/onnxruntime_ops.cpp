// detrkit's operators for ONNX Runtime, as a custom-op library that a session loads with
// SessionOptions.register_custom_ops_library(path).
//
// ai.detrkit::MultiScaleDeformableAttention (version 1): the inputs and output of
// ms_deform_attn_sampling.h, float32 (value, sampling_locations, attention_weights, output) and
// int64 (spatial_shapes, level_start_index). It runs the same forward computation as detrkit's
// PyTorch kernel, split over ONNX Runtime's own intra-op threads, so the sampled values are never
// written out as the GridSample form of the export writes them.
//
// Built against ONNX Runtime's C API headers (1.17 or later, for KernelContext_ParallelFor) and
// linked against nothing of ONNX Runtime's: the API is the table the session hands over.

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#include <onnxruntime_lite_custom_op.h>
#undef ORT_API_MANUAL_INIT

#include "ms_deform_attn_sampling.h"

#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace {

using detrkit::deform::Sizes;

// Queries per parallel task: enough to amortise a task's setup, few enough to balance threads.
constexpr int64_t kQueriesPerTask = 16;

Ort::Status invalid(const std::string& message) {
  return Ort::Status(("MultiScaleDeformableAttention: " + message).c_str(), ORT_INVALID_ARGUMENT);
}

struct Task {
  Sizes sizes;
  const float* value;
  const int64_t* spatial_shapes;
  const int64_t* level_start_index;
  const float* sampling_locations;
  const float* attention_weights;
  float* output;
};

void run_task(void* data, size_t index) {
  const Task& task = *static_cast<const Task*>(data);
  const int64_t rows = task.sizes.N * task.sizes.Lq;
  const int64_t begin = static_cast<int64_t>(index) * kQueriesPerTask;
  const int64_t end = std::min(rows, begin + kQueriesPerTask);
  detrkit::deform::forward_queries<float, float, float>(
      task.sizes, task.value, task.spatial_shapes, task.level_start_index,
      task.sampling_locations, task.attention_weights, task.output, begin, end);
}

Ort::Status multi_scale_deformable_attention(
    OrtKernelContext* context, const Ort::Custom::Tensor<float>& value,
    const Ort::Custom::Tensor<int64_t>& spatial_shapes,
    const Ort::Custom::Tensor<int64_t>& level_start_index,
    const Ort::Custom::Tensor<float>& sampling_locations,
    const Ort::Custom::Tensor<float>& attention_weights, Ort::Custom::Tensor<float>& output) {
  Sizes s{};
  const char* problem = detrkit::deform::check_inputs(
      value.Shape(), spatial_shapes.Shape(), level_start_index.Shape(), sampling_locations.Shape(),
      attention_weights.Shape(), spatial_shapes.Data(), level_start_index.Data(), s);
  if (problem != nullptr) return invalid(problem);
  float* out = output.Allocate({s.N, s.Lq, s.M * s.D});  // [N, Lq, M * D]
  const int64_t rows = s.N * s.Lq;
  if (rows == 0 || s.M * s.D == 0) return Ort::Status{nullptr};
  Task task{s,
            value.Data(),
            spatial_shapes.Data(),
            level_start_index.Data(),
            sampling_locations.Data(),
            attention_weights.Data(),
            out};
  const size_t tasks = static_cast<size_t>((rows + kQueriesPerTask - 1) / kQueriesPerTask);
  Ort::KernelContext(context).ParallelFor(run_task, tasks, 0, &task);
  return Ort::Status{nullptr};
}

}  // namespace

// The library's one exported symbol (it is built with -fvisibility=hidden), the entry point that
// register_custom_ops_library calls.
extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  // One domain and operator for the process: each session that loads the library adds the same
  // domain, which must outlive the sessions.
  static std::once_flag once;
  static std::unique_ptr<Ort::CustomOpDomain> domain;
  static std::unique_ptr<Ort::Custom::OrtLiteCustomOp> op;
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    // A runtime older than the headers: every runtime has version 1 of the API to say so with.
    const std::string message = "detrkit's ONNX Runtime operators were built against version " +
                                std::to_string(ORT_API_VERSION) +
                                " of ONNX Runtime's API, newer than this runtime's";
    return api_base->GetApi(1)->CreateStatus(ORT_FAIL, message.c_str());
  }
  Ort::InitApi(api);
  try {
    std::call_once(once, [] {
      domain = std::make_unique<Ort::CustomOpDomain>("ai.detrkit");
      op.reset(Ort::Custom::CreateLiteCustomOp("MultiScaleDeformableAttention",
                                               "CPUExecutionProvider",
                                               multi_scale_deformable_attention));
      domain->Add(op.get());
    });
    Ort::UnownedSessionOptions(options).Add(*domain);
  } catch (const Ort::Exception& error) {
    return Ort::Status(error).release();
  } catch (const std::exception& error) {
    return Ort::Status(error.what(), ORT_FAIL).release();
  }
  return nullptr;
}
