"""The app in a real headless Chromium (Debian's `chromium`, driven by Playwright for Python).

One page walks through what a user does, test by test and in order: open the page and edit a
caption; generate (every video element must really play: readyState >= 2, a duration, no media
error, time advancing); look at the routing heatmap; regenerate one shot (only that shot's video
changes); stop a long run; save and open a story (the takes it remembers come back from the cache);
switch a shot back to an earlier take. Screenshots of every stage go to test-artifacts/screenshots/.
"""

from __future__ import annotations

import shutil
import time
import tempfile
from pathlib import Path

import pytest

from .conftest import SCREENSHOTS

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
RENDER_TIMEOUT_MS = 180_000  # a tiny story renders in seconds; leave room for a busy 2-core CPU

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")]


@pytest.fixture(scope="module")
def page(app_url):
    if not CHROMIUM.exists():
        pytest.skip(f"Debian's chromium is not installed at {CHROMIUM} (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1480, "height": 1000})
        page = context.new_page()
        page.errors = []
        page.on("pageerror", lambda error: page.errors.append(str(error)))
        page.goto(app_url)
        page.wait_for_selector("#generate", timeout=60_000)
        try:
            yield page
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


def screenshot(page, name: str) -> Path:
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def current_job(page) -> int:
    return int(page.get_attribute("#status .status", "data-job") or 0)


def wait_status(page, kind: str, after_job: int, timeout: float = RENDER_TIMEOUT_MS) -> str:
    """Wait until a render newer than `after_job` shows status `kind` (done, stopped, error)."""
    page.wait_for_function(
        """([kind, after]) => { const s = document.querySelector('#status .status');
                                return s && s.dataset.kind === kind && Number(s.dataset.job) > after; }""",
        arg=[kind, after_job], timeout=timeout)
    return page.inner_text("#status")


def visible_shots(page) -> int:
    return page.locator(".shot-card:visible").count()


def video_state(page, selector: str) -> dict:
    """Wait until the <video> under `selector` can play, play it muted, and report its state."""
    page.wait_for_function(
        """(sel) => { const v = document.querySelector(sel + ' video');
                      return v && (v.readyState >= 2 || v.error); }""", arg=selector, timeout=30_000)
    return page.evaluate(
        """async (sel) => {
            const v = document.querySelector(sel + ' video');
            v.muted = true;
            const start = v.currentTime;
            try { await v.play(); } catch (e) { return {error: 'play() failed: ' + e}; }
            await new Promise(r => setTimeout(r, 400));
            const state = {readyState: v.readyState, duration: v.duration, error: v.error && v.error.code,
                           advanced: v.currentTime > start || v.ended, src: v.currentSrc};
            v.pause();
            return state;
        }""", selector)


def video_digest(page, selector: str) -> str:
    """SHA-256 of the bytes the page's <video> plays (fetched from its own src)."""
    return page.evaluate(
        """async (sel) => {
            const v = document.querySelector(sel + ' video');
            const data = await (await fetch(v.currentSrc)).arrayBuffer();
            const hash = await crypto.subtle.digest('SHA-256', data);
            return Array.from(new Uint8Array(hash)).map(b => b.toString(16).padStart(2, '0')).join('');
        }""", selector)


def set_steps(page, steps: int) -> None:
    """Type a step count into the Settings slider's box and wait until the slider took it."""
    page.get_by_role("tab", name="Settings").click()
    box = page.locator("#steps input[type=number]")
    box.fill(str(steps))
    box.press("Enter")
    page.wait_for_function("(n) => document.querySelector('#steps input[type=range]').value === String(n)",
                           arg=steps, timeout=10_000)
    page.get_by_role("tab", name="Storyboard").click()


def takes_shown(page) -> list[str]:
    """The take keys the shot cards' Takes sections know (empty for sections not opened yet)."""
    return page.eval_on_selector_all(".shot-card:visible .takes-label[data-key]", "els => els.map(e => e.dataset.key)")


def take_label(page, i: int) -> dict:
    return page.eval_on_selector(f"#take-label-{i} .takes-label", "e => ({...e.dataset})")


def statuses(page) -> list[str]:
    return page.eval_on_selector_all(".shot-card:visible .pill", "els => els.map(e => e.dataset.status)")


def test_1_open_and_edit_a_caption(page):
    assert visible_shots(page) == 3
    caption = page.locator("#shot-caption-0 textarea")
    caption.fill("a red ball bounces high (edited in the browser)")
    assert caption.input_value().endswith("(edited in the browser)")
    assert statuses(page) == ["new", "new", "new"]
    screenshot(page, "01_opened")


def test_2_generate_and_every_video_plays(page):
    job = current_job(page)
    page.click("#generate")
    wait_status(page, "done", job)
    assert statuses(page) == ["generated"] * 3, statuses(page)
    for selector in [f"#shot-video-{i}" for i in range(3)] + ["#story-video"]:
        state = video_state(page, selector)
        assert state.get("error") is None, (selector, state)
        assert state["readyState"] >= 2 and state["duration"] > 0 and state["advanced"], (selector, state)
    assert page.locator("#shot-caption-0 textarea").input_value().endswith("(edited in the browser)")
    headers = page.inner_text("#shot-0 .shot-head")
    assert "seed" in headers  # the seed actually used is shown
    screenshot(page, "02_generated")
    assert not page.errors, page.errors


def test_3_routing_heatmap_renders(page):
    page.get_by_role("tab", name="Routing").click()
    page.wait_for_selector("#frame-heatmap .js-plotly-plot .heatmaplayer", timeout=30_000)
    assert page.locator("#frame-heatmap .heatmaplayer image, #frame-heatmap .heatmaplayer path").count() > 0
    assert page.locator("#frame-heatmap .shapelayer path").count() >= 2  # shot boundaries
    assert page.locator("#shot-recall .heatmaplayer").count() == 1
    assert "%" in page.inner_text("#routing-stats")
    title = lambda: page.text_content("#frame-heatmap .gtitle")  # noqa: E731  (an SVG <text>)
    assert "all layers" in title()
    page.click("#layer input")
    page.get_by_role("option", name="2", exact=True).click()
    page.wait_for_function("() => document.querySelector('#frame-heatmap .gtitle').textContent.includes('layer 2')",
                           timeout=15_000)
    screenshot(page, "03_routing")
    page.get_by_role("tab", name="Storyboard").click()


def test_4_regenerate_changes_only_that_shot(page):
    before = [video_digest(page, f"#shot-video-{i}") for i in range(3)]
    seed_box = page.locator("#shot-seed-1 input")
    used = int(page.inner_text("#shot-1 .shot-head").split("seed ")[1].split()[0])
    seed_box.fill(str(used + 1))  # a new take: another seed
    job = current_job(page)
    page.click("#shot-regen-1")
    wait_status(page, "done", job)
    after = [video_digest(page, f"#shot-video-{i}") for i in range(3)]
    assert after[0] == before[0] and after[2] == before[2], "regenerating shot 2 changed another shot"
    assert after[1] != before[1], "the regenerated shot did not change"
    status = statuses(page)
    # both sides as context (the default): the later shot is kept as it is and not stale
    assert page.is_checked("#both-sides input")
    assert status == ["cached", "generated", "cached"], status
    assert f"seed {used + 1}" in page.inner_text("#shot-1 .shot-head")
    state = video_state(page, "#shot-video-1")
    assert state["readyState"] >= 2 and state["duration"] > 0 and state.get("error") is None, state
    screenshot(page, "04_regenerated")


def test_5_stop_a_long_run(page):
    page.get_by_role("tab", name="Settings").click()
    screenshot(page, "06_settings")
    set_steps(page, 200)
    job = current_job(page)
    page.click("#generate")
    page.wait_for_function(
        """() => { const s = document.querySelector('#status [data-kind="running"] .status-detail');
                   return s && /step [2-9]/.test(s.textContent); }""", timeout=RENDER_TIMEOUT_MS)

    # A second tab asking for a render meanwhile waits in the queue and sees its place.
    other = page.context.new_page()
    other.goto(page.url)
    other.wait_for_selector("#generate", timeout=60_000)
    other.click("#generate")
    other.wait_for_selector('#status [data-kind="queued"]:has-text("place 1")', timeout=30_000)
    assert "You are next" in other.inner_text("#status")
    screenshot(other, "05_queued_second_tab")

    page.click("#stop")
    clicked = time.monotonic()
    text = wait_status(page, "stopped", job, timeout=30_000)
    print(f"\nstop shown {time.monotonic() - clicked:.1f} s after the click")
    assert "Stopped" in text
    wait_status(other, "done", 0)  # the queued render runs once the first one stopped
    other.close()
    assert "rendering" not in statuses(page) and "queued" not in statuses(page), statuses(page)
    screenshot(page, "05_stopped")
    print(f"\nbrowser screenshots: {SCREENSHOTS}")


def test_6_lock_keeps_the_take_and_sessions_are_separate(page):
    set_steps(page, 3)
    job = current_job(page)
    page.click("#generate")
    wait_status(page, "done", job)
    # test 4's takes again: shot 3 was kept by the both-sided regeneration, so nothing is sampled
    assert statuses(page) == ["cached", "cached", "cached"], statuses(page)
    page.check("#shot-lock-1 input[type=checkbox]")
    page.wait_for_function("() => document.querySelector('#shot-caption-1 textarea').disabled", timeout=10_000)
    assert "locked" in page.inner_text("#shot-1 .shot-head")
    before = [video_digest(page, f"#shot-video-{i}") for i in range(3)]
    # A new first shot changes the context of every later shot; the locked take stays as it is.
    page.locator("#shot-caption-0 textarea").fill("a red ball rolls in from the left")
    job = current_job(page)
    page.click("#generate")
    wait_status(page, "done", job)
    assert statuses(page) == ["generated", "stale", "generated"], statuses(page)
    after = [video_digest(page, f"#shot-video-{i}") for i in range(3)]
    assert after[1] == before[1] and after[0] != before[0]

    # Another tab is another session with its own story.
    other = page.context.new_page()
    other.goto(page.url)
    other.wait_for_selector("#generate", timeout=60_000)
    assert "rolls in from the left" not in other.locator("#shot-caption-0 textarea").input_value()
    other.click("#shot-remove-2")
    other.wait_for_function(
        "() => [...document.querySelectorAll('.shot-card')].filter(e => e.offsetParent !== null).length === 2",
        timeout=10_000)
    other.close()
    assert visible_shots(page) == 3
    screenshot(page, "07_locked")


def test_7_save_and_open_a_story(page, tmp_path):
    page.click("#save-story")
    link = page.wait_for_selector("#saved-story a[href]", timeout=15_000)
    href = link.get_attribute("href")
    saved = page.evaluate("async (url) => await (await fetch(url)).text()", href)
    assert '"global_caption"' in saved and "rolls in from the left" in saved and '"locked": true' in saved

    shown = [video_digest(page, f"#shot-video-{i}") for i in range(3)]
    assert all(f'"take": "{key}"' in saved for key in takes_shown(page))  # each shot remembers its take

    def open_story(text: str, name: str) -> None:
        story = tmp_path / name
        story.write_text(text)
        with page.expect_file_chooser() as chooser:
            page.click("#open-story")
        chooser.value.set_files(str(story))
        page.wait_for_function("(name) => document.querySelector('#status').textContent.includes(name)",
                               arg=name, timeout=15_000)

    page.locator("#shot-caption-0 textarea").fill("an edit that opening a file replaces")
    open_story(saved, "as_saved.json")  # its remembered takes are shown from the cache, nothing renders
    assert statuses(page) == ["cached", "stale", "cached"], statuses(page)
    assert [video_digest(page, f"#shot-video-{i}") for i in range(3)] == shown
    open_story(saved.replace("rolls in from the left", "rolls in (opened from a file)"), "opened.json")
    assert page.locator("#shot-caption-0 textarea").input_value().endswith("(opened from a file)")
    # shot 1's caption changed, so it and the joint shot after it need a new take; the locked
    # shot keeps the take it remembers, stale now
    assert statuses(page) == ["new", "stale", "new"], statuses(page)
    screenshot(page, "08_opened_file")


def test_8_errors_are_readable_messages(page):
    page.locator("#shot-caption-2 textarea").fill("   ")
    page.click("#generate")
    page.wait_for_selector('#status [data-kind="error"]', timeout=15_000)
    text = page.inner_text("#status")
    assert "Shot 3 › caption: must not be empty" in text and "Traceback" not in page.content()
    screenshot(page, "09_error")


def test_9_pin_a_shot_and_see_the_pinned_link_in_routing(page):
    import re
    page.locator("#shot-caption-2 textarea").fill("the cube spins (it must remember shot 1)")
    page.click("#shot-memory-2 button")  # open the shot's Memory section
    page.click("#shot-pins-2 input")
    page.get_by_role("option", name=re.compile(r"^Shot 1")).click()
    page.keyboard.press("Escape")
    assert "Shot 1" in page.inner_text("#shot-pins-2")
    job = current_job(page)
    page.click("#generate")
    wait_status(page, "done", job)
    assert statuses(page)[2] == "generated", statuses(page)
    page.get_by_role("tab", name="Routing").click()
    page.wait_for_function(
        "() => [...document.querySelectorAll('#frame-heatmap .annotation-text')].some(e => e.textContent === 'pinned')",
        timeout=30_000)
    assert page.locator("#frame-heatmap .shapelayer path").count() >= 3  # shot boundaries + the pinned block
    page.wait_for_function("() => document.querySelector('#shot-recall').textContent.includes('pinned')", timeout=15_000)
    screenshot(page, "10_pinned_routing")
    page.get_by_role("tab", name="Storyboard").click()


def test_10_recall_pictures_of_the_last_shot(page):
    """What shot 3 remembered: captioned thumbnails of earlier frames beside its video; a click on
    one of its frames narrows to that frame's queries, and the heatmap outlines the same rows."""
    import re
    job = current_job(page)
    page.click("#generate")
    wait_status(page, "done", job)
    page.get_by_role("tab", name="Routing").click()

    def summary() -> dict:
        return page.eval_on_selector("#recall-summary .recall-summary", "e => ({...e.dataset, text: e.textContent})")

    page.wait_for_function("() => document.querySelectorAll('#recall-frames .caption-label').length > 0",
                           timeout=30_000)
    assert summary()["shot"] == "2" and summary()["frame"] == "" and "all frames" in summary()["text"]
    captions = page.eval_on_selector_all("#recall-frames .caption-label", "els => els.map(e => e.textContent.trim())")
    parsed = [re.fullmatch(r"shot ([12]) · frame ([12]) · (\d+) %", c) for c in captions]
    assert captions and all(parsed), captions  # only earlier shots' frames (shots 1 and 2 of 3)
    assert 97 <= sum(int(m.group(3)) for m in parsed) <= 103, captions  # every recalled frame: shares sum to 100 %
    page.wait_for_function("() => [...document.querySelectorAll('#recall-frames img')].every(i => i.complete) && "
                           "document.querySelectorAll('#recall-frames img').length > 0", timeout=15_000)
    widths = page.eval_on_selector_all("#recall-frames img", "els => els.map(e => e.naturalWidth)")
    assert widths and set(widths) == {96}, widths  # the small thumbnails, one per caption
    state = video_state(page, "#recall-video")  # the shot's own video next to them
    assert state.get("error") is None and state["duration"] > 0 and "shot_02" in state["src"], state
    assert page.locator("#recall-query-frames .thumbnail-item").count() == 2  # the shot's own frames

    def query_rows() -> list:
        shapes = page.evaluate("() => document.querySelector('#frame-heatmap .js-plotly-plot').layout.shapes")
        query = [s for s in shapes if s.get("name") == "recall query"]
        keys = [s for s in shapes if str(s.get("name", "")).startswith("recall key")]
        assert len(query) == 1 and len(keys) == len(captions), shapes
        return [query[0]["y0"], query[0]["y1"]]

    assert query_rows() == [3.5, 5.5]  # shot 3's two frames (story frames 4 and 5) across the heatmap
    screenshot(page, "11_recall_shot")

    page.locator("#recall-query-frames .thumbnail-item").nth(1).click()
    page.wait_for_function("() => document.querySelector('#recall-summary .recall-summary').dataset.frame === '1'",
                           timeout=30_000)
    assert "frame 2" in summary()["text"]
    page.wait_for_function("() => { const s = document.querySelector('#frame-heatmap .js-plotly-plot').layout.shapes"
                           ".find(s => s.name === 'recall query'); return s && s.y0 === 4.5; }", timeout=15_000)
    assert query_rows() == [4.5, 5.5]  # narrowed to the clicked frame's row
    narrowed = page.eval_on_selector_all("#recall-frames .caption-label", "els => els.map(e => e.textContent.trim())")
    assert narrowed and all(re.fullmatch(r"shot [12] · frame [12] · \d+ %", c) for c in narrowed), narrowed
    screenshot(page, "12_recall_one_frame")

    page.click("#layer input")  # the Routing tab's layer selector narrows the pictures and the heatmap alike
    page.get_by_role("option", name="1", exact=True).click()
    page.wait_for_function("() => document.querySelector('#recall-summary .recall-summary').dataset.layer === '1'",
                           timeout=30_000)
    assert summary()["frame"] == "1"  # the frame stays chosen
    assert "layer 1" in page.text_content("#frame-heatmap .gtitle")
    page.click("#recall-all-frames")
    page.wait_for_function("() => document.querySelector('#recall-summary .recall-summary').dataset.frame === ''",
                           timeout=30_000)
    assert query_rows() == [3.5, 5.5]
    assert not page.errors, page.errors
    page.get_by_role("tab", name="Storyboard").click()


def test_11_takes_switch_back_to_an_earlier_take(page):
    job = current_job(page)
    page.click("#generate")
    wait_status(page, "done", job)
    earlier = video_digest(page, "#shot-video-2")
    used = int(page.inner_text("#shot-2 .shot-head").split("seed ")[1].split()[0])
    page.locator("#shot-seed-2 input").fill(str(used + 1))  # another seed: a new take
    job = current_job(page)
    page.click("#shot-regen-2")
    wait_status(page, "done", job)
    newer = video_digest(page, "#shot-video-2")
    assert newer != earlier

    page.locator("#shot-takes-2 button").first.click()  # open the card's Takes section
    page.wait_for_function("""() => { const e = document.querySelector('#take-label-2 .takes-label');
                                      return e && e.dataset.current === 'true' && Number(e.dataset.count) >= 2; }""",
                           timeout=15_000)
    label = take_label(page, 2)
    count = int(label["count"])
    assert int(label["number"]) == count  # the newest take is the current one

    def browsed_video_is(key: str) -> None:
        page.wait_for_function("(key) => (document.querySelector('#take-video-2 video') || {}).currentSrc?.includes(key)",
                               arg=key, timeout=15_000)

    page.click("#take-prev-2")
    page.wait_for_function("(n) => document.querySelector('#take-label-2 .takes-label').dataset.number === String(n)",
                           arg=count - 1, timeout=15_000)
    label = take_label(page, 2)
    assert label["current"] == "false" and f"take {count - 1} of {count}" in page.inner_text("#take-label-2")
    browsed_video_is(label["key"])
    assert video_digest(page, "#take-video-2") == earlier  # the earlier take is the first video

    page.click("#take-compare-2")
    page.wait_for_selector("#takes-compare #compare-right-video video", timeout=15_000)
    sides = [video_digest(page, f"#compare-{side}-video") for side in ("left", "right")]
    assert sides == [earlier, newer], "compare shows the browsed take left and the current one right"
    for side in ("left", "right"):
        state = video_state(page, f"#compare-{side}-video")
        assert state["readyState"] >= 2 and state["duration"] > 0 and state.get("error") is None, state
    screenshot(page, "13_takes_compared")

    shown = page.evaluate("() => document.querySelector('#shot-video-2 video').currentSrc")
    job = current_job(page)
    page.click("#take-current-2")
    wait_status(page, "done", job)
    page.wait_for_function("(src) => document.querySelector('#shot-video-2 video').currentSrc !== src",
                           arg=shown, timeout=15_000)
    assert video_digest(page, "#shot-video-2") == earlier, "the earlier take did not become the card's video"
    assert statuses(page)[2] == "cached" and f"seed {used}" in page.inner_text("#shot-2 .shot-head")
    page.wait_for_function("(key) => { const e = document.querySelector('#take-label-2 .takes-label');"
                           "           return e.dataset.key === key && e.dataset.current === 'true'; }",
                           arg=label["key"], timeout=15_000)
    # the compare panel says so too (its dropdowns refresh after the card's label)
    page.wait_for_function("() => document.querySelector('#compare-left input').value.includes('(current)')",
                           timeout=15_000)
    assert "(current)" not in page.input_value("#compare-right input")
    assert not page.errors, page.errors
    screenshot(page, "14_earlier_take_current")
