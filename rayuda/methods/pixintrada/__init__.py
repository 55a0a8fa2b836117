"""``pixintrada`` — Pixel-level Intra-domain Adaptation (Yan et al., ACM MM 2021).

Plan: source-only → ``inter`` → ``split`` (pass) → ``intra`` (reported) [→ ``split2`` → ``intra2`` (reported)].

* ``inter``: the inter-domain model, ``params.inter_method`` ∈ {adaptsegnet, advent} with the knobs
  ``params.inter`` (both take ``w_adv``). Default ``adaptsegnet``, the paper's: its inter-domain stage
  "follow[s] the adversarial learning approach [32]" (Sec. 3.1, eq. 1: softmax maps, L_G = CE − log D(G(x_t)))
  and on GTA5 it trains "the inter-domain adaptation model of [32]" (Sec. 5.3), [32] = AdaptSegNet (Tsai et
  al. 2018). Not reproduced: the paper's source images are GTA5 translated to Cityscapes' style by BDL [19]
  (point ``source=`` at them). ``advent`` (rayuda's earlier default) is the very stage ``intrada``
  trains (same name, knobs and key), so the two methods then share it in a stage cache.
* ``split`` (:class:`rayuda.methods.pixintrada.labeller.ClassThresholdSplit`, ``params.split``): class-wise thresholds
  ``t_k = min(0.9, median confidence of class k)``; easy pixels (some ``y_k > α·t_k``) get the argmax over
  the passing classes, hard pixels 255 (eq. 2–4).
* ``intra`` (``params.intra``), on target-train images only: partial CE on easy pixels (eq. 5) and a
  pixel-level adversarial term on the softmax of each output level (two discriminators on multi-level
  models, level weights 1 / 0.2 as AdaptSegNet), weight β (eq. 9): ``adversarial: binary`` (PLA, eq. 6),
  ``continuous`` (CTS, eq. 7–8) or ``none`` (partial CE only, an ablation). D = 1 means hard.
* ``rounds: 2`` (the paper's setting) adds ``split2`` — the split regenerated from the round-1 model, knobs
  ``params.round2.split`` — and ``intra2`` (``params.round2.intra``, with the KL-to-uniform weight ``kld``).
  Round 1's stages do not read ``rounds`` or ``round2``, so trials with 1 and 2 rounds share round 1.

(choice) Each intra round starts from the latest model (as ``intrada``; the paper trains another network):
a short CPU schedule would otherwise undo the adaptation it refines. (choice) CTS's ``Z = 1 − max_k y_k``
uses ``y`` from the model that made the split (the paper's ``G_inter``), held frozen as the stage's teacher
and run on the same augmented batch, so Z stays aligned with the pseudo-labels. (choice) The KLD term of
round 2 ("to prevent overfitting to pseudo labels", CRST's MR-KLD) applies to the main output on the
pseudo-labelled (easy) pixels; hard pixels are the adversarial term's. β defaults to 1e-3 (AdaptSegNet's
adversarial weight; the paper gives no value), the KLD weight to 0.1 (CRST's).
"""

from __future__ import annotations

import torch

from rayuda.config import ConfigError
from rayuda.methods.adaptsegnet import AdaptSegNet
from rayuda.methods.advent import AdvEnt
from rayuda.methods.base import DEFAULT_SCHEDULE, Method, Stage, image_size, source_only_stage
from rayuda.methods.context import ADV_LEVEL_WEIGHT
from rayuda.methods.pixintrada.labeller import ClassThresholdSplit
from rayuda.methods.pixintrada.losses import (
    continuous_index,
    cts_d_loss,
    cts_g_loss,
    kl_to_uniform,
    pla_d_loss,
    pla_g_loss,
)
from rayuda.models import PixelDiscriminator
from rayuda.pseudo import IGNORE

#: The inter-domain methods (``params.inter_method``); both read ``params.inter.w_adv``.
INTER_METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (AdaptSegNet, AdvEnt)}
ADVERSARIAL_FORMS = ("binary", "continuous", "none")


