"""``load``: CLIP weights and tokenizer from random init, a local directory, a file or the hub.

Weights are read with safetensors into numpy; PyTorch is never imported. Sources:

* ``"random:<arch>"``: seeded random weights with CLIP's initialisation, for tests and
  benchmarks. The tokenizer comes from the shipped OpenAI vocabulary.
* A local Hugging Face CLIP directory: ``config.json``, ``model.safetensors`` (or sharded
  safetensors with ``model.safetensors.index.json``) and the tokenizer files.
* A ``.safetensors`` or ``.npz`` file with an OpenAI CLIP state dict.
* A Hugging Face Hub id such as ``openai/clip-vit-base-patch32``, downloaded with
  ``huggingface_hub`` when the machine has network access.

NOTE: the hub download path is not covered by the tests, which run without network access.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
import transformers

from cap_jax.clip import state_dicts
from cap_jax.clip import tokenizer as tokenization
from cap_jax.clip.model import CLIP, CLIPConfig, init_params

logger = logging.getLogger(__name__)

RANDOM_CONFIGS: dict[str, CLIPConfig] = {
    "tiny": CLIPConfig(
        embed_dim=32,
        image_resolution=224,
        vision_layers=2,
        vision_width=64,
        vision_patch_size=32,
        vision_heads=2,
        text_width=64,
        text_heads=2,
        text_layers=2,
    ),
    "ViT-B/32": CLIPConfig(
        embed_dim=512,
        image_resolution=224,
        vision_layers=12,
        vision_width=768,
        vision_patch_size=32,
        vision_heads=12,
        text_width=512,
        text_heads=8,
        text_layers=12,
    ),
    "ViT-B/16": CLIPConfig(
        embed_dim=512,
        image_resolution=224,
        vision_layers=12,
        vision_width=768,
        vision_patch_size=16,
        vision_heads=12,
        text_width=512,
        text_heads=8,
        text_layers=12,
    ),
    "ViT-L/14": CLIPConfig(
        embed_dim=768,
        image_resolution=224,
        vision_layers=24,
        vision_width=1024,
        vision_patch_size=14,
        vision_heads=16,
        text_width=768,
        text_heads=12,
        text_layers=12,
    ),
}

HF_WEIGHTS = "model.safetensors"
HF_WEIGHTS_INDEX = "model.safetensors.index.json"
HF_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
HUB_FILES = [
    "config.json",
    "*.safetensors",
    HF_WEIGHTS_INDEX,
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
]
STATE_DICT_SUFFIXES = (".safetensors", ".npz")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")


class CLIPModel:
    """A ``CLIP`` module with its parameters and tokenizer.

    Attributes:
        config: model sizes and token ids.
        module: the ``CLIP`` Flax module, with its activation dtype.
        params: the inner parameter dict of ``module`` (pass ``{'params': params}`` to
            ``module.apply``). It is never trained.
        tokenizer: a transformers CLIP tokenizer.
        is_random: True when the weights are random rather than pretrained.
        name: the ``name_or_path`` the model was loaded from.
    """

    def __init__(
        self,
        *,
        config: CLIPConfig,
        module: CLIP,
        params: dict[str, Any],
        tokenizer: transformers.PreTrainedTokenizerBase,
        is_random: bool,
        name: str,
    ):
        self.config = config
        self.module = module
        self.params = params
        self.tokenizer = tokenizer
        self.is_random = is_random
        self.name = name
        self._encode_images = jax.jit(
            lambda params, images: module.apply(
                {"params": params}, images, method=CLIP.encode_image
            )
        )
        self._encode_texts = jax.jit(
            lambda params, ids: module.apply({"params": params}, ids, method=CLIP.encode_text)
        )
        self._embed_tokens = jax.jit(
            lambda params, ids: module.apply({"params": params}, ids, method=CLIP.embed_tokens)
        )

    def __repr__(self) -> str:
        return (
            f"CLIPModel(name={self.name!r}, is_random={self.is_random}, "
            f"dtype={jnp.dtype(self.module.dtype).name}, config={self.config})"
        )

    @property
    def logit_scale(self) -> jax.Array:
        """The logit multiplier ``exp(params['logit_scale'])``, a float32 scalar."""
        return jnp.exp(self.params["logit_scale"])

    def tokenize(self, texts: Sequence[str] | str) -> np.ndarray:
        """Tokenise texts: int32 ``[N, L]``, padded, raising ValueError for a too-long text."""
        return tokenization.tokenize(
            self.tokenizer, texts, context_length=self.config.context_length
        )

    def embed_tokens(self, token_ids: Any) -> jax.Array:
        """Look up token embeddings: int ``[N, L]`` -> float32 ``[N, L, Wt]``."""
        return self._embed_tokens(self.params, jnp.asarray(token_ids))

    def encode_images(self, images: Any) -> jax.Array:
        """Encode CLIP-normalised images ``[B, H, W, 3]``: float32 ``[B, D]``, not normalised."""
        return self._encode_images(self.params, jnp.asarray(images))

    def encode_texts(self, texts: Sequence[str] | str) -> jax.Array:
        """Encode texts without prompts: float32 ``[N, D]``, not normalised."""
        return self._encode_texts(self.params, jnp.asarray(self.tokenize(texts)))


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Read a safetensors file into numpy arrays.

    numpy has no bfloat16, so the safetensors numpy API rejects bfloat16 tensors; files that
    hold them are read with ``safe_open`` metadata and ``ml_dtypes.bfloat16`` instead.
    """
    try:
        return safetensors.numpy.load_file(str(path))
    except TypeError as error:
        if "bfloat16" not in str(error):
            raise
    return _read_safetensors_bfloat16(Path(path))


