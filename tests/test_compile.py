"""The ops are proper torch.library custom ops: opcheck passes and torch.compile traces them."""

import pytest
import torch

import lora_fast

from .helpers import assert_close, random_case


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_opcheck_every_custom_op(backend):
    c = random_case(9, 3, 8, 6, 4, dtype=torch.float32)
    meta = c["batch"].metadata
    out = torch.randn(9, 6)
    t = torch.randn(9, 4)
    with lora_fast.use_backend(backend):
        torch.library.opcheck(torch.ops.lora_fast.lora_shrink.default, (c["x"], c["A"], *meta, c["ranks"]))
        torch.library.opcheck(
            torch.ops.lora_fast.lora_expand_.default, (t, c["B"], *meta, c["scales"], c["ranks"], out)
        )
        torch.library.opcheck(
            torch.ops.lora_fast.lora_delta.default,
            (c["x"], c["A"], c["B"], *meta, c["scales"], c["ranks"], None),
        )
        # with inputs that require grad opcheck also exercises the registered autograd formula
        grads = tuple(c[k].detach().requires_grad_() for k in ("x", "A", "B"))
        torch.library.opcheck(
            torch.ops.lora_fast.lora_delta.default,
            (*grads, *meta, c["scales"], c["ranks"], torch.ones(3, dtype=torch.bool)),
        )
        torch.library.opcheck(
            torch.ops.lora_fast.lora_delta_backward.default,
            (
                torch.randn(9, 6),
                c["x"],
                c["A"],
                c["B"],
                *meta,
                c["scales"],
                c["ranks"],
                None,
                True,
                True,
                False,
            ),
        )
        torch.library.opcheck(
            torch.ops.lora_fast.lora_delta_.default, (c["x"], c["A"], c["B"], *meta, c["scales"], None, out)
        )


def test_compile_fullgraph_on_cpu():
    torch._dynamo.reset()
    c = random_case(24, 4, 16, 12, 8, dtype=torch.float32)
    base = torch.nn.Linear(16, 12)

    @torch.compile(fullgraph=True)
    def layer(x, A, B, batch, scales, ranks):
        y = base(x)
        lora_fast.lora_delta(x, A, B, batch, scales, ranks, out=y)
        return torch.relu(y) + lora_fast.lora_delta(x, A, B, batch, scales, ranks)

    args = (c["x"], c["A"], c["B"], c["batch"], c["scales"], c["ranks"])
    with torch.no_grad():
        got = layer(*args)
        delta = lora_fast.reference.lora_delta(*args)
        expected = torch.relu(base(c["x"]) + delta) + delta
    assert_close(got, expected, torch.float32)
