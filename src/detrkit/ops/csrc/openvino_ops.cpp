// detrkit's operators for OpenVINO, as an extension library that Core.add_extension(path) loads:
// with it, OpenVINO's ONNX front end reads ai.detrkit::MultiScaleDeformableAttention nodes (the
// export's attention_op="detrkit") as an operation of its own, which OpenVINO's CPU plugin runs
// by calling evaluate().
//
// evaluate() runs the forward computation of ms_deform_attn_sampling.h, as the PyTorch kernel
// and the ONNX Runtime operator do, split over TBB's threads: inside a compiled model that is
// the inference stream's own arena, so it uses the threads the model was compiled with.
//
// Built against the headers and library that OpenVINO's wheel ships (include/, libs/).

#include <openvino/core/extension.hpp>
#include <openvino/core/op_extension.hpp>
#include <openvino/frontend/onnx/extension/op.hpp>
#include <openvino/op/op.hpp>
#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>

#include "ms_deform_attn_sampling.h"

#include <string>
#include <vector>

namespace {

using detrkit::deform::Sizes;

// Queries per task, as in the ONNX Runtime operator.
constexpr int64_t kQueriesPerTask = 16;

class MultiScaleDeformableAttention : public ov::op::Op {
 public:
  OPENVINO_OP("MultiScaleDeformableAttention", "detrkit");

  MultiScaleDeformableAttention() = default;
  explicit MultiScaleDeformableAttention(const ov::OutputVector& inputs) : Op(inputs) {
    constructor_validate_and_infer_types();
  }

  // [N, S, M, D] value and [N, Lq, M, L, P, 2] locations -> [N, Lq, M * D], with whatever of
  // those sizes are known when the model is read (N and Lq are dynamic in an export).
  void validate_and_infer_types() override {
    NODE_VALIDATION_CHECK(this, get_input_size() == 5, "takes 5 inputs, got ", get_input_size());
    const ov::PartialShape& value = get_input_partial_shape(0);
    const ov::PartialShape& locations = get_input_partial_shape(3);
    ov::PartialShape output = ov::PartialShape::dynamic(3);
    if (value.rank().is_static() && locations.rank().is_static()) {
      NODE_VALIDATION_CHECK(this, value.size() == 4, "value must be [N, S, M, D]");
      NODE_VALIDATION_CHECK(this, locations.size() == 6,
                            "sampling_locations must be [N, Lq, M, L, P, 2]");
      output = ov::PartialShape{locations[0], locations[1], value[2] * value[3]};
    }
    set_output_type(0, get_input_element_type(0), output);
  }

  std::shared_ptr<ov::Node> clone_with_new_inputs(const ov::OutputVector& inputs) const override {
    return std::make_shared<MultiScaleDeformableAttention>(inputs);
  }

  bool visit_attributes(ov::AttributeVisitor&) override { return true; }

  // The CPU plugin runs int64 tensors as int32 unless told otherwise: both are taken.
  bool has_evaluate() const override {
    const auto is_index = [](const ov::element::Type& type) {
      return type == ov::element::i64 || type == ov::element::i32;
    };
    return get_input_element_type(0) == ov::element::f32 &&
           get_input_element_type(3) == ov::element::f32 &&
           get_input_element_type(4) == ov::element::f32 &&
           is_index(get_input_element_type(1)) && is_index(get_input_element_type(2));
  }

  bool evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const override {
    // The level sizes and starts as int64, whatever the plugin made of them (a few values).
    const std::vector<int64_t> shapes = as_int64(inputs[1]);
    const std::vector<int64_t> starts = as_int64(inputs[2]);
    const Sizes s = check_sizes(inputs, shapes.data(), starts.data());
    outputs[0].set_shape({static_cast<size_t>(s.N), static_cast<size_t>(s.Lq),
                          static_cast<size_t>(s.M * s.D)});  // [N, Lq, M * D]
    const float* value = inputs[0].data<const float>();
    const int64_t* spatial_shapes = shapes.data();
    const int64_t* level_start_index = starts.data();
    const float* sampling_locations = inputs[3].data<const float>();
    const float* attention_weights = inputs[4].data<const float>();
    float* output = outputs[0].data<float>();
    const int64_t rows = s.N * s.Lq;
    if (rows == 0 || s.M * s.D == 0) return true;
    const int64_t tasks = (rows + kQueriesPerTask - 1) / kQueriesPerTask;
    tbb::parallel_for(tbb::blocked_range<int64_t>(0, tasks), [&](const auto& range) {
      const int64_t begin = range.begin() * kQueriesPerTask;
      const int64_t end = std::min(rows, range.end() * kQueriesPerTask);
      detrkit::deform::forward_queries<float, float, float>(s, value, spatial_shapes,
                                                            level_start_index, sampling_locations,
                                                            attention_weights, output, begin, end);
    });
    return true;
  }

 private:
  static std::vector<int64_t> as_int64(const ov::Tensor& tensor) {
    if (tensor.get_element_type() == ov::element::i64) {
      const int64_t* data = tensor.data<const int64_t>();
      return std::vector<int64_t>(data, data + tensor.get_size());
    }
    const int32_t* data = tensor.data<const int32_t>();
    return std::vector<int64_t>(data, data + tensor.get_size());
  }

  // The sizes, checked as the other front ends check them (check_inputs).
  Sizes check_sizes(const ov::TensorVector& inputs, const int64_t* hw,
                    const int64_t* start) const {
    std::vector<int64_t> dims[5];
    for (int i = 0; i < 5; ++i) {
      const ov::Shape& shape = inputs[i].get_shape();
      dims[i].assign(shape.begin(), shape.end());
    }
    Sizes s{};
    const char* problem =
        detrkit::deform::check_inputs(dims[0], dims[1], dims[2], dims[3], dims[4], hw, start, s);
    NODE_VALIDATION_CHECK(this, problem == nullptr, problem == nullptr ? "" : problem);
    return s;
  }
};

}  // namespace

// The operation itself, and its reading from ONNX nodes of detrkit's domain.
OPENVINO_CREATE_EXTENSIONS(std::vector<ov::Extension::Ptr>(
    {std::make_shared<ov::OpExtension<MultiScaleDeformableAttention>>(),
     std::make_shared<ov::frontend::onnx::OpExtension<MultiScaleDeformableAttention>>(
         "MultiScaleDeformableAttention", "ai.detrkit")}));
