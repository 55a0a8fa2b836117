"""``rayuda.predict`` and the MLflow side of a search's result, for real: a tiny trained run, PNG/JPG folders of
mixed sizes, a SQLite MLflow store with its model registry."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from rayuda.data import Transform, class_names, open_dataset
from rayuda.data.labels import palette
from rayuda.engine import run_pipeline
from rayuda.methods import resolve_config
from rayuda.metrics import Evaluator
from rayuda.models import build_segmenter, predict_logits
from rayuda.predict import main
from rayuda.runs import mlflow_uri, resolve_run

SIZE = (32, 64)  # the run's data.size


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trained")
    cfg = resolve_config("source_only", {"data.size": list(SIZE), "data.batch_size": 2, "data.holdout": 4,
                                         "stages.source_only.iters": 2, "train.eval_every": 2,
                                         "train.log_every": 2})
    run_pipeline(cfg, root / "run", cache_dir=root / "cache")
    return root / "run"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A ``folder:`` dataset: 4 minicity images at 4 sizes (one JPG), 3 of them with Cityscapes label ids."""
    from rayuda.data.minicity import ensure_minicity

    root = tmp_path_factory.mktemp("images")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    target = ensure_minicity() / "target"
    pngs = sorted((target / "leftImg8bit" / "train").glob("*/*_leftImg8bit.png"))[:4]
    for i, (png, size) in enumerate(zip(pngs, [None, (100, 50), (90, 70), (256, 128)], strict=True)):
        label_png = target / "gtFine" / "train" / png.parent.name / png.name.replace("_leftImg8bit", "_gtFine_labelIds")
        image, label = Image.open(png).convert("RGB"), Image.open(label_png)
        if size is not None:
            image, label = image.resize(size, Image.BILINEAR), label.resize(size, Image.NEAREST)
        image.save(root / "images" / (f"img{i}.jpg" if i == 2 else f"img{i}.png"), quality=95)
        if i != 3:
            label.save(root / "labels" / f"img{i}.png")
    return root


def load_g(run_dir: Path, weights: str = "best_model.pt") -> torch.nn.Module:
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    model = build_segmenter(cfg["model"], 19)
    model.load_state_dict(torch.load(run_dir / weights, map_location="cpu", weights_only=True))
    return model.eval()


@torch.no_grad()
def expected_labels(model: torch.nn.Module, image_path: Path, size: tuple[int, int] | None) -> np.ndarray:
    """G's prediction for one image, done by hand: resize to ``size``, logits upsampled to the image's size."""
    image = Image.open(image_path).convert("RGB")
    x, _ = Transform(size=size)(image)
    return predict_logits(model, x[None], (image.height, image.width)).argmax(1)[0].numpy().astype(np.uint8)


def read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_palette_colours_each_class_by_its_cityscapes_colour():
    assert tuple(palette(19)[0]) == (128, 64, 128) and tuple(palette(19)[13]) == (0, 0, 142)  # road, car
    sky = class_names(16).index("sky")
    assert tuple(palette(16)[sky]) == (70, 130, 180) and tuple(palette(13)[class_names(13).index("sky")]) == (
        70, 130, 180)
    assert tuple(palette(19)[255]) == (0, 0, 0)


