"""``ModelParts`` reads a model's members in one walk; it must list what the model's own methods do."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fuser.sharing import ModelParts


class HidesFrozen(nn.Module):
    """Lists only its trainable parameters: ``parameters()`` and friends are its own."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.frozen = nn.Conv2d(2, 2, 1)

    def named_parameters(self, prefix="", recurse=True, remove_duplicate=True):
        for name, p in super().named_parameters(prefix, recurse, remove_duplicate):
            if "frozen" not in name:
                yield name, p

    def parameters(self, recurse=True):
        for _, p in self.named_parameters(recurse=recurse):
            yield p


def _shared_block() -> nn.Module:
    conv = nn.Conv2d(2, 2, 1)
    bn = nn.BatchNorm2d(2)
    model = nn.Sequential(conv, bn, nn.Sequential(conv, nn.ReLU()), nn.Conv2d(2, 2, 1))
    model[3].weight = conv.weight  # a tied parameter: held by two convs
    model.register_buffer("alias", bn.running_mean)  # a buffer held at two places
    return model


def _views_of_one_storage() -> nn.Module:
    model = nn.Sequential(nn.BatchNorm2d(2), nn.BatchNorm2d(2))
    statistics = torch.rand(4)
    model[0].running_mean, model[1].running_mean = statistics[:2], statistics[2:]
    return model


MODELS = {
    "plain": lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)),
    "leaf": lambda: nn.Conv2d(3, 4, 3),
    "shared": _shared_block,
    "views": _views_of_one_storage,
    "own methods inside": lambda: nn.Sequential(HidesFrozen(), nn.BatchNorm2d(2)),
    "own methods at the root": HidesFrozen,
}


def _by_methods(model: nn.Module) -> tuple:
    """What ``held_twice`` and ``objects`` mean, computed from the model's methods alone."""
    places: dict[int, int] = {}
    for _, part in (
        *model.named_modules(remove_duplicate=False),
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ):
        places[id(part)] = places.get(id(part), 0) + 1
    twice = frozenset(key for key, count in places.items() if count > 1)
    objects = {id(p) for p in (*model.modules(), *model.parameters(), *model.buffers())}
    return twice, objects, [id(p) for p in model.parameters()], [id(b) for b in model.buffers()]


@pytest.mark.parametrize("name", MODELS)
def test_one_walk_lists_what_the_methods_list(name):
    model = MODELS[name]()
    parts = ModelParts.of(model)
    twice, objects, parameters, buffers = _by_methods(model)
    assert parts.held_twice() == twice
    assert set(parts.objects) == objects
    assert [id(p) for p in parts.parameters] == parameters
    assert [id(b) for b in parts.buffers] == buffers


def test_held_twice_names_tied_and_reused_parts():
    model = _shared_block()
    twice = ModelParts.of(model).held_twice()
    assert {id(model[0]), id(model[0].weight), id(model[1].running_mean)} <= twice
    assert id(model[1]) not in twice and id(model[3].bias) not in twice


def test_a_deep_copy_shares_nothing_unless_its_class_says_so():
    model = _shared_block()
    original = ModelParts.of(model)
    assert not ModelParts.of(copy.deepcopy(model)).shared_with(original)
    model[3].__class__ = type("KeepsSelf", (nn.Conv2d,), {"__deepcopy__": lambda s, memo: s})
    duplicate = copy.deepcopy(model)
    shared = ModelParts.of(duplicate).shared_with(original)
    assert shared == {id(model[3]), id(model[3].bias), id(model[0].weight)}


def test_private_storages_are_the_copys_own_and_unaliased():
    model = _views_of_one_storage()
    duplicate = copy.deepcopy(model)  # keeps the two means on one storage of its own
    private = ModelParts.of(duplicate).private_storages(ModelParts.of(model))
    means = {bn.running_mean.untyped_storage().data_ptr() for bn in duplicate}
    assert len(means) == 1 and means.isdisjoint(private)
    others = [t for name, t in duplicate.state_dict(keep_vars=True).items() if "mean" not in name]
    assert {t.untyped_storage().data_ptr() for t in others} == private
    assert not ModelParts.of(model).private_storages(ModelParts.of(model))
