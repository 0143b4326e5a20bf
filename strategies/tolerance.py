"""When is a fused output "the same" as the original's? The tolerance rule, in one place.

For one network and its inputs (``measure_reference``):

- ``orig``: the original network, evaluated in its own dtype;
- ``ref``: a float64 copy of it (the same parameter values, upcast): the reference;
- ``ref~``: ``ref`` evaluated with one rounding's worth of noise wherever rounding happens: every
  floating parameter and buffer, and the floating result of every torch operation, multiplied by
  ``1 + eps(dtype) * u`` (``u`` uniform in [-1, 1], seeded), the standard model of floating-point
  evaluation applied in the network's dtype; a batch norm on batch statistics is evaluated step by
  step, each step rounded (``RoundingNoise``).

Then::

    err_unfused  = max |orig(x) - ref(x)|    rounding actually observed evaluating the network
    err_rounding = max |ref~(x) - ref(x)|    effect of one rounding of every constant and result,
                                             the largest of NOISE_SAMPLES independent draws
    allowed      = UNFUSED_MULTIPLE * (err_unfused + err_rounding)
                   + FLOOR_ULPS * eps(dtype) * max |ref(x)|
    pass         iff  err_fused = max |fused(x) - ref(x)| <= allowed

Why:

- Folding is exact in real arithmetic, so every difference between ``fused`` and ``orig`` is
  rounding. A correct fold adds two kinds: the folded constants (``w * s``, the new bias) are rounded
  once to the dtype, and the fused model evaluates a re-associated computation whose intermediate
  results and accumulations round differently. ``err_unfused`` is the second kind as it actually
  happens in this network (accumulation order, cancellation, large BN scales); ``err_rounding`` is the
  first kind, to first order. Both are properties of the network, never of the fuser under test.
- Neither is enough alone. float16/bfloat16 kernels accumulate in float32, so ``err_unfused`` is about
  one output rounding while a rounded folded weight moves the output by one rounding per product;
  ``err_rounding`` covers that. ``err_rounding`` only perturbs results, not the partial sums inside a
  convolution, which ``err_unfused`` measures.
- float64 networks are their own reference, so ``err_unfused`` would be exactly 0. For them it is
  measured on a float32 copy and scaled by ``eps(float64) / eps(float32)`` (same kernels, same
  accumulation order, first order in eps); and since a float64 rounding of the constants would itself
  be rounded away, ``ref~`` perturbs by ``MIN_STEP`` and scales the effect back (``perturbation_step``).
- ``err_rounding`` is a random variable, and one draw of it (like ``err_unfused``, one run) can be
  near zero by luck; where the output varies with one number, no maximum over the output averages
  that away. The largest of ``NOISE_SAMPLES`` draws is rarely small.
- The maxima are over the whole output, not per element: per-element errors are samples of
  independent roundings, and one being small by luck would make a per-element rule flaky.
- ``UNFUSED_MULTIPLE = 4`` absorbs which roundings happen to align; ``FLOOR_ULPS = 4`` units in the last
  place of the largest output only matters for degenerate networks whose outputs are exactly
  representable. Both constants are fixed and small (``docs/tolerance.md`` has the calibration): a
  real bug is orders of magnitude above ``allowed``. Never raise them to make a test pass.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

UNFUSED_MULTIPLE = 4.0
FLOOR_ULPS = 4.0
MIN_STEP = 2.0**-24  # smallest perturbation float64 resolves to first order, about 6e-8
NOISE_SAMPLES = 3  # independent draws of ref~; err_rounding is the largest (see measure_reference)


class OutOfRange(Exception):
    """The original network's own output is not finite in its dtype (float16 overflow): there
    is nothing to compare against, so the example says nothing about the fuser."""


@dataclass(frozen=True)
class Reference:
    """What a fused output is judged against, measured once per network."""

    original_output: torch.Tensor
    output: torch.Tensor  # float64, on the cpu
    err_unfused: float
    err_rounding: float
    inputs_after: tuple[torch.Tensor, ...]  # the inputs as the original's run left them

    @property
    def dtype(self) -> torch.dtype:
        return self.original_output.dtype

    @property
    def scale(self) -> float:
        return float(self.output.abs().max()) if self.output.numel() else 0.0

    @property
    def floor(self) -> float:
        return FLOOR_ULPS * torch.finfo(self.dtype).eps * self.scale

    @property
    def allowed(self) -> float:
        return UNFUSED_MULTIPLE * (self.err_unfused + self.err_rounding) + self.floor

    def compare(self, fused_output: torch.Tensor) -> Comparison:
        """Apply the rule to a fused output of the same shape."""
        errors = _errors(fused_output, self.output)
        worst = int(errors.argmax()) if errors.numel() else 0
        return Comparison(self, _largest(errors), _unravel(worst, tuple(self.output.shape)))


@dataclass(frozen=True)
class Comparison:
    """One application of the rule."""

    reference: Reference
    err_fused: float
    worst_index: tuple[int, ...]

    @property
    def ok(self) -> bool:
        return self.err_fused <= self.reference.allowed

    def describe(self) -> str:
        r = self.reference
        return (
            f"max error {self.err_fused:.3e} vs allowed {r.allowed:.3e} "
            f"(= {UNFUSED_MULTIPLE:g} x (unfused error {r.err_unfused:.3e} + rounding-noise "
            f"error {r.err_rounding:.3e}) + floor {r.floor:.3e}; {r.dtype}, "
            f"max |output| {r.scale:.3g}), worst at output index {self.worst_index}"
        )


def measure_reference(model: nn.Module, inputs: tuple[torch.Tensor, ...], seed: int) -> Reference:
    """Evaluate ``model`` and the float64 copies the rule needs. ``model`` is evaluated as it
    is (a training-mode BN in it updates its statistics); its copies are taken first."""
    reference = copy.deepcopy(model).to(torch.float64)
    is_float64 = inputs[0].dtype == torch.float64
    float32_copy = copy.deepcopy(model).to(torch.float32) if is_float64 else None
    reference_inputs = tuple(x.double() for x in inputs)
    original_output, inputs_after = evaluate(model, inputs)
    output = evaluate(reference, reference_inputs)[0].detach().double().cpu()
    if not (torch.isfinite(original_output).all() and torch.isfinite(output).all()):
        raise OutOfRange(f"the original network overflows in {original_output.dtype}")
    dtype = original_output.dtype
    if float32_copy is None:
        err_unfused = _largest(_errors(original_output, output))
    else:
        float32_output = evaluate(float32_copy, tuple(x.float() for x in inputs))[0]
        ratio = torch.finfo(torch.float64).eps / torch.finfo(torch.float32).eps
        err_unfused = _largest(_errors(float32_output, output)) * ratio
    noisy_outputs = [
        rounding_noise_output(reference, reference_inputs, dtype, seed + 2 * sample)
        for sample in range(NOISE_SAMPLES)
    ]
    err_rounding = max(_largest(_errors(noisy, output)) for noisy in noisy_outputs)
    err_rounding *= torch.finfo(dtype).eps / perturbation_step(dtype)
    return Reference(original_output, output, err_unfused, err_rounding, inputs_after)


def evaluate(
    module: nn.Module, inputs: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Run ``module`` on its own copy of ``inputs``: its output, and the copy as the run left it.

    A network may change its input in place (``Act.inplace``), and every run (original, float64
    reference, fused, fused twice) must start from the values the network was built with."""
    copies = fresh_copies(inputs)
    with torch.no_grad():
        return module(*copies), copies


