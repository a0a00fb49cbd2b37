"""Training data: corpora, tokenizers, packed sequences, prompts and target-regenerated answers.

Corpora that every machine with Python has: the standard library's ``.py`` sources (code) and
``pydoc_data`` topics (English prose). A stable hash of each document's name decides its split,
so the held-out documents never change between runs or machines of the same Python version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sysconfig
from typing import Iterable, Sequence

import numpy as np

EOS_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mask|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, MASK_TOKEN, PAD_TOKEN)


@dataclasses.dataclass(frozen=True)
class Document:
    name: str
    text: str
    domain: str  # "code" or "prose"


def is_held_out(name: str, fraction: float = 0.05) -> bool:
    """Stable split: a document is held out iff a hash of its name falls below ``fraction``."""
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
    return h / 2**64 < fraction


def stdlib_code(split: str = "train", held_out_fraction: float = 0.05, max_bytes: int = 200_000) -> list[Document]:
    """The standard library's Python sources (test suites and huge generated files excluded)."""
    root = sysconfig.get_paths()["stdlib"]
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        dirnames[:] = sorted(
            d for d in dirnames
            if d not in ("test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__")
            and not d.startswith(("lib2to3", "ensurepip", "turtledemo"))
        )
        for fn in sorted(filenames):
            if not fn.endswith(".py"):
                continue
            path = os.path.join(dirpath, fn)
            name = os.path.normpath(os.path.join(rel_dir, fn))
            if os.path.getsize(path) > max_bytes:
                continue
            if (split == "held-out") != is_held_out(name, held_out_fraction):
                continue
            with open(path, encoding="utf-8", errors="replace") as f:
                docs.append(Document(name, f.read(), "code"))
    return docs


def pydoc_prose(split: str = "train", held_out_fraction: float = 0.05) -> list[Document]:
    """English prose: the ``pydoc_data`` help topics."""
    from pydoc_data.topics import topics

    return [
        Document(f"pydoc:{key}", topics[key], "prose")
        for key in sorted(topics)
        if (split == "held-out") == is_held_out(f"pydoc:{key}", held_out_fraction)
    ]


def stdlib_corpus(split: str = "train", held_out_fraction: float = 0.05) -> list[Document]:
    return stdlib_code(split, held_out_fraction) + pydoc_prose(split, held_out_fraction)


def text_corpus(paths: Sequence[str]) -> list[Document]:
    """Plain text files (or every ``.txt``/``.py``/``.md`` file under a directory)."""
    docs = []
    for p in paths:
        files = [p]
        if os.path.isdir(p):
            files = sorted(
                os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs if f.endswith((".txt", ".py", ".md"))
            )
        for f in files:
            with open(f, encoding="utf-8", errors="replace") as fh:
                docs.append(Document(f, fh.read(), "code" if f.endswith(".py") else "prose"))
    return docs


