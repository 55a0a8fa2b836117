"""``cada`` — Category-Adaptive Domain Adaptation (Wang et al., ICASSP 2021), Sec. 3 and eq. 1–6.

Plan: source-only → ``adapt`` → (``thresholds<k>`` → ``round<k>``, reported) for k = 1 … ``params.rounds``.

* ``adapt`` (§2.1, §2.3, eq. 5): ``L = L_seg + λ_adv_seg·L_adv_seg + λ_style·Σ_l w_l·L_style^l``. L_adv_seg is the
  output-space GAN loss on softmax maps "consistent with BDL" (§2.3) with *one* segmentation discriminator D_c
  (§3.2) on G's main output (``output_levels: main``; choice: the paper's G, as BDL's, has one output, so a
  multi-level G's aux output gets its CE only), a PatchGAN that outputs "a 16x downsampled confidence probability
  map relative to the input semantic segmentation map" (§3.2; ``d_downsample: 16``: AdaptSegNet's five 4×4 convs
  with the last at stride 1). Each domain's map enters D_c at its own size (the image's, as BDL's code and
  ``advent``). rayuda's adapt stage in version 1 had one 32× D per output level and resized source
  maps to the target's size: ``output_levels: all, d_downsample: 32`` give the first two back (32× is also BDL's
  code, whose G is single-level). L_style^l is the GAN loss of a style discriminator D_f^l on the style vector
  (channel means) of backbone layer l. ``style_weights`` maps each layer to its w_l: the paper's layer1 and layer2
  at 1; a layer with weight 0 gets no discriminator. Update order as AdaptSegNet/BDL: G with every D fixed, then the
  Ds on detached inputs.
* ``thresholds<k>`` (§2.2, eq. 1–3): :class:`rayuda.methods.cada.labeller.CategoryAdaptiveThresholds` with the latest
  model; a pixel predicted l keeps its label when ``E(P) < E(f^l) − Δ`` (``params.thresholds.delta``, nats).
  Δ is in nats, so it reads against the class centroids' entropies that the pass reports: on minicity
  (19 classes, the adapted model) they span 0.98–1.95 nats of the 2.94 maximum; Δ = −0.5 keeps ~all
  predicted pixels, 0 (the default; the paper gives no value) 73 %, 0.5 41 %, 1.0 7 % (Δ ≥ E(f^l) empties
  class l). With 16 classes entropies shrink by at most log 15 / log 18 ≈ 0.94 (only the mass off the
  argmax spreads over fewer classes), so the same range serves (``bench/cada_delta.py`` measures a model).
* ``round<k>`` (eq. 6): ``L = w_source·L_seg + w_ssl·L_ssl`` on source labels and the pass's pseudo-labels.
  The source CE is kept (rayuda's choice; ``ssl.w_source: 0`` gives eq. 6 alone). Rounds chain:
  round k starts from round k−1's model and its labels come from that model.

Stage names are stable, so trials with rounds = 1, 2, 3 share round 1 (and 2) in the stage cache; every round
reads the same ``params.thresholds`` / ``params.ssl`` knobs, ``rounds`` itself is read by no stage.
(choice) ``rounds: 0`` reports ``adapt`` itself (the ablation rows without self-training; its key then differs
from the unreported ``adapt`` of rounds ≥ 1). The paper's encoder/classifier lrs 2.5e-4 / 2.5e-3 are
``rayuda.models.param_groups``' 10× classifier rate; the stage lr default is the engine's CPU 2.5e-3 (10× the
paper's, see ``DEFAULT_SCHEDULE``). Not reproduced: the paper's exponential lr decay of the Ds (0.1 per 50k
iterations; the engine's poly schedule applies) and its CycleGAN-translated source images.
"""

from __future__ import annotations

from rayuda.config import ConfigError
from rayuda.methods.adversarial import OutputSpaceAdversarial
from rayuda.methods.base import DEFAULT_SCHEDULE, SOURCE, TARGET, Method, Stage, image_size, source_only_stage
from rayuda.methods.cada.labeller import CategoryAdaptiveThresholds
from rayuda.methods.cada.losses import self_training_cross_entropy, style_adversarial_loss
from rayuda.methods.context import SEG_LEVEL_WEIGHT
from rayuda.models import OutputDiscriminator, StyleDiscriminator, style_vector

