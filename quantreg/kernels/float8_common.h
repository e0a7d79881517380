// What quantreg's two float8 kernels share (float8_kernel.cpp, AVX2; float8_avx512_kernel.cpp,
// AVX512-BF16): the checks of a call's arguments against the layout both read
// (cpu_float8.CPUFloat8Layout). cpu_build puts this file after cpu_common.h, before each source.
namespace {

// x [M, K], out [M, N], codes and scales of one call, checked
struct Float8Args {
  int64_t M, N, K, G;
  const uint8_t* codes;
  const float* scales;         // float32 scales, or
  const uint8_t* scale_codes;  // (fp4) e4m3 codes

  Float8Args(const torch::Tensor& x, const torch::Tensor& out, const torch::Tensor& codes_,
             const torch::Tensor& scales_, int64_t group_size, bool fp4, double scale_mult) {
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous() &&
                (x.dtype() == torch::kFloat32 || x.dtype() == torch::kBFloat16 ||
                 x.dtype() == torch::kFloat16),
                "x must be a contiguous float32 / bfloat16 / float16 [M, K] matrix");
    TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && out.size(0) == x.size(0) &&
                (out.dtype() == torch::kFloat32 || out.dtype() == torch::kBFloat16 ||
                 out.dtype() == torch::kFloat16),
                "out must be a contiguous float32 / bfloat16 / float16 [M, N] matrix");
    TORCH_CHECK(codes_.dtype() == torch::kUInt8 && codes_.is_contiguous() && codes_.dim() == 2,
                "codes: uint8 [N/16, bytes]");
    const bool codes8 = scales_.dtype() == torch::kUInt8;
    TORCH_CHECK((scales_.dtype() == torch::kFloat32 || (fp4 && codes8)) &&
                scales_.is_contiguous() && scales_.dim() == 3 && scales_.size(2) == 16,
                "scales: float32, or (fp4) e4m3 codes as uint8, [N/16, G, 16]");
    TORCH_CHECK(fp4 || scale_mult == 1.0, "fp8 scales take no multiplier");
    M = x.size(0), K = x.size(1), N = out.size(1), G = scales_.size(1);
    const int64_t blocks = (N + 15) / 16;
    TORCH_CHECK(scales_.size(0) == blocks && codes_.size(0) == blocks,
                "N does not match the layout");
    TORCH_CHECK(codes_.size(1) == K * (fp4 ? 8 : 16), "codes do not match K");
    TORCH_CHECK(group_size > 0 && (K + group_size - 1) / group_size == G,
                "scales must hold ceil(K / group_size) groups");
    TORCH_CHECK(!fp4 || (K % 4 == 0 && group_size % 4 == 0),
                "fp4 codes need K and the group size to be multiples of 4");
    codes = codes_.data_ptr<uint8_t>();
    scales = codes8 ? nullptr : scales_.data_ptr<float>();
    scale_codes = codes8 ? scales_.data_ptr<uint8_t>() : nullptr;
  }
};

}  // namespace
