"""Headless CLI and real-checkpoint loading: a tiny random Wan2.1 pipeline saved with
save_pretrained (umT5 + tokenizer built offline) loads through --model and renders."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.story import GenerationSettings, MoCSettings, Shot, Story

ROOT = Path(__file__).resolve().parents[2]


def build_tiny_wan(folder: Path) -> Path:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    words = "a the red blue green fox bird square circle moves jumps grows on snow <unk> <pad> </s>".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 15)])  # as T5 does
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(words), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                               num_heads=4, relative_attention_num_buckets=8, pad_token_id=14,
                                               eos_token_id=15, decoder_start_token_id=14))
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=16, out_channels=16, text_dim=32, freq_dim=16, ffn_dim=24,
                                        num_layers=2, rope_max_seq_len=32)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=transformer)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory) -> Path:
    return build_tiny_wan(tmp_path_factory.mktemp("tiny_wan") / "wan")


def wan_story() -> Story:
    settings = GenerationSettings(steps=2, guidance=2.0, height=32, width=48, fps=4, mode="shot_by_shot",
                                  moc=MoCSettings(top_k=1))
    return Story("a red fox", [Shot("the fox jumps on snow", 2, 1), Shot("a blue bird", 1, -1)], settings)


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch.py", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=240)


def test_saved_wan_pipeline_renders_through_the_cli(tiny_wan, tmp_path):
    story_path = wan_story().save(tmp_path / "story.json")
    out, cache = tmp_path / "out", tmp_path / "cache"
    proc = run_cli("--story", story_path, "--out", out, "--model", tiny_wan, "--device", "cpu", "--cache-dir", cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("shot_00.mp4", "shot_01.mp4", "story.mp4", "routing.json", "summary.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert [s["status"] for s in summary["shots"]] == ["generated", "generated"]
    assert [s["frames"] for s in summary["shots"]] == [5, 1]  # Wan VAE: 1 + 4 (f - 1) video frames
    routing = json.loads((out / "routing.json").read_text())
    assert routing["shot_frames"] == [2, 1] and len(routing["frame_selection"]["all"]) == 3
    again = run_cli("--story", story_path, "--out", out, "--model", tiny_wan, "--device", "cpu",
                    "--cache-dir", cache, "--regenerate", "1")
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [s["status"] for s in summary["shots"]] == ["cached", "generated"]  # seed -1: a new take
    assert "reading shot 1 as context (1 of 1)" in again.stdout  # the context pass is shown as it runs


def test_wan_checkpoint_loads_offline_with_umt5_and_vae(tiny_wan):
    from engine.model import StoryModel
    model = StoryModel.load(tiny_wan, device="cpu")
    assert model.codec.name == "wan-vae" and model.codec.video_frames(3) == 9
    states = model.text_encoder.encode(["a red fox", ""])
    assert states[0].shape == (4, 32) and states[1].shape[0] >= 1  # "a red fox" + </s>
    assert model.scheduler_class.__name__ == "UniPCMultistepScheduler"


def test_bad_story_exits_with_the_field_named(tmp_path):
    d = wan_story().to_dict()
    d["shots"][1]["frames"] = 0
    (tmp_path / "bad.json").write_text(json.dumps(d))
    proc = run_cli("--story", tmp_path / "bad.json", "--out", tmp_path / "o")
    assert proc.returncode == 2 and "shots[1].frames" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_model_folder_is_a_message(tmp_path):
    story_path = wan_story().save(tmp_path / "story.json")
    proc = run_cli("--story", story_path, "--model", tmp_path / "nope", "--out", tmp_path / "o")
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_routing_demo_flag_prints_the_routing():
    out = subprocess.run([sys.executable, "launch.py", "--routing-demo"], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[2]).stdout
    assert "density" in out and "shot 3 frame 2:" in out


def test_no_keep_context_flag_reaches_the_engine(monkeypatch, tiny_model_dir):
    from engine.engine import StoryEngine
    from launch import load_engine, parse_args
    built = {}
    monkeypatch.setattr(StoryEngine, "load", staticmethod(lambda *a, **kw: built.setdefault("options", kw["options"])))
    for argv, keep in (([], True), (["--no-keep-context"], False)):
        built.clear()
        args = parse_args(["--model", str(tiny_model_dir), *argv])
        load_engine(args, None, "cpu", preview=False)
        assert built["options"].keep_context is keep


def test_open_top_k_flag_is_checked():
    from launch import parse_args
    assert parse_args([]).open_top_k == 2 and parse_args(["--open-top-k", "0"]).open_top_k == 0
    proc = run_cli("--open-top-k", "-1", "--routing-demo")
    assert proc.returncode == 2 and "--open-top-k" in proc.stderr and "from 0 to 64" in proc.stderr
