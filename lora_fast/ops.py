"""The public op surface: multi-adapter LoRA shrink, expand and delta, and the delta's backward.

Each public function checks its arguments (ValueError / TypeError naming the argument) and calls a
``torch.library`` custom op (``torch.ops.lora_fast.*``) that has a fake implementation, so
``torch.compile(fullgraph=True)`` traces through it; ``lora_fast::lora_delta`` has a registered
autograd formula. The custom op runs the backend that ``lora_fast.backends.select`` picks for the
tensors' device and dtype. Plain eager calls that need no gradient skip the dispatcher and call
the same backend directly. Semantics: ``lora_fast.reference``.
"""

from __future__ import annotations

import os

import torch

from . import _checks as check
from . import reference
from .backends import available, forced, select
from .batch import AdapterBatch
from .reference import accumulation_dtype

# Backends with backward kernels; the cuda backend's gradients run on the next of these.
BACKWARD_BACKENDS = ("torch", "cpu", "triton")

# fused_lora_linear runs its one-call C++ kernel on the CPU up to this many tokens with one torch
# thread, and up to FUSED_MAX_TOKENS_THREADED with several. On a 2-core AMD EPYC sweep of
# SmolLM2's seven projections (16 adapters of rank 16) the kernel beat MKL's GEMM plus
# lora_delta at 1-32 tokens on one thread (tied at 64), and with two threads only at 1-4 tokens
# (its base GEMM does not scale there as MKL's does). On the Intel Xeon, one thread, after its
# base GEMM learned to overlap the weight reads (`benchmarks.bench_fused_linear`, 30 layers),
# it took 0.95 / 0.85 of MKL plus lora_delta at 40 tokens of 1 / 16 adapters and 0.90 / 0.98 at
# 48 / 64 tokens of 16, but 1.05 / 1.13 at 48 / 64 tokens of one adapter.
FUSED_MAX_TOKENS = 40
FUSED_MAX_TOKENS_THREADED = 4
_CPU = torch.device("cpu")

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------
# Backend implementations and the custom ops wrapping them: tensors only (the AdapterBatch
# travels as its metadata tensors).


def _compiled():
    return torch.ops.lora_fast_C


def _triton():
    from . import kernels

    return kernels


def _int64(ranks: Tensor | None) -> Tensor | None:
    return ranks if ranks is None or ranks.dtype == torch.int64 else ranks.to(torch.int64)


def _unit_stride_rows(tensor: Tensor) -> Tensor:
    """``tensor`` itself when the kernels can use it in place, else a contiguous copy."""
    return tensor if tensor.shape[-1] <= 1 or tensor.stride(-1) == 1 else tensor.contiguous()


def _shrink_impl(
    x: Tensor,
    A: Tensor,
    token_slots: Tensor,
    token_order: Tensor,
    segment_starts: Tensor,
    segment_lengths: Tensor,
    ranks: Tensor | None,
) -> Tensor:
    backend = select(x.device, x.dtype)
    if backend == "torch":
        batch = AdapterBatch.from_metadata(token_slots, token_order, segment_starts, segment_lengths)
        return reference.lora_shrink(x, A, batch, ranks)
    if backend == "triton":
        return _triton().lora_shrink(
            _unit_stride_rows(x),
            A,
            token_order,
            token_slots,
            _int64(ranks),
            segments=(segment_starts, segment_lengths),
        )
    return _compiled().lora_shrink(x, A, token_order, segment_starts, segment_lengths, _int64(ranks))


def _expand_impl(
    t: Tensor,
    B: Tensor,
    token_slots: Tensor,
    token_order: Tensor,
    segment_starts: Tensor,
    segment_lengths: Tensor,
    scales: Tensor,
    ranks: Tensor | None,
    out: Tensor,
) -> None:
    backend = select(out.device, out.dtype)
    if backend == "torch":
        batch = AdapterBatch.from_metadata(token_slots, token_order, segment_starts, segment_lengths)
        reference.lora_expand(t, B, batch, scales, out, ranks)
        return
    target = _unit_stride_rows(out)
    if backend == "triton":
        _triton().lora_expand_(
            _unit_stride_rows(t),
            B,
            token_order,
            token_slots,
            scales,
            _int64(ranks),
            target,
            segments=(segment_starts, segment_lengths),
        )
    else:
        _compiled().lora_expand_(
            t, B, token_order, segment_starts, segment_lengths, scales, _int64(ranks), target
        )
    if target is not out:
        out.copy_(target)


