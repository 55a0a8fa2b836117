"""The method registry: name → class. Adding a method = one module here + one ``search_spaces`` YAML."""

from __future__ import annotations

from rayuda.methods.adaptsegnet import AdaptSegNet
from rayuda.methods.advent import AdvEnt
from rayuda.methods.base import Method
from rayuda.methods.cram import CRAM
from rayuda.methods.fgdem import FGDEM
from rayuda.methods.minent import MinEnt
from rayuda.methods.source_only import SourceOnly

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (SourceOnly, AdaptSegNet, AdvEnt, MinEnt, CRAM, FGDEM)}


def get_method(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(sorted(METHODS))}") from None
