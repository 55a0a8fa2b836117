"""The method interface: a method is its knobs, its stage plan, the networks it adds and one training step.
Defining a subclass of :class:`Method` registers it under its ``name`` in :data:`METHODS`.

A *plan* is a list of :class:`Stage` s, declared as data; the engine (``rayuda.engine``) runs any plan,
caching every stage under a key derived from exactly the config it reads. Single-stage methods keep the
default plan — the shared source-only stage, then the method's own stage, reported to the search.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from rayuda.methods.context import TrainContext

#: Discriminator labels: source 1, target 0 (AdaptSegNet's and CRAM's convention; ADVENT's code labels source 0 —
#: BCE is symmetric, so only the consistency between D's and G's losses matters).
SOURCE, TARGET = 1.0, 0.0

#: The schedule of a method's own stage on the CPU default (``stages.<name>.iters`` / ``.lr``). The lr is 10×
#: the papers' 2.5e-4: their runs last ~100k iterations from ImageNet weights; here a 400-iteration stage
#: after the source-only stage, where 2.5e-4 barely moves the model (docs/BENCHMARKS.md).
DEFAULT_SCHEDULE = {"iters": 400, "lr": 2.5e-3}


@dataclass(frozen=True)
class Stage:
    """One stage of a plan.

    Attributes:
        name: the stage's name; its schedule is ``stages.<name>`` (train stages) and its folder
            ``<name>-<key>`` in the stage cache.
        kind: ``"train"`` (a loop of ``step.train_step``) or ``"pseudo_labels"`` (one eval-mode pass over
            target-train with ``labeller``, writing label PNGs and statistics).
        step: the :class:`Method` whose ``train_step`` trains the stage (train stages).
        labeller: the :class:`rayuda.pseudo.PseudoLabeller` of a pseudo-label stage.
        params: dotted config path of the knobs the stage reads as ``ctx.params`` (``None``: no knobs).
        labelled, unlabelled: what the stage trains on, the two batches of ``train_step``: ``"source"`` /
            ``"target"`` (the configured train sets), ``"STAGE:SUBSET"`` (target-train images of a pseudo-label
            stage's subset, labelled with its PNGs), or ``None`` (``train_step`` gets ``None``). ``labelled`` is
            trained on with its labels (the source's ground truth, or a pass's pseudo-labels: CRA and PixIntraDA
            train on target images alone, IntraDA's easy split stands in for the source); ``unlabelled`` is the
            other batch, whose ground truth is never read (the target, IntraDA's hard split; in CADA's rounds
            the target images with the pass's pseudo-labels).
            In the stage's cache key they keep their former names, ``source`` / ``target``
            (:func:`rayuda.engine.plan.stage_identity`).
        init: where G's weights start: ``"upstream"`` (the previous train stage's final model, or
            ``model.init`` for the first), ``"model.init"``, or the name of an earlier train stage.
        teacher: an earlier train stage whose final model the stage holds frozen as ``ctx.frozen["teacher"]``.
        reported: the stage's evaluations are reported to the search (its iterations count on the
            trial's step axis); unreported stages are never evaluated with target labels.
    """

    name: str
    kind: str = "train"
    step: type[Method] | None = None
    labeller: type | None = None
    params: str | None = "params"
    labelled: str | None = "source"
    unlabelled: str | None = "target"
    init: str = "upstream"
    teacher: str | None = None
    reported: bool = False


#: Every registered method by name (``method:`` in a config, ``rayuda.train METHOD``), filled as the classes are
#: defined (:meth:`Method.__init_subclass__`).
METHODS: dict[str, type[Method]] = {}


class Method:
    """Base of every UDA method.

    Subclasses set ``name`` and ``defaults`` (their knobs at the paper's values; config ``params.*``) and
    implement :meth:`train_step`, the update order of one iteration readable top to bottom. Multi-stage
    methods override :meth:`plan` and :meth:`schedules` instead. ``version`` is part of every cache key of a
    stage this method trains: bump it when a change alters what the stage computes.

    A subclass registers itself under its ``name``; one that is no method of its own — a shared base, or a
    stage step that only a plan uses — is defined with ``register=False``
    (``class CADAAdapt(OutputSpaceAdversarial, register=False)``).
    """

    name: ClassVar[str]
    version: ClassVar[int] = 1
    defaults: ClassVar[dict[str, Any]] = {}
    #: whether ``setup`` adds discriminators (their optimiser settings then enter the stage's cache key)
    has_discriminators: ClassVar[bool] = False

    def __init_subclass__(cls, register: bool = True, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not register:
            return
        if "name" not in vars(cls):
            raise TypeError(f"method class {cls.__qualname__} sets no name of its own: give it one, or define it "
                            "with register=False (a base or a plan's stage step)")
        METHODS[cls.name] = cls

    @classmethod
    def schedules(cls) -> dict[str, dict[str, Any]]:
        """Default ``stages.<name>`` schedules of the train stages this method adds (beyond source_only)."""
        return {cls.name: dict(DEFAULT_SCHEDULE)}

    @classmethod
    def plan(cls, params: dict[str, Any]) -> list[Stage]:
        """The stages of this method for knobs ``params``: source-only, then the method's own stage."""
        return [source_only_stage(), Stage(cls.name, step=cls, reported=True)]

    def setup(self, ctx: TrainContext) -> None:
        """Called once per stage on the real context, before the optimisers are built: add discriminators
        (``ctx.discriminators[name] = ...``) or frozen modules. Nothing by default."""

    def train_step(self, ctx: TrainContext, labelled: dict, unlabelled: dict | None) -> dict[str, Any]:
        """One iteration on a batch of the stage's ``labelled`` data and one of its ``unlabelled`` data (``None``
        when the stage has none): update the networks, return the losses to log (tensors or floats)."""
        raise NotImplementedError(f"{type(self).__name__} trains no stage itself; it declares a plan")

    def state_dict(self) -> dict[str, Any]:
        """Method state that must survive a resume (saved in every checkpoint); none by default."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


def image_size(batch: dict) -> tuple[int, int]:
    return tuple(batch["label"].shape[-2:])


class SourceOnly(Method):
    """``source_only``: supervised cross-entropy on the labelled source domain, the first stage of every plan.

    As a method of its own, its plan is that one stage, reported: the source-only baseline of a target. It lives
    beside :class:`Method` because every plan starts with its stage (:func:`source_only_stage`).
    """

    name = "source_only"

    @classmethod
    def schedules(cls):
        return {}  # stages.source_only is in the base config: every plan starts with it

    @classmethod
    def plan(cls, params):
        return [Stage("source_only", step=cls, params=None, unlabelled=None, reported=True)]

    def train_step(self, ctx, labelled, unlabelled):
        output = ctx.forward(labelled["image"])
        loss_seg = ctx.seg_loss(output, labelled["label"])
        ctx.step_generator(loss_seg)
        return {"seg": loss_seg.detach()}


def source_only_stage() -> Stage:
    """The source-only stage every plan starts from; its key does not depend on the method, so all methods
    (and all trials of a search) share it."""
    return Stage("source_only", step=SourceOnly, params=None, unlabelled=None)