def test_predict_labelled_folder_of_mixed_sizes(trained, folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(trained), "--images", str(folder), "--out", str(out), "--overlay", "--batch-size", "3",
                 "--progress-every", "2"]) == 0
    stdout = capsys.readouterr().out
    assert f"resized to {SIZE[0]}x{SIZE[1]} (data.size)" in stdout
    assert "2/4 images" in stdout and "4/4 images" in stdout
    model = load_g(trained)
    images = sorted((folder / "images").iterdir())
    assert len(images) == 4
    for image_path in images:
        image = np.asarray(Image.open(image_path).convert("RGB"))
        labels = read(out / "labels" / f"{image_path.stem}.png")
        assert labels.dtype == np.uint8 and labels.shape == image.shape[:2]
        assert np.array_equal(labels, expected_labels(model, image_path, SIZE))
        colour = read(out / "color" / f"{image_path.stem}.png")
        assert np.array_equal(colour, palette(19)[labels])
        overlay = read(out / "overlay" / f"{image_path.stem}.png")
        assert np.array_equal(overlay, np.concatenate([image, colour], axis=1))

    # mIoU over the 3 labelled images, recomputed from the written label maps
    evaluator = Evaluator(19)
    for item in open_dataset(f"folder:{folder}", "val", role="target", protocol=19):
        pred = torch.from_numpy(read(out / "labels" / f"{Path(item['name']).stem}.png").astype(np.int64))
        evaluator.update(pred[None], item["label"][None])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["labelled_images"] == 3
    assert metrics["miou"] == pytest.approx(evaluator.miou())
    assert f"mIoU {100 * evaluator.miou():.2f} over 3 labelled images" in stdout
    road = evaluator.per_class_iou()[0]
    assert metrics["per_class_iou"]["road"] == pytest.approx(road)
    assert re.search(rf"^\s+road\s+{100 * road:6.2f}$", stdout, re.M)


