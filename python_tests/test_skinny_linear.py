"""skinny_linear: the CPU kernel against F.linear, the wrapper's fallbacks, and a real HF model
switched with use_skinny_linear.

Kernel tests call ``torch.ops.dflare.skinny_linear`` directly and skip when the extension is
not built. Shapes cover every row count the kernel takes (1-8, each its own instantiation),
weight-row counts that leave a partial group and fewer rows than one thread's share, and K
with and without a remainder past the 16-float vectors.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from dflare_sgl._ext import has_kernel
from dflare_sgl.skinny_linear import MAX_ROWS, SkinnyLinear, skinny_linear, use_skinny_linear

# float32, another summation order than the BLAS: |x| ~ 1 and K <= 1536 terms.
FP32_TOL = {"atol": 1e-4, "rtol": 1e-5}

needs_kernel = pytest.mark.skipif(
    not has_kernel("skinny_linear", torch.device("cpu")), reason="extension not built"
)


@needs_kernel
@pytest.mark.parametrize("m", range(1, MAX_ROWS + 1))
@pytest.mark.parametrize("n, k", [(1, 16), (7, 5), (300, 577), (1536, 576), (576, 1536)])
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_matches_f_linear(m: int, n: int, k: int, bias: bool) -> None:
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen)
    b = torch.randn(n, generator=gen) if bias else None
    torch.testing.assert_close(torch.ops.dflare.skinny_linear(x, w, b), F.linear(x, w, b),
                               **FP32_TOL)


@needs_kernel
@pytest.mark.parametrize("bias", [False, True])
def test_op_has_a_fake_kernel(bias: bool) -> None:
    """opcheck: schema, fake kernel (so torch.compile traces it), autograd registration."""
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(3, 40, generator=gen), torch.randn(24, 40, generator=gen)
    b = torch.randn(24, generator=gen) if bias else None
    torch.library.opcheck(torch.ops.dflare.skinny_linear.default, (x, w, b))


@needs_kernel
def test_kernel_result_does_not_depend_on_threads() -> None:
    """Each output is one thread's fixed-order sum, so thread count cannot change a bit."""
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 576, generator=gen), torch.randn(1536, 576, generator=gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.dflare.skinny_linear(x, w, None)
        torch.set_num_threads(2)
        two = torch.ops.dflare.skinny_linear(x, w, None)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@needs_kernel
@pytest.mark.parametrize(
    "x, w, b, message",
    [
        (torch.randn(9, 8), torch.randn(4, 8), None, "1 to 8 rows"),
        (torch.randn(2, 8), torch.randn(4, 7), None, "must be \\[M, K\\]"),
        (torch.randn(2, 8, dtype=torch.bfloat16), torch.randn(4, 8), None, "float32"),
        (torch.randn(8, 2).t(), torch.randn(4, 8), None, "contiguous"),
        (torch.randn(2, 8), torch.randn(4, 8), torch.randn(5), "bias"),
    ],
)
def test_kernel_rejects_bad_arguments(x, w, b, message: str) -> None:
    with pytest.raises(RuntimeError, match=message):
        torch.ops.dflare.skinny_linear(x, w, b)


@pytest.mark.parametrize(
    "shape, dtype, grad",
    [
        ((3, 2, 32), torch.float32, False),  # 6 rows in two leading dims: the kernel
        ((1, 9, 32), torch.float32, False),  # 9 rows: F.linear
        ((4, 32), torch.bfloat16, False),  # another dtype: F.linear
        ((4, 32), torch.float32, True),  # autograd: F.linear, and the gradient flows
        ((0, 32), torch.float32, False),  # no rows
    ],
)
def test_wrapper_equals_f_linear_on_every_path(shape, dtype, grad: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=gen).to(dtype).requires_grad_(grad)
    w = torch.randn(24, 32, generator=gen).to(dtype)
    b = torch.randn(24, generator=gen).to(dtype)
    y = skinny_linear(x, w, b)
    assert y.shape == (*shape[:-1], 24) and y.dtype == dtype
    torch.testing.assert_close(y, F.linear(x, w, b), **FP32_TOL)
    if grad:
        y.sum().backward()
        torch.testing.assert_close(x.grad, w.sum(0).expand(*shape), **FP32_TOL)


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def test_use_skinny_linear_keeps_the_model() -> None:
    """Same parameters (the tied head included), same state dict, same greedy tokens."""
    model = _tiny_llama()
    reference = _tiny_llama()
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(2))
    expected = reference.generate(ids, do_sample=False, max_new_tokens=16, pad_token_id=0)
    keys = list(model.state_dict())

    linears = sum(type(m) is torch.nn.Linear for m in model.modules())
    assert use_skinny_linear(model) == linears > 0
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert isinstance(model.lm_head, SkinnyLinear)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert list(model.state_dict()) == keys
    assert use_skinny_linear(model) == 0  # idempotent
    assert use_skinny_linear(_tiny_llama(), _tiny_llama()) == 2 * linears  # several at once

    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, **FP32_TOL)
        got = model.generate(ids, do_sample=False, max_new_tokens=16, pad_token_id=0)
    assert torch.equal(got, expected)
