"""``apr_kernels.ggml_quant``: the GGML types GGUF files hold beside APR's (Q5_K, Q5_0, Q5_1, Q8_0, F16).

References: the ``gguf`` package's dequantisers (``gguf.quants.dequantize``) read the blocks
``ggml_quant.blocks`` writes, which tests/test_quant_recipe.py checks byte for byte against the files
llama-quantize wrote (tests/data/llama_cpp); ``fake_quantize`` must give those values exactly, and
the ``gguf`` package's own quantisers' blocks for the 32-value types.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apr_kernels import ggml_quant


def _rows() -> torch.Tensor:
    """Rows of a weight matrix with the corner cases the quantisers meet."""
    torch.manual_seed(0)
    w = torch.randn(48, 512) * 0.05
    w[0] = 0.0  # all zero
    w[1] = 0.25  # constant
    w[2] = -(w[2].abs() + 0.05)  # all negative
    w[3] *= 1e-20  # tiny
    w[4, 7] = 100.0  # one outlier
    w[5] = torch.linspace(-1.0, 1.0, 512)  # a ramp
    w[6, :32] = -w[6, :32].abs().max()  # the largest magnitude negative (Q5_0's sign), ties
    w[7] = torch.where(torch.arange(512) % 2 == 0, 1e-3, -1e-3)  # two values
    w[8, :16] = 0.07  # a tie for the largest in a block
    return w


@pytest.mark.parametrize("gtype", ["Q8_0", "Q5_0", "Q5_1", "Q5_K", "Q4_K", "Q6_K", "F16"])
def test_fake_quantize_gives_the_values_the_blocks_hold(gtype):
    import gguf
    from gguf.quants import dequantize, quantize

    w = _rows()
    ours = ggml_quant.fake_quantize(gtype, w)
    assert ours.dtype == w.dtype and ours.shape == w.shape
    if gtype == "F16":
        assert torch.equal(ours, w.half().float())
        return
    qtype = getattr(gguf.GGMLQuantizationType, gtype)
    raw = ggml_quant.blocks(gtype, w)
    assert raw.shape == (w.shape[0], w.shape[1] // gguf.GGML_QUANT_SIZES[qtype][0] * gguf.GGML_QUANT_SIZES[qtype][1])
    if gtype in ("Q8_0", "Q5_0", "Q5_1"):  # (written by gguf's quantiser)
        assert np.array_equal(raw, quantize(w.numpy(), qtype))
    expected = dequantize(raw, qtype).reshape(w.shape)
    np.testing.assert_array_equal(ours.numpy(), expected)
    assert (ours - w).abs().max() > 0  # (it quantises)
    # (half precision input: the same values, rounded once more)
    assert torch.equal(ggml_quant.fake_quantize(gtype, w.to(torch.bfloat16)),
                       ggml_quant.fake_quantize(gtype, w.to(torch.bfloat16).float()).to(torch.bfloat16))


@pytest.mark.cuda
@pytest.mark.parametrize("gtype", ["Q8_0", "Q5_0", "Q5_1", "Q5_K"])
def test_cuda_fake_quantize_matches_the_host(gtype):
    w = _rows()
    assert torch.equal(ggml_quant.fake_quantize(gtype, w.cuda()).cpu(), ggml_quant.fake_quantize(gtype, w))
