"""One training step of ``advent``, ``cram`` and ``fgdem``, profiled: rayuda's step now (source loss backpropagated
before the target forward, losses left on the device), the earlier step (both forward passes, one
backward, ``.item()`` on every loss) and, for advent, the official ADVENT loop's order written out here.

Each (method, variant) runs in a fresh process (peak memory is the process's peak RSS on CPU,
``torch.cuda.max_memory_allocated`` on CUDA), on random images, after one warm-up step::

    python bench/step_profile.py           # the CPU default (ResNet-18, 3 layers, 64×128, batch 8)
    python bench/step_profile.py --model r101 --size 129 257 --batch 1   # DeepLab-v2 R101 multi-level

Prints a markdown table: step time (CUDA: median wall time of ``--steps``; CPU: the least process CPU time of
``--steps``, which other processes on a shared machine disturb far less than wall time), peak memory, and from
``torch.profiler`` (one step) the time in convolutions, upsampling, optimiser steps and the host syncs
(``aten::item`` calls outside the optimisers).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rayuda.losses import bce_adversarial, entropy_loss, seg_cross_entropy, weighted_self_information  # noqa: E402
from rayuda.methods import default_config, get_method  # noqa: E402
from rayuda.methods.base import SOURCE, TARGET, image_size  # noqa: E402
from rayuda.methods.context import ADV_LEVEL_WEIGHT, SEG_LEVEL_WEIGHT, TrainContext, set_requires_grad  # noqa: E402
from rayuda.methods.cram import layered_style_loss, style_layer_weights  # noqa: E402
from rayuda.methods.fgdem import (  # noqa: E402
    deepest_features,
    domain_encoding,
    fine_grained_adv_loss,
    fine_grained_d_loss,
)
from rayuda.models import build_segmenter, param_groups  # noqa: E402
from rayuda.models.predict import upsample_logits  # noqa: E402

MODELS = {
    "cpu": {"backbone": "resnet18", "layers": 3, "multi_level": False},
    "r101": {"backbone": "resnet101", "layers": 4, "multi_level": True},
}
NUM_CLASSES = 19


# --- the earlier step: both forward passes, then one backward; .item() on every loss ------------------

class OldContext(TrainContext):
    """The earlier context: every upsampling done afresh (no memo)."""

    def logits(self, output, level, size):
        return upsample_logits(output.logits[level], size)

    def seg_loss(self, output, labels):
        return sum(SEG_LEVEL_WEIGHT[lvl] * seg_cross_entropy(output.logits[lvl].float(), labels) for lvl in self.levels)


def old_adversarial(method, ctx, source, target):
    out_s, out_t = ctx.forward(source["image"]), ctx.forward(target["image"])
    size = image_size(target)
    maps_s, maps_t = method.domain_maps(ctx, out_s, size), method.domain_maps(ctx, out_t, size)
    loss_seg = ctx.seg_loss(out_s, source["label"])
    loss_adv = method.generator_loss(ctx, maps_t)
    ctx.step_generator(loss_seg + ctx.params["w_adv"] * loss_adv)
    d_loss = method.discriminator_loss(ctx, maps_s, maps_t)
    ctx.step_discriminators(d_loss)
    return {"seg": loss_seg.item(), "adv": loss_adv.item(), "d": d_loss.item()}


def old_cram(method, ctx, source, target):
    p = ctx.params
    out_s, out_t = ctx.forward(source["image"]), ctx.forward(target["image"])
    loss_g = ctx.seg_loss(out_s, source["label"])
    losses = {"seg": loss_g.item()}
    size = image_size(target)
    maps_s, maps_t = method.domain_maps(ctx, out_s, size), method.domain_maps(ctx, out_t, size)
    d_loss = method.discriminator_loss(ctx, maps_s, maps_t)
    ctx.step_discriminators(d_loss)
    loss_adv = method.generator_loss(ctx, maps_t)
    loss_g = loss_g + p["w_adv"] * loss_adv
    losses.update(adv=loss_adv.item(), d=d_loss.item())
    weights = style_layer_weights(p["style_layers"], p["style_weight"])
    loss_sty = layered_style_loss({k: out_s.features[k].float() for k in weights},
                                  {k: out_t.features[k].float() for k in weights}, weights)
    losses["style"] = loss_sty.item()
    ctx.step_generator(loss_g + p["lambda_style"] * loss_sty)
    return losses


def old_fgdem(method, ctx, source, target):
    p, disc = ctx.params, ctx.discriminators["fine"]
    out_s, out_t = ctx.forward(source["image"]), ctx.forward(target["image"])
    feat_s, feat_t = deepest_features(out_s), deepest_features(out_t)
    z_s, z_t = out_s.logits["main"].float(), out_t.logits["main"].float()
    loss_seg = ctx.seg_loss(out_s, source["label"])
    loss_adv = fine_grained_adv_loss(disc(feat_t), domain_encoding(z_t, p["temperature"], p["clamp"], domain="source"))
    loss_ent = entropy_loss(ctx.probs(out_t, "main", image_size(target)))
    ctx.step_generator(loss_seg + p["lambda_adv"] * (loss_adv + p["lambda_ent"] * loss_ent))
    enc_s = domain_encoding(z_s, p["temperature"], p["clamp"], domain="source")
    enc_t = domain_encoding(z_t, p["temperature"], p["clamp"], domain="target")
    loss_d = fine_grained_d_loss(disc(feat_s.detach()), disc(feat_t.detach()), enc_s, enc_t)
    ctx.step_discriminators(loss_d)
    return {"seg": loss_seg.item(), "adv": loss_adv.item(), "ent": loss_ent.item(), "d": loss_d.item()}


# --- the official ADVENT loop (train_UDA.py, train_advent) in its own order, on rayuda's networks -------------

def advent_reference(method, ctx, source, target):
    model, discs = ctx.model, ctx.discriminators
    ctx.opt_g.zero_grad()
    ctx.opt_d.zero_grad()
    for d in discs.values():
        set_requires_grad(d, False)
    out_s = model(source["image"])  # train on source
    pred_src = {lvl: upsample_logits(out_s.logits[lvl], image_size(source)) for lvl in ctx.levels}
    loss = sum(SEG_LEVEL_WEIGHT[lvl] * seg_cross_entropy(pred_src[lvl], source["label"]) for lvl in ctx.levels)
    loss.backward()
    out_t = model(target["image"])  # adversarial training to fool the discriminator
    pred_trg = {lvl: upsample_logits(out_t.logits[lvl], image_size(target)) for lvl in ctx.levels}
    loss_adv = sum(ADV_LEVEL_WEIGHT[lvl] * bce_adversarial(
        discs[lvl](weighted_self_information(torch.softmax(pred_trg[lvl], 1))), SOURCE) for lvl in ctx.levels)
    (ctx.params["w_adv"] * loss_adv).backward()
    for d in discs.values():
        set_requires_grad(d, True)
    d_losses = []
    for lvl in ctx.levels:  # train the discriminators: source, then target
        for pred, label in ((pred_src[lvl], SOURCE), (pred_trg[lvl], TARGET)):
            loss_d = bce_adversarial(discs[lvl](weighted_self_information(torch.softmax(pred.detach(), 1))), label) / 2
            loss_d.backward()
            d_losses.append(loss_d)
    ctx.opt_g.step()
    ctx.opt_d.step()
    return {"seg": loss.item(), "adv": loss_adv.item(), "d": sum(d.item() for d in d_losses)}  # print_losses


def rayuda_step(method, ctx, source, target):
    return method.train_step(ctx, source, target)


VARIANTS = {
    "advent": {"before": old_adversarial, "now": rayuda_step, "ADVENT reference": advent_reference},
    "cram": {"before": old_cram, "now": rayuda_step},
    "fgdem": {"before": old_fgdem, "now": rayuda_step},
}
def old_adversarial_cram_cea(method, ctx, source, target):
    """The earlier step for ``cram`` with ``sfa: false``."""
    p = ctx.params
    out_s, out_t = ctx.forward(source["image"]), ctx.forward(target["image"])
    loss_g = ctx.seg_loss(out_s, source["label"])
    size = image_size(target)
    maps_s, maps_t = method.domain_maps(ctx, out_s, size), method.domain_maps(ctx, out_t, size)
    d_loss = method.discriminator_loss(ctx, maps_s, maps_t)
    ctx.step_discriminators(d_loss)
    loss_adv = method.generator_loss(ctx, maps_t)
    ctx.step_generator(loss_g + p["w_adv"] * loss_adv)
    return {"seg": loss_g.item(), "adv": loss_adv.item(), "d": d_loss.item()}


# CRAM with CEA alone (sfa off): the configuration where its step can free the source graph early
CRAM_CEA = {"cram (CEA only)": {"before": old_adversarial_cram_cea, "now": rayuda_step}}


def _in_optimizer(event) -> bool:
    """Adam reads its (CPU) step counters with ``.item()``: not a device sync, not counted."""
    while event is not None:
        if event.name.startswith("Optimizer.step"):
            return True
        event = event.cpu_parent
    return False


def _rss_gib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**30


def child(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    name, params = args.method, {}
    if name == "cram (CEA only)":
        name, params = "cram", {"sfa": False}
    cfg = default_config(name)
    cfg["model"].update(MODELS[args.model])
    cfg["params"].update(params)
    model = build_segmenter(cfg["model"], NUM_CLASSES).to(device).train()
    context = OldContext if args.variant == "before" else TrainContext
    ctx = context(config=cfg, model=model, device=device, num_classes=NUM_CLASSES, params=cfg["params"])
    method = get_method(name)()
    method.setup(ctx)
    ctx.discriminators.to(device)
    ctx.opt_g = torch.optim.SGD(param_groups(model, 2.5e-4), lr=2.5e-4, momentum=0.9, weight_decay=5e-4)
    ctx.opt_d = torch.optim.Adam(ctx.discriminators.parameters(), lr=1e-4, betas=(0.9, 0.99))
    step = {**VARIANTS, **CRAM_CEA}[args.method][args.variant]
    h, w = args.size
    g = torch.Generator().manual_seed(0)
    source = {"image": torch.randn(args.batch, 3, h, w, generator=g).to(device),
              "label": torch.randint(0, NUM_CLASSES, (args.batch, h, w), generator=g).to(device)}
    target = {"image": torch.randn(args.batch, 3, h, w, generator=g).to(device),
              "label": torch.full((args.batch, h, w), 255).to(device)}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    baseline = _rss_gib()
    step(method, ctx, source, target)  # warm-up: optimiser state, allocator
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, cpu_times = [], []
    for _ in range(args.steps):
        sync()
        tic, cpu_tic = time.perf_counter(), time.process_time()
        step(method, ctx, source, target)
        sync()
        times.append(time.perf_counter() - tic)
        cpu_times.append(time.process_time() - cpu_tic)
    peak = (torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step(method, ctx, source, target)
        sync()
    events = prof.key_averages()

    def self_ms(pred) -> float:
        attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        return sum(getattr(e, attr, 0.0) for e in events if pred(e.key)) / 1000

    total = self_ms(lambda k: True)
    return {
        "method": args.method, "variant": args.variant, "wall_s": statistics.median(times),
        # on CPU the process's CPU time (less sensitive to other processes on a shared machine than wall time)
        "step_s": statistics.median(times) if device.type == "cuda" else min(cpu_times),
        "peak_gib": peak, "baseline_gib": baseline, "device": str(device),
        "conv_ms": self_ms(lambda k: "conv" in k), "upsample_ms": self_ms(lambda k: "upsample" in k),
        "upsample_calls": sum(e.count for e in events if e.key == "aten::upsample_bilinear2d"),
        "optim_ms": self_ms(lambda k: k.startswith("Optimizer.step") or "_foreach_" in k or "adam" in k.lower()),
        "syncs": sum(1 for e in prof.events() if e.name == "aten::item" and not _in_optimizer(e)),
        "profiled_ms": total,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="cpu")
    p.add_argument("--size", type=int, nargs=2, default=[64, 128], metavar=("H", "W"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up (median)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--methods", default="advent,cram,fgdem,cram (CEA only)")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    p.add_argument("--child", nargs=2, metavar=("METHOD", "VARIANT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.method, args.variant = args.child
        print(json.dumps(child(args)))
        return

    rows = []
    for name in args.methods.split(","):
        for variant in {**VARIANTS, **CRAM_CEA}[name]:
            cmd = [sys.executable, __file__, "--child", name, variant, "--model", args.model,
                   "--size", *map(str, args.size), "--batch", str(args.batch), "--steps", str(args.steps),
                   "--threads", str(args.threads), "--device", args.device]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"# {name:16s} {variant:17s} {r['step_s']:.3f} s  peak {r['peak_gib']:.2f} GiB", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    h, w = args.size
    print(f"\n{args.model} ({MODELS[args.model]['backbone']}), {h}×{w}, batch {args.batch}, {args.threads} thread(s), "
          f"{rows[0]['device']}, torch {torch.__version__}\n")
    print(table(rows))


def table(rows: list[dict]) -> str:
    """The markdown table of ``rows``; the profiler's times as shares of the profiled step (wall times of the
    operators, which a busy machine inflates; their shares and call counts hold up better)."""
    cuda = rows[0]["device"].startswith("cuda")
    lines = [f"| method | step | {'s / step' if cuda else 'CPU s / step'} | × before | "
             f"{'peak GPU memory' if cuda else 'peak RSS'} (GiB) | peak − start (GiB) | conv | upsample (calls) | "
             "optimisers | `.item()` syncs |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        before = next(b for b in rows if b["method"] == r["method"] and b["variant"] == "before")
        total = max(r["profiled_ms"], 1e-9)
        lines.append(f"| {r['method']} | {r['variant']} | {r['step_s']:.3f} | {r['step_s'] / before['step_s']:.2f} | "
                     f"{r['peak_gib']:.2f} | {r['peak_gib'] - r['baseline_gib']:.2f} | "
                     f"{100 * r['conv_ms'] / total:.0f} % | {100 * r['upsample_ms'] / total:.1f} % "
                     f"({r['upsample_calls']}) | {100 * r['optim_ms'] / total:.1f} % | {r['syncs']} |")
    return "\n".join(lines)

if __name__ == "__main__":
    main()
