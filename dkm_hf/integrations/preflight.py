"""The check `from_pretrained` makes of a local directory before transformers opens anything in it.

A damaged dkm_hf checkpoint must fail with a `PalettizedCheckpointError` naming the file rather than inside
transformers' or safetensors' own parsers, and palettized files must never load as a dense model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from huggingface_hub import try_to_load_from_cache
from huggingface_hub.utils import HFValidationError
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING

from ..errors import PalettizedCheckpointError
from .safetensors_files import INDEX_NAME, SINGLE_NAME, checkpoint_files, read_headers, variant_name


def preflight(
    pretrained: str | os.PathLike, subfolder: str = "", variant: str | None = None, config: Any = None
) -> None:
    """Before transformers opens anything in a local directory: a dkm_hf checkpoint's shard index, file locations and
    safetensors headers must be sound (errors name the file), so that a damaged checkpoint fails with a
    `PalettizedCheckpointError` rather than inside transformers' or safetensors' own parsers; and files that dkm_hf
    wrote as a palettized checkpoint must not load under a config.json that no longer declares them (transformers
    would build a model with random weights for every clustered layer). `config`: from_pretrained's `config=`
    argument, which transformers builds the model from instead of the directory's config.json (a config object; a
    path names the directory to read config.json from)."""
    directory = Path(pretrained) / subfolder
    if config is not None and not isinstance(config, (str, os.PathLike)):
        quant = getattr(config, "quantization_config", None)
        quant = quant.to_dict() if hasattr(quant, "to_dict") else quant
    else:
        source = directory if config is None else Path(config)
        if config is not None and source.is_dir():
            source = source / subfolder  # where transformers reads a config directory's config.json too
        source = source / "config.json" if source.is_dir() else source
        try:
            loaded = json.loads(source.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return  # not a local checkpoint directory, or transformers reports its config.json itself
        quant = loaded.get("quantization_config") if isinstance(loaded, dict) else None
    names = (variant_name(INDEX_NAME, variant), variant_name(SINGLE_NAME, variant))
    has_weights = any((directory / name).is_file() for name in names)
    if isinstance(quant, dict) and quant.get("quant_method") == "dkm":
        if has_weights:
            read_headers(checkpoint_files(directory, variant, loading=True))
        return
    try:
        header = read_headers(checkpoint_files(directory, variant)) if has_weights else None
    except PalettizedCheckpointError:
        return  # not ours to judge: transformers loads (or refuses) it as any other checkpoint
    written = header.metadata.get("dkm_format") if header is not None else None
    # not under a quantization method transformers runs (its quantizer may name tensors so); an unknown one it skips
    judged = header is not None and written is None and not _quantized_by_another(quant)
    stripped = _palettized_keys(header.tensors) if judged else []
    if stripped:
        raise PalettizedCheckpointError(
            f"{directory}: the weight files hold dkm_hf palettized tensors ({', '.join(stripped[:2])}) but none of "
            "dkm_hf's metadata (re-saved by another tool?), and the config does not declare them: they cannot load "
            "as a dense model. Load the checkpoint dkm_hf saved"
        )
    if written == "palettized":
        method = quant.get("quant_method") if isinstance(quant, dict) else None
        if config is not None and _read_from(config, pretrained, directory):
            config = None  # an Auto class's config: config.json's, as it reads on disk
        where = "the `config=` given" if config is not None else directory / "config.json"
        raise PalettizedCheckpointError(
            f"{where}: the weights are a dkm_hf palettized checkpoint but the config's quantization_config does not "
            f'declare it (quant_method={method!r}); restore `"quant_method": "dkm"` or the original config.json'
            + (" (or load without config=)" if config is not None else "")
        )


def _quantized_by_another(quant: Any) -> bool:
    """Whether transformers loads under `quant` (a config.json's quantization_config) with a quantizer it knows
    (`AutoHfQuantizer.supports_quant_method`'s rule, without its warning); it loads as dense otherwise."""
    if not isinstance(quant, dict):
        return False
    method = quant.get("quant_method")
    if quant.get("load_in_8bit") or quant.get("load_in_4bit"):
        method = f"bitsandbytes_{'4bit' if quant.get('load_in_4bit') else '8bit'}"
    return method in AUTO_QUANTIZATION_CONFIG_MAPPING


def _palettized_keys(tensors) -> list[str]:
    """The `<weight>_lut` / `<weight>_indices` pairs that look as a palettized checkpoint stores them (a float
    (groups, 2**bits, cluster_dim) LUT, a flat uint8 tensor of packed indices); not any tensors of those names."""

    def palettized(lut, indices) -> bool:
        k = lut.shape[1] if len(lut.shape) == 3 else 0
        return lut.dtype in ("F16", "BF16", "F32") and 2 <= k <= 256 and k & (k - 1) == 0 and indices.dtype == "U8"

    pairs = ((k, k[: -len("lut")] + "indices") for k in sorted(tensors) if k.endswith("_lut"))
    return [k for k, i in pairs if i in tensors and len(tensors[i].shape) == 1 and palettized(tensors[k], tensors[i])]


def _read_from(config: Any, *directories: str | os.PathLike) -> bool:
    """Whether a config object is what transformers read from one of `directories`' config.json, unchanged since
    (an Auto class passes the config it read as `config=`)."""
    source = getattr(config, "name_or_path", "") if not isinstance(config, (str, os.PathLike)) else ""
    if not source or os.path.realpath(source) not in {os.path.realpath(d) for d in directories}:
        return False
    try:
        on_disk = json.loads((Path(directories[-1]) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    quant = config.quantization_config if hasattr(config, "quantization_config") else None
    quant = quant.to_dict() if hasattr(quant, "to_dict") else quant
    return isinstance(on_disk, dict) and on_disk.get("quantization_config") == quant


def cached_snapshot(
    repo_id: str, subfolder: str, cache_dir: Any, revision: str | None, variant: str | None
) -> str | None:
    """The local snapshot directory of Hub repo `repo_id` when its config.json and every weight file are in the Hub
    cache (a repo loaded before, or offline), for `preflight` to read as a local directory; None otherwise: nothing is
    downloaded here, and files transformers downloads afterwards (an interrupted download's other shards) are only
    checked as they load."""
    try:
        name = "/".join(filter(None, (subfolder, "config.json")))
        found = try_to_load_from_cache(repo_id, name, cache_dir, revision)
    except (HFValidationError, ValueError, OSError):
        return None
    if not isinstance(found, str):
        return None
    folder = Path(found).parent
    try:
        checkpoint_files(folder, variant)
    except PalettizedCheckpointError:
        return None
    return str(folder.parents[len(Path(subfolder).parts) - 1] if subfolder else folder)
