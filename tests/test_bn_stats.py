"""train.bn_stats: in a stage that forwards source and target images separately, the source forwards leave
BatchNorm's running statistics to the target's (``target``, the default), or move them too (``mixed``, as before)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rayuda.config import ConfigError
from rayuda.engine import run_pipeline
from rayuda.engine.checkpoint import load_checkpoint
from rayuda.engine.plan import check_plan, holds_source_statistics, stage_key, stage_params, stage_slice
from rayuda.methods import METHODS, plan_of, resolve_config
from rayuda.methods.context import TrainContext, batch_norms, running_statistics_held
from tests.test_methods import StubG

TINY = {"data.size": [32, 64], "data.batch_size": 2, "data.holdout": 4, "train.eval_every": 3,
        "train.log_every": 3, "stages.source_only.iters": 3, "stages.advent.iters": 3}


def test_a_held_forward_normalises_with_its_batch_but_leaves_the_running_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).train()
    ctx = TrainContext(config={"model": {"multi_level": False}}, model=model, device=torch.device("cpu"),
                       num_classes=4)
    source, target = torch.randn(2, 3, 5, 5) + 3.0, torch.randn(2, 3, 5, 5) - 3.0
    ctx.held_images = source
    out = ctx.forward(source)
    assert torch.equal(model[1].running_mean, torch.zeros(4)) and torch.equal(model[1].running_var, torch.ones(4))
    assert out.mean(dim=(0, 2, 3)).abs().max() < 1e-5  # normalised with the batch's own statistics
    assert model[1].momentum == 0.1  # restored
    ctx.forward(target)  # any other tensor, even of the same values as the held one, moves them
    after = model[1].running_mean.clone()
    assert not torch.equal(after, torch.zeros(4))
    ctx.forward(source.clone())
    assert not torch.equal(model[1].running_mean, after)
    with running_statistics_held(batch_norms(model)):
        assert model[1].momentum == 0.0
    assert model[1].momentum == 0.1 and ctx.held_norms == [model[1]]


def test_the_setting_keys_only_the_two_domain_stages_and_mixed_keeps_the_keys_of_before():
    target, mixed = resolve_config("cada", {}), resolve_config("cada", {"train.bn_stats": "mixed"})
    for stage in plan_of(target):
        ours, before = stage_slice(target, stage), stage_slice(mixed, stage)
        changed = stage.name in ("adapt", "round1", "round2")  # source beside target; not source_only, passes
        assert ("bn_stats" in ours.get("train", {})) == changed and "bn_stats" not in before.get("train", {})
        assert (stage_key(stage, ours, None) != stage_key(stage, before, None)) == changed
    cra = resolve_config("cra", {})
    assert [s.name for s in plan_of(cra) if "bn_stats" in stage_slice(cra, s).get("train", {})] == ["cda"]
    with pytest.raises(ConfigError, match="train.bn_stats must be one of target, mixed"):
        check_plan(plan_of(target), resolve_config("cada", {"train.bn_stats": "source"}))


def test_a_two_domain_stage_ends_with_the_targets_statistics(tmp_path):
    runs = {}
    for mode in ("target", "mixed"):
        summary = run_pipeline(resolve_config("advent", {**TINY, "train.bn_stats": mode}), tmp_path / mode,
                               cache_dir=tmp_path / "cache")
        runs[mode] = summary
    first, second = ([s for s in runs[m]["stages"]] for m in ("target", "mixed"))
    assert first[0]["key"] == second[0]["key"] and second[0]["cache"] == "hit"  # source_only: one stage
    assert first[1]["key"] != second[1]["key"] and second[1]["cache"] == "miss"
    stats = {m: load_checkpoint(tmp_path / m / "model.pt") for m in runs}
    means = [k for k in stats["target"] if k.endswith("running_mean")]
    assert means and any(not torch.equal(stats["target"][k], stats["mixed"][k]) for k in means)


def two_domain_steps() -> list[tuple[str, str]]:
    """(method, stage) of every stage whose source forwards are held under the default."""
    found = []
    for name in sorted(METHODS):
        cfg = resolve_config(name)
        found += [(name, stage.name) for stage in plan_of(cfg) if holds_source_statistics(stage, cfg)]
    return found


@pytest.mark.parametrize("method,stage_name", two_domain_steps())
def test_every_source_forward_of_a_two_domain_step_is_held(method, stage_name):
    """The engine recognises the source batch by identity (``ctx.held_images``): a step that forwarded a copy or a
    transform of it would let the source move the running statistics. One real step of each stage, on a stub G."""
    cfg = resolve_config(method)
    stage = next(s for s in plan_of(cfg) if s.name == stage_name)
    step, model = stage.step(), StubG(size=(32, 32))  # the stages' own discriminators need ≥ 32 pixels
    ctx = TrainContext(config=cfg, model=model, device=torch.device("cpu"), num_classes=2,
                       params=stage_params(cfg, stage))
    step.setup(ctx)
    ctx.opt_g = torch.optim.SGD(model.parameters(), lr=0.01)
    ctx.opt_d = torch.optim.Adam(ctx.discriminators.parameters()) if len(ctx.discriminators) else None
    labels = torch.randint(0, 2, (1, 32, 32), generator=torch.Generator().manual_seed(0))
    source = {"image": torch.zeros(1, 3, 32, 32), "label": labels}
    target = {"image": torch.full((1, 3, 32, 32), 1.5), "label": labels}  # pseudo-labels, for the rounds
    ctx.held_images, seen, forward = source["image"], [], ctx.forward

    def spy(images):
        seen.append((images is ctx.held_images, images.shape == source["image"].shape
                     and torch.equal(images, source["image"])))
        return forward(images)

    ctx.forward = spy
    step.train_step(ctx, source, target)
    assert any(same for _, same in seen), "the step never forwarded the source batch"
    assert all(held for held, same in seen if same)