def _delta_impl(
    x: Tensor,
    A: Tensor,
    B: Tensor,
    token_slots: Tensor,
    token_order: Tensor,
    segment_starts: Tensor,
    segment_lengths: Tensor,
    scales: Tensor,
    ranks: Tensor | None,
    out: Tensor,
) -> None:
    _delta_into(
        x, A, B, token_slots, token_order, segment_starts, segment_lengths, scales, ranks, out, route=True
    )


def _routes_to_cuda(x: Tensor, A: Tensor) -> bool:
    """True where this GPU's config table sends an in-place inference delta to the CUDA C++
    one-launch kernel (a ``cuda_delta`` row that matches: the tuner measured it faster than the
    Triton kernels there) and nothing forces a backend."""
    if forced() is not None or "cuda" not in available("cuda", x.dtype):
        return False
    return _triton().configs.find("cuda_delta", x.device, x.shape[0], A.shape[1], x.shape[1]) is not None


def _delta_into(
    x: Tensor,
    A: Tensor,
    B: Tensor,
    token_slots: Tensor,
    token_order: Tensor,
    segment_starts: Tensor,
    segment_lengths: Tensor,
    scales: Tensor,
    ranks: Tensor | None,
    out: Tensor,
    accumulate: bool = True,
    keep_t: bool = False,
    route: bool = False,
) -> Tensor | None:
    """The delta added into ``out`` (written there with ``accumulate=False``: ``out`` may then
    hold anything). Returns the shrink of x as the backward can take it instead of running that
    shrink again (``t_partials``), or None: the Triton kernels' split-K partials (always, as the
    kernels write them anyway, except the one-launch kernel), the C++ kernels' ``t [T, r_max]``
    when ``keep_t`` (the shrink and the expand then run as two calls, which costs the same at
    training sizes; without it, one fused call keeps t in registers; on Triton it picks the config
    table's ``train_shrink`` entry, whose partials the backward reads). ``route``: an in-place
    inference call, which the config table may send to the CUDA backend (``_routes_to_cuda``)."""
    backend = select(x.device, x.dtype)
    if route and backend == "triton" and x.is_cuda and _routes_to_cuda(x, A):
        backend = "cuda"
    if backend == "torch":
        batch = AdapterBatch.from_metadata(token_slots, token_order, segment_starts, segment_lengths)
        if not accumulate:
            out.zero_()
        reference.lora_delta(x, A, B, batch, scales, ranks, out)
        return None
    target = _unit_stride_rows(out)
    partials = None
    if backend == "triton":
        partials = _triton().lora_delta_(
            _unit_stride_rows(x),
            A,
            B,
            token_order,
            token_slots,
            scales,
            _int64(ranks),
            target,
            segments=(segment_starts, segment_lengths),
            accumulate=accumulate,
            training=keep_t,
        )
    else:  # (with accumulate=False the compiled kernels write out: no zero-filled buffer)
        segments = (token_order, segment_starts, segment_lengths)
        if keep_t and backend == "cpu":  # (the CUDA C++ forward's backward runs on Triton)
            partials = _compiled().lora_shrink(x, A, *segments, _int64(ranks))
            _compiled().lora_expand_(partials, B, *segments, scales, _int64(ranks), target, accumulate)
        else:
            _compiled().lora_delta_(x, A, B, *segments, scales, _int64(ranks), target, accumulate)
    if target is not out:
        out.copy_(target)
    return partials


