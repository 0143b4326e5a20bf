"""Render a spec as a standalone Python program that builds the network and its inputs.

The rendered program is the network: ``build`` executes exactly this text, so a failure report that
prints it hands over a reproduction that cannot drift from what was tested. Weights, BN statistics
and inputs come from ``torch.Generator`` seeded with the spec's seed, so the program needs no data.
"""

from __future__ import annotations

from strategies.naming import chain_names, local_name, two_calls_names
from strategies.spec import (
    ADD,
    AMPLIFYING,
    CALL_COUNTER,
    CAT,
    COMPUTED_ARGUMENTS,
    COMPUTED_FACTOR,
    CONV,
    CONV_TRANSPOSE,
    COUNTS_CALLS,
    FORWARD_HOOK,
    FORWARD_PRE_HOOK,
    FROZEN,
    FUNCTIONAL,
    GAIN_EXPONENT,
    GUARDED,
    HOOK_READS_MODULE,
    HOOKED,
    INLINE,
    KEEPER,
    LAST_MEAN,
    LOOP_INSPECTS,
    MODULE_STATE,
    NO_GRAD,
    OPAQUE_SUBCLASS,
    PARAMETRIZED,
    REPLACED_FORWARD,
    ROOT_ASKS_A_KEEPER,
    ROOT_RANK_GUARD,
    ROOT_READERS,
    ROOT_READS_MODULE_STATE,
    ROOT_READS_STATE,
    SEQUENTIAL,
    SHRINKING,
    SPIKE,
    SYNC,
    TRACED_SUBCLASS,
    TRAINING,
    TWIN,
    TYPE_CHECK,
    UNTRACEABLE,
    WRAPPER,
    Act,
    Block,
    Chain,
    Layer,
    NetSpec,
    Norm,
    Op,
    TwoCalls,
    readable_layer,
    twin_of,
)

INDENT = "    "
RANK_GUARD = ["if x.dim() < 2:", '    raise ValueError("expected a batched input")']

HEADER = '''\
"""A network drawn by the convbn-fuser property suite. Run it: it builds `model` and `inputs`."""

import math
import types

import torch
import torch.nn as nn
import torch.nn.functional as F
'''

