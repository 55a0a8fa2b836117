"""Screenshots of a finished search in MLflow's own UI, taken by a real (headless) browser.

    python bench/mlflow_ui.py --store sqlite:///mlflow.db [--out docs/img] [--search RUN_ID]

A bench script, not a CI test: it needs Chromium (Debian: ``apt-get install chromium``) and a search that has
finished (its parent run and trials in ``--store``, the artifacts in ``mlartifacts/`` beside the db, as
``rayuda.tune`` writes them). It starts ``mlflow server`` on 127.0.0.1 (a free port) over the store, waits for
``/health``, finds the rayuda experiment, the search's parent run (tag ``rayuda.role=search``; the latest, or
``--search``) and one of its trials with mask artifacts (tag ``rayuda.role=trial``; the best by ``score``), then
drives headless Chromium over the DevTools protocol (waiting for each page's content, not a fixed delay) and saves:

* ``mlflow-experiment.png``: the experiment's runs table (with the ``score``, ``test/miou`` and ``rayuda.outcome``
  columns added), the search's row expanded to its trials;
* ``mlflow-search-run.png``: the parent run's artifacts with its optimisation-history plot open;
* ``mlflow-trial-masks.png``: a trial's ``masks/iter_XXXXXX/`` artifacts with one predicted mask open.

It also says what the experiment's plain link opens on. MLflow 3's UI has a global "GenAI / Model training"
switch (``?workflowType=machine_learning`` in the URL, else the browser's last choice, GenAI on a first visit);
the screenshots use the Model-training view. The server (and the browser) are stopped at the end, also on error.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

INSTALL_HINT = "Chromium is needed: apt-get install chromium (Debian/Ubuntu), or pass --chromium PATH"
ML_VIEW = "workflowType=machine_learning"
MAX_BYTES = 400_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(store: str, port: int, log_path: Path) -> subprocess.Popen:
    """``mlflow server`` over ``store`` (artifacts served from ``mlartifacts/`` beside a SQLite db)."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store,
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    if store.startswith("sqlite:///"):
        # rayuda's experiments name their artifact location (a file:// URI) themselves; this only keeps the
        # server from creating ./mlartifacts in the working directory
        cmd += ["--artifacts-destination", str(Path(store[len("sqlite:///"):]).resolve().parent / "mlartifacts")]
    # no telemetry, and no background job runners (GenAI scorers): nothing here needs them
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1",
               MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop(proc: subprocess.Popen | None) -> None:
    """Stop a process this script started, with the workers it spawned (its own session)."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def wait_health(base: str, proc: subprocess.Popen, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited ({proc.returncode}):\n{log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"mlflow server did not answer /health within {timeout:.0f}s:\n{log_path.read_text()[-2000:]}")


def find_runs(client, search_id: str | None):
    """(experiment, search run, trial run, mask artifact path, plot artifact path or None)."""
    if search_id:
        search = client.get_run(search_id)
    else:
        experiments = [e.experiment_id for e in client.search_experiments()]
        found = client.search_runs(experiments, "tags.`rayuda.role` = 'search'",
                                   order_by=["attributes.start_time DESC"], max_results=1)
        if not found:
            raise RuntimeError("no search run (tag rayuda.role = 'search') in this store")
        search = found[0]
    experiment = client.get_experiment(search.info.experiment_id)
    trials = client.search_runs([experiment.experiment_id],
                                f"tags.`mlflow.parentRunId` = '{search.info.run_id}' and tags.`rayuda.role` = 'trial'",
                                order_by=["metrics.score DESC"], max_results=200)
    for trial in trials:
        steps = sorted(a.path for a in client.list_artifacts(trial.info.run_id, "masks") if a.is_dir)
        for step in reversed(steps):
            masks = sorted(a.path for a in client.list_artifacts(trial.info.run_id, step) if a.path.endswith(".png"))
            if masks:
                break
        else:
            continue
        break
    else:
        raise RuntimeError(f"no trial of search {search.info.run_id} has masks/iter_*/*.png artifacts")
    plots = sorted(a.path for a in client.list_artifacts(search.info.run_id) if a.path.endswith(".png"))
    plot = "optimization_history.png" if "optimization_history.png" in plots else (plots[0] if plots else None)
    return experiment, search, trial, masks[0], plot


TABLE_COLUMNS = ["attributes.`Dataset`", "metrics.`score`", "metrics.`test/miou`", "tags.`rayuda.outcome`",
                 "attributes.`Models`"]


def runs_table_key(experiment_id: str) -> str:
    """Where MLflow 3's UI keeps an experiment's runs-table view (browser localStorage)."""
    return f'MLflowLocalStorage-1.1-ExperimentPage-["{experiment_id}"]-ReactComponentState'


def runs_table_state(client, experiment_id: str) -> dict:
    """The runs table as the UI's defaults, with the columns a search is read by (those the runs have)."""
    runs = client.search_runs([experiment_id], max_results=50)
    metrics = {k for r in runs for k in r.data.metrics}
    tags = {k for r in runs for k in r.data.tags}
    columns = [c for c in TABLE_COLUMNS if not c.startswith(("metrics.", "tags."))
               or c.split("`")[1] in (metrics if c.startswith("metrics.") else tags)]
    return {"searchFilter": "", "orderByKey": "attributes.start_time", "orderByAsc": False, "startTime": "ALL",
            "lifecycleFilter": "Active", "datasetsFilter": [], "modelVersionFilter": "All Runs",
            "selectedColumns": columns}