def _delta_forward(
    x: Tensor,
    A: Tensor,
    B: Tensor,
    token_slots: Tensor,
    token_order: Tensor,
    segment_starts: Tensor,
    segment_lengths: Tensor,
    scales: Tensor,
    ranks: Tensor | None,
    keep_t: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """``(delta, t_partials)``: a new delta tensor (the Triton kernels write it, so it is never
    zero-filled first) and the partials of :func:`_delta_into`."""
    out = torch.empty((x.shape[0], B.shape[1]), dtype=x.dtype, device=x.device)
    metadata = (token_slots, token_order, segment_starts, segment_lengths)
    partials = _delta_into(x, A, B, *metadata, scales, ranks, out, accumulate=False, keep_t=keep_t)
    return out, partials


def _delta_functional_impl(
    x: Tensor,
    A: Tensor,
    B: Tensor,
    token_slots: Tensor,
    token_order: Tensor,
    segment_starts: Tensor,
    segment_lengths: Tensor,
    scales: Tensor,
    ranks: Tensor | None,
    grad_slots: Tensor | None,
) -> Tensor:
    # grad_slots only matters to the backward: it names the slots whose weights get gradients.
    metadata = (token_slots, token_order, segment_starts, segment_lengths)
    return _delta_forward(x, A, B, *metadata, scales, ranks)[0]


def _backward_backend(device: torch.device, dtype: torch.dtype) -> str:
    """The forward's backend when it has backward kernels, else the next one that does."""
    preferred = select(device, dtype)
    if preferred in BACKWARD_BACKENDS:
        return preferred
    return next(b for b in available(device, dtype) if b in BACKWARD_BACKENDS)


def _delta_backward_impl(
    grad_out: Tensor,
    x: Tensor,
    A: Tensor,
    B: Tensor,
    token_slots: Tensor,
    token_order: Tensor,
    segment_starts: Tensor,
    segment_lengths: Tensor,
    scales: Tensor,
    ranks: Tensor | None,
    grad_slots: Tensor | None,
    needs_x: bool,
    needs_A: bool,
    needs_B: bool,
    t_partials: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    # t_partials: the forward's shrink of x as its backend kept it (Triton: split-K partials;
    # C++: t itself), which eager autograd passes so the backward skips that shrink; the custom
    # op recomputes it (same kernel, same bits).
    needs = (needs_x, needs_A, needs_B)
    backend = _backward_backend(x.device, x.dtype)
    if backend == "torch":
        batch = AdapterBatch.from_metadata(token_slots, token_order, segment_starts, segment_lengths)
        grads = reference.lora_delta_backward(grad_out, x, A, B, batch, scales, ranks, grad_slots, needs)
    elif backend == "triton":
        grads = _triton().lora_delta_backward(
            _unit_stride_rows(grad_out),
            _unit_stride_rows(x),
            A,
            B,
            token_order,
            token_slots,
            segment_starts,
            segment_lengths,
            scales,
            _int64(ranks),
            grad_slots,
            needs,
            t_partials=t_partials,
        )
    else:
        grads = _compiled().lora_delta_backward(
            grad_out,
            x,
            A,
            B,
            token_order,
            segment_starts,
            segment_lengths,
            scales,
            _int64(ranks),
            grad_slots,
            needs_x,
            needs_A,
            needs_B,
            t_partials,
        )
    # custom ops cannot return None: an unneeded gradient travels as an empty tensor
    return tuple(
        g if g is not None and need else x.new_empty(0) for g, need in zip(grads, needs, strict=True)
    )


_lora_shrink = torch.library.custom_op("lora_fast::lora_shrink", _shrink_impl, mutates_args=())
_lora_expand_ = torch.library.custom_op("lora_fast::lora_expand_", _expand_impl, mutates_args=("out",))
_lora_delta_ = torch.library.custom_op("lora_fast::lora_delta_", _delta_impl, mutates_args=("out",))
_lora_delta = torch.library.custom_op("lora_fast::lora_delta", _delta_functional_impl, mutates_args=())
_lora_delta_backward = torch.library.custom_op(
    "lora_fast::lora_delta_backward", _delta_backward_impl, mutates_args=()
)


@_lora_shrink.register_fake
def _(x, A, token_slots, token_order, segment_starts, segment_lengths, ranks):
    return x.new_empty((x.shape[0], A.shape[1]), dtype=accumulation_dtype(x.dtype))


@_lora_expand_.register_fake
def _(t, B, token_slots, token_order, segment_starts, segment_lengths, scales, ranks, out):
    return None


@_lora_delta_.register_fake
def _(x, A, B, token_slots, token_order, segment_starts, segment_lengths, scales, ranks, out):
    return None


@_lora_delta.register_fake
def _(x, A, B, token_slots, token_order, segment_starts, segment_lengths, scales, ranks, grad_slots):
    return x.new_empty((x.shape[0], B.shape[1]))


@_lora_delta_backward.register_fake
def _(
    grad_out,
    x,
    A,
    B,
    token_slots,
    token_order,
    segment_starts,
    segment_lengths,
    scales,
    ranks,
    grad_slots,
    needs_x,
    needs_A,
    needs_B,
    t_partials=None,
):
    return tuple(
        t.new_empty(t.shape) if need else t.new_empty(0)
        for t, need in ((x, needs_x), (A, needs_A), (B, needs_B))
    )


def _setup_delta_context(ctx, inputs, output):
    x, A, B, *metadata, scales, ranks, grad_slots = inputs
    ctx.save_for_backward(x, A, B, *metadata, scales, ranks, grad_slots)


def _delta_backward(ctx, grad_out):
    x, A, B, *metadata, scales, ranks, grad_slots = ctx.saved_tensors
    needs_x, needs_A, needs_B = ctx.needs_input_grad[:3]
    dx, dA, dB = torch.ops.lora_fast.lora_delta_backward(
        grad_out, x, A, B, *metadata, scales, ranks, grad_slots, needs_x, needs_A, needs_B
    )
    grads = (dx if needs_x else None, dA if needs_A else None, dB if needs_B else None)
    return (*grads, None, None, None, None, None, None, None)


_lora_delta.register_autograd(_delta_backward, setup_context=_setup_delta_context)


# ---------------------------------------------------------------------------------------------
# Public functions.


def _eager_direct(*tensors: Tensor) -> bool:
    """True when the op can skip the dispatcher and call its backend directly.

    Going through ``torch.ops`` costs ~40 us of Python dispatch per call, more than a decode-sized
    kernel. Plain eager calls (tensors or nn.Parameters) with no autograd, no tracing and no
    dispatch mode are identical either way, so they take the short path; everything else goes
    through the custom op.
    """
    if torch.compiler.is_compiling() or _dispatch_mode_active():
        return False
    grad_enabled = torch.is_grad_enabled()
    for t in tensors:  # a plain loop: this runs once per layer call
        if (
            (type(t) is not torch.Tensor and type(t) is not _PARAMETER)
            or t.is_meta
            or (grad_enabled and t.requires_grad)
        ):
            return False
    return True


_PARAMETER = torch.nn.Parameter  # a plain tensor to the kernels (no torch-function override)


def _eager_plain(*tensors: Tensor) -> bool:
    """True when autograd is wanted but nothing else needs the custom op: no tracing, no dispatch
    mode, plain tensors or nn.Parameters. Such calls take _DeltaFunction, a plain autograd
    Function over the same implementations (one dispatcher round trip less each way)."""
    if torch.compiler.is_compiling() or _dispatch_mode_active():
        return False
    return all((type(t) is torch.Tensor or type(t) is _PARAMETER) and not t.is_meta for t in tensors)


class _DeltaFunction(torch.autograd.Function):
    """lora_delta's autograd in eager mode: the custom op's forward and backward implementations
    called directly. On a GPU the custom op's dispatch and autograd wrapping cost more host time
    per training step than the kernels (benchmarks/results/gpu_2026-11-26.md); torch.compile and
    dispatch modes still see the custom op. The Triton forward's shrink partials are kept for
    dB, so the backward does not read x a second time."""

    @staticmethod
    def forward(
        ctx, x, A, B, token_slots, token_order, segment_starts, segment_lengths, scales, ranks, grad_slots
    ):
        metadata = (token_slots, token_order, segment_starts, segment_lengths)
        keep_t = ctx.needs_input_grad[2]  # dB needs the shrink of x
        delta, t_partials = _delta_forward(x, A, B, *metadata, scales, ranks, keep_t)
        ctx.t_backend = select(x.device, x.dtype)
        ctx.save_for_backward(x, A, B, *metadata, scales, ranks, grad_slots, t_partials)
        return delta

    @staticmethod
    def backward(ctx, grad_out):
        return _eager_backward(ctx, grad_out, 0)


class _DeltaIntoFunction(torch.autograd.Function):
    """``out += delta`` with autograd, in place (``out`` is marked dirty): an eager training
    forward that adds into the base layer's output needs no delta tensor and no second pass
    over the output. ``out``'s gradient passes through unchanged."""

    @staticmethod
    def forward(ctx, out, x, A, B, *rest):
        token_slots, token_order, segment_starts, segment_lengths, scales, ranks, grad_slots = rest
        metadata = (token_slots, token_order, segment_starts, segment_lengths)
        t_partials = _delta_into(x, A, B, *metadata, scales, ranks, out, keep_t=ctx.needs_input_grad[3])
        ctx.t_backend = select(x.device, x.dtype)
        ctx.mark_dirty(out)
        ctx.save_for_backward(x, A, B, *metadata, scales, ranks, grad_slots, t_partials)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return (grad_out, *_eager_backward(ctx, grad_out, 1))


def _eager_backward(ctx, grad_out: Tensor, first: int) -> tuple:
    """Gradients of x, A and B (None where not needed), then None for the metadata arguments."""
    x, A, B, *metadata, scales, ranks, grad_slots, t_partials = ctx.saved_tensors
    needs = ctx.needs_input_grad[first : first + 3]
    if t_partials is not None and _backward_backend(x.device, x.dtype) != ctx.t_backend:
        t_partials = None  # the backend changed between forward and backward: it computes its own
    grads = _delta_backward_impl(
        grad_out, x, A, B, *metadata, scales, ranks, grad_slots, *needs, t_partials=t_partials
    )
    return (*(g if need else None for g, need in zip(grads, needs, strict=True)), *(None,) * 7)


def _dispatch_mode_active() -> bool:
    return _DISPATCH_STACK_DEPTH is None or _DISPATCH_STACK_DEPTH() > 0


_DISPATCH_STACK_DEPTH = getattr(torch._C, "_len_torch_dispatch_stack", None)


def _check_x_A(x: object, A: object, batch: AdapterBatch) -> tuple[Tensor, Tensor]:
    x = check.float_tensor(x, "x", 2)
    A = check.float_tensor(A, "A", 3)
    check.dim_size(x, "x", 0, batch.num_tokens, "the batch's token count")
    check.dim_size(A, "A", 0, batch.num_slots, "the batch's num_slots")
    check.dim_size(A, "A", 2, x.shape[1], "d_in of x")
    check.same_dtype(A, "A", x.dtype, "x")
    return x, A


def _check_B(B: object, batch: AdapterBatch, r_max: int, r_source: str) -> Tensor:
    B = check.float_tensor(B, "B", 3)
    check.dim_size(B, "B", 0, batch.num_slots, "the batch's num_slots")
    check.dim_size(B, "B", 2, r_max, f"r_max ({r_source})")
    return B


def _check_out(out: object, num_tokens: int, d_out: int, dtype: torch.dtype, dtype_source: str) -> Tensor:
    out = check.float_tensor(out, "out", 2)
    check.dim_size(out, "out", 0, num_tokens, "the batch's token count")
    check.dim_size(out, "out", 1, d_out, "d_out (B.shape[1])")
    check.same_dtype(out, "out", dtype, dtype_source)
    return out


def lora_shrink(x: Tensor, A: Tensor, batch: AdapterBatch, ranks: Tensor | None = None) -> Tensor:
    """``t [T, r_max]``, ``t[i, :k] = A[a_i, :k] @ x_i``, zero elsewhere.

    ``x [T, d_in]``, ``A [S, r_max, d_in]``; t is float32 (float64 for float64 x).
    """
    batch = check.batch(batch)
    x, A = _check_x_A(x, A, batch)
    ranks = check.ranks(ranks, batch.num_slots, A.shape[1])
    check.same_device(batch.device, {"x": x, "A": A, "ranks": ranks})
    op = _shrink_impl if _eager_direct(x, A) else torch.ops.lora_fast.lora_shrink
    return op(x, A, *batch.metadata, ranks)


def lora_expand(
    t: Tensor,
    B: Tensor,
    batch: AdapterBatch,
    scales: Tensor,
    out: Tensor,
    ranks: Tensor | None = None,
) -> Tensor:
    """Adds ``scales[a_i] * B[a_i][:, :k] @ t[i, :k]`` into ``out[i]`` in place and returns ``out``.

    ``t [T, r_max]`` (any float dtype; only its first k columns per token are read),
    ``B [S, d_out, r_max]``, ``scales [S]`` float32 (or float64 for float64 B), ``out [T, d_out]``
    of B's dtype.
    """
    batch = check.batch(batch)
    t = check.float_tensor(t, "t", 2)
    check.dim_size(t, "t", 0, batch.num_tokens, "the batch's token count")
    B = _check_B(B, batch, t.shape[1], "t.shape[1]")
    out = _check_out(out, batch.num_tokens, B.shape[1], B.dtype, "B")
    scales = check.scales(scales, batch.num_slots, B.dtype)
    ranks = check.ranks(ranks, batch.num_slots, B.shape[2])
    check.same_device(batch.device, {"t": t, "B": B, "scales": scales, "ranks": ranks, "out": out})
    check.no_overlap(out, "out", {"t": t, "B": B})
    op = _expand_impl if _eager_direct(t, B, out) else torch.ops.lora_fast.lora_expand_
    op(t, B, *batch.metadata, scales, ranks, out)
    return out


def lora_delta(
    x: Tensor,
    A: Tensor,
    B: Tensor,
    batch: AdapterBatch,
    scales: Tensor,
    ranks: Tensor | None = None,
    out: Tensor | None = None,
    grad_slots: Tensor | None = None,
    check_args: bool = True,
) -> Tensor:
    """The multi-adapter LoRA delta ``scales[a_i] * B[a_i][:, :k] @ (A[a_i][:k] @ x_i)`` per token.

    ``x [T, d_in]``, ``A [S, r_max, d_in]``, ``B [S, d_out, r_max]`` (one dtype), ``scales [S]``
    float32 (or float64 for float64 x), ``ranks [S]`` int (default r_max for every slot). Tokens
    whose slot is -1 get nothing.
    With ``out [T, d_out]`` given the delta is added into it in place and ``out`` is returned;
    otherwise a new ``[T, d_out]`` tensor holding the delta is returned.

    Differentiable w.r.t. x, A and B: each slot's weight gradients sum over that slot's tokens.
    ``grad_slots [S]`` bool limits the weight gradients to the slots marked True; the others get
    zero gradient and cost no gradient work.

    ``check_args=False`` skips the argument checks, for callers that build every argument
    themselves (lora_fast's layers and integrations, once per layer call); a wrong argument is
    then not caught before the kernel.
    """
    if check_args:
        _check_delta_args(x, A, B, batch, scales, ranks, out, grad_slots)
    if out is None or _needs_grad(x, A, B, out):
        if out is not None and not (out.requires_grad and out.is_leaf) and _eager_plain(x, A, B, out):
            # in place with autograd: out += delta, no delta tensor (out keeps its own history)
            return _DeltaIntoFunction.apply(out, x, A, B, *batch.metadata, scales, ranks, grad_slots)
        if _eager_direct(x, A, B):
            op = _delta_functional_impl
        elif _eager_plain(x, A, B):
            op = _DeltaFunction.apply
        else:
            op = torch.ops.lora_fast.lora_delta
        delta = op(x, A, B, *batch.metadata, scales, ranks, grad_slots)
        # autograd tracks an out-of-place delta; adding it keeps out's own history intact
        return delta if out is None else out.add_(delta)
    op = _delta_impl if _eager_direct(x, A, B, out) else torch.ops.lora_fast.lora_delta_
    op(x, A, B, *batch.metadata, scales, ranks, out)
    return out


def _fused_cpu_kernel_runs(x: Tensor, W: Tensor, bias: Tensor | None, A: Tensor, B: Tensor) -> bool:
    """True when :func:`fused_lora_linear` runs these tensors through the C++ CPU kernel directly
    (``torch.ops.lora_fast_C.fused_lora_linear``, no autograd, nothing else around it)."""
    dtype = x.dtype
    return (
        (dtype == torch.float32 or dtype == torch.float64)
        and x.shape[0] <= (FUSED_MAX_TOKENS if torch.get_num_threads() == 1 else FUSED_MAX_TOKENS_THREADED)
        and _cpu_kernels_run(x, W, bias, A, B)
    )


def _cpu_kernels_run(x: Tensor, W: Tensor, bias: Tensor | None, A: Tensor, B: Tensor) -> bool:
    """True when :func:`fused_lora_linear` computes these tensors with the C++ CPU kernels alone,
    nothing else: no autograd, the CPU backend. It then runs the fused kernel where
    :func:`_fused_cpu_kernel_runs` says so, else ``F.linear`` and the delta kernel
    (``lora_fast_C.lora_delta_``, through :func:`lora_delta`'s direct path)."""
    return (
        x.is_cpu
        and x.dtype.is_floating_point
        and _eager_direct(x, W, A, B, *(() if bias is None else (bias,)))
        and select(_CPU, x.dtype) == "cpu"
    )


def fused_lora_linear(
    x: Tensor,
    W: Tensor,
    bias: Tensor | None,
    A: Tensor,
    B: Tensor,
    batch: AdapterBatch,
    scales: Tensor,
    ranks: Tensor | None = None,
    check_args: bool = True,
) -> Tensor:
    """A base linear layer and its adapters in one call: ``x @ W^T + bias + lora_delta(x, ...)``.

    ``x [T, d_in]``, ``W [d_out, d_in]``, ``bias [d_out]`` or None (x's dtype); ``A``, ``B``,
    ``batch``, ``scales`` and ``ranks`` as in :func:`lora_delta`. Returns a new ``[T, d_out]``.

    On the CPU, for float32/float64 batches of at most ``FUSED_MAX_TOKENS`` tokens (one torch
    thread; ``FUSED_MAX_TOKENS_THREADED`` with more) and no autograd, one C++ kernel computes the
    base GEMM in register tiles (faster than the BLAS library at decode sizes) and adds the LoRA
    delta into the still-cached output rows.
    With the Triton backend and no autograd, where the GPU's config table has a ``linear`` row
    for the shape, the shrink runs and then one kernel computes the base GEMM and adds the expand
    to its tile before writing it (kernels/lora_linear.py). Without such a row, with
    ``LORA_FAST_OVERLAP_SHRINK=1``, on CUDA while a CUDA graph is captured, the shrink runs on a
    side stream beside ``F.linear`` and the expand adds into its output after both.
    Everywhere else this is ``F.linear`` followed by ``lora_delta`` added into its output, which
    is differentiable w.r.t. every tensor argument.
    """
    if check_args:
        _check_delta_args(x, A, B, batch, scales, ranks, None, None)
        _check_linear_args(x, W, bias, B, batch)
    dtype = x.dtype
    if _fused_cpu_kernel_runs(x, W, bias, A, B):
        # (the kernel converts ranks to int64 itself)
        return _compiled().fused_lora_linear(
            x, W, bias, A, B, batch.token_order, batch.segment_starts, batch.segment_lengths, scales, ranks
        )
    if select(x.device, dtype) == "triton" and _eager_direct(x, W, A, B, *(() if bias is None else (bias,))):
        kernels = _triton()
        config = kernels.linear_config(x.device, x.shape[0], A.shape[1], x.shape[1])
        if config is not None:  # the table's linear row: shrink, then GEMM + expand in one kernel
            segments = (batch.segment_starts, batch.segment_lengths)
            return kernels.lora_linear(
                _unit_stride_rows(x),
                W,
                bias,
                A,
                B,
                batch.token_order,
                batch.token_slots,
                scales,
                _int64(ranks),
                config,
                segments=segments,
            )
        if (
            x.is_cuda
            and os.environ.get(OVERLAP_ENV) == "1"
            and batch.num_tokens > 0
            and torch.cuda.is_current_stream_capturing()
        ):
            return _overlapped_linear(x, W, bias, A, B, batch, scales, ranks)
    out = torch.nn.functional.linear(x, W, bias)
    return lora_delta(x, A, B, batch, scales, ranks, out=out, check_args=False)


# With LORA_FAST_OVERLAP_SHRINK=1, while a CUDA graph is captured, fused_lora_linear runs the
# shrink on a side stream beside the base GEMM (both only read x), and the expand after both.
# Opt-in: on the H100 (bench_peft, which times the graph both ways) it took 5% off a 16-adapter
# decode step, nothing at 64 adapters, and cost 1-2% at prefill. Eager calls never
# fork: the stream switch would cost host time that an eager decode step (host-bound already)
# pays in full.
OVERLAP_ENV = "LORA_FAST_OVERLAP_SHRINK"
_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _overlapped_linear(
    x: Tensor,
    W: Tensor,
    bias: Tensor | None,
    A: Tensor,
    B: Tensor,
    batch: AdapterBatch,
    scales: Tensor,
    ranks: Tensor | None,
) -> Tensor:
    """fused_lora_linear's graph-capture path: in the captured graph the shrink is a branch
    parallel to the base GEMM instead of a node after it."""
    kernels = _triton()
    x = _unit_stride_rows(x)
    ranks = _int64(ranks)
    segments = (batch.segment_starts, batch.segment_lengths)
    current = torch.cuda.current_stream(x.device)
    side = _SIDE_STREAMS.get(x.device.index)
    if side is None:  # a pool stream: torch creates its pool before any capture begins
        side = _SIDE_STREAMS[x.device.index] = torch.cuda.Stream(x.device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        partials = kernels.lora_shrink_partials(
            x, A, batch.token_order, batch.token_slots, ranks, None, segments, zeroed=False
        )
    out = torch.nn.functional.linear(x, W, bias)
    current.wait_stream(side)
    kernels.lora_expand_(
        partials, B, batch.token_order, batch.token_slots, scales, ranks, out, None, segments
    )
    return out


def _check_linear_args(x: Tensor, W: object, bias: object, B: Tensor, batch: AdapterBatch) -> None:
    """W and bias of fused_lora_linear, once x, A, B and the batch have passed their checks."""
    W = check.float_tensor(W, "W", 2)
    check.dim_size(W, "W", 1, x.shape[1], "d_in of x")
    check.dim_size(W, "W", 0, B.shape[1], "d_out of B")
    check.same_dtype(W, "W", x.dtype, "x")
    if bias is not None:
        bias = check.float_tensor(bias, "bias", 1)
        check.dim_size(bias, "bias", 0, W.shape[0], "d_out of W")
        check.same_dtype(bias, "bias", x.dtype, "x")
    check.same_device(batch.device, {"W": W, "bias": bias})


def _check_delta_args(x, A, B, batch, scales, ranks, out, grad_slots) -> None:
    batch = check.batch(batch)
    x, A = _check_x_A(x, A, batch)
    B = _check_B(B, batch, A.shape[1], "A.shape[1]")
    check.same_dtype(B, "B", x.dtype, "x")
    scales = check.scales(scales, batch.num_slots, x.dtype)
    ranks = check.ranks(ranks, batch.num_slots, A.shape[1])
    grad_slots = check.grad_slots(grad_slots, batch.num_slots)
    check.same_device(
        batch.device, {"x": x, "A": A, "B": B, "scales": scales, "ranks": ranks, "grad_slots": grad_slots}
    )
    if out is not None:
        out = _check_out(out, batch.num_tokens, B.shape[1], x.dtype, "x")
        check.same_device(batch.device, {"out": out})
        check.no_overlap(out, "out", {"x": x, "A": A, "B": B})


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


from .ops_subspace import subspace_lora_delta, subspace_project  # noqa: E402, F401
