// Fused NHWC GroupNorm (+ optional ReLU) for TensorFlow on CPU: forward and backward.
//
// Why: TensorFlow composes GroupNorm from separate reductions and elementwise ops, each streaming the
// whole batch through memory (about 11 passes with the ReLU). These kernels work one sample at a time
// (its activations fit in cache) with 3 passes forward (channel sums, squared deviations from the group
// mean, apply scale + shift + ReLU) and 3 backward (two channel sums, then dx), accumulating in double; bfloat16 in and out, float32
// arithmetic. Numerics are the two-pass group statistics of keras_bit.layers.GroupNormalization.
// Built at first use by keras_bit/kernels/__init__.py; the keras.ops implementation is the fallback.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"

namespace {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::int64;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

// Storage types: float, or bfloat16 held as its 16 raw bits.
inline float load(const float* p, int64 i) { return p[i]; }
inline float load(const uint16_t* p, int64 i) {
  uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline void store(float* p, int64 i, float v) { p[i] = v; }
inline void store(uint16_t* p, int64 i, float v) {
  // Round to nearest even, as TensorFlow's float -> bfloat16 cast; NaN stays NaN.
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  uint32_t nan = (bits >> 16) | 0x40u;
  p[i] = static_cast<uint16_t>(v != v ? nan : rounded);
}

constexpr int64 kRowsPerFlush = 64;  // float partial sums over <= 64 rows, then added in double

// Sums over rows of f(row, c) per channel, added into out[c] (double).
template <typename F>
void channel_sums(int64 rows, int64 channels, double* out, F f) {
  std::vector<float> acc(channels);
  for (int64 r0 = 0; r0 < rows; r0 += kRowsPerFlush) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    const int64 r1 = std::min(rows, r0 + kRowsPerFlush);
    for (int64 r = r0; r < r1; ++r) {
      for (int64 c = 0; c < channels; ++c) acc[c] += f(r, c);
    }
    for (int64 c = 0; c < channels; ++c) out[c] += acc[c];
  }
}

// Each sample's rows are cut into chunks of kChunkRows; per-chunk partial sums are combined in a fixed order,
// so results do not depend on the batch size or the thread count. The work units are whole samples when there
// are at least as many samples as threads (all passes while a sample is in cache), else (sample, chunk) pairs.
constexpr int64 kChunkRows = 256;

struct Plan {
  int64 samples, rows, channels, groups, chunks;
  bool per_sample;
  int64 begin(int64 chunk) const { return std::min(rows, chunk * kChunkRows); }
  int64 end(int64 chunk) const { return std::min(rows, (chunk + 1) * kChunkRows); }
};

Plan make_plan(OpKernelContext* ctx, const Tensor& x, int64 groups) {
  const int threads = ctx->device()->tensorflow_cpu_worker_threads()->num_threads;
  const int64 rows = x.dim_size(1) * x.dim_size(2);
  return Plan{x.dim_size(0), rows, x.dim_size(3), groups, std::max<int64>(1, (rows + kChunkRows - 1) / kChunkRows),
              x.dim_size(0) >= threads};
}

// Runs f(unit) for units 0..units-1 on TensorFlow's CPU worker threads.
template <typename F>
void shard(OpKernelContext* ctx, int64 units, int64 cost_per_unit, F f) {
  auto* workers = ctx->device()->tensorflow_cpu_worker_threads();
  ::tensorflow::Shard(workers->num_threads, workers->workers, units, cost_per_unit, [&](int64 first, int64 last) {
    for (int64 unit = first; unit < last; ++unit) f(unit);
  });
}

// Runs f(sample, chunk) for every chunk: one unit per sample (its chunks in order) or one per (sample, chunk).
template <typename F>
void run_units(OpKernelContext* ctx, const Plan& plan, F f) {
  if (plan.per_sample) {
    shard(ctx, plan.samples, plan.rows * plan.channels * 8, [&](int64 n) {
      for (int64 s = 0; s < plan.chunks; ++s) f(n, s);
    });
  } else {
    shard(ctx, plan.samples * plan.chunks, kChunkRows * plan.channels * 8,
          [&](int64 unit) { f(unit / plan.chunks, unit % plan.chunks); });
  }
}

// One sample's per-channel y = x * scale + shift (the forward pass, and the gradient's ReLU mask: one function,
// so that both compute the same bits).
void sample_affine(const float* mean, const float* rstd, const float* gamma, const float* beta, int64 n,
                   int64 groups, int64 channels, float* scale, float* shift) {
  const int64 per_group = channels / groups;
  for (int64 c = 0; c < channels; ++c) {
    const int64 k = n * groups + c / per_group;
    scale[c] = rstd[k] * gamma[c];
    shift[c] = beta[c] - mean[k] * scale[c];
  }
}

// Per (sample, chunk) partial sums [samples, chunks, channels] -> the total of sample n's group k, chunks then
// channels in order, each channel's partial times weight[c] (or 1).
double group_total(const Plan& plan, const std::vector<double>& partial, int64 n, int64 k,
                   const float* weight = nullptr) {
  const int64 per_group = plan.channels / plan.groups;
  double total = 0.0;
  for (int64 s = 0; s < plan.chunks; ++s)
    for (int64 c = k * per_group; c < (k + 1) * per_group; ++c)
      total += partial[(n * plan.chunks + s) * plan.channels + c] * (weight ? weight[c] : 1.0f);
  return total;
}

// The totals of every sample and group, [samples, groups].
std::vector<double> group_totals(const Plan& plan, const std::vector<double>& partial, const float* weight) {
  std::vector<double> totals(plan.samples * plan.groups);
  for (int64 n = 0; n < plan.samples; ++n)
    for (int64 k = 0; k < plan.groups; ++k) totals[n * plan.groups + k] = group_total(plan, partial, n, k, weight);
  return totals;
}

// Per-sample float values [samples, channels] summed pairwise (halves first): the sum over a batch equals the
// float sum of its two halves' sums, as when data-parallel replicas all-reduce their gradients, and the error
// grows with log(samples), not samples.
void pairwise_sum(const std::vector<float>& values, int64 channels, int64 lo, int64 hi, float* out) {
  if (hi - lo < 1) {
    std::fill(out, out + channels, 0.0f);
    return;
  }
  if (hi - lo == 1) {
    std::copy(values.begin() + lo * channels, values.begin() + hi * channels, out);
    return;
  }
  const int64 mid = lo + (hi - lo) / 2;
  std::vector<float> right(channels);
  pairwise_sum(values, channels, lo, mid, out);
  pairwise_sum(values, channels, mid, hi, right.data());
  for (int64 c = 0; c < channels; ++c) out[c] += right[c];
}

// Per (sample, chunk) partials -> one float per sample and channel -> `out[c]`, the pairwise sum over samples.
void sum_over_samples(const Plan& plan, const std::vector<double>& partial, float* out) {
  std::vector<float> per_sample(plan.samples * plan.channels);
  for (int64 n = 0; n < plan.samples; ++n)
    for (int64 c = 0; c < plan.channels; ++c) {
      double total = 0.0;
      for (int64 s = 0; s < plan.chunks; ++s) total += partial[(n * plan.chunks + s) * plan.channels + c];
      per_sample[n * plan.channels + c] = static_cast<float>(total);
    }
  pairwise_sum(per_sample, plan.channels, 0, plan.samples, out);
}

void check_inputs(OpKernelContext* ctx, const Tensor& x, const Tensor& gamma, const Tensor& beta, int64 groups) {
  OP_REQUIRES(ctx, x.dims() == 4, ::tensorflow::errors::InvalidArgument("x must be 4D NHWC"));
  OP_REQUIRES(ctx, x.dim_size(3) % groups == 0,
              ::tensorflow::errors::InvalidArgument("channels must be a multiple of groups"));
  OP_REQUIRES(ctx, gamma.NumElements() == x.dim_size(3) && beta.NumElements() == x.dim_size(3),
              ::tensorflow::errors::InvalidArgument("gamma and beta need one value per channel"));
}

template <typename T, typename S>
class GroupNormOp : public OpKernel {
 public:
  explicit GroupNormOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("groups", &groups_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("epsilon", &epsilon_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("relu", &relu_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& gamma = ctx->input(1);
    const Tensor& beta = ctx->input(2);
    check_inputs(ctx, x, gamma, beta, groups_);
    if (!ctx->status().ok()) return;
    Tensor *y, *mean_out, *rstd_out;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &y));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({x.dim_size(0), groups_}), &mean_out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({x.dim_size(0), groups_}), &rstd_out));
    if (x.NumElements() == 0) {  // no values: the statistics of an empty set
      mean_out->flat<float>().setConstant(std::numeric_limits<float>::quiet_NaN());
      rstd_out->flat<float>().setConstant(std::numeric_limits<float>::quiet_NaN());
      return;
    }
    const Plan plan = make_plan(ctx, x, groups_);
    const S* xs = reinterpret_cast<const S*>(x.flat<T>().data());
    S* ys = reinterpret_cast<S*>(y->flat<T>().data());
    const float* g = gamma.flat<float>().data();
    const float* b = beta.flat<float>().data();
    float* mean = mean_out->flat<float>().data();
    float* rstd = rstd_out->flat<float>().data();
    const int64 C = plan.channels, per_group = C / groups_;
    const double count = static_cast<double>(plan.rows) * per_group;
    std::vector<double> partial(plan.samples * plan.chunks * C, 0.0);