HELPERS = {
    MODULE_STATE: f'''
#: What the counting block keeps of its last call, at module level (no module holds it).
{MODULE_STATE} = {{"{LAST_MEAN}": torch.zeros(())}}
''',
    "Keeper": f'''
class Keeper:
    """A plain object holding a module, whose method reads what that module keeps."""

    def __init__(self, block):
        self.block = block

    def kept(self):
        return self.block.{LAST_MEAN}
''',
    "Tally": '''
class Tally:
    """A plain object counting the calls of its method: a module holding ``tick`` holds no
    object of its own, and its count changes in no module."""

    def __init__(self):
        self.count = 0

    def tick(self):
        self.count += 1
''',
    "BatchNormStats": '''
class BatchNormStats(nn.Module):
    """Statistics and affine parameters read by a functional F.batch_norm call."""

    def __init__(self, num_features, affine, track_running_stats):
        super().__init__()
        self.num_features = num_features
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None
        stats = track_running_stats
        self.register_buffer("running_mean", torch.zeros(num_features) if stats else None)
        self.register_buffer("running_var", torch.ones(num_features) if stats else None)
''',
    "LayerWeights": '''
class LayerWeights(nn.Module):
    """Weight and bias read by a functional F.conv*/F.linear call."""

    def __init__(self, weight_shape, bias_features):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(weight_shape))
        self.bias = nn.Parameter(torch.empty(bias_features)) if bias_features else None
''',
    "shift_output": '''
def shift_output(module, args, output):
    """Forward hook that changes values, so skipping it is visible."""
    return output + 0.25
''',
    "shift_by_own_weights": '''
def shift_by_own_weights(module, args, output):
    """Forward hook that reads its module's parameters: handed a module whose weights fusing
    changed (BNs folded into its layers), it shifts by something else."""
    weights = [p.detach().double().flatten() for p in module.parameters()]
    mean = torch.cat(weights).mean() if weights else torch.zeros((), dtype=torch.float64)
    return output + (0.25 * torch.tanh(mean)).to(output.dtype)
''',
    "shrink_batch_norm": '''
def shrink_batch_norm(bn):
    """Scale a BatchNorm's output down to about 2**-GAIN (gamma and beta), for a spiked layer."""
    with torch.no_grad():
        bn.weight.mul_(2.0**-GAIN)
        bn.bias.mul_(2.0**-GAIN)
''',
    "spike_weight": '''
def spike_weight(layer):
    """One weight entry of SPIKE; the bias scaled like the small inputs the layer reads."""
    with torch.no_grad():
        layer.weight.view(-1)[0] = SPIKE
        if layer.bias is not None:
            layer.bias.mul_(2.0**-GAIN)
''',
    "amplify_batch_norm": '''
def amplify_batch_norm(bn, eps, seed):
    """Statistics for a BatchNorm reading values of about 2**-GAIN: running mean of that size,
    scale gamma / sqrt(var + eps) of 1.25..2 times 2**GAIN in every channel, so its output is
    O(10) while folding it into a SPIKE weight gives more than float16's 65504."""
    generator = torch.Generator().manual_seed(seed)
    count = bn.running_var.numel()

    def uniform(low, high):
        return low + (high - low) * torch.rand(count, generator=generator, dtype=torch.float64)

    def signs():
        return torch.where(uniform(0, 1) < 0.5, -1.0, 1.0).double()

    var = torch.exp(uniform(math.log(1e-4), math.log(1e-2)))
    with torch.no_grad():
        bn.running_var.copy_(var)
        bn.running_mean.copy_(signs() * uniform(0.5, 1.5) * 2.0**-GAIN)
        bn.weight.copy_(signs() * uniform(1.25, 2.0) * 2.0**GAIN * (var + eps).sqrt())
        bn.bias.copy_(uniform(-1.0, 1.0))
''',
    FROZEN: """
from torchvision.ops.misc import FrozenBatchNorm2d
""",
    "keep_norms_float32": '''
def keep_norms_float32(model, norms):
    """BatchNorms back in float32 in a half-precision network, as mixed-precision training leaves
    them (apex's O2, timm's half-precision export, ``model.half()`` then ``bn.float()``): their
    inputs and outputs stay in the network's dtype, their statistics and affine parameters not."""
    for module in model.modules():
        if isinstance(module, norms):
            module.float()
''',
    "shift_forward": '''
def shift_forward(module):
    """Replace forward on the instance, as monkeypatching does, with one that shifts the output:
    the class still says what the module is, no longer what it computes."""
    module.forward = types.MethodType(shifted_forward, module)


def shifted_forward(self, x):
    return type(self).forward(self, x) + 0.25
''',
    "reverse_channels_on_read": '''
class ChannelsReversed(nn.Module):
    """A parametrization: the module reads its stored tensor in reverse channel order."""

    def forward(self, stored):
        return stored.flip(0)

    def right_inverse(self, value):
        return value.flip(0)


def reverse_channels_on_read(bn):
    """Store a BatchNorm's weight (its running variance when it has none) in reverse channel
    order, reversed back by a parametrization on every read: the module computes what it did,
    but the tensor is computed on every call, and the stored one is not what it reads."""
    name = "weight" if bn.weight is not None else "running_var"
    torch.nn.utils.parametrize.register_parametrization(bn, name, ChannelsReversed())
''',
    "NegatesHeldTensor": '''
class NegatesHeldTensor(nn.Module):
    """Holds a tensor as a plain attribute (no parameter, no buffer) and negates it in place on
    every call. It branches on its input, so FX cannot trace it: its code runs as written."""

    def __init__(self, tensor):
        super().__init__()
        self.__dict__["held"] = tensor

    def forward(self, x):
        if x.numel() >= 0:  # always, but a branch on the input
            self.held.data.neg_()
''',
    "NegatesHandedTensor": '''
class NegatesHandedTensor(nn.Module):
    """Negates the tensor it is handed, in place. It branches on that tensor, so FX cannot trace
    it: its code runs as written, with the tensor in hand."""

    def forward(self, tensor):
        if tensor.numel() >= 0:  # always, but a branch on the tensor
            tensor.data.neg_()
''',
    "negate_wrapped": '''
def negate_wrapped(tensor):
    """Negates a tensor in place; FX calls it whole (torch.fx.wrap), its code untraced."""
    tensor.data.neg_()


torch.fx.wrap("negate_wrapped")
''',
    "scale_input": '''
def scale_input(module, args):
    """Forward pre-hook that changes values, so skipping it is visible."""
    return (args[0] * 0.5,)
''',
}

for _dims in (1, 2, 3):
    HELPERS[f"TracedBatchNorm{_dims}d"] = f'''
class TracedBatchNorm{_dims}d(nn.BatchNorm{_dims}d):
    """Overrides forward with F.batch_norm then ReLU (like timm's BatchNormAct2d): traceable."""

    def forward(self, x):
        x = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )
        return F.relu(x)
'''
    HELPERS[f"OpaqueBatchNorm{_dims}d"] = f'''
class OpaqueBatchNorm{_dims}d(nn.BatchNorm{_dims}d):
    """Overrides forward through super().forward, which FX cannot trace (it checks the rank)."""

    def forward(self, x):
        return super().forward(x) + 0.125
'''

for _layer_class in ("Linear", *(f"{k}{d}d" for k in ("Conv", "ConvTranspose") for d in (1, 2, 3))):
    HELPERS[f"ShiftedCall{_layer_class}"] = f'''
class ShiftedCall{_layer_class}(nn.{_layer_class}):
    """Its class's __call__ shifts what forward returns. FX runs __call__ and records the shift;
    the class is not torch.nn's, so FX traces through forward (a functional call on the weight)."""

    def __call__(self, *args, **kwargs):
        return super().__call__(*args, **kwargs) - 0.25
'''