MAX_ROUNDS = 3
STYLE_PREFIX = "style_"
OUTPUT_LEVELS = ("main", "all")  # params.adapt.output_levels
D_DOWNSAMPLE = (16, 32)  # params.adapt.d_downsample


def style_weights(params) -> dict[str, float]:
    """The style layers that train a discriminator: ``{layer: w_l}`` for every ``w_l > 0`` (none when the
    style adversarial is switched off)."""
    if not params["style_adv"]:
        return {}
    return {layer: float(w) for layer, w in params["style_weights"].items() if float(w) > 0}


class CADAAdapt(OutputSpaceAdversarial, register=False):
    """Stage 1: style-vector + output-space adversarial alignment (eq. 5)."""

    name = "cada_adapt"
    version = 2  # 2: one 16× D_c on the main output, source maps at their own size
    has_discriminators = True
    defaults = {
        "w_adv_seg": 1.0e-3,  # λ_adv_seg, eq. 5
        "w_style": 1.0e-3,  # λ_style, eq. 5
        "style_weights": {"layer1": 1.0, "layer2": 1.0, "layer3": 0.0, "layer4": 0.0},  # w_l (choice: 1 each)
        "style_adv": True,  # ablation: False = "original" (output-space adversarial only)
        "output_adv": True,
        "output_levels": "main",  # §3.2: one D_c, on the main output; "all": one D per output level
        "d_downsample": 16,  # §3.2: D_c's output is 16× downsampled; 32: AdaptSegNet's/BDL's D
    }

    def discriminator_input(self, ctx, prob):
        return prob  # AdaptSegNet: the softmax map

    def adversarial_levels(self, ctx):
        return ["main"] if ctx.params["output_levels"] == "main" else ctx.levels

    def setup(self, ctx):
        if ctx.params["output_adv"]:
            for lvl in self.adversarial_levels(ctx):
                ctx.discriminators[lvl] = OutputDiscriminator(self.map_channels(ctx),
                                                              downsample=ctx.params["d_downsample"])
        channels = ctx.feature_channels
        for layer in style_weights(ctx.params):
            if layer not in channels:
                raise ConfigError(f"params.adapt.style_weights.{layer} > 0, but G has only {', '.join(channels)} "
                                  f"(model.layers / model.backbone)")
            ctx.discriminators[STYLE_PREFIX + layer] = StyleDiscriminator(channels[layer])

    def style_logits(self, ctx, output, layers, detach: bool = False) -> dict:
        """``D_f^l(S^l)`` for each style layer l, with ``S^l`` the channel means of G's layer-l features."""
        out = {}
        for layer in layers:
            style = style_vector(output.features[layer].float())
            out[layer] = ctx.discriminators[STYLE_PREFIX + layer](style.detach() if detach else style)
        return out

    def train_step(self, ctx, labelled, unlabelled):
        p = ctx.params
        weights = style_weights(p)
        size = image_size(unlabelled)
        losses, loss_d = {}, 0.0
        with ctx.generator_update():
            out_s = ctx.forward(labelled["image"])
            loss_seg = ctx.seg_loss(out_s, labelled["label"])
            ctx.backward(loss_seg)  # the source graph is freed before the target forward (ADVENT's order)
            losses["seg"] = loss_seg.detach()
            maps_s = self.detached_maps(ctx, out_s, image_size(labelled)) if p["output_adv"] else None  # own size
            out_t = ctx.forward(unlabelled["image"])
            loss_g = None
            if p["output_adv"]:  # L_adv_seg: target softmax maps should look like source ones
                maps_t = self.domain_maps(ctx, out_t, size)
                loss_adv = self.generator_loss(ctx, maps_t)
                loss_g = p["w_adv_seg"] * loss_adv
                losses["adv"] = loss_adv.detach()
            if weights:  # Σ_l w_l L_style^l: target style vectors should look like source ones
                loss_style = style_adversarial_loss(self.style_logits(ctx, out_t, weights), weights, SOURCE)
                term = p["w_style"] * loss_style
                loss_g = term if loss_g is None else loss_g + term
                losses["style"] = loss_style.detach()
            if loss_g is not None:
                ctx.backward(loss_g)

        if p["output_adv"]:
            loss_d = loss_d + self.discriminator_loss(ctx, maps_s, maps_t)
        if weights:  # each D_f^l: source styles 1, target styles 0 (G's vectors detached)
            ones = dict.fromkeys(weights, 1.0)
            d_style = 0.5 * style_adversarial_loss(self.style_logits(ctx, out_s, weights, detach=True), ones, SOURCE) \
                + 0.5 * style_adversarial_loss(self.style_logits(ctx, out_t, weights, detach=True), ones, TARGET)
            losses["d_style"] = d_style.detach()
            loss_d = loss_d + d_style
        if p["output_adv"] or weights:
            ctx.step_discriminators(loss_d)
            losses["d"] = loss_d.detach()
        return losses


