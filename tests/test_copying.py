"""``fuser.copying.deep_copy`` against ``copy.deepcopy``: the same object graph, object for object.

Each test copies a model both ways and walks the original and the two copies side by side: at every
position the copies must hold objects of the same type and value, share exactly what the other
copy shares (within the copy, and with the original), and never share a tensor's storage with the
original.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
import torchvision
from torch import fx, nn

from fuser.copying import deep_copy


def assert_same_copy(original: object, expected: object, got: object) -> None:
    """``got`` is a copy of ``original`` of exactly the shape ``expected`` (deepcopy's) has."""
    seen: dict[int, tuple[object, object]] = {}
    storages: dict[int, int] = {}  # expected's tensor storages -> got's: the same sharing
    _walk(original, expected, got, seen, storages, "model")


def _kind(value: object) -> type:
    """The class, except that each GraphModule (and each copy of one) has a class of its own."""
    return type(value).__base__ if isinstance(value, fx.GraphModule) else type(value)


def _walk(original, expected, got, seen, storages, where: str) -> None:
    assert _kind(got) is _kind(expected), f"{where}: {type(got)} != {type(expected)}"
    if id(expected) in seen:
        _, earlier_got = seen[id(expected)]
        assert earlier_got is got, f"{where}: deepcopy shares this object here, deep_copy does not"
        return
    seen[id(expected)] = (original, got)
    assert (got is original) == (expected is original), f"{where}: sharing with the original"
    if isinstance(expected, torch.Tensor):
        assert torch.equal(got, expected) and got.dtype == expected.dtype, where
        assert got.requires_grad == expected.requires_grad, where
        assert got.stride() == expected.stride(), f"{where}: strides"
        assert got.storage_offset() == expected.storage_offset(), f"{where}: storage offset"
        assert got.is_conj() == expected.is_conj() and got.is_neg() == expected.is_neg(), where
        _walk(vars(original), vars(expected), vars(got), seen, storages, f"{where}.__dict__")
        storage = got.untyped_storage().data_ptr()
        if got is not original and storage:  # (an empty storage has no memory, address 0)
            assert storage != original.untyped_storage().data_ptr(), f"{where}: storage shared"
        expected_storage = expected.untyped_storage().data_ptr()
        assert storages.setdefault(expected_storage, storage) == storage, f"{where}: views"
        return
    if isinstance(expected, (fx.GraphModule, torch.jit.ScriptModule)):
        # Copied by their own __deepcopy__ either way; compare what they compute with.
        assert got.code == expected.code, f"{where}: code"
        _walk(original.state_dict(), expected.state_dict(), got.state_dict(), {}, {}, where)
        return
    if isinstance(expected, dict):
        assert list(got) == list(expected), f"{where}: keys"
        for key in expected:
            _walk(original[key], expected[key], got[key], seen, storages, f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), f"{where}: length"
        for i, (o, e, g) in enumerate(zip(original, expected, got, strict=True)):
            _walk(o, e, g, seen, storages, f"{where}[{i}]")
    elif isinstance(expected, set):
        assert got == expected, f"{where}: set"
    elif hasattr(expected, "__dict__") and not isinstance(expected, type):
        _walk(vars(original), vars(expected), vars(got), seen, storages, f"{where}.__dict__")
    else:
        assert got == expected or got is expected, f"{where}: {got!r} != {expected!r}"


class Buffers(nn.Module):
    """Tensors of every shape a buffer takes, most copied by deep_copy's own path for plain
    tensors, the rest (autograd state, a lazy conjugate, attributes) by ``Tensor.__deepcopy__``."""

    def __init__(self) -> None:
        super().__init__()
        whole = torch.arange(24.0).reshape(4, 6)
        self.register_buffer("whole", whole)
        self.register_buffer("rows", whole[1:3])  # a view at an offset: shares the copy
        self.register_buffer("columns", whole[:, ::2])  # strided
        self.register_buffer("transposed", whole.t())
        self.register_buffer(
            "channels_last", torch.rand(2, 3, 4, 5).to(memory_format=torch.channels_last)
        )
        self.register_buffer("scalar", torch.tensor(3, dtype=torch.int64))
        self.register_buffer("empty", torch.empty(0, 3))
        self.register_buffer("flags", torch.tensor([True, False]))
        self.register_buffer("float16", torch.rand(5).half())
        self.register_buffer("learned", torch.rand(3).requires_grad_())
        self.register_buffer("conjugate", torch.randn(3, dtype=torch.complex64).conj())
        tagged = torch.ones(2)
        tagged.note = "an attribute of the tensor"
        self.register_buffer("tagged", tagged)
        self.register_buffer("missing", None)
        self.unregistered = whole[3]  # a plain attribute viewing a buffer


def test_buffers_of_every_layout_are_copied_like_deepcopy() -> None:
    model = Buffers()
    got = check(model)
    assert got.rows.untyped_storage().data_ptr() == got.whole.untyped_storage().data_ptr()
    assert got.unregistered.untyped_storage().data_ptr() == got.whole.untyped_storage().data_ptr()
    assert got.tagged.note == "an attribute of the tensor"


def check(model: object) -> object:
    got = deep_copy(model)
    assert_same_copy(model, copy.deepcopy(model), got)
    return got


class Counted:
    """A user object with its own ``__deepcopy__``: deep_copy must hand it the shared memo."""

    def __init__(self, payload: torch.Tensor) -> None:
        self.payload = payload

    def __deepcopy__(self, memo: dict) -> Counted:
        return Counted(copy.deepcopy(self.payload, memo))


class Opinionated(nn.Module):
    """A module that changes its own pickled state: it must be copied through that protocol."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.cache = torch.ones(3)

    def __getstate__(self):
        state = super().__getstate__()
        state["cache"] = None  # not worth copying
        return state


class Slotted(nn.Module):
    __slots__ = ("extra",)

    def __init__(self) -> None:
        super().__init__()
        self.extra = [1, 2]


class Tangled(nn.Module):
    """Sharing and cycles in every place a module can hold them."""

    def __init__(self) -> None:
        super().__init__()
        shared = nn.Conv2d(3, 3, 1)
        self.first = shared
        self.again = shared  # one module under two names
        self.tied = nn.Conv2d(3, 3, 1)
        self.tied.weight = shared.weight  # one parameter in two modules
        self.bn = nn.BatchNorm2d(3)
        self.register_buffer("scale", torch.arange(3.0), persistent=False)
        self.plain_list = [shared, self.bn.running_mean, (1, "two", shared)]
        self.weight_view = shared.weight.detach()[:, :1]  # shares storage with a parameter
        self.ordered = OrderedDict(a=shared, b=torch.zeros(1))
        self.labelled = OrderedDict(a=1)
        self.labelled.note = "an OrderedDict with attributes"
        self.names = {"first", "again"}
        self.pair = (shared, 2.0, self.bn.running_mean)  # a tuple that must be rebuilt
        self.user_object = Counted(self.bn.running_var)
        self.opinionated = Opinionated()
        self.__dict__["parent_link"] = self  # a cycle through a plain attribute
        self.bn.register_forward_hook(lambda module, args, output: output)
        self.nested = nn.Sequential(nn.Sequential(nn.Sequential(shared, nn.ReLU())))


def test_a_tangled_module_is_copied_like_deepcopy() -> None:
    got = check(Tangled().eval())
    assert got.first is got.again and got.tied.weight is got.first.weight
    assert got.parent_link is got and got.opinionated.cache is None


def test_copies_run_like_the_original() -> None:
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 32, 32)
    got = check(model)
    torch.testing.assert_close(got(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Slotted(),
        lambda: fx.symbolic_trace(nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))),
        lambda: torch.jit.script(nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))),
        lambda: nn.Sequential(torch.jit.script(nn.Conv2d(2, 2, 1)), Opinionated()),
        lambda: torchvision.models.mobilenet_v2(),
    ],
    ids=["slots", "graph_module", "script_module", "scripted_child", "mobilenet_v2"],
)
def test_modules_with_their_own_copy_protocol(make) -> None:
    model = make()
    got = deep_copy(model)
    assert _kind(got) is _kind(model)
    if isinstance(model, torch.jit.ScriptModule):
        x = torch.randn(1, 2, 4, 4)
        torch.testing.assert_close(got(x), model(x), rtol=0, atol=0)
        return
    assert_same_copy(model, copy.deepcopy(model), got)


def test_the_original_is_left_alone() -> None:
    model = Tangled()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    got = deep_copy(model)
    with torch.no_grad():
        for parameter in got.parameters():
            parameter.add_(1)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
