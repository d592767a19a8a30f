"""CLIP tokenisation through transformers' CLIPTokenizer.

The OpenAI CLIP byte-pair vocabulary ships with the package
(``assets/bpe_simple_vocab_16e6.txt.gz``), so models with random weights tokenise exactly as
pretrained CLIP does, without any download.
"""

from __future__ import annotations

import functools
import gzip
import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import transformers

logger = logging.getLogger(__name__)

VOCAB_PATH = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
# OpenAI CLIP keeps the first 49152 - 256 - 2 merges of the file; line 0 is a header.
NUM_MERGES = 49152 - 256 - 2


def _byte_symbols() -> list[str]:
    """Return the 256 printable characters that byte-level BPE uses for the bytes 0..255.

    Printable Latin-1 bytes map to themselves, and the other bytes map to the code points from
    256 upwards in byte order. The list is in vocabulary order (printable bytes first).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    others = [b for b in range(256) if b not in set(printable)]
    code_points = printable + [256 + i for i in range(len(others))]
    return [chr(c) for c in code_points]


def read_openai_vocabulary(path: str | Path = VOCAB_PATH) -> tuple[dict[str, int], list[str]]:
    """Read the OpenAI BPE file into a Hugging Face vocabulary and merge list.

    Returns:
        ``(vocab, merges)``. ``vocab`` maps the 49408 tokens to ids in the order of
        transformers' CLIP checkpoints: byte symbols, byte symbols with ``</w>``, merged pairs,
        SOT, EOT. ``merges`` are ``"left right"`` strings.
    """
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1 : 1 + NUM_MERGES]
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(m.split()) for m in merges]
    tokens += [SOT_TOKEN, EOT_TOKEN]
    return {token: i for i, token in enumerate(tokens)}, merges


def write_vocabulary_files(directory: str | Path) -> None:
    """Write the shipped vocabulary as ``vocab.json`` and ``merges.txt`` into ``directory``."""
    directory = Path(directory)
    vocab, merges = read_openai_vocabulary()
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8"
    )


@functools.lru_cache(maxsize=1)
def openai_tokenizer() -> transformers.CLIPTokenizer:
    """Build a CLIPTokenizer from the shipped OpenAI vocabulary (cached per process).

    The vocabulary files are written into a temporary directory that is removed once the
    tokenizer has read them. The pad token is EOT, as in OpenAI's checkpoints on the Hugging
    Face Hub.
    """
    with tempfile.TemporaryDirectory(prefix="cap_jax_vocab_") as directory:
        write_vocabulary_files(directory)
        return transformers.CLIPTokenizer.from_pretrained(
            directory,
            bos_token=SOT_TOKEN,
            eos_token=EOT_TOKEN,
            unk_token=EOT_TOKEN,
            pad_token=EOT_TOKEN,
            model_max_length=77,
        )


def tokenize(
    tokenizer: transformers.PreTrainedTokenizerBase,
    texts: Sequence[str] | str,
    *,
    context_length: int = 77,
) -> np.ndarray:
    """Tokenise texts into fixed-length rows ``[SOT, ..., EOT, pad, ...]``.

    Args:
        tokenizer: a CLIP tokenizer that adds SOT and EOT.
        texts: N strings (a single string is treated as one text).
        context_length: row length L, including SOT and EOT.

    Returns:
        int32 ``[N, L]`` token ids, padded with ``tokenizer.pad_token_id``.

    Raises:
        ValueError: a text needs more than ``context_length`` tokens. Texts are never cut.
    """
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    rows = np.full((len(texts), context_length), pad_id, dtype=np.int32)
    if not texts:
        return rows
    # verbose=False silences transformers' own length warning; the check below raises instead.
    encoded = tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
    for i, (text, ids) in enumerate(zip(texts, encoded)):
        if len(ids) > context_length:
            raise ValueError(
                f"text {text!r} has {len(ids)} tokens including the start and end tokens, "
                f"more than the context length {context_length}; shorten the text"
            )
        rows[i, : len(ids)] = ids
    return rows
