"""Text <-> token ids through a Hugging Face ``tokenizer.json`` (the ``tokenizers`` library)."""

from __future__ import annotations

import os


class Tokenizer:
    """A thin wrapper over ``tokenizers.Tokenizer``: ``encode(text) -> ids``, ``decode(ids) -> text``."""

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as HFTokenizer

        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no tokenizer.json (pass --prompt-ids, or a model directory with a tokenizer)")
        self.path = path
        try:
            self._tok = HFTokenizer.from_file(path)
        except Exception as e:  # the tokenizers library raises a bare Exception on a malformed file
            from .validate import DataError

            raise DataError(f"{path}: not a readable tokenizer.json ({e})") from None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of ``text``; ``add_special_tokens=False`` skips the post-processor's BOS/EOS (chat
        templates write their own)."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids))

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def is_special(self, token_id: int) -> bool:
        """Whether ``token_id`` is one of the tokenizer's special added tokens."""
        added = self._tok.get_added_tokens_decoder().get(int(token_id))
        return bool(added is not None and added.special)