RANDOMIZE = '''
def randomize(model, seed):
    """Deterministic values from the seed: activations stay O(1), BN statistics far from defaults
    (running_var log-uniform over 1e-4..1e2, running_mean away from zero, gamma and beta of both
    signs and sometimes zero, gamma scaled by sqrt(running_var) so outputs stay O(1))."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(shape, low, high):
        return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)

    def signs(shape):
        return torch.where(uniform(shape, 0, 1) < 0.5, -1.0, 1.0).double()

    def sometimes_zero(values):
        return torch.where(uniform(values.shape, 0, 1) < 0.125, 0.0, values)

    norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d{other_norms})
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, norms):
                count = module.running_var.numel() if module.running_var is not None else 0
                count = getattr(module, "num_features", count)  # FrozenBatchNorm2d has none
                var = torch.ones(count, dtype=torch.float64)
                if module.running_var is not None:
                    var = torch.exp(uniform(count, math.log(1e-4), math.log(1e2)))
                    module.running_var.copy_(var)
                    module.running_mean.copy_(signs(count) * uniform(count, 0.5, 1.5))
                if module.weight is not None:
                    gamma = signs(count) * uniform(count, 0.25, 2.0) * var.sqrt()
                    module.weight.copy_(sometimes_zero(gamma))
                    module.bias.copy_(sometimes_zero(uniform(count, -1.0, 1.0)))
                continue
            for name, param in module.named_parameters(recurse=False):
                if name == "weight":
                    fan_in = param[0].numel()
                    values = torch.randn(param.shape, generator=generator, dtype=torch.float64)
                    param.copy_(values / fan_in**0.5)
                else:
                    param.copy_(uniform(param.shape, -0.5, 0.5))
'''


def render_source(spec: NetSpec) -> str:
    """A runnable program that builds ``model`` (eval mode, hooks and training flags set) and
    ``inputs`` (a tuple) for this spec, deterministically from its seed."""
    renderer = _Renderer(spec)
    return renderer.program()


def _literal(value: object) -> str:
    """A compact Python literal: ``(3, 3)`` becomes ``3``."""
    if isinstance(value, tuple) and value and all(v == value[0] for v in value):
        return repr(value[0])
    return repr(value)


def _batchnorm_class(norm: Norm) -> str:
    if norm.module_class == SYNC:
        return "nn.SyncBatchNorm"
    if norm.module_class == FROZEN:
        return FROZEN  # imported from torchvision.ops.misc (HELPERS)
    dims = {2: 1, 3: 1, 4: 2, 5: 3}[norm.input_ndim]
    prefix = {TRACED_SUBCLASS: "Traced", OPAQUE_SUBCLASS: "Opaque"}.get(norm.style, "nn.")
    return f"{prefix}BatchNorm{dims}d"