class CADASelfTraining(Method, register=False):
    """A self-training round (eq. 6): CE on the kept pseudo-labels of target images, plus source CE.

    Order: the *target* forward and backward come first, then the source's — the reverse of the two-domain
    steps' source-first order (ARCHITECTURE, ``rayuda.methods``). On purpose: eq. 6 is the round's loss and the
    source CE is rayuda's optional addition (``w_source: 0`` skips its forward), so the step reads as the paper's
    loss plus the extra term. G steps once for both terms, so the gradient is the summed loss's in either order;
    what the order changes is BatchNorm's running statistics (updated per forward, momentum-averaged), so
    swapping it would change the trained weights and every cached round — kept as it was measured.
    """

    name = "cada_ssl"
    defaults = {
        "w_ssl": 1.0,
        "w_source": 1.0,  # (choice) source CE kept during self-training; 0 = eq. 6 alone
        "normalise": "all",  # eq. 6 divides by H·W ("all"); "kept": by the kept pixels (choice)
    }

    def train_step(self, ctx, labelled, unlabelled):
        p = ctx.params
        with ctx.generator_update():
            out_t = ctx.forward(unlabelled["image"])
            size = unlabelled["label"].shape[-2:]  # logits upsampled by ctx.logits (model.align_corners)
            loss_ssl = sum(SEG_LEVEL_WEIGHT[lvl] * self_training_cross_entropy(
                ctx.logits(out_t, lvl, size), unlabelled["label"], p["normalise"]) for lvl in ctx.levels)
            ctx.backward(p["w_ssl"] * loss_ssl)  # the target graph is freed before the source forward
            del out_t
            losses = {"ssl": loss_ssl.detach(), "kept": (unlabelled["label"] != 255).float().mean()}
            if p["w_source"] > 0:
                loss_seg = ctx.seg_loss(ctx.forward(labelled["image"]), labelled["label"])
                ctx.backward(p["w_source"] * loss_seg)
                losses["seg"] = loss_seg.detach()
        return losses


class CADA(Method):
    name = "cada"
    defaults = {
        "adapt": dict(CADAAdapt.defaults),
        # Δ in nats; the paper gives no value: 0.0 (threshold = the centroid's entropy) is rayuda's default,
        # calibrated on minicity (search_spaces/cada.yaml)
        "thresholds": {"delta": 0.0},
        "ssl": dict(CADASelfTraining.defaults),
        "rounds": 2,  # the paper's two rounds of self-training
    }

    @classmethod
    def schedules(cls):
        return {"adapt": dict(DEFAULT_SCHEDULE), **{f"round{k}": dict(DEFAULT_SCHEDULE)
                                                    for k in range(1, MAX_ROUNDS + 1)}}

    @classmethod
    def plan(cls, params):
        rounds = params["rounds"]
        if not isinstance(rounds, int) or isinstance(rounds, bool) or not 0 <= rounds <= MAX_ROUNDS:
            raise ConfigError(f"params.rounds must be an int in 0 … {MAX_ROUNDS}, got {rounds!r}")
        adapt = params["adapt"]
        if adapt["output_levels"] not in OUTPUT_LEVELS:
            raise ConfigError(f"params.adapt.output_levels={adapt['output_levels']!r}; valid: "
                              f"{', '.join(OUTPUT_LEVELS)}")
        if adapt["d_downsample"] not in D_DOWNSAMPLE:
            raise ConfigError(f"params.adapt.d_downsample must be 16 or 32, got {adapt['d_downsample']!r}")
        stages = [source_only_stage(), Stage("adapt", step=CADAAdapt, params="params.adapt", reported=rounds == 0)]
        for k in range(1, rounds + 1):
            stages += [
                Stage(f"thresholds{k}", kind="pseudo_labels", labeller=CategoryAdaptiveThresholds,
                      params="params.thresholds"),
                Stage(f"round{k}", step=CADASelfTraining, params="params.ssl", labelled="source",
                      unlabelled=f"thresholds{k}:all", reported=True),
            ]
        return stages