def test_predict_plain_folder_at_own_size(trained, folder, tmp_path, capsys):
    """No data.size: each image at its own size (batched by size); a nested folder without labels; the output
    folder inside the images is not read back."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["size"] = None
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    photos = tmp_path / "photos"
    for i, image_path in enumerate(sorted((folder / "images").iterdir())):
        target = photos / ("sub" if i % 2 else "") / image_path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(image_path, target)
    out = photos / "pred"
    for _ in range(2):
        assert main([str(run), "--images", str(photos), "--out", str(out), "--weights", "final"]) == 0
    stdout = capsys.readouterr().out
    assert "at its own size" in stdout and "mIoU" not in stdout and not (out / "metrics.json").exists()
    written = sorted(p.relative_to(out / "labels") for p in (out / "labels").rglob("*.png"))
    assert written == [Path("img0.png"), Path("img2.png"), Path("sub/img1.png"), Path("sub/img3.png")]
    model = load_g(trained, "model.pt")
    for name in written:
        source = next(photos.glob(f"{name.with_suffix('')}.*"))
        assert np.array_equal(read(out / "labels" / name), expected_labels(model, source, None))


def test_search_folder_picks_its_best_trial(trained, folder, tmp_path, capsys):
    search = tmp_path / "storage" / "cram-1"
    (search / "best.yaml").parent.mkdir(parents=True)
    (search / "best.yaml").write_text((trained / "config.yaml").read_text())
    for trial, score in (("t_low", 0.2), ("t_high", 0.7), ("t_nan", float("nan")), ("t_running", None)):
        shutil.copytree(trained, search / "work" / "trials" / trial)
        summary = search / "work" / "trials" / trial / "summary.json"
        if score is None:
            summary.unlink()
        else:
            summary.write_text(json.dumps({**json.loads(summary.read_text()), "best_score": score}))
    run, note = resolve_run(str(search))
    assert Path(run.weights) == search / "work" / "trials" / "t_high" / "best_model.pt"
    assert "picked trial t_high (best_score 0.7000, best of 2)" in note
    assert main([str(search), "--images", str(folder / "images" / "img0.png"), "--out", str(tmp_path / "o")]) == 0
    assert "picked trial t_high" in capsys.readouterr().out and (tmp_path / "o" / "labels" / "img0.png").is_file()

    confirmed = search / "work" / "confirm" / "defaults-seed1"  # after a confirmation phase: its winner, not t_high
    shutil.copytree(trained, confirmed)
    (search / "work" / "winner.json").write_text(json.dumps({"run": "work/confirm/defaults-seed1",
                                                             "why": "confirmed: keep the defaults"}))
    run, note = resolve_run(str(search))
    assert Path(run.weights) == confirmed / "best_model.pt" and "keep the defaults" in note


def _bad_runs(trained: Path, root: Path) -> dict[str, tuple[Path, str]]:
    """name → (RUN folder, the file the error must name)."""
    cases = {}
    for name in ("unknown_key", "corrupt", "other_model", "no_weights"):
        run = root / name
        shutil.copytree(trained, run)
        cases[name] = (run, str(run / "best_model.pt"))
    cfg_text = (trained / "config.yaml").read_text()
    (root / "unknown_key" / "config.yaml").write_text(cfg_text + "colour: blue\n")
    cases["unknown_key"] = (root / "unknown_key", str(root / "unknown_key" / "config.yaml"))
    (root / "corrupt" / "best_model.pt").write_bytes(b"\x80\x04not a tensor file")
    (root / "other_model" / "config.yaml").write_text(cfg_text.replace("backbone: resnet18", "backbone: vgg16"))
    (root / "no_weights" / "best_model.pt").unlink()
    cases["missing"] = (root / "nowhere", str(root / "nowhere"))
    return cases


@pytest.mark.parametrize("case", ["unknown_key", "corrupt", "other_model", "no_weights", "missing"])
def test_bad_run_is_one_error_line(trained, folder, tmp_path, capsys, case):
    run, named = _bad_runs(trained, tmp_path)[case]
    assert main([str(run), "--images", str(folder), "--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {named}: "), captured.err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["corrupt", "missing"])
def test_bad_run_on_the_command_line(trained, folder, tmp_path, case):
    run, named = _bad_runs(trained, tmp_path)[case]
    proc = subprocess.run([sys.executable, "-m", "rayuda.predict", str(run), "--images", str(folder)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(f"error: {named}: ") and "Traceback" not in proc.stderr


def test_mlflow_experiment_kind_datasets_and_registered_model(trained, folder, tmp_path, capsys):
    import mlflow

    from rayuda.hpo.registry import dataset_input, log_dataset_inputs, log_winner_model
    from rayuda.hpo.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, ensure_experiment
    from rayuda.runs import client_for

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = client_for(uri)
    exp_id = ensure_experiment(client, "rayuda-source_only", uri)
    assert client.get_experiment(exp_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"
    old = client.create_experiment("rayuda-old")  # made before the tag existed
    chosen = client.create_experiment("rayuda-chosen", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    assert ensure_experiment(client, "rayuda-old", uri) == old
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    ensure_experiment(client, "rayuda-chosen", uri)
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"  # a user's choice

    run_id = client.create_run(exp_id, run_name="search").info.run_id
    log_dataset_inputs(client, run_id, "minicity", f"folder:{folder}", 19)
    inputs = {d.dataset.name: d for d in client.get_run(run_id).inputs.dataset_inputs}
    assert set(inputs) == {"minicity", f"folder:{folder}"}
    target = inputs[f"folder:{folder}"]
    assert [(t.key, t.value) for t in target.tags] == [("mlflow.data.context", "target")]
    assert [(t.key, t.value) for t in inputs["minicity"].tags] == [("mlflow.data.context", "source")]
    assert json.loads(target.dataset.source) == {"uri": f"folder:{folder}"}
    profile = json.loads(target.dataset.profile)
    assert (profile["num_images"], profile["num_labelled"]) == (4, 3)
    assert json.loads(inputs["minicity"].dataset.profile)["num_images"] > 4
    fewer = tmp_path / "fewer"
    shutil.copytree(folder, fewer)
    assert dataset_input(f"folder:{fewer}", "target", 19).dataset.digest == target.dataset.digest
    (fewer / "labels" / "img1.png").unlink()
    assert dataset_input(f"folder:{fewer}", "target", 19).dataset.digest != target.dataset.digest

    before = mlflow.get_tracking_uri()
    assert log_winner_model(uri, run_id, trained) == "models:/rayuda-source_only/1"
    assert log_winner_model(uri, run_id, trained) == "models:/rayuda-source_only/2"  # a new version per call
    assert mlflow.get_tracking_uri() == before
    model = client.search_logged_models([exp_id])[0]
    assert model.source_run_id == run_id and model.name == "model"
    assert client.get_run(run_id).info.status == "RUNNING"

    out_run, out_model = tmp_path / "from_run", tmp_path / "from_model"
    assert main([str(trained), "--images", str(folder), "--out", str(out_run)]) == 0
    assert main(["models:/rayuda-source_only/latest", "--mlflow-uri", uri, "--images", str(folder),
                 "--out", str(out_model)]) == 0
    names = sorted(p.name for p in (out_run / "labels").iterdir())
    assert names == sorted(p.name for p in (out_model / "labels").iterdir()) and len(names) == 4
    for name in names:
        assert np.array_equal(read(out_run / "labels" / name), read(out_model / "labels" / name))
    assert json.loads((out_model / "metrics.json").read_text()) == json.loads((out_run / "metrics.json").read_text())

    # the pickle-free pt2 export serves the same logits to plain MLflow users
    x = torch.randn(2, 3, 40, 72)
    with torch.no_grad():
        expected = predict_logits(load_g(trained), x, (40, 72))
        with mlflow_uri(uri):
            served = mlflow.pytorch.load_model("models:/rayuda-source_only/1")(x)
    torch.testing.assert_close(served, expected, rtol=1e-4, atol=1e-4)


def test_model_uri_without_a_store_is_one_error_line(folder, tmp_path, capsys):
    store = tmp_path / "none" / "mlflow.db"
    assert main(["models:/rayuda-cram/latest", "--mlflow-uri", f"sqlite:///{store}", "--images", str(folder)]) == 2
    assert capsys.readouterr().err == f"error: {store}: no MLflow store there to find models:/rayuda-cram/latest in " \
                                      "(see --mlflow-uri)\n"
    assert not store.exists()


def test_the_champion_alias_names_the_confirmed_version_and_predict_leaves_mlflows_globals_alone(
        trained, folder, tmp_path):
    import mlflow

    from rayuda.hpo.registry import CHAMPION, log_winner_model
    from rayuda.hpo.tracking import ensure_experiment
    from rayuda.runs import client_for

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = client_for(uri)
    run_id = client.create_run(ensure_experiment(client, "rayuda-source_only", uri)).info.run_id
    described = "search s, confirmed on fresh seeds: the paper defaults (keep the defaults)"
    confirmed = log_winner_model(uri, run_id, trained, alias=CHAMPION, description=described)
    assert confirmed == "models:/rayuda-source_only/1"
    assert log_winner_model(uri, run_id, trained) == "models:/rayuda-source_only/2"  # unconfirmed: the alias stays
    version = client.get_model_version_by_alias("rayuda-source_only", CHAMPION)
    assert str(version.version) == "1" and "keep the defaults" in version.description

    decoy = f"sqlite:///{tmp_path}/decoy.db"  # what some other code pinned globally
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(decoy)
    mlflow.set_registry_uri(decoy)
    try:
        assert main(["models:/rayuda-source_only@champion", "--mlflow-uri", uri, "--images", str(folder),
                     "--out", str(tmp_path / "pred")]) == 0
        assert main(["models:/rayuda-source_only/latest", "--mlflow-uri", uri, "--images", str(folder),
                     "--out", str(tmp_path / "latest")]) == 0
        assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == (decoy, decoy)
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
    assert not (tmp_path / "decoy.db").exists()  # nothing went through the global store
    assert main([str(trained), "--images", str(folder), "--out", str(tmp_path / "run")]) == 0
    for name in sorted(p.name for p in (tmp_path / "run" / "labels").iterdir()):
        assert np.array_equal(read(tmp_path / "pred" / "labels" / name), read(tmp_path / "run" / "labels" / name))