def _weight_shape(layer: Layer) -> tuple[int, ...]:
    if layer.kind == CONV:
        return (layer.out_channels, layer.in_channels // layer.groups, *layer.kernel_size)
    if layer.kind == CONV_TRANSPOSE:
        return (layer.in_channels, layer.out_channels // layer.groups, *layer.kernel_size)
    return (layer.out_channels, layer.in_channels)


def _layer_options(layer: Layer, functional: bool) -> list[str]:
    """Keyword arguments that differ from the defaults, in the order torch documents them."""
    options = []
    if layer.kind == CONV_TRANSPOSE:
        names = ("stride", "padding", "output_padding", "groups", "dilation")
    else:
        names = ("stride", "padding", "dilation", "groups")
    defaults = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1, "output_padding": 0}
    for name in names:
        value = getattr(layer, name)
        if _literal(value) != repr(defaults[name]):
            options.append(f"{name}={_literal(value)}")
    if not functional:
        if not layer.bias:
            options.append("bias=False")
        if layer.padding_mode != "zeros":
            options.append(f"padding_mode={layer.padding_mode!r}")
    return options


def _constructor(op: Op) -> str | None:
    """The expression that creates an op's submodule (or holder), ``None`` when it has none."""
    if isinstance(op, Layer):
        if op.functional:
            bias = op.out_channels if op.bias else 0
            return f"LayerWeights({_weight_shape(op)!r}, {bias})"
        if op.kind == "linear":
            bias = "" if op.bias else ", bias=False"
            return f"{_layer_class(op)}({op.in_channels}, {op.out_channels}{bias})"
        options = [f"kernel_size={_literal(op.kernel_size)}", *_layer_options(op, False)]
        args = ", ".join([str(op.in_channels), str(op.out_channels), *options])
        return f"{_layer_class(op)}({args})"
    if isinstance(op, Norm):
        if op.style == FUNCTIONAL:
            return (
                f"BatchNormStats({op.num_features}, affine={op.affine}, "
                f"track_running_stats={op.track_running_stats})"
            )
        if op.module_class == FROZEN:  # always affine, with statistics, and no momentum
            return f"{FROZEN}({op.num_features}, eps={op.eps!r})"
        options = [f"eps={op.eps!r}", f"momentum={op.momentum!r}"]
        if not op.affine:
            options.append("affine=False")
        if not op.track_running_stats:
            options.append("track_running_stats=False")
        return f"{_batchnorm_class(op)}({op.num_features}, {', '.join(options)})"
    if isinstance(op, Act):
        inplace = "inplace=True" if op.inplace else ""
        leaky_options = "0.1, inplace=True" if op.inplace else "0.1"
        return {
            "relu": f"nn.ReLU({inplace})",
            "tanh": "nn.Tanh()",
            "gelu": "nn.GELU()",
            "leaky_relu": f"nn.LeakyReLU({leaky_options})",
            "hardswish": f"nn.Hardswish({inplace})",
            "identity": "nn.Identity()",
        }[op.kind]
    return f"nn.Flatten({op.start_dim})"


def _layer_class(layer: Layer) -> str:
    """``nn.Conv2d``, ``nn.Linear``, ...; ``ShiftedCallConv2d`` and so on for a layer whose class
    overrides ``__call__`` (``Layer.call_override``)."""
    if layer.kind == "linear":
        name = "Linear"
    else:
        name = f"{'Conv' if layer.kind == CONV else 'ConvTranspose'}{layer.spatial_dims}d"
    return f"ShiftedCall{name}" if layer.call_override else f"nn.{name}"


def _functional_layer_call(layer: Layer, value: str, owner: str) -> str:
    """``F.conv*``/``F.linear`` on ``owner.weight`` and ``owner.bias`` (left out where
    ``layer.bias_omitted``; one of them computed where ``layer.computed``)."""
    weight, bias = (_argument(owner, name, layer.computed) for name in COMPUTED_ARGUMENTS)
    args = [value, weight] + ([] if layer.bias_omitted else [bias])
    if layer.kind == "linear":
        return f"F.linear({', '.join(args)})"
    name = "conv" if layer.kind == CONV else "conv_transpose"
    args += _layer_options(layer, True)
    return f"F.{name}{layer.spatial_dims}d({', '.join(args)})"


def _argument(owner: str, name: str, computed: str | None) -> str:
    """``owner.name``, or a value computed from it when the call runs (``computed``)."""
    return f"{owner}.{name} * {COMPUTED_FACTOR!r}" if name == computed else f"{owner}.{name}"


def _call(op: Op, value: str, owner: str | None) -> str:
    """The expression applying an op to ``value``; ``owner`` is its submodule's expression."""
    if isinstance(op, Layer) and op.functional:
        return _functional_layer_call(op, value, owner)
    if isinstance(op, Norm) and op.style == FUNCTIONAL:
        training = op.defect == TRAINING or not op.track_running_stats
        momentum = 0.1 if op.momentum is None else op.momentum
        running = f"{owner}.running_mean, {owner}.running_var"
        weight, bias = (_argument(owner, name, op.computed) for name in COMPUTED_ARGUMENTS)
        affine = f"{weight}, {bias}"
        if op.torch_call:
            arguments = f"{value}, {affine}, {running}, {training}, {momentum!r}, {op.eps!r}, False"
            return f"torch.batch_norm({arguments})"
        return f"F.batch_norm({value}, {running}, {affine}, {training}, {momentum!r}, {op.eps!r})"
    if isinstance(op, Act) and op.functional:
        inplace = ", inplace=True" if op.inplace else ""
        return {
            "relu": f"F.relu({value}{inplace})",
            "tanh": f"torch.tanh({value})",
            "gelu": f"F.gelu({value})",
            "leaky_relu": f"F.leaky_relu({value}, 0.1{inplace})",
            "hardswish": f"F.hardswish({value}{inplace})",
        }[op.kind]
    if owner is None:
        return f"{value}.flatten({op.start_dim})"
    return f"{owner}({value})"


def _negated_in_place(op: Op, owner: str | None) -> list[str]:
    """The lines negating the parameter an op's ``changed_in_place`` names, in its form
    (``IN_PLACE_FORMS``); run before its call and again after, they undo each other."""
    change = getattr(op, "changed_in_place", None)
    if change is None or owner is None:
        return []
    tensor, form = change
    data = f"{owner}.{tensor}.data"
    return {
        "method": [f"{data}.neg_()  # changed in place around its call"],
        "view": [f"{data}.view(-1).neg_()  # changed in place around its call"],
        "function": [f"torch.neg_({data})  # changed in place around its call"],
        "out": [f"torch.neg({data}, out={data})  # changed in place around its call"],
        "augmented": [f"flipped = {data}", "flipped *= -1  # changed in place around its call"],
        "held": [f"{owner}_negator(negated_around)  # changed in place around its call"],
        "wrapped": [f"negate_wrapped({owner}.{tensor})  # changed in place around its call"],
        "handed": [f"{owner}_negator({owner}.{tensor})  # changed in place around its call"],
    }[form]


def _attribute_path(qualname: str) -> str:
    """``self.b2.inner[0][1]``: a submodule reached by attributes and constant indices, as model
    code reaches it (not ``get_submodule``, which reflects on the module)."""
    return "self" + "".join(
        f"[{part}]" if part.isdigit() else f".{part}" for part in qualname.split(".")
    )


def _submodule(qualname: str) -> str:
    """``model.a.b``, or ``model.get_submodule("a.0.1")`` where a name part is a number."""
    if all(part.isidentifier() for part in qualname.split(".")):
        return f"model.{qualname}"
    return f"model.get_submodule({qualname!r})"


def _metadata_assert(kind: str, value: str, expected: int) -> str:
    read = {
        "ndim": f"{value}.ndim",
        "shape": f"{value}.shape[1]",
        "size": f"{value}.size(1)",
        "dim": f"{value}.dim()",
        "numel": f"{value}.numel()",
    }[kind]
    return f'torch._assert({read} == {expected}, "metadata check on {value}")'


class _Renderer:
    """Collects the pieces of one program: helper definitions, classes, root attributes,
    forward lines and the post-construction steps (training flags, hooks)."""

    def __init__(self, spec: NetSpec) -> None:
        self.spec = spec
        self.helpers: set[str] = set()
        self.classes: list[str] = []
        self.root_init: list[str] = []
        self.root_forward: list[str] = []
        self.weight_reads: list[str] = []  # ``Norm.weight_read``: after every block
        self.setup: list[str] = []
        self.norm_classes: set[str] = set()  # BN modules other than nn.BatchNormNd and subclasses
        for index, block in enumerate(spec.blocks):
            self._block(index, block)

    def program(self) -> str:
        if self.spec.replaced_forward:
            self.helpers.add("shift_forward")
        if self.spec.float32_norms:
            self.helpers.add("keep_norms_float32")
        helper_order = [name for name in HELPERS if name in self.helpers]
        parts = [HEADER]
        if self.helpers & {"shrink_batch_norm", "spike_weight", "amplify_batch_norm"}:
            parts.append(f"\nGAIN = {GAIN_EXPONENT}\nSPIKE = {SPIKE!r}\n")
        parts += [*(HELPERS[name] for name in helper_order), *self.classes]
        forward = self.root_forward + self.weight_reads
        if self.spec.root_untraced == ROOT_RANK_GUARD:
            forward = [*RANK_GUARD, *forward]
        parts.append(self._class("Net", "The drawn network.", self.root_init, forward))
        parts.append(RANDOMIZE.replace("{other_norms}", self._other_norms()))
        parts.append(self._make_network())
        parts.append("\nmodel, inputs = make_network()\n")
        return "".join(parts)

    def _class(self, name: str, doc: str, init: list[str], forward: list[str]) -> str:
        body = [f"class {name}(nn.Module):", f'{INDENT}"""{doc}"""', ""]
        body += [f"{INDENT}def __init__(self):", f"{INDENT * 2}super().__init__()"]
        body += [INDENT * 2 + line for line in init]
        body += ["", f"{INDENT}def forward(self, x):"]
        body += [INDENT * 2 + line for line in forward]
        body.append(f"{INDENT * 2}return x")
        return "\n\n" + "\n".join(body) + "\n"

    def _make_network(self) -> str:
        spec = self.spec
        target = f"device={spec.device!r}, dtype=torch.{spec.dtype}"
        lines = [
            "def make_network():",
            "model = Net()",
            f"model = model.to({target}).eval()",
            *(
                # FrozenBatchNorm2d stays half: its ``x * scale + bias`` would return float32, and
                # the next layer's half weights would refuse it (``NetSpec.float32_norms``).
                [f"keep_norms_float32(model, {self._norm_classes(leave_out=(FROZEN,))})"]
                if spec.float32_norms
                else []
            ),
            f"randomize(model, seed={spec.seed})",
            *self.setup,
            *(["shift_forward(model)"] if spec.replaced_forward else []),
            f"generator = torch.Generator().manual_seed({spec.seed + 1})",
            f"x = torch.randn({spec.input_shape!r}, generator=generator, dtype=torch.float64)",
            f"return model, (x.to({target}),)",
        ]
        return "\n\n" + "\n".join(lines[:1] + [INDENT + line for line in lines[1:]]) + "\n"

    def _other_norms(self, leave_out: tuple[str, ...] = ()) -> str:
        """The classes beside ``nn.BatchNormNd`` (and its subclasses) holding BN statistics."""
        holders = ["BatchNormStats"] if "BatchNormStats" in self.helpers else []
        names = [name for name in sorted(self.norm_classes) if name not in leave_out] + holders
        return "".join(f", {name}" for name in names)

    def _norm_classes(self, leave_out: tuple[str, ...] = ()) -> str:
        """Every BatchNorm module of the network (subclasses included) and the holders of the
        functional calls' statistics, but the classes in ``leave_out``."""
        return f"(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d{self._other_norms(leave_out)})"

    def _note_helpers(self, op: Op, qualname: str | None) -> None:
        """Record helper definitions an op needs and its post-construction steps."""
        if isinstance(op, Layer):
            if op.functional:
                self.helpers.add("LayerWeights")
            if op.frozen:
                self.setup.append(f"{_submodule(qualname)}.requires_grad_(False)")
            if op.hooked:
                self.helpers.add("shift_output")
                self.setup.append(f"{_submodule(qualname)}.register_forward_hook(shift_output)")
            if op.spiked:
                self.helpers.add("spike_weight")
                self.setup.append(f"spike_weight({_submodule(qualname)})")
            if op.replaced_forward:
                self.helpers.add("shift_forward")
                self.setup.append(f"shift_forward({_submodule(qualname)})")
            if op.call_override:
                self.helpers.add(_layer_class(op))
            if op.parametrized:
                weight_norm = "torch.nn.utils.parametrizations.weight_norm"
                self.setup.append(f"{weight_norm}({_submodule(qualname)})")
        if isinstance(op, Norm):
            if op.gain == SHRINKING:
                self.helpers.add("shrink_batch_norm")
                self.setup.append(f"shrink_batch_norm({_submodule(qualname)})")
            if op.gain == AMPLIFYING:
                self.helpers.add("amplify_batch_norm")
                seed = self.spec.seed + 2 + sum("amplify_batch_norm(" in s for s in self.setup)
                self.setup.append(
                    f"amplify_batch_norm({_submodule(qualname)}, eps={op.eps!r}, seed={seed})"
                )
            if op.style == FUNCTIONAL:
                self.helpers.add("BatchNormStats")
            elif op.style != "module" or op.module_class == FROZEN:
                self.helpers.add(_batchnorm_class(op))
            if op.module_class is not None:
                self.norm_classes.add(_batchnorm_class(op))
            if op.defect == TRAINING and op.style != FUNCTIONAL:
                self.setup.append(f"{_submodule(qualname)}.train()")
            if op.defect == FORWARD_HOOK:
                self.helpers.add("shift_output")
                self.setup.append(f"{_submodule(qualname)}.register_forward_hook(shift_output)")
            if op.defect == FORWARD_PRE_HOOK:
                self.helpers.add("scale_input")
                self.setup.append(f"{_submodule(qualname)}.register_forward_pre_hook(scale_input)")
            if op.defect == REPLACED_FORWARD:
                self.helpers.add("shift_forward")
                self.setup.append(f"shift_forward({_submodule(qualname)})")
            if op.defect == PARAMETRIZED:
                self.helpers.add("reverse_channels_on_read")
                self.setup.append(f"reverse_channels_on_read({_submodule(qualname)})")

    def _block(self, index: int, block: Block) -> None:
        if isinstance(block, Chain):
            self._chain_block(index, block)
            return
        init: list[str] = []
        forward: list[str] = []
        self._two_calls_lines(index, block, init, forward)
        if block.packaging == INLINE:
            self.root_init += init
            self.root_forward += forward
        else:
            self._place(index, self._wrapper_class(f"Block{index}", init, forward))

    def _place(self, index: int, module: str) -> None:
        """Put a block's module on the root as ``b{index}`` and call it."""
        self.root_init.append(f"self.b{index} = {module}")
        self.root_forward.append(f"x = self.b{index}(x)")

    def _wrapper_class(self, name: str, init: list[str], forward: list[str]) -> str:
        doc = "A custom wrapper holding its layers and norms as attributes."
        self.classes.append(self._class(name, doc, init, forward))
        return f"{name}()"

    def _chain_block(self, index: int, chain: Chain) -> None:
        module = None  # the expression creating the module that runs the chain, if any
        if chain.packaging == SEQUENTIAL:
            for op, name in zip(chain.ops, chain_names(index, chain), strict=True):
                self._note_helpers(op, name)
            module = _nested_sequential([_constructor(op) for op in chain.ops], chain.depth)
        elif chain.packaging == WRAPPER:
            init, forward = self._chain_lines(index, chain)
            module = self._wrapper_class(f"Block{index}", init, forward)
        if chain.boundary in GUARDED:
            if module is None:
                init, forward = self._chain_lines(index, chain)
            else:
                init, forward = [f"self.inner = {module}"], _inner_call(chain.loop)
            if chain.boundary == UNTRACEABLE:
                name = f"Guarded{index}"
                doc = "Checks the input's rank in Python control flow, which FX cannot trace."
                forward = [*RANK_GUARD, *forward]
            elif chain.boundary == TYPE_CHECK:
                name = f"TypeChecked{index}"
                doc = "Shifts a tensor result: FX traces x as a proxy, no Tensor, and drops that."
                shift = "x = x * 0.5 + 0.25  # + 0.25: visible on example inputs that make x zero"
                forward = [*forward, "if isinstance(x, torch.Tensor):", INDENT + shift]
            elif chain.boundary == COUNTS_CALLS:
                name = f"Counted{index}"
                doc = "Counts its calls on itself, a write FX runs but does not record."
                if chain.counts_in_held_object:  # an int in a plain object it holds
                    init = [*init, f"self.{CALL_COUNTER} = types.SimpleNamespace(count=0)"]
                    forward = [*forward, f"self.{CALL_COUNTER}.count += 1"]
                elif chain.packaging == INLINE:  # an int it sets again
                    init = [*init, f"self.{CALL_COUNTER} = 0"]
                    forward = [*forward, f"self.{CALL_COUNTER} += 1"]
                elif chain.counts_with_held_method:  # a plain object's method it calls
                    self.helpers.add("Tally")
                    init = [*init, f"self.{CALL_COUNTER} = Tally().tick"]
                    forward = [*forward, f"self.{CALL_COUNTER}()"]
                elif chain.packaging == WRAPPER:  # an int set around nn.Module.__setattr__
                    init = [*init, f"self.{CALL_COUNTER} = 0"]
                    count = f"self.{CALL_COUNTER} + 1"
                    forward = [*forward, f'object.__setattr__(self, "{CALL_COUNTER}", {count})']
                elif chain.counts_in_buffer:  # an int64 buffer it changes in place
                    zero = "torch.zeros((), dtype=torch.int64)"
                    init = [*init, f'self.register_buffer("{CALL_COUNTER}", {zero})']
                    forward = [*forward, f"self.{CALL_COUNTER}.add_(1)"]
                else:  # a list it appends to (each call's output shape), its count the length
                    init = [*init, f"self.{CALL_COUNTER} = []"]
                    forward = [*forward, f"self.{CALL_COUNTER}.append(x.shape)"]
                if self.spec.root_untraced == ROOT_READS_MODULE_STATE:  # kept at module level
                    self.helpers.add(MODULE_STATE)
                    forward = [*forward, f'{MODULE_STATE}["{LAST_MEAN}"] = x.detach().mean()']
                elif self.spec.root_untraced in ROOT_READERS:  # what the root reads of it
                    init = [*init, f"self.{LAST_MEAN} = torch.zeros(())"]
                    forward = [*forward, f"self.{LAST_MEAN} = x.detach().mean()"]
            elif chain.boundary == NO_GRAD:
                name = f"NoGrad{index}"
                doc = "Runs its chain under torch.no_grad(), which FX runs but does not record."
                forward = ["with torch.no_grad():", *(INDENT + line for line in forward)]
            else:
                name = f"Autocast{index}"
                doc = "Runs its chain under torch.autocast, which FX runs but does not record."
                autocast = f"with torch.autocast({self.spec.device!r}, dtype=torch.bfloat16):"
                forward = [autocast, *(INDENT + line for line in forward)]
            self.classes.append(self._class(name, doc, init, forward))
            module = f"{name}()"
        if module is None:
            init, forward = self._chain_lines(index, chain)
            self.root_init += init
            self.root_forward += forward
            for op, name in zip(chain.ops, chain_names(index, chain), strict=True):
                if isinstance(op, Norm) and op.weight_read:
                    read = f"self.{local_name(name)}.weight.mean() * 0.5"
                    self.weight_reads.append(f"x = x + {read}  # reads the BN's weight")
        else:
            self._place(index, module)
        if chain.boundary == COUNTS_CALLS and self.spec.root_untraced == ROOT_READS_STATE:
            read = f"self.b{index}.{LAST_MEAN} * 0.5"
            self.weight_reads.append(f"x = x + {read}  # what b{index} keeps of its last call")
        if chain.boundary == COUNTS_CALLS and self.spec.root_untraced == ROOT_READS_MODULE_STATE:
            read = f'{MODULE_STATE}["{LAST_MEAN}"] * 0.5'
            self.weight_reads.append(f"x = x + {read}  # what b{index} keeps at module level")
        if chain.boundary == COUNTS_CALLS and self.spec.root_untraced == ROOT_ASKS_A_KEEPER:
            self.helpers.add("Keeper")
            self.root_init.append(f"self.{KEEPER} = Keeper(self.b{index})  # no module")
            read = f"self.{KEEPER}.kept() * 0.5"
            self.weight_reads.append(f"x = x + {read}  # what b{index} keeps, asked of a keeper")
        if chain.layer_read:
            name = chain_names(index, chain)[readable_layer(chain.ops)]
            read = f"{_attribute_path(name)}.weight.mean() * 0.5"
            self.weight_reads.append(f"x = x + {read}  # reads a layer's weight behind b{index}")
        if chain.boundary == HOOKED:
            self.helpers.add("shift_output")
            self.setup.append(f"model.b{index}.register_forward_hook(shift_output)")
        if chain.boundary == HOOK_READS_MODULE:
            self.helpers.add("shift_by_own_weights")
            self.setup.append(f"model.b{index}.register_forward_hook(shift_by_own_weights)")

    def _chain_lines(self, index: int, chain: Chain) -> tuple[list[str], list[str]]:
        """``__init__`` and ``forward`` lines of a chain whose ops are attributes of one module."""
        init: list[str] = []
        forward: list[str] = []
        names = chain_names(index, chain)
        for position, (op, name) in enumerate(zip(chain.ops, names, strict=True)):
            self._note_helpers(op, name)
            owner = None
            if name is not None:
                attribute = local_name(name)
                init.append(f"self.{attribute} = {_constructor(op)}")
                owner = "self." + attribute
            flip = _negated_in_place(op, owner)
            before = flip
            if flip and op.changed_in_place[1] == "wrapped":
                self.helpers.add("negate_wrapped")
            if flip and op.changed_in_place[1] == "handed":
                self.helpers.add("NegatesHandedTensor")
                init.append(f"self.{attribute}_negator = NegatesHandedTensor()")
            if flip and op.changed_in_place[1] == "held":
                self.helpers.add("NegatesHeldTensor")
                tensor = op.changed_in_place[0]
                init.append(f"self.{attribute}_negator = NegatesHeldTensor({owner}.{tensor})")
                # Handed the op's input (before the call and after), never its output, which
                # another reader would keep from folding: the negator only branches on it.
                before = ["negated_around = x", *flip]
            forward += [*before, f"x = {_call(op, 'x', owner)}", *flip]
            tap = chain.tap
            if tap is not None and tap.after == position:
                if tap.kind in (ADD, CAT):
                    forward.append("tap = x")
                    if tap.shifted:
                        forward.append("x *= 0.5  # in place: tap is halved too")
                else:
                    forward.append(_metadata_assert(tap.kind, "x", tap.expected))
        if chain.tap is not None and chain.tap.kind == ADD:
            forward.append("x += tap" if chain.tap.in_place else "x = x + tap")
        if chain.tap is not None and chain.tap.kind == CAT:
            forward.append("x = torch.cat([x, tap], 1)")
        return init, forward

    def _two_calls_lines(
        self, index: int, block: TwoCalls, init: list[str], forward: list[str]
    ) -> None:
        names = two_calls_names(index, block)
        layer_attribute = local_name(names.layer)
        self._note_helpers(block.layer, names.layer)
        init.append(f"self.{layer_attribute} = {_constructor(block.layer)}")
        layer = "self." + layer_attribute
        if block.alias:  # the same module held under a second name
            init.append(f"self.{layer_attribute}_alias = {layer}")
        forward.append(f"a = {_call(block.layer, 'x', layer)}")
        self._norm_lines(index, block, block.first_norms, names.first_norms, "a", init, forward)
        if block.second == FUNCTIONAL:
            forward.append(f"b = {_functional_layer_call(block.layer, 'x', layer)}")
        elif block.second == TWIN:
            twin = twin_of(block.layer)
            twin_attribute = local_name(names.second_layer)
            init.append(f"self.{twin_attribute} = {_constructor(twin)}")
            self._note_helpers(twin, names.second_layer)
            init.append(f"self.{twin_attribute}.weight = {layer}.weight  # tied weights")
            forward.append(f"b = {_call(twin, 'x', 'self.' + twin_attribute)}")
        else:
            forward.append(f"b = {layer}{'_alias' if block.alias else ''}(x)")
        if block.second_norms is None:
            norms = block.first_norms
            self._norm_lines(index, block, norms, names.second_norms, "b", None, forward)
        else:
            norms = block.second_norms
            self._norm_lines(index, block, norms, names.second_norms, "b", init, forward)
        forward.append("x = a + b")

    def _norm_lines(
        self,
        index: int,
        block: TwoCalls,
        norms: tuple[Norm, ...],
        names: list[str],
        value: str,
        init: list[str] | None,
        forward: list[str],
    ) -> None:
        """Norms applied to one branch; ``init=None`` reuses modules created for the other."""
        for norm, name in zip(norms, names, strict=True):
            attribute = local_name(name)
            if init is not None:
                self._note_helpers(norm, name)
                init.append(f"self.{attribute} = {_constructor(norm)}")
            forward.append(f"{value} = {_call(norm, value, 'self.' + attribute)}")


def _inner_call(loop: str | None) -> list[str]:
    """How a guard's forward runs its child ``inner`` (``Chain.loop``)."""
    if loop is None:
        return ["x = self.inner(x)"]
    lines = ["for stage in self.inner:", f"{INDENT}x = stage(x)"]
    if loop == LOOP_INSPECTS:
        lines += [
            f"{INDENT}if isinstance(stage, nn.Sequential):  # a nested stage: halve what it returns",
            f"{INDENT * 2}x = x * 0.5",
        ]
    return lines


def _nested_sequential(expressions: list[str], depth: int) -> str:
    """``nn.Sequential`` staircase matching ``naming.staircase``."""
    if depth <= 1:
        return f"nn.Sequential({', '.join(expressions)})"
    if len(expressions) == 1:
        return f"nn.Sequential({_nested_sequential(expressions, depth - 1)})"
    return f"nn.Sequential({expressions[0]}, {_nested_sequential(expressions[1:], depth - 1)})"
