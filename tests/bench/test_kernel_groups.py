"""Decode-step kernel groups: the name patterns on real kernel names, and the prefill taken out by difference."""

import pytest

from fastllm.bench.kernel_groups import group_of, group_times, step_groups, step_kernels

# names as torch.profiler reports them on an H100 (Triton kernels by function name, ATen and library kernels mangled)
NAMES = {
    "_nf4_gemv_kernel": "NF4 GEMV (fastllm)",
    "_nf4_glu_gemv_kernel": "NF4 GEMV (fastllm)",
    "_group_epilogue_kernel": "NF4 GEMV (fastllm)",
    "void kgemm_4bit_inference_naive<__nv_bfloat16, 128, 16>(int, int, int, __nv_bfloat16*, unsigned char*, float*, "
    "float const*, __nv_bfloat16*, int, int, int, int)": "NF4 GEMV (bitsandbytes)",
    "void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>(float*, unsigned char*, float*, __nv_bfloat16*, int, "
    "int)": "NF4 dequant",
    "_nf4_dequant_parts_kernel": "NF4 dequant",
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__"
    "5x_cublas": "GEMM (cuBLAS, CUTLASS)",
    "nvjet_tst_64x8_64x16_4x1_v_bz_splitK_TNT": "GEMM (cuBLAS, CUTLASS)",
    "void pytorch_flash::flash_fwd_splitkv_kernel<Flash_fwd_kernel_traits<128, 64, 128, 4, false, false, "
    "cutlass::bfloat16_t, Flash_kernel_traits<128, 64, 128, 4, cutlass::bfloat16_t> >, false, true, false, false, "
    "true, true, false, false>(Flash_fwd_params)": "attention",
    "fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::bfloat16_t, "
    "cutlass::arch::Sm80, true, 64, 64, 64, true, true>::Params)": "attention",
    "_rms_norm_fwd_kernel": "RMSNorm",
    "_rope_kernel": "RoPE",
    "_cast_cat_kernel": "LoRA casts and adds",
    "_lora_add_kernel": "LoRA casts and adds",
    "void at::native::index_elementwise_kernel<128, 4, at::native::gpu_index_kernel<at::native::index_copy_kernel_impl"
    "<at::native::OpaqueType<2> >(at::TensorIterator&, long, long, long)::{lambda(char*, char const*, long)#1}> >"
    "(long, at::native::gpu_index_kernel<>)": "copies, cache updates",
    "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)::"
    "{lambda()#3}::operator()() const::{lambda()#7}::operator()() const::{lambda(float)#1}, at::detail::Array<char*, "
    "2>, 4, TrivialOffsetCalculator<1, unsigned int>>": "copies, cache updates",
    "Memcpy DtoD (Device -> Device)": "copies, cache updates",
    "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>, "
    "at::detail::Array<char*, 3> >(int, at::native::CUDAFunctor_add<c10::BFloat16>, at::detail::Array<char*, 3>)":
        "elementwise",
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::ArgMaxOps<float>, unsigned int, "
    "long, 4> >(at::native::ReduceOp<float, at::native::ArgMaxOps<float>, unsigned int, long, 4>)":
        "reductions, sampling",
    "triton_poi_fused_0": "other",
}


@pytest.mark.parametrize("name", sorted(NAMES))
def test_each_kernel_falls_in_its_group(name):
    assert group_of(name) == NAMES[name]


def test_a_decode_step_is_the_difference_over_the_extra_steps():
    # a generate of 9 new tokens: the prefill (gemm 900 us) plus 8 steps of gemv 10 us x 4 launches and norm 2 us
    long = group_times([("_nf4_gemv_kernel", 8 * 40.0, 32), ("_rms_norm_fwd_kernel", 8 * 2.0 + 5.0, 9),
                        ("sm90_xmma_gemm_bf16", 900.0, 3)])
    short = group_times([("_rms_norm_fwd_kernel", 5.0, 1), ("sm90_xmma_gemm_bf16", 900.0, 3)])
    rows = {r["group"]: r for r in step_groups(long, short, 9)}
    assert rows["NF4 GEMV (fastllm)"]["us_per_step"] == pytest.approx(40.0)
    assert rows["NF4 GEMV (fastllm)"]["calls_per_step"] == pytest.approx(4.0)
    assert rows["RMSNorm"]["us_per_step"] == pytest.approx(2.0)
    assert rows["GEMM (cuBLAS, CUTLASS)"]["us_per_step"] == pytest.approx(0.0)
    assert rows["all kernels"]["us_per_step"] == pytest.approx(42.0)
    assert rows["NF4 GEMV (fastllm)"]["share"] == pytest.approx(40.0 / 42.0)
    with pytest.raises(ValueError, match="n >= 2"):
        step_groups(long, short, 1)


def test_step_kernels_per_name_largest_first():
    long = [("_nf4_gemv_kernel", 8 * 40.0, 32), ("_rms_norm_fwd_kernel", 8 * 2.0 + 5.0, 9),
            ("sm90_xmma_gemm_bf16", 900.0, 3), ("_rms_norm_fwd_kernel", 4.0, 1)]  # a name twice: summed
    short = [("_rms_norm_fwd_kernel", 5.0, 1), ("sm90_xmma_gemm_bf16", 900.0, 3)]
    rows = step_kernels(long, short, 9, top=2)
    assert [r["kernel"] for r in rows] == ["_nf4_gemv_kernel", "_rms_norm_fwd_kernel"]
    assert rows[0]["us_per_step"] == pytest.approx(40.0) and rows[0]["calls_per_step"] == pytest.approx(4.0)
    assert rows[1]["us_per_step"] == pytest.approx(2.5) and rows[1]["calls_per_step"] == pytest.approx(9 / 8)
    assert rows[1]["group"] == "RMSNorm"
    with pytest.raises(ValueError, match="n >= 2"):
        step_kernels(long, short, 1)
