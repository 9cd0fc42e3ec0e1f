// The input and output transforms of a 3x3, stride-1, padding-1 convolution computed by Winograd's
// minimal filtering algorithm F(4x4, 3x3) (Lavin and Gray, "Fast Algorithms for Convolutional
// Neural Networks", 2016), on channels-last fp32 maps.
//
// The image is cut into 4x4 output tiles; each reads a 6x6 input patch (the tile and a one-pixel
// border; outside the image, zeros: the convolution's padding). For every patch d,
//   input transform   V = B^T d B                          [6, 6] per channel
//   products          M[k] = V[k] @ U[k], k = 0..35         U = G w G^T, the transformed weights
//   output transform  Y = A^T M A + bias                    [4, 4] per output channel
// The 36 matrix products (one per position k of the 6x6 transform) are torch.bmm's, in Python;
// this file holds the two transforms, which are additions and small constant multiples, done
// over a block of channels at a time so that the compiler vectorises them.
//
// Layouts: input [N, H, W, C]; V [36, P, C] with P = N * tiles_h * tiles_w, tile p = (n, ty, tx)
// in that order; M [36, P, C_out]; output [N, H, W, C_out].

#include "kernels.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>

namespace {

constexpr int64_t kTile = 4;    // output pixels per tile side
constexpr int64_t kPatch = 6;   // input pixels per patch side: kTile + 3 - 1
constexpr int64_t kBlock = 16;  // channels transformed together

// r = B^T d along one axis of the patch, for `count` channels; d[i] and r[i] point at the
// channels of the patch's i-th row (or column).
inline void input_rows(const float* const d[kPatch], float* const r[kPatch], int64_t count) {
  for (int64_t c = 0; c < count; ++c) {
    const float d0 = d[0][c], d1 = d[1][c], d2 = d[2][c], d3 = d[3][c], d4 = d[4][c],
                d5 = d[5][c];
    r[0][c] = 4.f * d0 - 5.f * d2 + d4;
    r[1][c] = -4.f * (d1 + d2) + d3 + d4;
    r[2][c] = 4.f * (d1 - d2) - d3 + d4;
    r[3][c] = 2.f * (d3 - d1) - d2 + d4;
    r[4][c] = 2.f * (d1 - d3) - d2 + d4;
    r[5][c] = 4.f * d1 - 5.f * d3 + d5;
  }
}

// r = A^T m along one axis of a transformed tile, for `count` channels.
inline void output_rows(const float* const m[kPatch], float* const r[kTile], int64_t count) {
  for (int64_t c = 0; c < count; ++c) {
    const float m1_plus_m2 = m[1][c] + m[2][c], m1_minus_m2 = m[1][c] - m[2][c];
    const float m3_plus_m4 = m[3][c] + m[4][c], m3_minus_m4 = m[3][c] - m[4][c];
    r[0][c] = m[0][c] + m1_plus_m2 + m3_plus_m4;
    r[1][c] = m1_minus_m2 + 2.f * m3_minus_m4;
    r[2][c] = m1_plus_m2 + 4.f * m3_plus_m4;
    r[3][c] = m1_minus_m2 + 8.f * m3_minus_m4 + m[5][c];
  }
}

void check_float_cpu(const at::Tensor& tensor, const char* name) {
  TORCH_CHECK(tensor.device().is_cpu() && tensor.scalar_type() == at::kFloat,
              "winograd: ", name, " must be a float32 CPU tensor, got ", tensor.scalar_type(),
              " on ", tensor.device());
}

}  // namespace

