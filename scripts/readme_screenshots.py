"""The README's pictures of the app: the storyboard after generating the default story, and the
routing tab's recall view (what the last shot remembered, as pictures, beside the heatmaps), both
on the shipped default model, taken in a headless Chromium (Debian's `chromium`, Playwright).

  python scripts/readme_screenshots.py [--out docs] [--model PATH]

Writes OUT/screenshot.png and OUT/recall.png. The app runs on 127.0.0.1 with a scratch shot cache
and output folder (deleted afterwards); the story is examples/default_story.json, the page's first
example, rendered exactly as a user's click on Generate renders it.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
RENDER_TIMEOUT_MS = 600_000  # the default story takes about a minute on 2 CPU cores; room for a busy one


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs")
    p.add_argument("--model", default=None, help="model folder (default: the shipped default)")
    args = p.parse_args(argv)
    if not CHROMIUM.exists():
        raise SystemExit(f"Debian's chromium is not at {CHROMIUM}: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    from app.server import StoryboardApp
    from engine.engine import StoryEngine

    scratch = Path(tempfile.mkdtemp(prefix="readme-shots-"))
    try:
        engine = StoryEngine.load(model=args.model, device="cpu", cache_dir=scratch / "cache")
        examples = scratch / "examples"
        examples.mkdir()
        shutil.copy(ROOT / "examples" / "default_story.json", examples / "default_story.json")
        app = StoryboardApp(engine, examples_dir=examples, out_root=scratch / "outputs")
        port = free_port()
        app.launch(host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
        args.out.mkdir(parents=True, exist_ok=True)
        try:
            with sync_playwright() as playwright:
                context = playwright.chromium.launch_persistent_context(
                    str(scratch / "profile"), executable_path=str(CHROMIUM), args=ARGS, headless=True,
                    viewport={"width": 1480, "height": 1000})
                page = context.new_page()
                page.goto(f"http://127.0.0.1:{port}/")
                page.wait_for_selector("#generate", timeout=60_000)
                job = int(page.get_attribute("#status .status", "data-job") or 0)
                page.click("#generate")
                print("generating the default story ...", flush=True)
                page.wait_for_function(
                    """(after) => { const s = document.querySelector('#status .status');
                                    return s && s.dataset.kind === 'done' && Number(s.dataset.job) > after; }""",
                    arg=job, timeout=RENDER_TIMEOUT_MS)
                page.wait_for_timeout(1500)  # the videos' first frames
                page.screenshot(path=str(args.out / "screenshot.png"), full_page=False)
                page.get_by_role("tab", name="Routing").click()
                page.wait_for_function(
                    "() => [...document.querySelectorAll('#recall-frames img')].every(i => i.complete) && "
                    "document.querySelectorAll('#recall-frames img').length > 0", timeout=60_000)
                page.wait_for_selector("#frame-heatmap .js-plotly-plot .heatmaplayer", timeout=60_000)
                page.wait_for_timeout(1500)
                summary = page.inner_text("#recall-summary")
                page.locator("#recall").first.scroll_into_view_if_needed()
                page.screenshot(path=str(args.out / "recall.png"), full_page=True)
                context.close()
        finally:
            app.close()
        print(f"wrote {args.out / 'screenshot.png'} and {args.out / 'recall.png'}; recall: {summary.strip()}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