def _read_safetensors_bfloat16(path: Path) -> dict[str, np.ndarray]:
    """Read a safetensors file by its header: 8-byte little-endian length, JSON, raw data."""
    import ml_dtypes

    dtypes = {
        "BF16": ml_dtypes.bfloat16,
        "F16": np.float16,
        "F32": np.float32,
        "F64": np.float64,
        "I64": np.int64,
        "I32": np.int32,
        "I16": np.int16,
        "I8": np.int8,
        "U8": np.uint8,
        "BOOL": np.bool_,
    }
    with path.open("rb") as f:
        header_length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_length))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_length)
    arrays = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in dtypes:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        array = np.frombuffer(data[start:end], dtype=dtypes[info["dtype"]])
        arrays[name] = array.reshape(info["shape"]).copy()
    return arrays


def _read_hf_weights(directory: Path) -> dict[str, np.ndarray]:
    single, index = directory / HF_WEIGHTS, directory / HF_WEIGHTS_INDEX
    if single.is_file():
        return read_safetensors(single)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        arrays = {}
        for shard in shards:
            arrays.update(read_safetensors(directory / shard))
        return arrays
    torch_files = sorted(p.name for p in directory.iterdir() if p.suffix in TORCH_SUFFIXES)
    hint = (
        f" It contains PyTorch weights {torch_files}, which cap_jax does not read because it "
        "never imports torch; save the model with safetensors (save_pretrained does by default)."
        if torch_files
        else ""
    )
    raise FileNotFoundError(f"{single} not found (nor {index.name}).{hint}")


def _config_from_hf(
    hf_config: transformers.CLIPConfig, tokenizer: transformers.PreTrainedTokenizerBase
) -> CLIPConfig:
    text, vision = hf_config.text_config, hf_config.vision_config
    if text.hidden_act != vision.hidden_act:
        raise ValueError(
            f"the text tower uses {text.hidden_act!r} and the image tower {vision.hidden_act!r}; "
            "cap_jax supports one activation for both"
        )
    if not math.isclose(text.layer_norm_eps, vision.layer_norm_eps):
        raise ValueError(
            f"the text tower uses layer_norm_eps {text.layer_norm_eps} and the image tower "
            f"{vision.layer_norm_eps}; cap_jax supports one value for both"
        )
    return CLIPConfig(
        embed_dim=hf_config.projection_dim,
        image_resolution=vision.image_size,
        vision_layers=vision.num_hidden_layers,
        vision_width=vision.hidden_size,
        vision_patch_size=vision.patch_size,
        vision_heads=vision.num_attention_heads,
        text_width=text.hidden_size,
        text_heads=text.num_attention_heads,
        text_layers=text.num_hidden_layers,
        context_length=text.max_position_embeddings,
        vocab_size=text.vocab_size,
        layer_norm_eps=text.layer_norm_eps,
        hidden_act=text.hidden_act,
        sot_token_id=tokenizer.bos_token_id,
        eot_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id
        if tokenizer.pad_token_id is not None
        else tokenizer.eos_token_id,
        vision_mlp_width=None
        if vision.intermediate_size == 4 * vision.hidden_size
        else vision.intermediate_size,
        text_mlp_width=None
        if text.intermediate_size == 4 * text.hidden_size
        else text.intermediate_size,
    )


def _load_hf_tokenizer(directory: Path, vocab_size: int) -> transformers.PreTrainedTokenizerBase:
    if any((directory / name).is_file() for name in HF_TOKENIZER_FILES):
        return transformers.CLIPTokenizer.from_pretrained(str(directory))
    if vocab_size != len(tokenization.read_openai_vocabulary()[0]):
        raise FileNotFoundError(
            f"{directory} has no tokenizer files ({' or '.join(HF_TOKENIZER_FILES)}), and its "
            f"vocabulary of {vocab_size} tokens is not OpenAI's, so the shipped one cannot stand in"
        )
    logger.warning(
        "%s has no tokenizer files; using the shipped OpenAI CLIP vocabulary, which matches "
        "its vocabulary size",
        directory,
    )
    return tokenization.openai_tokenizer()


def _load_hf_directory(directory: Path, *, dtype: Any, name: str) -> CLIPModel:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path} not found; a Hugging Face CLIP directory needs config.json, "
            f"{HF_WEIGHTS} and the tokenizer files"
        )
    hf_config = transformers.CLIPConfig.from_pretrained(str(directory))
    if hf_config.model_type != "clip":
        raise ValueError(
            f"{config_path} describes a {hf_config.model_type!r} model, not a 'clip' model"
        )
    arrays = _read_hf_weights(directory)
    tokenizer = _load_hf_tokenizer(directory, hf_config.text_config.vocab_size)
    config = _config_from_hf(hf_config, tokenizer)
    params = state_dicts.load_hf_state_dict(arrays, config)
    return CLIPModel(
        config=config,
        module=CLIP(config, dtype=dtype),
        params=params,
        tokenizer=tokenizer,
        is_random=False,
        name=name,
    )