    auto sums = [&](int64 n, int64 s) {
      const S* xn = xs + (n * plan.rows + plan.begin(s)) * C;
      channel_sums(plan.end(s) - plan.begin(s), C, &partial[(n * plan.chunks + s) * C],
                   [&](int64 r, int64 c) { return load(xn, r * C + c); });
    };
    auto deviations = [&](int64 n, int64 s) {
      const S* xn = xs + (n * plan.rows + plan.begin(s)) * C;
      std::vector<float> m(C);
      for (int64 c = 0; c < C; ++c) m[c] = mean[n * groups_ + c / per_group];
      double* out = &partial[(n * plan.chunks + s) * C];
      std::fill(out, out + C, 0.0);
      channel_sums(plan.end(s) - plan.begin(s), C, out, [&](int64 r, int64 c) {
        const float d = load(xn, r * C + c) - m[c];
        return d * d;
      });
    };
    auto apply = [&](int64 n, int64 s) {
      std::vector<float> scale(C), shift(C);
      sample_affine(mean, rstd, g, b, n, groups_, C, scale.data(), shift.data());
      const int64 first = (n * plan.rows + plan.begin(s)) * C, size = (plan.end(s) - plan.begin(s)) * C;
      const S* xn = xs + first;
      S* yn = ys + first;
      for (int64 i = 0; i < size; i += C) {
        for (int64 c = 0; c < C; ++c) {
          float v = load(xn, i + c) * scale[c] + shift[c];
          if (relu_ && v < 0.0f) v = 0.0f;  // NaN stays NaN, as in TensorFlow's Relu
          store(yn, i + c, v);
        }
      }
    };
    auto finish_mean = [&](int64 n) {
      for (int64 k = 0; k < groups_; ++k)
        mean[n * groups_ + k] = static_cast<float>(group_total(plan, partial, n, k) / count);
    };
    auto finish_rstd = [&](int64 n) {
      for (int64 k = 0; k < groups_; ++k)
        rstd[n * groups_ + k] =
            1.0f / std::sqrt(static_cast<float>(group_total(plan, partial, n, k) / count) + epsilon_);
    };
    if (plan.per_sample) {  // one unit per sample: all passes while the sample is in cache
      shard(ctx, plan.samples, plan.rows * C * 24, [&](int64 n) {
        for (int64 s = 0; s < plan.chunks; ++s) sums(n, s);
        finish_mean(n);
        for (int64 s = 0; s < plan.chunks; ++s) deviations(n, s);
        finish_rstd(n);
        for (int64 s = 0; s < plan.chunks; ++s) apply(n, s);
      });
      return;
    }
    run_units(ctx, plan, sums);
    for (int64 n = 0; n < plan.samples; ++n) finish_mean(n);
    run_units(ctx, plan, deviations);
    for (int64 n = 0; n < plan.samples; ++n) finish_rstd(n);
    run_units(ctx, plan, apply);
  }

 private:
  int64 groups_;
  float epsilon_;
  bool relu_;
};