def fresh_copies(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(x.clone() for x in inputs)


def _errors(value: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return (value.detach().double().cpu() - reference).abs()


def _unravel(flat_index: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The index of element ``flat_index`` of a contiguous tensor of ``shape`` (plain Python:
    ``torch.unravel_index`` needs torch 2.2, and tox.ini's oldest torch is 2.1)."""
    index = []
    for size in reversed(shape):
        flat_index, position = divmod(flat_index, size) if size else (flat_index, 0)
        index.append(position)
    return tuple(reversed(index))


def _largest(errors: torch.Tensor) -> float:
    return float(errors.max()) if errors.numel() else 0.0


def perturbation_step(dtype: torch.dtype) -> float:
    """The relative perturbation ``ref~`` applies: one rounding of ``dtype`` (its eps), except
    for float64, where one float64 rounding applied in float64 would itself be rounded away; there
    the step is ``MIN_STEP`` and the output change is scaled back by ``eps / step``."""
    return max(torch.finfo(dtype).eps, MIN_STEP)


@contextlib.contextmanager
def perturbed_constants(module: nn.Module, dtype: torch.dtype, seed: int) -> Iterator[None]:
    """While active, every floating parameter and buffer of ``module`` (float64) is multiplied
    in place by ``1 + step * u``, ``u`` uniform in [-1, 1] (see ``perturbation_step``); on exit
    they are put back as they were, so the next sample starts from the same constants."""
    step = perturbation_step(dtype)
    generator = torch.Generator().manual_seed(seed)
    tensors = [t for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()]
    originals = [t.detach().clone() for t in tensors]
    with torch.no_grad():
        for tensor in tensors:
            tensor.mul_(_noise(tensor, step, generator))
    try:
        yield
    finally:
        with torch.no_grad():
            for tensor, original in zip(tensors, originals, strict=True):
                tensor.copy_(original)


def _noise(like: torch.Tensor, step: float, generator: torch.Generator) -> torch.Tensor:
    """``1 + step * u`` for ``u`` uniform in [-1, 1], shaped like ``like``; drawn on the CPU (the
    generator's device, so a seed gives the same noise on every device), in one operation."""
    noise = torch.empty(like.shape, dtype=torch.float64)
    return noise.uniform_(1 - step, 1 + step, generator=generator).to(like.device, like.dtype)


class RoundingNoise(TorchFunctionMode):
    """While active, multiplies the floating result of every torch operation by ``1 + step * u``:
    each operation's result rounded once, as in the standard floating-point error model.

    One operation is more than one rounding: a batch norm on batch statistics computes the batch
    mean and subtracts it inside one call, and when the values are far from zero compared with
    their spread (``x`` about -1.47, spread 0.02) the rounding of that mean moves every output by
    ``eps * |x| / std``, dozens of roundings of the output, while the rounding of its inputs moves
    them all alike and cancels. Such calls are evaluated step by step, each step rounded
    (``_batch_norm_in_steps``)."""

    def __init__(self, dtype: torch.dtype, seed: int) -> None:
        super().__init__()
        self.step = perturbation_step(dtype)
        self.generator = torch.Generator().manual_seed(seed)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))  # also what the call does besides its result
        batch_norm = _batch_statistics_call(func, args, kwargs or {})
        if batch_norm is not None:
            return self._batch_norm_in_steps(*batch_norm)
        if _views_an_argument(result, args, kwargs or {}):
            return result
        return self.rounded(result)

    def rounded(self, result):
        if isinstance(result, torch.Tensor) and result.is_floating_point():
            result = result * _noise(result, self.step, self.generator)
        return result

    def _batch_norm_in_steps(
        self,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
    ) -> torch.Tensor:
        """Batch norm on batch statistics with each of its steps rounded: the batch mean, the
        centred values, the (biased) variance, its inverse square root, the scaling and the
        affine transform."""
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [-1 if d == 1 else 1 for d in range(x.dim())]
        centred = self.rounded(x - self.rounded(x.mean(dims, keepdim=True)))
        variance = self.rounded(self.rounded(centred * centred).mean(dims, keepdim=True))
        result = self.rounded(centred * self.rounded(self.rounded(variance + eps).rsqrt()))
        if weight is not None:
            result = self.rounded(result * weight.reshape(shape))
        if bias is not None:
            result = self.rounded(result + bias.reshape(shape))
        return result


def _views_an_argument(result, args: tuple, kwargs: dict) -> bool:
    """Whether ``result`` is a new tensor on an argument's memory (a view, ``.data``): it computes
    nothing, so nothing is rounded, and a rounded copy would cut it off from the tensor it views,
    which the code may then change in place through it (``self.conv.weight.data.neg_()``). An
    in-place operation returns its argument itself, and is rounded as any other result."""
    if not isinstance(result, torch.Tensor):
        return False
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    if any(a is result for a in tensors):
        return False
    memory = result.untyped_storage().data_ptr()
    return any(a.untyped_storage().data_ptr() == memory for a in tensors)


_F_BATCH_NORM = inspect.signature(F.batch_norm)


def _batch_statistics_call(func, args: tuple, kwargs: dict) -> tuple | None:
    """``(input, weight, bias, eps)`` if ``func(*args, **kwargs)`` is a batch norm normalizing
    with the batch's own statistics (``F.batch_norm`` or ``torch.batch_norm`` with ``training``
    true, as BatchNorm modules call it in training mode or without running statistics)."""
    if func is F.batch_norm:
        bound = _F_BATCH_NORM.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        return (a["input"], a["weight"], a["bias"], a["eps"]) if a["training"] else None
    if func is torch.batch_norm and len(args) >= 8:  # input, weight, bias, mean, var, training,
        x, weight, bias, _, _, training, _, eps = args[:8]  # momentum, eps, cudnn_enabled
        return (x, weight, bias, eps) if training else None
    return None


def rounding_noise_output(
    reference: nn.Module, inputs: tuple[torch.Tensor, ...], dtype: torch.dtype, seed: int
) -> torch.Tensor:
    """``ref~(x)``: the float64 ``reference`` evaluated with rounding noise of ``dtype`` on every
    constant and every operation's result (one sample of it, drawn from ``seed``)."""
    copies = fresh_copies(inputs)  # outside the mode: copying adds no rounding
    with (
        perturbed_constants(reference, dtype, seed),
        torch.no_grad(),
        RoundingNoise(dtype, seed + 1),
    ):
        return reference(*copies).detach().double().cpu()