namespace detrkit {

at::Tensor winograd_input_transform(const at::Tensor& input) {
  check_float_cpu(input, "input");
  TORCH_CHECK(input.dim() == 4 && input.is_contiguous(),
              "winograd: input must be a contiguous [N, H, W, C] map, got shape ",
              input.sizes());
  const int64_t batch = input.size(0), height = input.size(1), width = input.size(2),
                channels = input.size(3);
  const int64_t tiles_h = (height + kTile - 1) / kTile, tiles_w = (width + kTile - 1) / kTile;
  const int64_t tiles = batch * tiles_h * tiles_w;
  at::Tensor transformed = at::empty({kPatch * kPatch, tiles, channels}, input.options());
  const float* source = input.data_ptr<float>();
  float* target = transformed.data_ptr<float>();
  const int64_t plane = tiles * channels;  // elements of one of the 36 [P, C] matrices

  at::parallel_for(0, tiles, /*grain_size=*/8, [&](int64_t begin, int64_t end) {
    alignas(64) float zeros[kBlock] = {};
    alignas(64) float rows[kPatch][kPatch][kBlock];  // B^T d: [transformed row][column][channel]
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n = p / (tiles_h * tiles_w), ty = p / tiles_w % tiles_h, tx = p % tiles_w;
      for (int64_t c0 = 0; c0 < channels; c0 += kBlock) {
        const int64_t count = std::min(kBlock, channels - c0);
        // Rows first: for each column j of the patch, transform its six pixels.
        for (int64_t j = 0; j < kPatch; ++j) {
          const int64_t x = tx * kTile - 1 + j;
          const float* column[kPatch];
          float* out[kPatch];
          for (int64_t i = 0; i < kPatch; ++i) {
            const int64_t y = ty * kTile - 1 + i;
            const bool inside = y >= 0 && y < height && x >= 0 && x < width;
            column[i] = inside ? source + ((n * height + y) * width + x) * channels + c0 : zeros;
            out[i] = rows[i][j];
          }
          input_rows(column, out, count);
        }
        // Then along each transformed row, straight into the 36 planes.
        for (int64_t a = 0; a < kPatch; ++a) {
          const float* row[kPatch];
          float* out[kPatch];
          for (int64_t b = 0; b < kPatch; ++b) {
            row[b] = rows[a][b];
            out[b] = target + (a * kPatch + b) * plane + p * channels + c0;
          }
          input_rows(row, out, count);
        }
      }
    }
  });
  return transformed;
}

at::Tensor winograd_output_transform(const at::Tensor& products, const at::Tensor& bias,
                                     int64_t batch, int64_t height, int64_t width) {
  check_float_cpu(products, "products");
  const int64_t tiles_h = (height + kTile - 1) / kTile, tiles_w = (width + kTile - 1) / kTile;
  const int64_t tiles = batch * tiles_h * tiles_w;
  TORCH_CHECK(products.dim() == 3 && products.size(0) == kPatch * kPatch &&
                  products.size(1) == tiles && products.is_contiguous(),
              "winograd: products must be a contiguous [36, ", tiles, ", C_out] tensor, got ",
              products.sizes());
  const int64_t channels = products.size(2);
  check_float_cpu(bias, "bias");
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == channels && bias.is_contiguous(),
              "winograd: bias must be [", channels, "], got ", bias.sizes());
  at::Tensor output = at::empty({batch, height, width, channels}, products.options());
  const float* source = products.data_ptr<float>();
  const float* bias_data = bias.data_ptr<float>();
  float* target = output.data_ptr<float>();
  const int64_t plane = tiles * channels;

  at::parallel_for(0, tiles, /*grain_size=*/8, [&](int64_t begin, int64_t end) {
    alignas(64) float rows[kTile][kPatch][kBlock];  // A^T m: [output row][column][channel]
    alignas(64) float pixels[kTile][kTile][kBlock];
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n = p / (tiles_h * tiles_w), ty = p / tiles_w % tiles_h, tx = p % tiles_w;
      for (int64_t c0 = 0; c0 < channels; c0 += kBlock) {
        const int64_t count = std::min(kBlock, channels - c0);
        for (int64_t b = 0; b < kPatch; ++b) {
          const float* column[kPatch];
          float* out[kTile];
          for (int64_t a = 0; a < kPatch; ++a) {
            column[a] = source + (a * kPatch + b) * plane + p * channels + c0;
          }
          for (int64_t i = 0; i < kTile; ++i) out[i] = rows[i][b];
          output_rows(column, out, count);
        }
        for (int64_t i = 0; i < kTile; ++i) {
          const float* row[kPatch];
          float* out[kTile];
          for (int64_t b = 0; b < kPatch; ++b) row[b] = rows[i][b];
          for (int64_t j = 0; j < kTile; ++j) out[j] = pixels[i][j];
          output_rows(row, out, count);
        }
        // Add the bias and write the pixels that fall inside the image.
        for (int64_t i = 0; i < kTile; ++i) {
          const int64_t y = ty * kTile + i;
          if (y >= height) break;
          for (int64_t j = 0; j < kTile; ++j) {
            const int64_t x = tx * kTile + j;
            if (x >= width) break;
            float* pixel = target + ((n * height + y) * width + x) * channels + c0;
            for (int64_t c = 0; c < count; ++c) pixel[c] = pixels[i][j][c] + bias_data[c0 + c];
          }
        }
      }
    }
  });
  return output;
}

}  // namespace detrkit