template <typename T, typename S>
class GroupNormGradOp : public OpKernel {
 public:
  explicit GroupNormGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("groups", &groups_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("relu", &relu_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& dy = ctx->input(0);
    const Tensor& x = ctx->input(1);
    const Tensor& gamma = ctx->input(2);
    const Tensor& beta = ctx->input(3);
    check_inputs(ctx, x, gamma, beta, groups_);
    if (!ctx->status().ok()) return;
    OP_REQUIRES(ctx, dy.shape() == x.shape(), ::tensorflow::errors::InvalidArgument("dy and x differ in shape"));
    OP_REQUIRES(ctx, ctx->input(4).NumElements() == x.dim_size(0) * groups_ &&
                         ctx->input(5).NumElements() == x.dim_size(0) * groups_,
                ::tensorflow::errors::InvalidArgument("mean and rstd need one value per sample and group"));
    Tensor *dx_out, *dgamma_out, *dbeta_out;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &dx_out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, gamma.shape(), &dgamma_out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, beta.shape(), &dbeta_out));
    const Plan plan = make_plan(ctx, x, groups_);
    const int64 C = plan.channels, per_group = C / groups_;
    float* dgamma = dgamma_out->flat<float>().data();
    float* dbeta = dbeta_out->flat<float>().data();
    std::fill(dgamma, dgamma + C, 0.0f);
    std::fill(dbeta, dbeta + C, 0.0f);
    if (x.NumElements() == 0) return;
    const S* xs = reinterpret_cast<const S*>(x.flat<T>().data());
    const S* dys = reinterpret_cast<const S*>(dy.flat<T>().data());
    S* dxs = reinterpret_cast<S*>(dx_out->flat<T>().data());
    const float* g = gamma.flat<float>().data();
    const float* b = beta.flat<float>().data();
    const float* mean = ctx->input(4).flat<float>().data();
    const float* rstd = ctx->input(5).flat<float>().data();
    const double count = static_cast<double>(plan.rows) * per_group;
    const int64 partials = plan.samples * plan.chunks * C;
    std::vector<double> sum_dz(partials, 0.0), sum_dz_xhat(partials, 0.0);
    std::vector<double> group_dz, group_dz_xhat;

