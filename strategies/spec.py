"""The network description: plain, frozen data that says everything about one random network.

A spec holds no torch objects, so it can be printed, compared, pinned as a Python literal in a
regression test (``repr(spec)`` is valid Python once these classes are imported), and read by the
oracle without building anything. Every op records the shape facts it was drawn for (input rank,
channel counts), so the renderer and the oracle never have to re-run shape inference and cannot
disagree about it.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields, is_dataclass, replace

CONV = "conv"
CONV_TRANSPOSE = "conv_transpose"
LINEAR = "linear"

MODULE = "module"
FUNCTIONAL = "functional"
TRACED_SUBCLASS = "traced_subclass"
OPAQUE_SUBCLASS = "opaque_subclass"

TRAINING = "training"
FORWARD_HOOK = "forward_hook"
FORWARD_PRE_HOOK = "forward_pre_hook"
REPLACED_FORWARD = "replaced_forward"
PARAMETRIZED = "parametrized"

INLINE = "inline"
SEQUENTIAL = "sequential"
WRAPPER = "wrapper"

SHRINKING = "shrinking"
AMPLIFYING = "amplifying"
GAIN_EXPONENT = 12  # a shrinking BN scales its output by about 2**-12, an amplifying one by 2**12
SPIKE = 16.0  # the spiked weight entry: 16 * 1.25 * 2**12 = 81920 > float16's 65504

HOOKED = "hooked"
HOOK_READS_MODULE = "hook_reads_module"
UNTRACEABLE = "untraceable"
AUTOCAST = "autocast"
NO_GRAD = "no_grad"
COUNTS_CALLS = "counts_calls"
TYPE_CHECK = "type_check"
#: Boundaries whose module FX cannot trace faithfully: it holds an inline chain's ops itself,
#: another chain as its child ``inner``, and runs its own code (see ``Chain``).
GUARDED = (UNTRACEABLE, AUTOCAST, NO_GRAD, COUNTS_CALLS, TYPE_CHECK)
#: The attribute a ``counts_calls`` module increments on every call.
CALL_COUNTER = "calls"
#: The attribute a ``counts_calls`` module keeps its last output's mean in, for a root that reads
#: it (``NetSpec.root_untraced``).
LAST_MEAN = "last_mean"

#: ``NetSpec.root_untraced``: the root's forward checks its input's rank in Python first, or reads
#: what its counting last block keeps of its last call, itself or through a plain object's method.
ROOT_RANK_GUARD = "rank_guard"
ROOT_READS_STATE = "reads_state"
ROOT_ASKS_A_KEEPER = "asks_a_keeper"
ROOT_READS_MODULE_STATE = "reads_module_state"
#: The roots that read what their counting last block keeps.
ROOT_READERS = (ROOT_READS_STATE, ROOT_ASKS_A_KEEPER, ROOT_READS_MODULE_STATE)
#: The root's attribute holding the plain object it asks (``ROOT_ASKS_A_KEEPER``).
KEEPER = "keeper"
#: The module-level dict a counting block keeps its last mean in (``ROOT_READS_MODULE_STATE``).
MODULE_STATE = "KEPT"

#: How an untraceable module runs a Sequential child (``Chain.loop``): a loop calling each element
#: of it, and one that also asks each element's type.
LOOP_CALLS = "calls"
LOOP_INSPECTS = "inspects"

SYNC = "SyncBatchNorm"  # ``Norm.module_class``: torch.nn.SyncBatchNorm, any rank
FROZEN = "FrozenBatchNorm2d"  # torchvision.ops.misc.FrozenBatchNorm2d, 4-D inputs

#: ``TwoCalls.second``: a second layer module holding the first one's weight Parameter.
TWIN = "twin"

ADD = "add"
CAT = "cat"
METADATA_ATTRIBUTES = ("ndim", "shape")  # read as x.ndim, x.shape[1]
METADATA_METHODS = ("size", "dim", "numel")  # called as x.size(1), x.dim(), x.numel()
METADATA_TAPS = METADATA_ATTRIBUTES + METADATA_METHODS

#: The arguments of a functional call that can be computed when it runs (``Norm.computed``,
#: ``Layer.computed``), rendered as ``owner.NAME * COMPUTED_FACTOR``: parameters only. FX turns
#: a module's parameters into graph values but hands it its buffers as tensors, so a computation
#: on running statistics runs once, while tracing, and becomes a constant of the traced module
#: (``_tensor_constant0``) that folds like any other.
COMPUTED_ARGUMENTS = ("weight", "bias")
COMPUTED_FACTOR = 0.5

#: How a model's code changes one of a fold's tensors in place as it runs (``Layer`` and
#: ``Norm``'s ``changed_in_place``, README rule 6): it negates the parameter right before the call
#: that reads it and again right after, through its ``.data``: as a method (``.neg_()``), through a
#: view (``.view(-1).neg_()``), as a function (``torch.neg_``), as an ``out=`` argument, as an
#: augmented assignment (``flipped *= -1``, which FX alone records out of place), by calling
#: an untraceable helper module that holds the tensor as a plain attribute (``held``: its code
#: runs as written, in no graph, so only what it holds tells), or by handing the parameter to
#: code that runs as written: a module-level function FX calls whole (``wrapped``,
#: ``torch.fx.wrap``) or an untraceable helper module (``handed``). Negation is exact in every
#: dtype and undone after the call, so every call of the model computes the same, and a fold
#: made from the value at fusing time (its sign the other way) computes something else.
IN_PLACE_FORMS = ("method", "view", "function", "out", "augmented", "held", "wrapped", "handed")


@dataclass(frozen=True)
class Layer:
    """A convolution, transposed convolution or linear layer.

    ``spatial_dims`` is 1, 2 or 3 for convolutions and 0 for linear layers. ``input_ndim`` is the
    rank of the (batched) tensor it reads: the oracle needs it to decide whether a Linear sees a
    2-D input. Functional layers are ``F.conv*``/``F.linear`` calls on registered parameters;
    they only support ``padding_mode="zeros"``. A hooked layer carries a forward hook that changes
    its output, so folding into it would be visible. A frozen layer's parameters have
    ``requires_grad=False``, which its folded parameters must keep. A layer whose forward is
    replaced has, on the instance, a ``forward`` that shifts its class's output (monkeypatching,
    or accelerate's hooks, do this): to FX and to its class it is still a conv or linear, so
    folding into it would be wrong. A layer whose ``call_override`` is set is a module of a
    subclass whose ``__call__`` shifts what the inherited ``forward`` returns: FX runs that code
    and records the shift, and, the class being no longer torch.nn's, traces through ``forward``,
    so the fuser sees a functional ``F.conv*``/``F.linear`` on the module's weight (after an
    ``F.pad`` for a conv with another ``padding_mode``), then the shift. A spiked layer's first weight
    entry is ``SPIKE`` and its bias is scaled by ``2**-GAIN_EXPONENT``: it reads a shrinking BN's
    small output, and an amplifying BN folded into it would overflow float16 (see ``Norm``).
    A parametrized layer's weight is computed on every call by a parametrization
    (``torch.nn.utils.parametrizations.weight_norm``), so it takes no fold (README rule 6).
    A functional layer without bias may leave the argument out (``bias_omitted``:
    ``F.conv2d(x, w, padding=1)``, as most code calls it) instead of passing ``None``: a fold must
    then add one where the call has none.
    A functional layer's ``computed`` argument (``weight`` or ``bias``) is not its registered
    parameter but a value computed from it when the call runs (``F.conv2d(x, w.weight * 0.5,
    w.bias)``): the layer is then no foldable layer (README rule 2 asks for module constants), and
    a fuser that took the computed argument for the parameter, or a computed bias for none, would
    fold wrongly.
    A layer ``changed_in_place`` (``("weight" or "bias", form)``, ``IN_PLACE_FORMS``) has that
    parameter negated in place by the code that calls it, before the call and after: it takes no
    fold (README rule 6).
    """

    kind: str
    spatial_dims: int
    input_ndim: int
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    bias: bool = True
    padding_mode: str = "zeros"
    output_padding: tuple[int, ...] = ()
    functional: bool = False
    hooked: bool = False
    frozen: bool = False
    spiked: bool = False
    replaced_forward: bool = False
    call_override: bool = False
    bias_omitted: bool = False
    parametrized: bool = False
    computed: str | None = None
    changed_in_place: tuple[str, str] | None = None


@dataclass(frozen=True)
class Norm:
    """A BatchNorm call site.

    ``style``: ``module`` (``nn.BatchNormNd``), ``functional`` (``F.batch_norm`` on registered
    buffers), ``traced_subclass`` (a BatchNorm subclass whose forward calls ``F.batch_norm`` then
    ReLU, like timm's ``BatchNormAct2d``) or ``opaque_subclass`` (a subclass whose forward calls
    ``super().forward(x)`` and adds a constant: FX cannot trace it). ``defect`` makes a site
    unfoldable on purpose: ``training`` (a training-mode module, or ``training=True`` in the
    functional call), ``forward_hook`` or ``forward_pre_hook`` (hooks that change values),
    ``replaced_forward`` (a ``forward`` on the instance that shifts the class's output) or
    ``parametrized`` (a module whose weight, or running variance when it has no affine
    parameters, a ``torch.nn.utils.parametrize`` parametrization computes on every call: the
    stored tensor holds the channels in reverse order and the parametrization reverses them, so
    the module computes what it did, while a fuser reading the stored tensor folds wrong channels;
    README rule 1 folds no computed tensor, so it is left). A
    functional call with ``torch_call`` is ``torch.batch_norm`` (which ``F.batch_norm`` calls: the
    affine parameters first, every argument positional) instead of ``F.batch_norm``. A functional
    call's ``computed`` argument (``weight`` or ``bias``, of an affine BN) is computed from the
    registered parameter when the call runs, ``owner.weight * 0.5`` (a reparametrised gamma, a
    conditional BN): README rule 1 folds only module constants, so the call is left, and a fuser
    that took a computed weight or bias for none (gamma 1, beta 0) would fold wrongly.

    A ``module`` BN's ``module_class`` is ``nn.BatchNormNd`` (None), ``nn.SyncBatchNorm`` (``SYNC``:
    what ``convert_sync_batchnorm`` leaves in a model trained with DDP; without a process group it
    runs as a BatchNorm, in training mode too) or torchvision's ``FrozenBatchNorm2d`` (``FROZEN``:
    the backbones of torchvision's detection models; 4-D inputs, affine parameters and
    statistics all buffers, and always its running statistics: in training mode it still folds).
    Neither matches ``nn.BatchNorm2d`` by type, which is how torch's own fuse matches.

    ``gain`` makes a float16 fold overflow without the network overflowing: a ``shrinking`` BN's
    gamma and beta are scaled by ``2**-GAIN_EXPONENT``, so its output is about 2**-12; an
    ``amplifying`` BN reads values of that size (its running mean is scaled down likewise) and
    has a scale ``gamma / sqrt(var + eps)`` of 1.25..2 times ``2**GAIN_EXPONENT`` in every channel.
    The strategies draw them only as ``shrinking BN -> spiked layer -> amplifying BN -> act``:
    the network's values stay finite in float16, but the amplifying BN's output-side fold puts at
    least ``16 * 1.25 * 2**12 = 81920`` into the spiked layer's weight. Both are affine, with
    running statistics and no defect.

    ``weight_read`` (an affine module BN the root module holds: an inline chain outside any
    boundary): after every block the root's forward also reads the BN's weight,
    ``x = x + self.bn.weight.mean() * 0.5``, as code reusing a BN's parameters does. A fold removes
    the BN's call, not its weight: the fused model must still read that weight, unchanged, and
    keep nothing else of the BN (``no_dead_state``). The read comes after the last block, so it
    changes no site's foldability.

    ``changed_in_place`` (``("weight" or "bias", form)``, ``IN_PLACE_FORMS``; an affine BN whose
    parameters are parameters, not ``FrozenBatchNorm2d``'s buffers): the code calling the BN
    negates that parameter in place before the call and after, so the BN is not foldable
    (README rule 6).
    """

    input_ndim: int
    num_features: int
    affine: bool = True
    track_running_stats: bool = True
    eps: float = 1e-5
    momentum: float | None = 0.1
    style: str = MODULE
    defect: str | None = None
    gain: str | None = None
    torch_call: bool = False
    computed: str | None = None
    module_class: str | None = None
    weight_read: bool = False
    changed_in_place: tuple[str, str] | None = None


@dataclass(frozen=True)
class Act:
    """An elementwise activation, or ``identity`` (``nn.Identity`` as a module).

    ``inplace`` (relu, leaky_relu and hardswish): the activation overwrites its input, as
    ``nn.ReLU(inplace=True)`` or ``F.relu(x, inplace=True)``, the way most torchvision CNNs
    write it. First in a network (after identities and flattens, which return their input or a
    view of it), it changes the caller's input tensor: the fused model must change it alike.
    """

    kind: str
    functional: bool = False
    inplace: bool = False


@dataclass(frozen=True)
class Flatten:
    """``x.flatten(start_dim)``: leads from convolutions to Linear heads on 2-D or 3-D inputs."""

    start_dim: int


Op = Layer | Norm | Act | Flatten


@dataclass(frozen=True)
class Tap:
    """An extra user of the output of ``ops[after]`` in a chain.

    ``add``/``cat`` read values (the chain's result is added to or concatenated with it), which
    blocks an output-side fold into that op. The metadata kinds (``ndim``, ``shape``, ``size``,
    ``dim``, ``numel``) only read shape facts through ``torch._assert`` and block nothing;
    ``expected`` is the value the assertion checks.

    ``shifted`` (value taps of a layer or BN output only): right after ``tap = x`` the chain
    changes that tensor in place, ``x *= 0.5``, so the tap reads the halved tensor too. FX records
    ``x *= 0.5`` as ``x = x * 0.5``: a fuser that runs that graph adds the tensor as it was.

    ``in_place`` (``add`` only): the chain's result takes the tap as ``x += tap``, as torchvision's
    ResNet blocks write ``out += identity``. The tapped tensor is then read by a method call,
    ``x.add_(tap)``, once a fuser turns the traced ``operator.iadd`` back into what runs.
    """

    after: int
    kind: str
    expected: int = 0
    shifted: bool = False
    in_place: bool = False


def readable_layer(ops: tuple[Op, ...]) -> int | None:
    """The position of a chain's first layer module whose weight is a registered parameter
    (``Chain.layer_read``), or None."""
    for position, op in enumerate(ops):
        if isinstance(op, Layer) and not (op.functional or op.parametrized or op.computed):
            return position
    return None


@dataclass(frozen=True)
class Chain:
    """Ops applied one after another, packaged inline in the root module, as an ``nn.Sequential``
    nested ``depth`` levels deep, or as a custom wrapper module holding the ops as attributes.

    ``boundary`` puts the chain behind a module the fuser must fuse on its own: ``hooked`` (the
    Sequential or wrapper has a forward hook that changes values), ``hook_reads_module`` (its hook
    also reads the module's parameters, so the fuser must keep that module whole: the hook would
    be handed the fused module) or ``untraceable`` (the chain sits
    in a module whose forward checks the input's rank in Python, which FX cannot trace; a Sequential
    or wrapper chain is its child ``inner``, an inline chain's ops are its own attributes).
    ``autocast`` is packaged the same way, in a module that runs the chain under
    ``torch.autocast(..., dtype=torch.bfloat16)``: FX runs that block but records none of it.
    Drawn only for a float32 network's last block, so the network returns bfloat16, and a fuser
    that traces through the block returns float32 instead. ``no_grad`` likewise runs the chain
    under ``torch.no_grad()``, which FX runs but does not record either: drawn only for a
    network's last block, so the network's output never requires grad, and a fuser that traces
    through the block returns one that does (on inputs that require grad: the gradients would
    reach every weight before it). ``counts_calls`` likewise runs the chain, then counts the
    call on the module, as code keeping its call count or its last features for a caller does:
    ``self.calls += 1`` for an inline chain (``self.calls.count += 1`` in a namespace it
    holds for one of an even number of ops: ``counts_in_held_object``),
    ``self.calls.append(x.shape)`` (a list, the count its length) for a Sequential child
    (``self.calls.add_(1)`` on an int64 buffer it registers for one nested an even number of
    levels: ``counts_in_buffer``),
    ``object.__setattr__(self, "calls", self.calls + 1)`` for a wrapper child (a write
    ``nn.Module.__setattr__`` never sees; handing ``self`` to a function
    also keeps the wrapper it holds whole, README), or ``self.calls()`` for a wrapper child of
    an even number of ops, ``self.calls`` the ``tick`` method of a plain ``Tally`` object that
    counts in its own attribute (``counts_with_held_method``: the module holds no object but a
    method). FX runs each write and records none of it, so
    a fuser that traces through the module returns one whose count never moves (and a fuser that
    runs its copy of the model must not leave that run's count behind). Drawn for a network's
    last block only, like the two before it. ``type_check`` is packaged the same way,
    in a module that maps the chain's output to ``x * 0.5 + 0.25`` ``if isinstance(x, torch.Tensor)``:
    while tracing ``x`` is a proxy, so FX leaves that out of the graph, and only a fuser that
    compares the trace with the module on the example inputs can tell. Drawn only for a network's
    last block, so that the difference reaches the output whatever the inputs (a ReLU after it could
    zero it on every example input, and no check on them could see it); the ``+ 0.25`` shows even
    where the chain's own output is zero.

    ``loop`` (an ``untraceable`` Sequential chain only): the guard does not call ``inner`` but
    iterates it, ``for stage in self.inner: x = stage(x)``, as code looping over a model's stages
    does. The stages are the Sequential's elements (``naming.staircase``: the first op, then the
    nested rest; every op alone at depth 1, which the strategies do not draw), each fused on its
    own, so a fold never crosses from one to the next. ``inspects`` also asks each stage's type,
    ``if isinstance(stage, nn.Sequential): x = x * 0.5``: a nested stage swapped for a fused
    module would no longer be halved, so every stage must be left as it is and nothing in the
    chain folds.

    ``layer_read`` (a chain behind a boundary other than ``type_check``): after every block the
    root module's code reads the weight of the chain's first layer module (``readable_layer``),
    ``x = x + self.b2.inner[0].weight.mean() * 0.5``, while the module behind the boundary runs
    as written: a fold inside it would change the weight the root reads, so nothing in the
    chain folds (README, models FX cannot trace whole).
    """

    ops: tuple[Op, ...]
    packaging: str = INLINE
    depth: int = 1
    tap: Tap | None = None
    boundary: str | None = None
    loop: str | None = None
    layer_read: bool = False

    @property
    def counts_in_held_object(self) -> bool:
        """An inline ``counts_calls`` chain of an even number of ops counts in a plain object
        it holds, ``self.calls.count += 1`` (``self.calls`` a ``types.SimpleNamespace``): a write
        that goes through no module. Derived from the chain rather than drawn: no extra choice
        in the draw, and shrinking (which removes ops) reaches both forms."""
        return self.boundary == COUNTS_CALLS and self.packaging == INLINE and not len(self.ops) % 2

    @property
    def counts_with_held_method(self) -> bool:
        """A wrapper ``counts_calls`` chain of an even number of ops counts by calling a method
        it holds, ``self.calls()``, bound to a plain ``Tally`` that keeps the count: only the
        object behind the method changes. Derived like ``counts_in_held_object``."""
        return self.boundary == COUNTS_CALLS and self.packaging == WRAPPER and not len(self.ops) % 2

    @property
    def counts_in_buffer(self) -> bool:
        """A Sequential ``counts_calls`` chain nested an even number of levels counts in an int64
        buffer it registers, ``self.calls.add_(1)``: no attribute is set and no container
        filled, the tensor changes in place. FX hands traced code the buffer itself, so the
        trace runs the increment on the fuser's copy and records none of it. Derived from the
        chain like ``counts_in_held_object``."""
        return self.boundary == COUNTS_CALLS and self.packaging == SEQUENTIAL and not self.depth % 2


@dataclass(frozen=True)
class TwoCalls:
    """One layer module read twice on the same input, then the two branches are added.

    The second read is either a second call of the same module (``second="module"``) or a
    functional call on the module's own weight and bias (``second="functional"``: tied weights).
    With ``second="functional"`` the first read may be functional too (``layer.functional``): one
    registered weight read by two ``F.conv*``/``F.linear`` calls, each with its own norms.
    ``second_norms=None`` calls the first branch's norm modules again (a BN with two call sites).
    ``alias`` (with ``second="module"``): the second call goes through another attribute holding
    the same module (``self.conv_alias = self.conv``, registered after it), so the module is held
    at two places in the module tree, as weight-sharing code holds it.

    ``second="twin"``: the second call is of another module of the same configuration, its twin
    (``self.conv0_twin``, a plain module: no hooks, no replaced ``forward``, no parametrization),
    with a bias of its own and the first layer's weight ``Parameter`` itself
    (``twin.weight = layer.weight``, as code tying two layers' weights writes it). Each module is
    called once and no functional call reads the weight, so a fuser that asks only that before
    scaling a weight where it lies changes the other layer's too: ``copy.deepcopy`` keeps one
    ``Parameter`` held by two modules one object. (Two ``Parameter`` objects on one storage come
    out of it on two: ``Parameter.__deepcopy__`` clones, so no fold on a copy can reach the
    other's memory, and such ties are not drawn.)
    """

    layer: Layer
    second: str
    first_norms: tuple[Norm, ...]
    second_norms: tuple[Norm, ...] | None
    packaging: str = INLINE
    alias: bool = False


Block = Chain | TwoCalls


@dataclass(frozen=True)
class NetSpec:
    """A whole network: its input shape (batched, channels on dim 1), blocks, dtype, device and
    the seed from which every weight, BN statistic and input value is derived.

    ``replaced_forward``: the built model's ``forward`` is replaced on the instance by one that
    shifts what its class's forward returns (see ``Layer``). FX traces ``type(model).forward``,
    so a fuser that traces the model anyway drops the shift; one that does not trace it cannot
    see how its code uses its children, and leaves every one whole (README).

    ``example_inputs``: whether the fuser under test is given the inputs (``fuse(model)`` is the
    other common call). Without them no Linear's rank is proven (README rule 2), so no Linear folds,
    and nothing can compare a trace with the model, so a network with a ``type_check`` block is
    always fused with them.

    ``float32_norms`` (bfloat16 and float16 networks): the BatchNorms' statistics and affine
    parameters (modules and the functional calls' holders) are float32 while everything else is
    half, as mixed-precision training leaves a model. PyTorch runs such a BN on half inputs and
    returns half outputs; a fold must still give its layer weights of the layer's own dtype.
    A ``FrozenBatchNorm2d`` stays half: its arithmetic would return float32.

    ``fused_in_inference_mode``: the fuser under test is called inside ``torch.inference_mode()``,
    as inference scripts often are. Tensors made there can never take part in autograd, so a fuser
    that makes the fused model's tensors there returns a model that raises where the original
    runs with gradients enabled (``output_signature_preserved`` runs both with gradients).

    ``root_untraced``: the root module's own code cannot be traced whole, as many models' top
    level cannot. ``rank_guard``: its forward first checks the input's rank in Python, as
    ``Guarded`` does. ``reads_state`` (only with a ``counts_calls`` last block): that block also
    keeps its last output's mean, ``self.last_mean = x.detach().mean()``, and the root's forward
    ends with ``x = x + self.b3.last_mean * 0.5``, as code reading the features a submodule keeps
    for its caller does; the block runs as written (it counts its calls), so a trace would read
    that mean once, as it found it, and keep it (README, models FX cannot trace whole). On the
    suite's one set of inputs that kept mean is the live one, so only the report, which the
    oracle checks, shows such a trace. ``asks_a_keeper`` (the same blocks): the root holds a
    plain object (no module), ``self.keeper = Keeper(self.b3)``, and ends with
    ``x = x + self.keeper.kept() * 0.5``, whose method reads the block's mean: the same read,
    through code that is not the root's and an object no module tree shows.
    ``reads_module_state``: the block keeps the mean in a module-level dict instead,
    ``KEPT["last_mean"] = x.detach().mean()``, and the root ends with
    ``x = x + KEPT["last_mean"] * 0.5``: state no module holds at all. Either way the root
    runs as written and each of its children is fused on its own: an inline block's layers and
    norms are the root's own children, each alone, so nothing folds among them; a Sequential or
    wrapper block is fused whole; and the counting block the root reads is left whole (code using
    a child other than by calling it), but fused on its own as any counting block is where the
    root only calls it (asking the keeper, or reading the dict). Drawn only by
    ``net_specs(untraced_root=True)``.
    """

    input_shape: tuple[int, ...]
    blocks: tuple[Block, ...]
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    replaced_forward: bool = False
    example_inputs: bool = True
    float32_norms: bool = False
    fused_in_inference_mode: bool = False
    root_untraced: str | None = None


def twin_of(layer: Layer) -> Layer:
    """A ``TwoCalls`` twin's configuration: the first layer's, as a plain module."""
    return replace(
        layer,
        functional=False,
        hooked=False,
        replaced_forward=False,
        call_override=False,
        parametrized=False,
        bias_omitted=False,
        computed=None,
    )


def literal(value: object) -> str:
    """Python source for a spec value that leaves out fields at their defaults.

    ``repr`` of these dataclasses is already valid Python; this is the short form used to pin a
    failing network in a regression test.
    """
    if is_dataclass(value) and not isinstance(value, type):
        parts = []
        for spec_field in fields(value):
            current = getattr(value, spec_field.name)
            if spec_field.default is not MISSING and current == spec_field.default:
                continue
            parts.append(f"{spec_field.name}={literal(current)}")
        return f"{type(value).__name__}({', '.join(parts)})"
    if isinstance(value, tuple):
        items = [literal(item) for item in value]
        return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"
    return repr(value)
