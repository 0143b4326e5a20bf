"""What the fuser recognises: BatchNorm call sites and the layers they can fold into.

The pattern tables are data at the top; the recognisers below turn one FX node into a small,
plain description (``BatchNormCall`` or ``LayerCall``) or ``None``. Nothing here edits a graph.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules import module as module_globals
from torch.nn.utils import parametrize

# Layer modules by the kind of fold math they take.
LAYER_MODULES: dict[type[nn.Module], str] = {
    nn.Conv1d: "conv",
    nn.Conv2d: "conv",
    nn.Conv3d: "conv",
    nn.ConvTranspose1d: "conv_transpose",
    nn.ConvTranspose2d: "conv_transpose",
    nn.ConvTranspose3d: "conv_transpose",
    nn.Linear: "linear",
}

# Functional layers: (kind, positional argument names) of each callable FX records.
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_TRANSPOSE_ARGS = (
    "input",
    "weight",
    "bias",
    "stride",
    "padding",
    "output_padding",
    "groups",
    "dilation",
)
FUNCTIONAL_LAYERS: dict[Any, tuple[str, tuple[str, ...]]] = {
    F.conv1d: ("conv", _CONV_ARGS),
    F.conv2d: ("conv", _CONV_ARGS),
    F.conv3d: ("conv", _CONV_ARGS),
    F.conv_transpose1d: ("conv_transpose", _CONV_TRANSPOSE_ARGS),
    F.conv_transpose2d: ("conv_transpose", _CONV_TRANSPOSE_ARGS),
    F.conv_transpose3d: ("conv_transpose", _CONV_TRANSPOSE_ARGS),
    F.linear: ("linear", ("input", "weight", "bias")),
}
FUNCTIONAL_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}

BATCH_NORM_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training")
BATCH_NORM_ARGS += ("momentum", "eps")
BATCH_NORM_DEFAULTS = {"weight": None, "bias": None, "training": False, "eps": 1e-5}
# ``torch.batch_norm``, which ``F.batch_norm`` calls, takes the affine parameters first and no defaults.
TORCH_BATCH_NORM_ARGS = ("input", "weight", "bias", "running_mean", "running_var", "training")
TORCH_BATCH_NORM_ARGS += ("momentum", "eps", "cudnn_enabled")
#: Functional BatchNorms: (argument names, defaults, the name reasons give) of each callable FX records.
FUNCTIONAL_BATCH_NORMS: dict[Any, tuple[tuple[str, ...], dict, str]] = {
    F.batch_norm: (BATCH_NORM_ARGS, BATCH_NORM_DEFAULTS, "F.batch_norm"),
    torch.batch_norm: (TORCH_BATCH_NORM_ARGS, {}, "torch.batch_norm"),
}

# Node uses that read only a tensor's metadata, never its values.
METADATA_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "layout"})
METADATA_METHODS = frozenset({"size", "dim", "ndimension", "numel", "get_device"})


def _frozen_batch_norm_type() -> type | None:
    """torchvision's FrozenBatchNorm2d, if its module has been imported.

    Looked up rather than imported: a model cannot hold an instance of the class before its
    module is imported, and importing torchvision for every user (about a second, and 150,000
    objects on the heap that every full garbage collection then walks) would buy nothing.
    """
    return getattr(sys.modules.get("torchvision.ops.misc"), "FrozenBatchNorm2d", None)


def is_frozen_batch_norm(module: nn.Module) -> bool:
    """torchvision's FrozenBatchNorm2d: always its running statistics, and a forward that
    computes ``x * scale + shift`` from its buffers rather than calling a batch norm."""
    frozen = _frozen_batch_norm_type()
    return frozen is not None and isinstance(module, frozen)


def batch_norm_module_types() -> tuple[type[nn.Module], ...]:
    frozen = _frozen_batch_norm_type()
    known: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm,)
    return (*known, frozen) if frozen is not None else known


def _known_base(module: nn.Module, bases: tuple[type, ...]) -> type | None:
    """The first class in the module's MRO that is one of ``bases`` (exact types preferred)."""
    for cls in type(module).__mro__:
        if cls in bases:
            return cls
    return None


#: What calling a module looks up on the instance before its class: code that sets one of these
#: on an instance (a monkeypatched ``forward``; accelerate's hooks do it) changes what it computes.
CALL_PATH = ("forward", "_call_impl", "_wrapped_call_impl")


def forward_replaced(module: nn.Module) -> bool:
    """Does this instance carry its own ``forward`` (or call path), hiding its class's?"""
    return any(name in vars(module) for name in CALL_PATH)