def train_tokenizer(texts: Iterable[str], vocab_size: int, path: str | os.PathLike):
    """Train a byte-level BPE ``tokenizer.json`` with the special tokens this project uses."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    tok.save(os.fspath(path))
    return tok


def pack_documents(token_docs: Iterable[Sequence[int]], seq_len: int, eos_id: int) -> np.ndarray:
    """Concatenate documents (EOS after each) and cut into rows ``[N, seq_len]`` int32."""
    stream: list[int] = []
    for ids in token_docs:
        stream.extend(ids)
        stream.append(eos_id)
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f"corpus of {len(stream)} tokens is shorter than one sequence of {seq_len}")
    return np.asarray(stream[: n * seq_len], np.int32).reshape(n, seq_len)


class BatchStream:
    """Deterministic batches over rows: epoch e visits rows in permutation(seed, e).

    ``batch(step)`` is a pure function of the step, so a resumed run sees exactly the batches
    the interrupted run would have seen (the data position is the step).
    """

    def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, seed: int = 0):
        self.arrays = arrays
        self.rows = len(next(iter(arrays.values())))
        if self.rows < batch_size:
            raise ValueError(f"{self.rows} rows of data are fewer than one batch of {batch_size}")
        self.batch_size, self.seed = batch_size, seed
        self.per_epoch = self.rows // batch_size
        self._perm_epoch, self._perm = None, None

    def batch(self, step: int) -> dict[str, np.ndarray]:
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.rows)
            self._perm_epoch = epoch
        idx = self._perm[i * self.batch_size : (i + 1) * self.batch_size]
        return {k: v[idx] for k, v in self.arrays.items()}


# ---------------------------------------------------------------------------- prompts


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from JSONL: DeepSpec's ``{"turns": [...]}`` (first turn) or ``{"text": ...}`` /
    ``{"prompt": ...}``."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: file not found")
    prompts = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
            if isinstance(row.get("turns"), list) and row["turns"]:
                prompts.append(str(row["turns"][0]))
            elif "text" in row or "prompt" in row:
                prompts.append(str(row.get("text", row.get("prompt"))))
            else:
                raise ValueError(f"{path}:{n}: expected a 'turns', 'text' or 'prompt' field")
    return prompts


def prompts_from_documents(docs: Sequence[Document], prompt_tokens: int, encode, stride_tokens: int = 0) -> list[list[int]]:
    """Cut documents into prompts of ``prompt_tokens`` ids (every ``stride_tokens``, default one
    per prompt length), the way held-out text becomes prompts for regeneration and evaluation."""
    stride = stride_tokens or prompt_tokens * 4
    out = []
    for d in docs:
        ids = encode(d.text)
        for start in range(0, max(len(ids) - prompt_tokens, 0), stride):
            out.append(ids[start : start + prompt_tokens])
    return out


def prompts_for_count(docs: Sequence[Document], prompt_tokens: int, encode, count: int) -> list[list[int]]:
    """Prompts cut from ``docs`` at the usual stride, or at a finer one (overlapping prompts)
    where the documents are too short to give ``count`` prompts that way."""
    lengths = [len(encode(d.text)) for d in docs]
    room = sum(max(n - prompt_tokens, 0) for n in lengths)  # where a prompt may start
    stride = max(1, min(prompt_tokens * 4, room // max(count + len(docs), 1)))
    return prompts_from_documents(docs, prompt_tokens, encode, stride)


def domain_mixed_prompts(docs: Sequence[Document], prompt_tokens: int, encode, num_prompts: int,
                         prose_fraction: float, rng: np.random.Generator) -> list[list[int]]:
    """``num_prompts`` prompts of which ``prose_fraction`` are cut from the prose documents and
    the rest from the code, shuffled. Prose is a few percent of the standard library, so its
    documents are cut at a finer stride (overlapping prompts) until there are enough."""
    if not 0.0 <= prose_fraction <= 1.0:
        raise ValueError(f"prose_fraction must be in [0, 1], got {prose_fraction}")
    num_prose = round(prose_fraction * num_prompts)
    by_domain = {}
    for domain, count in (("prose", num_prose), ("code", num_prompts - num_prose)):
        domain_docs = [d for d in docs if d.domain == domain]
        prompts = prompts_for_count(domain_docs, prompt_tokens, encode, count)
        if len(prompts) < count:
            raise ValueError(f"{domain}: asked for {count} prompts of {prompt_tokens} tokens, the corpus has "
                             f"{len(prompts)} (in {len(domain_docs)} documents)")
        by_domain[domain] = [prompts[i] for i in rng.permutation(len(prompts))[:count]]
    mixed = by_domain["prose"] + by_domain["code"]
    return [mixed[i] for i in rng.permutation(len(mixed))]


def answers_dataset(prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], seq_len: int, pad_id: int):
    """Rows of [prompt ; answer] with a loss mask on the answer, padded/cut to ``seq_len``."""
    tokens = np.full((len(prompts), seq_len), pad_id, np.int32)
    mask = np.zeros((len(prompts), seq_len), np.int32)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        row = (list(p) + list(a))[:seq_len]
        tokens[i, : len(row)] = row
        mask[i, len(p) : len(row)] = 1
    return {"tokens": tokens, "loss_mask": mask}