def _read_state_dict_file(path: Path) -> Mapping[str, np.ndarray]:
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix == ".npz":
        return dict(np.load(path))
    if path.suffix in TORCH_SUFFIXES:
        raise ValueError(
            f"{path} is a PyTorch file, which cap_jax does not read because it never imports "
            "torch; save the state dict as safetensors or npz (arrays named as in PyTorch)"
        )
    raise ValueError(f"{path}: unknown file type; expected one of {STATE_DICT_SUFFIXES}")


def _load_state_dict_file(path: Path, *, dtype: Any, name: str) -> CLIPModel:
    arrays = _read_state_dict_file(path)
    if "image_encoder.conv1.weight" in arrays:
        raise ValueError(
            f"{path} is a reference CustomCLIP state dict, whose text encoder has no token "
            "embedding; read it with cap_jax.clip.load_reference_state_dict"
        )
    if "visual.conv1.weight" not in arrays:
        raise ValueError(
            f"{path} is not an OpenAI CLIP (ViT) state dict: it has no 'visual.conv1.weight'. "
            "For a Hugging Face checkpoint, pass its directory with config.json"
        )
    config, params = state_dicts.load_openai_state_dict(arrays)
    tokenizer = tokenization.openai_tokenizer()
    config = _with_tokenizer_ids(config, tokenizer)
    return CLIPModel(
        config=config,
        module=CLIP(config, dtype=dtype),
        params=params,
        tokenizer=tokenizer,
        is_random=False,
        name=name,
    )


def _with_tokenizer_ids(
    config: CLIPConfig, tokenizer: transformers.PreTrainedTokenizerBase
) -> CLIPConfig:
    import dataclasses

    return dataclasses.replace(
        config,
        sot_token_id=tokenizer.bos_token_id,
        eot_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _load_random(arch: str, *, dtype: Any, seed: int, name: str) -> CLIPModel:
    if arch not in RANDOM_CONFIGS:
        raise ValueError(
            f"unknown random architecture {arch!r} in {name!r}; "
            f"use one of {['random:' + a for a in RANDOM_CONFIGS]}"
        )
    tokenizer = tokenization.openai_tokenizer()
    config = _with_tokenizer_ids(RANDOM_CONFIGS[arch], tokenizer)
    return CLIPModel(
        config=config,
        module=CLIP(config, dtype=dtype),
        params=init_params(config, seed=seed),
        tokenizer=tokenizer,
        is_random=True,
        name=name,
    )


def _looks_like_path(name: str) -> bool:
    """Tell a file system path from a hub id, which is ``name`` or ``owner/name``."""
    return (
        name.startswith(("/", ".", "~"))
        or "\\" in name
        or name.count("/") > 1
        or name.endswith(STATE_DICT_SUFFIXES + TORCH_SUFFIXES)
    )


def _download_from_hub(repo_id: str) -> Path:
    import huggingface_hub

    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as error:
        raise OSError(
            f"{repo_id!r} is not a local directory and downloading it from the Hugging Face Hub "
            f"failed ({type(error).__name__}: {error}). Without network access, pass a local "
            "directory with config.json, model.safetensors and the tokenizer files."
        ) from error


def load(name_or_path: str | Path, *, dtype: Any = jnp.float32, seed: int = 0) -> CLIPModel:
    """Load a CLIP model with its tokenizer.

    Args:
        name_or_path: one of
            ``"random:tiny"``, ``"random:ViT-B/32"``, ``"random:ViT-B/16"``,
            ``"random:ViT-L/14"`` (random weights), a local Hugging Face CLIP directory, a
            ``.safetensors`` or ``.npz`` file with an OpenAI CLIP state dict, or a Hugging Face
            Hub id.
        dtype: activation dtype, ``jnp.float32`` or ``jnp.bfloat16``. Parameters stay float32.
        seed: seed of the random weights; ignored for pretrained weights.

    Returns:
        A ``CLIPModel``.

    Raises:
        FileNotFoundError: a local path or a file the directory needs does not exist.
        ValueError: an unknown random architecture or an unreadable state dict.
        OSError: a hub download failed.
    """
    name = str(name_or_path)
    if name.startswith("random:"):
        return _load_random(name.removeprefix("random:"), dtype=dtype, seed=seed, name=name)

    path = Path(name).expanduser()
    if path.is_dir():
        return _load_hf_directory(path, dtype=dtype, name=name)
    if path.is_file():
        return _load_state_dict_file(path, dtype=dtype, name=name)
    if isinstance(name_or_path, Path) or _looks_like_path(name):
        raise FileNotFoundError(f"{name!r}: no such file or directory")
    return _load_hf_directory(_download_from_hub(name), dtype=dtype, name=name)