def call_overridden(module: nn.Module) -> bool:
    """Does the module's class run code of its own around ``forward`` when called?

    A class that overrides ``__call__`` (or ``nn.Module``'s call path) breaks FX's model of a
    module call: tracing runs that code and records what it does around the call, and a
    ``call_module`` node then runs it again. GraphModules are FX's own and exempt: their
    ``__call__`` only hands over to ``forward``.
    """
    for cls in type(module).__mro__:
        if cls is nn.Module or issubclass(cls, fx.GraphModule):
            return False
        if any(name in vars(cls) for name in ("__call__", *CALL_PATH[1:])):
            return True
    return False


def own_call_code(module: nn.Module) -> str | None:
    """Why calling ``module`` runs more than its class's ``forward`` (which is all FX traces of a
    root, and all a fold assumes of a layer or BN), as a predicate of it; None when it does not.
    The one answer for the fold rules, the tracer's roots and the children of untraced modules.
    """
    if forward_replaced(module):
        return "has its forward replaced on the instance"
    if call_overridden(module):
        return f"has a class ({type(module).__name__}) that overrides __call__"
    return None


def _inherits_behaviour(module: nn.Module, base: type, methods: tuple[str, ...]) -> bool:
    """True when neither a subclass nor the instance itself replaces any of the ``methods`` that
    define its computation, or the way it is called."""
    cls, own = type(module), vars(module)
    return own_call_code(module) is None and all(
        getattr(cls, name, None) is getattr(base, name, None) and name not in own
        for name in methods
    )


def layer_kind_of_module(module: nn.Module) -> str | None:
    """The fold kind of a layer module, or None when it is not one (or overrides its forward)."""
    base = _known_base(module, tuple(LAYER_MODULES))
    if base is None or not _inherits_behaviour(module, base, ("forward", "_conv_forward")):
        return None
    return LAYER_MODULES[base]


#: torch.nn's containers: they run the code of the modules they hold, and none of their own.
CONTAINER_MODULES = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
#: Modules that return their input as it is: always, or when not training (dropout).
PASS_THROUGH_MODULES = (
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)  # fmt: skip
#: Dropout functions, which return their input as it is when called with ``training=False``.
PASS_THROUGH_FUNCTIONS = dict.fromkeys(
    (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout),
    ("input", "p", "training", "inplace"),  # their arguments, all alike
)