class Tab:
    """One Chromium page, driven over the DevTools protocol (aiohttp's websocket client)."""

    def __init__(self, ws):
        self.ws, self.counter = ws, 0

    async def call(self, method: str, **params):
        self.counter += 1
        ident = self.counter
        await self.ws.send_json({"id": ident, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json()
            if msg.get("id") == ident:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def js(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result.get("result", {}).get("value")

    async def until(self, expression: str, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if await self.js(expression):
                    return
            except RuntimeError:
                pass  # the page is navigating
            await asyncio.sleep(0.5)
        raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")

    async def open(self, url: str, ready: str, what: str, timeout: float) -> None:
        await self.call("Page.navigate", url="about:blank")  # a fresh load: a hash change alone keeps app state
        await self.call("Page.navigate", url=url)
        await asyncio.sleep(1.0)
        await self.until(f"document.readyState === 'complete' && !!({ready}) && {NO_SPINNER}", what, timeout)

    async def click(self, selector: str) -> None:
        """A real mouse click (pressed, released) at the middle of the first element matching ``selector``."""
        box = await self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); if (!e) return null;"
                            " e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
                            " return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        if not box:
            raise RuntimeError(f"nothing to click: {selector}")
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            await self.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    async def screenshot(self, path: Path, crop_below: str | None = None) -> None:
        """Save the viewport; with ``crop_below`` (a CSS selector), only down to 48 px below its last match
        (at least 420 px)."""
        await asyncio.sleep(1.5)  # let the last layout and image decodes settle
        params = {}
        if crop_below:
            bottom = await self.js(f"Math.max(...Array.from(document.querySelectorAll({json.dumps(crop_below)}))"
                                   ".map(e => e.getBoundingClientRect().bottom))")
            size = await self.js("[window.innerWidth, window.innerHeight]")
            if bottom and bottom > 0:
                height = min(size[1], max(int(bottom) + 48, 420))
                params["clip"] = {"x": 0, "y": 0, "width": size[0], "height": height, "scale": 1}
        shot = await self.call("Page.captureScreenshot", format="png", **params)
        path.write_bytes(base64.b64decode(shot["data"]))
        shrink(path)
        print(f"  saved {path} ({path.stat().st_size // 1024} KB)")


NO_SPINNER = "!document.querySelector('[class*=spinner i], [data-testid*=spinner i], [role=progressbar]')"


def has_text(*texts: str) -> str:
    return " && ".join(f"document.body.innerText.includes({json.dumps(t)})" for t in texts)


BLOB_IMAGE = "img[src^='blob:']"


def image_loaded(name: str) -> str:
    """An <img> of the artifact viewer has decoded (artifact images are shown from blob: URLs)."""
    return (f"{has_text(name)} && Array.from(document.images).some("
            "i => i.src.startsWith('blob:') && i.complete && i.naturalWidth > 0)")


def shrink(path: Path) -> None:
    """Keep a screenshot under MAX_BYTES: a 256-colour palette first (the UI is mostly flat colour)."""
    if path.stat().st_size <= MAX_BYTES:
        return
    from PIL import Image

    with Image.open(path) as im:
        small = im.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)
    scale = 1.0
    while path.stat().st_size > MAX_BYTES and scale > 0.5:
        scale -= 0.1
        with Image.open(path) as im:
            im.convert("RGB").resize((int(im.width * scale), int(im.height * scale)), Image.LANCZOS).quantize(
                256).save(path, optimize=True)


async def browse(chromium: str, base: str, shots: list[dict], size: tuple[int, int], timeout: float) -> str:
    """Take ``shots`` (url, ready, what, path, optional click/after) in one browser; returns what the
    experiment's plain link (no workflowType) opened on."""
    import aiohttp

    profile = tempfile.mkdtemp(prefix="mlflow-ui-chromium-")
    browser = subprocess.Popen(
        [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
         "--remote-debugging-port=0", f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
         "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if browser.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Chromium did not start ({chromium})")
            time.sleep(0.2)
        port = port_file.read_text().split()[0]
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as resp:
                targets = await resp.json()
            page_ws = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
            async with session.ws_connect(page_ws, max_msg_size=0) as ws:
                tab = Tab(ws)
                await tab.call("Page.enable")
                await tab.call("Emulation.setDeviceMetricsOverride", width=size[0], height=size[1],
                               deviceScaleFactor=1, mobile=False)
                # first visit: what a new user's plain link shows; then keep the assistant panel closed
                first = shots[0]
                await tab.open(first["plain_url"], "document.querySelector('h2, h1')", "the experiment page",
                               timeout)
                await asyncio.sleep(2)
                landing = await tab.js("Array.from(document.querySelectorAll('h2')).map(h => h.innerText)"
                                       ".filter(Boolean)[0] || ''")
                storage = {"mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true",  # the assistant panel stays shut
                           "mlflow.assistant.panelOpen_v1": "false"}
                for shot in shots:
                    storage.update(shot.get("storage", {}))
                for key, value in storage.items():
                    await tab.js(f"localStorage.setItem({json.dumps(key)}, {json.dumps(value)})")
                for shot in shots:
                    print(f"- {shot['what']}: {shot['url']}")
                    try:
                        await tab.open(shot["url"], shot["ready"], shot["what"], timeout)
                        if shot.get("click"):
                            await tab.click(shot["click"])
                            await tab.until(shot["after"], shot["what"] + " (after the click)", timeout)
                    except RuntimeError:
                        await tab.screenshot(shot["path"].with_name(shot["path"].stem + "-failed.png"))
                        raise
                    await tab.screenshot(shot["path"], shot.get("crop_below"))
        return landing
    finally:
        stop(browser)
        shutil.rmtree(profile, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", required=True, help="the search's MLflow store, e.g. sqlite:///mlflow.db")
    parser.add_argument("--out", type=Path, default=Path("docs/img"), help="folder for the PNGs (docs/img)")
    parser.add_argument("--search", default=None, help="the search's parent run id (default: the latest search)")
    parser.add_argument("--chromium", default=None, help="Chromium binary (default: chromium on PATH)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the server and each page")
    parser.add_argument("--size", default="1600x1000", help="browser window WIDTHxHEIGHT (1600x1000)")
    args = parser.parse_args(argv)
    chromium = args.chromium or shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium or not Path(chromium).exists():
        print(INSTALL_HINT, file=sys.stderr)
        return 2
    if args.store.startswith("sqlite:///") and not Path(args.store[len("sqlite:///"):]).is_file():
        print(f"error: no MLflow store at {args.store}", file=sys.stderr)
        return 2
    size = tuple(int(v) for v in args.size.lower().split("x"))
    args.out.mkdir(parents=True, exist_ok=True)
    version = subprocess.run([chromium, "--version"], capture_output=True, text=True).stdout.strip()

    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = Path(tempfile.mkstemp(prefix="mlflow-server-", suffix=".log")[1])
    server = None
    try:
        print(f"mlflow {mlflow.__version__} server on {base}; {version}")
        server = start_server(args.store, port, log_path)
        wait_health(base, server, log_path, args.timeout)
        client = MlflowClient(tracking_uri=base)
        experiment, search, trial, mask, plot = find_runs(client, args.search)
        exp_id, sid, tid = experiment.experiment_id, search.info.run_id, trial.info.run_id
        print(f"experiment {experiment.name} ({exp_id}), search {search.info.run_name} ({sid}), "
              f"trial {trial.info.run_name} ({tid}), mask {mask}")
        trial_name = trial.info.run_name or tid
        shots = [
            {"what": "experiment: runs table, search expanded",
             "plain_url": f"{base}/#/experiments/{exp_id}",
             "url": f"{base}/#/experiments/{exp_id}?{ML_VIEW}",
             "ready": has_text(search.info.run_name or sid) + " && document.querySelector('.ag-row')",
             "storage": {runs_table_key(exp_id): json.dumps(runs_table_state(client, exp_id))},
             "click": "button[data-component-id*=runnamecellrenderer]",
             "after": has_text(trial_name),
             "crop_below": ".ag-row",
             "path": args.out / "mlflow-experiment.png"},
            {"what": "search run: " + (plot or "artifacts"),
             "url": f"{base}/#/experiments/{exp_id}/runs/{sid}/artifacts/{plot or ''}?{ML_VIEW}",
             "ready": image_loaded(plot) if plot else has_text("best.yaml"),
             "crop_below": BLOB_IMAGE if plot else None,
             "path": args.out / "mlflow-search-run.png"},
            {"what": "trial masks: " + mask,
             "url": f"{base}/#/experiments/{exp_id}/runs/{tid}/artifacts/{mask}?{ML_VIEW}",
             "ready": image_loaded(Path(mask).name),
             "crop_below": BLOB_IMAGE,
             "path": args.out / "mlflow-trial-masks.png"},
        ]
        landing = asyncio.run(browse(chromium, base, shots, size, args.timeout))
        print(f"the experiment's plain link ({base}/#/experiments/{exp_id}) opened on: {landing!r}"
              + ("" if "run" in landing.lower() else f" (add ?{ML_VIEW} or pick 'Model training' for the runs)"))
    except (RuntimeError, MlflowException) as err:
        print(f"error: {err} (server log: {log_path})", file=sys.stderr)
        return 1
    finally:
        stop(server)
    log_path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