    // Per channel of one sample: xhat's offset and factor, and y's scale and shift (the ReLU mask).
    auto coefficients = [&](int64 n, std::vector<float>* m, std::vector<float>* r, std::vector<float>* scale,
                            std::vector<float>* shift) {
      for (int64 c = 0; c < C; ++c) {
        (*m)[c] = mean[n * groups_ + c / per_group];
        (*r)[c] = rstd[n * groups_ + c / per_group];
      }
      sample_affine(mean, rstd, g, b, n, groups_, C, scale->data(), shift->data());
    };
    auto reduce = [&](int64 n, int64 s) {
      std::vector<float> m(C), r(C), scale(C), shift(C);
      coefficients(n, &m, &r, &scale, &shift);
      const int64 first = (n * plan.rows + plan.begin(s)) * C, rows = plan.end(s) - plan.begin(s);
      const S* xn = xs + first;
      const S* dyn = dys + first;
      auto dz = [&](int64 i, int64 c) {
        const float grad = load(dyn, i);
        return relu_ && !(load(xn, i) * scale[c] + shift[c] > 0.0f) ? 0.0f : grad;
      };
      channel_sums(rows, C, &sum_dz[(n * plan.chunks + s) * C], [&](int64 row, int64 c) { return dz(row * C + c, c); });
      channel_sums(rows, C, &sum_dz_xhat[(n * plan.chunks + s) * C], [&](int64 row, int64 c) {
        const int64 i = row * C + c;
        return dz(i, c) * ((load(xn, i) - m[c]) * r[c]);
      });
    };
    auto apply = [&](int64 n, int64 s) {
      std::vector<float> m(C), r(C), scale(C), shift(C), a(C), bb(C);
      coefficients(n, &m, &r, &scale, &shift);
      for (int64 c = 0; c < C; ++c) {
        const int64 k = n * groups_ + c / per_group;
        a[c] = static_cast<float>(group_dz[k] / count);
        bb[c] = static_cast<float>(group_dz_xhat[k] / count);
      }
      const int64 first = (n * plan.rows + plan.begin(s)) * C, size = (plan.end(s) - plan.begin(s)) * C;
      const S* xn = xs + first;
      const S* dyn = dys + first;
      S* dxn = dxs + first;
      for (int64 i = 0; i < size; i += C) {
        for (int64 c = 0; c < C; ++c) {
          const float xv = load(xn, i + c);
          float grad = load(dyn, i + c);
          if (relu_ && !(xv * scale[c] + shift[c] > 0.0f)) grad = 0.0f;
          const float xhat = (xv - m[c]) * r[c];
          store(dxn, i + c, r[c] * (grad * g[c] - a[c] - xhat * bb[c]));
        }
      }
    };
    run_units(ctx, plan, reduce);
    group_dz = group_totals(plan, sum_dz, g);
    group_dz_xhat = group_totals(plan, sum_dz_xhat, g);
    run_units(ctx, plan, apply);
    sum_over_samples(plan, sum_dz, dbeta);
    sum_over_samples(plan, sum_dz_xhat, dgamma);
  }

 private:
  int64 groups_;
  bool relu_;
};