def passed_through(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The graph value ``node`` returns as it is, or None: a call of ``nn.Identity`` or of a
    dropout module not in training mode (unhooked, running its class's own code), or a dropout
    function called with ``training=False``. Between a layer and a BN such a call changes no
    value, so a fold may look through it (README rules 2 and 3)."""
    if node.op == "call_module":
        module = submodule(gm, node.target)
        base = _known_base(module, PASS_THROUGH_MODULES)
        if base is None or not _inherits_behaviour(module, base, ("forward",)):
            return None
        if has_hooks(module) or (base is not nn.Identity and module.training):
            return None
        value = _first_arg(node)
        return value if len(node.all_input_nodes) == 1 else None
    if node.op == "call_function" and node.target in PASS_THROUGH_FUNCTIONS:
        args = normalized_args(node, PASS_THROUGH_FUNCTIONS[node.target], {"training": True})
        value = args.get("input")
        if args["training"] is not False or not isinstance(value, fx.Node):
            return None
        return value if len(node.all_input_nodes) == 1 else None
    return None


def is_batch_norm_module(module: nn.Module) -> bool:
    """Any BatchNorm module, foldable or not (a subclass overriding forward included)."""
    return isinstance(module, batch_norm_module_types())


def batch_norm_module_behaves_as_base(module: nn.Module) -> bool:
    bases = (
        nn.BatchNorm1d,
        nn.BatchNorm2d,
        nn.BatchNorm3d,
        nn.SyncBatchNorm,
        *batch_norm_module_types(),
    )
    base = _known_base(module, bases)
    return base is not None and _inherits_behaviour(module, base, ("forward",))


def has_hooks(module: nn.Module) -> bool:
    """Hooks run only on module calls, so a hooked module must stay a module call, untouched."""
    hook_dicts = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return any(getattr(module, name, None) for name in hook_dicts)


#: torch's process-wide module hooks (``torch.nn.modules.module``'s dicts), with the function that
#: registers each kind. The call hooks run on every module call of every model; the registration
#: hooks run whenever a module, parameter or buffer is assigned to a module, as fusing does to build
#: the fused model (its folded weights are new parameters), and each may replace what is assigned.
GLOBAL_MODULE_HOOKS = {
    "_global_forward_pre_hooks": "register_module_forward_pre_hook",
    "_global_forward_hooks": "register_module_forward_hook",
    "_global_backward_pre_hooks": "register_module_full_backward_pre_hook",
    "_global_backward_hooks": "register_module_full_backward_hook",
    "_global_parameter_registration_hooks": "register_module_parameter_registration_hook",
    "_global_module_registration_hooks": "register_module_module_registration_hook",
    "_global_buffer_registration_hooks": "register_module_buffer_registration_hook",
}


def global_module_hooks() -> list[str]:
    """The global module hooks registered now, each as ``registrar: hook name``.

    A global call hook runs on every module call, so it sees (and may change) what each BatchNorm
    module returns: folding one away removes those calls and changes what its layer returns. A
    registration hook sees every parameter, module and buffer the fuser assigns while it builds
    the fused model, and may replace them: a hook that rescales new parameters, say, would rescale
    the folded weights, which were computed from parameters it had already seen. Read at each
    fuse, as hooks come and go with the process (``handle.remove()``).
    """
    found = []
    for dict_name, registrar in GLOBAL_MODULE_HOOKS.items():
        for hook in getattr(module_globals, dict_name, {}).values():
            name = getattr(hook, "__qualname__", None) or type(hook).__qualname__
            found.append(f"{registrar}: {getattr(hook, '__module__', '?')}.{name}")
    return found


def normalized_args(node: fx.Node, names: tuple[str, ...], defaults: dict) -> dict[str, Any]:
    """A call node's arguments by name, positional and keyword alike, defaults filled in."""
    values = dict(defaults)
    values.update(zip(names, node.args, strict=False))
    values.update(node.kwargs)
    return values


def set_arg(node: fx.Node, names: tuple[str, ...], name: str, value: Any) -> None:
    """Set one argument of a call node, wherever it was passed."""
    index = names.index(name)
    if name not in node.kwargs and index < len(node.args):
        args = list(node.args)
        args[index] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, name: value}


def fetch_attr(gm: fx.GraphModule, qualname: str) -> Any:
    value: Any = gm
    for atom in qualname.split("."):
        value = attribute(value, atom)
    return value


def submodule(root: nn.Module, target: str) -> nn.Module:
    """``root.get_submodule(target)``, faster: the same module, or AttributeError where that
    raises one."""
    module = root
    for atom in target.split(".") if target else ():
        module = attribute(module, atom)
        if not isinstance(module, nn.Module):
            raise AttributeError(f"`{atom}` of {target!r} is not an nn.Module")
    return module


def attribute(owner: Any, name: str) -> Any:
    """``getattr(owner, name)``. A module's registered child is read from its ``_modules`` when
    nothing else could answer to that name (no class attribute, instance attribute, parameter or
    buffer of that name): the same object, without ``nn.Module.__getattr__``'s slow fallback,
    which is most of the time of looking a layer up by its path."""
    if isinstance(owner, nn.Module):
        child = owner._modules.get(name)
        if (
            child is not None
            and name not in owner.__dict__
            and name not in owner._parameters
            and name not in owner._buffers
            and not hasattr(type(owner), name)
        ):
            return child
    return getattr(owner, name)


def is_metadata_use(user: fx.Node) -> bool:
    """True for nodes like ``x.shape``, ``x.ndim``, ``x.size()``, ``x.dim()``."""
    if user.op == "call_function" and user.target is getattr:
        return len(user.args) >= 2 and user.args[1] in METADATA_ATTRIBUTES
    return user.op == "call_method" and user.target in METADATA_METHODS


def value_users(node: fx.Node) -> list[fx.Node]:
    return [user for user in node.users if not is_metadata_use(user)]


def known_rank(node: fx.Node) -> int | None:
    """The rank of a node's tensor output, when shape propagation recorded one."""
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return len(shape) if shape is not None else None


@dataclass
class BatchNormCall:
    """One BatchNorm call site, with its statistics when it is foldable."""

    node: fx.Node
    name: str  # the report's name: module qualname, or the running_mean qualname
    module_target: str | None  # set for a module call
    input: fx.Node | None
    running_mean: torch.Tensor | None = None
    running_var: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    eps: float = 1e-5
    not_foldable: str | None = None  # why the BN itself can never fold
    # FrozenBatchNorm2d computes ``x * scale + shift`` from its buffers: its output takes the
    # dtype they promote its input to, where a BatchNorm's output keeps its input's dtype.
    promotes: bool = False
    # The input ranks the BN runs on (a BatchNorm2d module checks for 4-D input); None for any
    # rank (a functional call, SyncBatchNorm, FrozenBatchNorm2d, an unknown check).
    accepted_ranks: frozenset[int] | None = None
    # The one rank at which the BN normalises dim 1 and returns its input's shape, where it does
    # not at every rank: FrozenBatchNorm2d broadcasts (1, C, 1, 1) buffers, so on 3-D input it
    # scales dim 0 and adds a batch dimension, on 5-D input dim 2, on 2-D input (N, C) it returns
    # (1, C, N, C). None for a BN that normalises dim 1 at every rank.
    exact_rank: int | None = None

    @property
    def channels(self) -> int | None:
        return None if self.running_mean is None else self.running_mean.numel()


@dataclass
class LayerCall:
    """A conv, transposed conv or linear call whose weights a BN can fold into."""

    node: fx.Node
    kind: str  # "conv", "conv_transpose" or "linear"
    weight: torch.Tensor
    bias: torch.Tensor | None
    groups: int
    zero_padded: bool  # does the layer pad its input with zeros?
    module_target: str | None = None  # set for a module call
    weight_node: fx.Node | None = None  # set for a functional call
    bias_node: fx.Node | None = None
    arg_names: tuple[str, ...] = ()

    @property
    def out_channels(self) -> int:
        if self.kind == "conv_transpose":
            return self.weight.shape[1] * self.groups
        return self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        if self.kind == "conv_transpose":
            return self.weight.shape[0]
        return self.weight.shape[1] * self.groups

    @property
    def batched_rank(self) -> int:
        """The rank of a batched input and output: (N, C, *spatial) or (N, features)."""
        return self.weight.ndim


def _constant(gm: fx.GraphModule, value: Any) -> torch.Tensor | None:
    if isinstance(value, fx.Node) and value.op == "get_attr":
        tensor = fetch_attr(gm, value.target)
        return tensor if isinstance(tensor, torch.Tensor) else None
    return None


def describe_batch_norm(gm: fx.GraphModule, node: fx.Node) -> BatchNormCall | None:
    """The BatchNorm call at ``node``, or None when ``node`` is not one."""
    if node.op == "call_module":
        module = submodule(gm, node.target)
        if not is_batch_norm_module(module):
            return None
        call = BatchNormCall(node, node.target, node.target, _first_arg(node))
        call.not_foldable = _module_batch_norm_problem(module)
        if call.not_foldable is None:
            call.running_mean, call.running_var = module.running_mean, module.running_var
            call.weight, call.bias, call.eps = module.weight, module.bias, float(module.eps)
        frozen = is_frozen_batch_norm(module)
        call.promotes = frozen
        call.accepted_ranks = _ranks_accepted(module)
        call.exact_rank = 4 if frozen else None
        return call
    if node.op == "call_function" and node.target in FUNCTIONAL_BATCH_NORMS:
        names, defaults, label = FUNCTIONAL_BATCH_NORMS[node.target]
        args = normalized_args(node, names, defaults)
        mean_node = args.get("running_mean")
        name = mean_node.target if _constant(gm, mean_node) is not None else node.name
        call = BatchNormCall(node, name, None, args.get("input"))
        call.not_foldable = _functional_batch_norm_problem(gm, args, label)
        if call.not_foldable is None:
            call.running_mean = _constant(gm, args["running_mean"])
            call.running_var = _constant(gm, args["running_var"])
            call.weight, call.bias = _constant(gm, args["weight"]), _constant(gm, args["bias"])
            call.eps = float(args["eps"])
        return call
    return None


#: The input ranks torch's BatchNorm modules check for before they normalise dimension 1.
_RANK_CHECKS = (
    (nn.BatchNorm1d._check_input_dim, frozenset({2, 3})),
    (nn.BatchNorm2d._check_input_dim, frozenset({4})),
    (nn.BatchNorm3d._check_input_dim, frozenset({5})),
)


def _ranks_accepted(module: nn.Module) -> frozenset[int] | None:
    """The input ranks a BN module runs on, when its rank check is one of torch's own; None
    (any rank) for any other check, or one set on the instance."""
    if "_check_input_dim" in vars(module):
        return None
    check = getattr(type(module), "_check_input_dim", None)
    for known, ranks in _RANK_CHECKS:
        if check is known:
            return ranks
    return None


def _first_arg(node: fx.Node) -> fx.Node | None:
    first = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
    return first if isinstance(first, fx.Node) else None


def _module_batch_norm_problem(module: nn.Module) -> str | None:
    own_code = own_call_code(module)
    if own_code is not None:
        return f"the BatchNorm module {own_code}"
    if not batch_norm_module_behaves_as_base(module):
        return f"{type(module).__name__} overrides forward"
    if has_hooks(module):
        return "the BatchNorm module has hooks"
    if parametrize.is_parametrized(module):
        # Its weight, bias or statistics are computed on every call (README rule 1): a value
        # read once at fusing time need not be what later calls compute.
        return "the BatchNorm module's tensors are parametrized (torch.nn.utils.parametrize)"
    if module.training and not is_frozen_batch_norm(module):
        return "the BatchNorm module is in training mode"
    if module.running_mean is None or module.running_var is None:
        return "no running statistics (track_running_stats=False)"
    return None


def _functional_batch_norm_problem(
    gm: fx.GraphModule, args: dict[str, Any], label: str
) -> str | None:
    if args.get("training") is not False:
        return f"{label} is called with training=True (or a non-constant training flag)"
    if _constant(gm, args.get("running_mean")) is None:
        return f"{label}'s running_mean is not a constant of the module"
    if _constant(gm, args.get("running_var")) is None:
        return f"{label}'s running_var is not a constant of the module"
    for name in ("weight", "bias"):
        if args.get(name) is not None and _constant(gm, args[name]) is None:
            return f"{label}'s {name} is not a constant of the module"
    if not isinstance(args.get("eps"), (int, float)):
        return f"{label}'s eps is not a constant"
    return None


def describe_layer(gm: fx.GraphModule, node: fx.Node) -> LayerCall | str:
    """The layer call at ``node``, or a short reason why it is not a foldable layer."""
    if node.op == "call_module":
        module = submodule(gm, node.target)
        kind = layer_kind_of_module(module)
        own_code = own_call_code(module)
        if kind is None and own_code is not None and _known_base(module, tuple(LAYER_MODULES)):
            return f"layer {node.target} {own_code}"
        if kind is None:
            return f"{node.target} ({type(module).__name__}) is not a conv or linear layer"
        if has_hooks(module):
            return f"layer {node.target} has hooks"
        if parametrize.is_parametrized(module):
            return f"layer {node.target}'s parameters are parametrized (torch.nn.utils.parametrize)"
        groups = getattr(module, "groups", 1)
        zero_padded = kind == "conv" and (
            module.padding_mode == "zeros"
            and _pads(module.padding, module.kernel_size, module.dilation)
        )
        return LayerCall(
            node,
            kind,
            module.weight,
            module.bias,
            groups,
            zero_padded,
            module_target=node.target,
        )
    if node.op == "call_function" and node.target in FUNCTIONAL_LAYERS:
        kind, names = FUNCTIONAL_LAYERS[node.target]
        args = normalized_args(node, names, FUNCTIONAL_DEFAULTS)
        weight = _constant(gm, args.get("weight"))
        if weight is None:
            return f"{label(node)}'s weight is not a constant of the module"
        bias_node = args.get("bias")
        bias = _constant(gm, bias_node)
        if bias_node is not None and bias is None:
            return f"{label(node)}'s bias is not a constant of the module"
        groups = args.get("groups", 1)
        if not isinstance(groups, int):
            return f"{label(node)}'s groups is not a constant"
        padding = args.get("padding", 0)
        if isinstance(padding, fx.Node):
            zero_padded = True
        else:
            kernel = tuple(weight.shape[2:])
            zero_padded = kind == "conv" and _pads(padding, kernel, args.get("dilation", 1))
        return LayerCall(
            node,
            kind,
            weight,
            bias,
            groups,
            zero_padded,
            weight_node=args["weight"],
            bias_node=bias_node,
            arg_names=names,
        )
    return f"{label(node)} is not a conv or linear layer"


def label(node: fx.Node) -> str:
    """How to name a node to a person: a module call by its module's qualified name."""
    if node.op == "call_module":
        return node.target
    if node.op == "placeholder":
        return f"the input {node.name}"
    if node.op == "output":
        return "the model's output"
    return node.name


def _pads(padding: Any, kernel_size: Any, dilation: Any) -> bool:
    """Does a conv with this padding add any border at all?"""
    if padding == "valid":
        return False
    if padding == "same":
        kernel = _as_tuple(kernel_size)
        dilations = _as_tuple(dilation, len(kernel))
        return any(d * (k - 1) > 0 for k, d in zip(kernel, dilations, strict=True))
    return any(p != 0 for p in _as_tuple(padding))


def _as_tuple(value: Any, length: int = 1) -> tuple:
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return (value,) * length
