"""benchmarks/e2e.py on the CPU with its tiny model: the checkpoint it builds loads through the
engine, every part runs and writes what the GPU run will (videos, JSON keys, the time split, the
scaling plot). Its timings are GPU figures and are never asserted."""

import json

import pytest

from benchmarks import e2e


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e")
    out = work / "e2e.json"
    assert e2e.main(["--tiny", "--device", "cpu", "--steps", "1", "--repeats", "1", "--work", str(work),
                     "--json", str(out)]) == 0
    return work, json.loads(out.read_text())


def test_the_summary_keys_and_the_forward_rows(run):
    _, data = run
    for key in ("forward_speedup_vs_cudnn", "forward_speedup_vs_flash", "regenerate_speedup"):
        assert data[key] > 0
    rows = {r["variant"]: r for r in data["forward"]}
    assert set(rows) == {"moc-auto", "moc-triton", "dense-cudnn", "dense-flash", "moc-gather"}
    for r in rows.values():  # the split adds up to the device time, which counts no named range
        assert r["attention_ms"] + r["routing_ms"] + r["rest_ms"] == pytest.approx(r["device_ms"], abs=0.3)
        assert r["attention_ms"] > 0 and r["rest_ms"] > 0
    assert rows["moc-auto"]["routing_ms"] > 0 and rows["dense-cudnn"]["routing_ms"] == 0
    assert data["forward_speedup_vs_cudnn"] == rows["moc-auto"]["speedup_vs_cudnn"]
    assert rows["dense-cudnn"]["speedup_vs_cudnn"] == 1.0 and rows["dense-flash"]["speedup_vs_flash"] == 1.0


def test_scaling_grows_the_story_one_shot_at_a_time(run):
    _, data = run
    tokens = [r["tokens"] for r in data["scaling"]]
    assert [r["shots"] for r in data["scaling"]] == [1, 2, 3]
    assert tokens == [tokens[0] * s for s in (1, 2, 3)]
    assert all(r["moc_ms"] > 0 and r["moc_triton_ms"] > 0 and r["moc_gather_ms"] > 0 for r in data["scaling"])


def test_renders_write_videos_and_regenerate_keeps_the_other_shots(run):
    work, data = run
    rows = {r["render"]: r for r in data["render"]}
    assert set(rows) == {"moc_joint", "moc_joint_regenerate", "moc_joint_regenerate_earlier", "moc_shot_by_shot",
                         "moc_joint_regenerate_kept", "moc_joint_regenerate_grouped", "moc_joint_regenerate_again"}
    for name in ("moc_joint_regenerate_kept", "moc_joint_regenerate_grouped", "moc_joint_regenerate_again"):
        assert rows[name]["statuses"] == ["cached", "generated", "cached"] and rows[name]["both_sides"] is True
    # another take of the regenerated shot reads no context: both passes kept from the one before;
    # the rows after it read theirs afresh
    assert rows["moc_joint_regenerate"]["context_passes"] == {"run": 2, "kept": 0}
    assert rows["moc_joint_regenerate_kept"]["context_passes"] == {"run": 0, "kept": 2}
    assert rows["moc_joint_regenerate_kept"]["phases_s"]["context"] < rows["moc_joint_regenerate"]["phases_s"]["context"]
    assert rows["moc_joint_regenerate_again"]["context_passes"] == {"run": 2, "kept": 0}
    assert rows["moc_joint_regenerate_earlier"]["context_passes"] == {"run": 1, "kept": 0}
    assert data["regenerate_speedup_kept_context"] > 0
    assert all(r["videos_ok"] for r in rows.values())
    joint = rows["moc_joint"]["videos"]
    assert [v["codec"] for v in joint] == ["h264"] * 4 and [v["frames"] for v in joint] == [5, 5, 5, 15]
    assert rows["moc_joint"]["statuses"] == ["generated"] * 3
    assert rows["moc_joint_regenerate"]["statuses"] == ["cached", "generated", "cached"]
    assert rows["moc_joint_regenerate"]["both_sides"] is True  # the app's default: the later shot is context
    # earlier shots only: the later shot no longer follows from the new take, so it is stale
    assert rows["moc_joint_regenerate_earlier"]["statuses"] == ["cached", "generated", "stale"]
    assert rows["moc_joint_regenerate_earlier"]["both_sides"] is False
    assert data["regenerate_speedup_earlier_only"] > 0
    for r in rows.values():  # the phases add up to the render's wall time
        assert sum(r["phases_s"].values()) == pytest.approx(r["seconds"], abs=0.05)
        assert r["phases_s"]["sampling"] > 0
    assert rows["moc_joint"]["phases_s"]["context"] == 0  # one run with no context before it
    assert rows["moc_joint_regenerate"]["phases_s"]["context"] > 0  # shots 1 and 3 read as context
    assert len(rows["moc_joint_regenerate"]["context_passes_s"]) == 2
    assert (work / "out" / "moc_joint" / "story.mp4").stat().st_size > 0
    assert "render moc_joint_regenerate" in (work / "out" / "e2e_log.txt").read_text()


def test_phase_split_gives_each_mark_the_time_to_the_next():
    marks = [("context", 1.0), ("context", 1.5), ("sampling", 3.0), ("after", 7.0), ("sampling", 8.0), ("after", 9.0)]
    assert e2e.phase_split(marks, 0.2, 10.0) == {"before": 0.8, "context": 2.0, "sampling": 5.0, "after": 2.0}
    assert e2e.phase_split([], 0.0, 2.5) == {"before": 2.5, "context": 0.0, "sampling": 0.0, "after": 0.0}
    assert e2e.context_passes(marks, 10.0) == [0.5, 1.5]  # each pass to the next mark
    assert e2e.context_passes([("sampling", 1.0)], 2.0) == []


def test_profiled_returns_the_result_and_logs_where_the_host_time_went():
    import torch
    lines = []
    out = e2e.profiled(lambda: torch.ones(64, 64) @ torch.ones(64, 64), torch.device("cpu"), lines.append, "mm")
    assert float(out[0, 0]) == 64.0
    assert len(lines) == 1 and lines[0].startswith("mm, host: ") and "aten::" in lines[0]


def test_the_scaling_plot_is_drawn_from_the_json(run, tmp_path):
    from PIL import Image
    work, data = run
    (tmp_path / "e.json").write_text(json.dumps(data))
    assert e2e.main(["--plot", str(tmp_path / "e.json"), "--png", str(tmp_path / "s.png")]) == 0
    img = Image.open(tmp_path / "s.png").convert("RGB")
    colours = set(img.getdata())
    assert (40, 90, 200) in colours and (200, 60, 50) in colours  # both lines are drawn


def test_classify_busy_counts_kernels_by_the_range_they_start_in_and_leaves_idle_out():
    # one attention range from 10 to 60 with a routing range inside (12..20); the GPU idles 30..50
    kernels = [(0, 5), (3, 8), (12, 18), (21, 30), (50, 58), (62, 70), (65, 66)]
    got = e2e.classify_busy(kernels, attention_spans=[(10, 60)], routing_spans=[(12, 20)])
    assert got == {"busy": 8 + 6 + 9 + 8 + 8, "routing": 6, "attention": 9 + 8, "rest": 8 + 8}
    assert e2e.classify_busy(kernels, [], [])["rest"] == got["busy"]  # no ranges: everything is the rest