::tensorflow::Status group_norm_shape(InferenceContext* c) {
  ShapeHandle x;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &x));
  int64 groups;
  TF_RETURN_IF_ERROR(c->GetAttr("groups", &groups));
  c->set_output(0, x);
  c->set_output(1, c->Matrix(c->Dim(x, 0), groups));
  c->set_output(2, c->Matrix(c->Dim(x, 0), groups));
  return ::tensorflow::Status();
}

::tensorflow::Status group_norm_grad_shape(InferenceContext* c) {
  c->set_output(0, c->input(1));
  c->set_output(1, c->input(2));
  c->set_output(2, c->input(3));
  return ::tensorflow::Status();
}

}  // namespace

REGISTER_OP("KerasBitGroupNorm")
    .Input("x: T")
    .Input("gamma: float")
    .Input("beta: float")
    .Output("y: T")
    .Output("mean: float")
    .Output("rstd: float")
    .Attr("T: {float, bfloat16}")
    .Attr("groups: int >= 1")
    .Attr("epsilon: float")
    .Attr("relu: bool = false")
    .SetShapeFn(group_norm_shape);

REGISTER_OP("KerasBitGroupNormGrad")
    .Input("dy: T")
    .Input("x: T")
    .Input("gamma: float")
    .Input("beta: float")
    .Input("mean: float")
    .Input("rstd: float")
    .Output("dx: T")
    .Output("dgamma: float")
    .Output("dbeta: float")
    .Attr("T: {float, bfloat16}")
    .Attr("groups: int >= 1")
    .Attr("relu: bool = false")
    .SetShapeFn(group_norm_grad_shape);

REGISTER_KERNEL_BUILDER(Name("KerasBitGroupNorm").Device(::tensorflow::DEVICE_CPU).TypeConstraint<float>("T"),
                        GroupNormOp<float, float>);
REGISTER_KERNEL_BUILDER(
    Name("KerasBitGroupNorm").Device(::tensorflow::DEVICE_CPU).TypeConstraint<::tensorflow::bfloat16>("T"),
    GroupNormOp<::tensorflow::bfloat16, uint16_t>);
REGISTER_KERNEL_BUILDER(Name("KerasBitGroupNormGrad").Device(::tensorflow::DEVICE_CPU).TypeConstraint<float>("T"),
                        GroupNormGradOp<float, float>);
REGISTER_KERNEL_BUILDER(
    Name("KerasBitGroupNormGrad").Device(::tensorflow::DEVICE_CPU).TypeConstraint<::tensorflow::bfloat16>("T"),
    GroupNormGradOp<::tensorflow::bfloat16, uint16_t>);
