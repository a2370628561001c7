"""Both ranks of `torchrun launch.py` without --story (tests/engine/test_ranks.py), Gradio left out.

argv: OUT, then launch.py's arguments. `StoryboardApp.launch` (Gradio's server) is replaced by a
client that does what a browser's clicks would, through the app's render worker: a render it
stops after the first sampler step, then a whole render. It saves what it saw to OUT/app.json and
returns, and the app closes as it does after Ctrl-C (rank 0 then sends the quit job).
"""

import json
import sys
from pathlib import Path

import launch
from app.server import StoryboardApp
from app.worker import TERMINAL
from engine.events import Finished, Progress
from tests.engine.conftest import tiny_story


def clicks(out: Path):
    def launch_without_gradio(app: StoryboardApp, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
                              **kwargs):
        seen = {"host": host, "port": port, "engine_html": app._engine_html()}
        long = tiny_story("joint")
        long.settings.steps = 6
        job = app.worker.submit("stopper", long.validate())
        for event in app.worker.stream(job):
            if isinstance(event, Progress) and event.step >= 1:
                app.worker.stop("stopper")
            if isinstance(event, TERMINAL):
                seen["stop"] = [type(event).__name__, getattr(event, "message", "")]
        job = app.worker.submit("client", tiny_story("joint"))
        last = [event for event in app.worker.stream(job) if isinstance(event, TERMINAL)][-1]
        seen["render"] = " ".join([type(last).__name__, getattr(last, "message", "")]).strip()  # Failed: why
        if isinstance(last, Finished):  # rank 0's files (the app's folder is removed when it closes)
            videos = [s.video_path for s in last.result.shots] + [last.result.story_video]
            seen["videos"] = [path.name for path in videos if path.is_file()]
        (out / "app.json").write_text(json.dumps(seen))
    return launch_without_gradio


if __name__ == "__main__":
    StoryboardApp.launch = clicks(Path(sys.argv[1]))
    sys.exit(launch.main(sys.argv[2:]))