class PixIntraDA(Method):
    name = "pixintrada"
    has_discriminators = True
    defaults = {
        "inter_method": "adaptsegnet",  # Sec. 3.1 / 5.3: the inter-domain model of [32], AdaptSegNet
        "inter": dict(AdaptSegNet.defaults),  # w_adv 1e-3 (AdaptSegNet's; advent takes the same knob)
        "split": {"alpha": 0.85, "cap": 0.9},  # α (paper's best, Prop. 0.67 on GTA5), t_k cap
        "intra": {"adversarial": "continuous", "beta": 1.0e-3},
        "rounds": 2,
        "round2": {"split": {"alpha": 0.85, "cap": 0.9},
                   "intra": {"adversarial": "continuous", "beta": 1.0e-3, "kld": 0.1}},
    }

    @classmethod
    def schedules(cls):
        return {"inter": dict(DEFAULT_SCHEDULE), "intra": dict(DEFAULT_SCHEDULE), "intra2": dict(DEFAULT_SCHEDULE)}

    @classmethod
    def plan(cls, params):
        if params["inter_method"] not in INTER_METHODS:
            raise ConfigError(f"params.inter_method={params['inter_method']!r}; valid: {', '.join(INTER_METHODS)}")
        if params["rounds"] not in (1, 2):
            raise ConfigError(f"params.rounds must be 1 or 2, got {params['rounds']!r}")
        for where, knobs in (("intra", params["intra"]), ("round2.intra", params["round2"]["intra"])):
            if knobs["adversarial"] not in ADVERSARIAL_FORMS:
                raise ConfigError(f"params.{where}.adversarial={knobs['adversarial']!r}; valid: "
                                  f"{', '.join(ADVERSARIAL_FORMS)}")
        stages = [
            source_only_stage(),
            Stage("inter", step=INTER_METHODS[params["inter_method"]], params="params.inter"),
            Stage("split", kind="pseudo_labels", labeller=ClassThresholdSplit, params="params.split"),
            Stage("intra", step=cls, params="params.intra", labelled="split:all", unlabelled=None, teacher="inter",
                  reported=True),
        ]
        if params["rounds"] == 2:
            stages += [
                Stage("split2", kind="pseudo_labels", labeller=ClassThresholdSplit, params="params.round2.split"),
                Stage("intra2", step=cls, params="params.round2.intra", labelled="split2:all", unlabelled=None,
                      teacher="intra", reported=True),
            ]
        return stages

    def setup(self, ctx):
        if ctx.params["adversarial"] != "none":
            for lvl in ctx.levels:
                ctx.discriminators[lvl] = PixelDiscriminator(ctx.num_classes)

    def train_step(self, ctx, labelled, unlabelled):
        """``labelled``: target-train images with the split pass's labels (255 = hard)."""
        p = ctx.params
        form, kld = p["adversarial"], p.get("kld", 0.0)  # round 1 has no kld knob
        out = ctx.forward(labelled["image"])
        size = image_size(labelled)
        label = labelled["label"]
        hard = (label == IGNORE).float().unsqueeze(1)  # M, N×1×H×W
        probs = {lvl: ctx.probs(out, lvl, size).float() for lvl in ctx.levels}
        loss_seg = ctx.seg_loss(out, label)  # eq. 5: partial CE on easy pixels
        loss_g, losses = loss_seg, {"seg": loss_seg.detach(), "easy": 1 - hard.mean()}
        if kld:
            loss_kld = kl_to_uniform(probs["main"], hard[:, 0] == 0)  # on pseudo-labelled (easy) pixels
            loss_g = loss_g + kld * loss_kld
            losses["kld"] = loss_kld.detach()
        if form == "none":
            ctx.step_generator(loss_g)
            return losses

        disc = ctx.discriminators
        if form == "continuous":
            with torch.no_grad():
                teacher = ctx.frozen["teacher"](labelled["image"])
                z = continuous_index(ctx.probs(teacher, "main", size).float(), hard)  # eq. 7
            g_loss, d_loss = (lambda d: cts_g_loss(d, hard)), (lambda d: cts_d_loss(d, z))  # eq. 8
        else:
            g_loss, d_loss = (lambda d: pla_g_loss(d, hard)), (lambda d: pla_d_loss(d, hard))  # eq. 6
        loss_adv = sum(ADV_LEVEL_WEIGHT[lvl] * g_loss(disc[lvl](probs[lvl])) for lvl in ctx.levels)
        ctx.step_generator(loss_g + p["beta"] * loss_adv)  # eq. 9
        loss_d = sum(d_loss(disc[lvl](probs[lvl].detach())) for lvl in ctx.levels)
        ctx.step_discriminators(loss_d)
        return {**losses, "adv": loss_adv.detach(), "d": loss_d.detach()}
