"""A two-round test method (registered through ``RAYUDA_METHODS=tests.two_rounds_method``): two reported AdvEnt
stages, the second starting from the first — the shape of a self-training method's rounds."""

from __future__ import annotations

from rayuda.methods.advent import AdvEnt
from rayuda.methods.base import Method, Stage, source_only_stage


class TwoRounds(Method):
    name = "two_rounds"
    defaults = {"round1": dict(AdvEnt.defaults), "round2": dict(AdvEnt.defaults)}

    @classmethod
    def schedules(cls):
        return {"round1": {"iters": 3, "lr": 2.5e-3}, "round2": {"iters": 3, "lr": 2.5e-3}}

    @classmethod
    def plan(cls, params):
        return [source_only_stage(), Stage("round1", step=AdvEnt, params="params.round1", reported=True),
                Stage("round2", step=AdvEnt, params="params.round2", reported=True)]
