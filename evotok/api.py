"""Using a trained tokenizer: load it from a run folder or checkpoint, encode image folders to codes,
decode codes to images, export the weights as safetensors.

A tokenizer checkpoint carries its resolved config (``hyper_parameters["config"]``) and the teacher's
width and token grid, so loading needs neither the teacher nor the data. The teacher itself is only
needed for semantic targets / CLIPSIM: :func:`load_run_teacher` builds it from the run's config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from evotok.config import Config, from_dict, to_yaml, with_overrides
from evotok.errors import UserError
from evotok.models.tokenizer import EvoTok, build_tokenizer
from evotok.runs import load_checkpoint_file, resolve_run


class TokenizerLoadError(UserError, ValueError):
    """A checkpoint that is not a tokenizer, or not the tokenizer the caller expects."""


def read_checkpoint(run_or_ckpt: str | Path) -> tuple[Config, dict[str, Any], Path]:
    """(config, raw checkpoint dict, checkpoint path) of a tokenizer run folder or .ckpt file."""
    _, ckpt_path = resolve_run(run_or_ckpt)
    ckpt = load_checkpoint_file(ckpt_path)
    hp = ckpt.get("hyper_parameters") or {}
    if not isinstance(hp.get("config"), dict) or "teacher_width" not in hp:
        raise TokenizerLoadError(f"{ckpt_path} is not a tokenizer checkpoint (no config / teacher_width in its hyper-parameters)")
    return from_dict(hp["config"], source=f"the config saved in {ckpt_path}"), ckpt, ckpt_path


def load_tokenizer(
    run_or_ckpt: str | Path, *, preset: Optional[str] = None, lpix: Optional[int] = None, lsem: Optional[int] = None,
    device: str | torch.device = "cpu",
) -> EvoTok:
    """The EvoTok model of a tokenizer run folder (best.ckpt, else last.ckpt) or a .ckpt, in eval mode.

    ``preset`` / ``lpix`` / ``lsem``, when given, must match the checkpoint's config (a clear error
    otherwise). The model carries its config as ``model.config``.
    """
    cfg, ckpt, path = read_checkpoint(run_or_ckpt)
    for key, want in (("preset", preset), ("lpix", lpix), ("lsem", lsem)):
        have = getattr(cfg.model, key)
        if want is not None and want != have:
            raise TokenizerLoadError(
                f"checkpoint {path} was trained with model.{key}={have!r} but model.{key}={want!r} was expected "
                f"(its model: preset={cfg.model.preset}, lpix={cfg.model.lpix}, lsem={cfg.model.lsem})"
            )
    hp = ckpt["hyper_parameters"]
    cfg.model.encoder_weights = ""  # the checkpoint holds the trained encoder: no init file needed
    model = build_tokenizer(cfg, hp["teacher_width"], hp["teacher_grid"])
    state = {k[len("model."):]: v for k, v in (ckpt.get("state_dict") or {}).items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise TokenizerLoadError(
            f"checkpoint {path} does not fit the tokenizer its config describes "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.config = cfg  # type: ignore[attr-defined]
    return model.to(device).eval()


def load_run_teacher(run_or_ckpt: str | Path):
    """The frozen teacher a tokenizer run was trained with (needed for semantic targets and CLIPSIM), found
    through the run's upstream record and verified by fingerprint (evotok.handover)."""
    from evotok.handover import upstream_config
    from evotok.models.teacher import load_teacher

    cfg, _, _ = read_checkpoint(run_or_ckpt)
    return load_teacher(upstream_config(run_or_ckpt, cfg, "tokenizer"))


# ------------------------------------------------------------------------------------------- folders


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """(3, R, R) float in [0, 1]: the data layer's decoding (RGB conversion, shorter side resized, centre crop)."""
    from evotok.data.sources import image_to_tensor, open_rgb

    return image_to_tensor(open_rgb(path), resolution)


@torch.no_grad()
def encode_folder(
    run: str | Path, images_dir: str | Path, out_npz: str | Path, batch_size: int = 64, device: str = "cpu",
    overrides: Sequence[str] = (),
) -> Path:
    """Encode every image under ``images_dir`` to codes, read by the data layer's folder source (split ``all``)
    at the tokenizer's data.resolution: unreadable or non-image files follow ``data.on_bad_file`` (the run's,
    or from ``overrides``, e.g. ``data.on_bad_file=error``): skipped and counted, or an error naming the file.

    The .npz holds ``codes`` (N, h, w, L) int32, ``names`` (paths relative to images_dir), ``skipped`` (the
    files that could not be read), ``lpix``, ``lsem``, ``preset``, ``resolution`` and ``config`` (the
    tokenizer's resolved YAML).
    """
    from evotok.data.sources import ImageFolder

    model = load_tokenizer(run, device=device)
    cfg: Config = model.config  # type: ignore[attr-defined]
    data_cfg = with_overrides(cfg, [f"data.root={images_dir}", "data.source=folder", *overrides]).data
    ds = ImageFolder(data_cfg, split="all")
    codes, names, batch = [], [], []

    def flush() -> None:
        if batch:
            codes.append(model.encode(torch.stack(batch).to(device)).to(torch.int32).cpu())
            batch.clear()

    for i in range(len(ds)):
        image = ds.image_or_none(i)
        if image is None:
            continue
        batch.append(image)
        names.append(ds.rel_paths[i])
        if len(batch) == batch_size:
            flush()
    flush()
    if not names:
        raise FileNotFoundError(f"image folder {images_dir} holds no image that could be read")
    skipped = [n for n, _ in ds.bad_files.items]
    if skipped:
        print(f"encode: skipped {len(skipped)} unreadable file(s) (data.on_bad_file=skip): {', '.join(skipped[:5])}"
              f"{' ...' if len(skipped) > 5 else ''}")
    out = Path(out_npz)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out, codes=torch.cat(codes).numpy(), names=np.array(names), skipped=np.array(skipped, dtype=str),
        lpix=cfg.model.lpix, lsem=cfg.model.lsem, preset=cfg.model.preset, resolution=cfg.data.resolution,
        config=to_yaml(cfg, "tokenizer"),
    )
    return out


@torch.no_grad()
def decode_to_folder(
    run: str | Path, codes_npz: str | Path, depth: Optional[int], out_dir: str | Path, batch_size: int = 64,
    device: str = "cpu",
) -> Path:
    """Decode the codes of ``codes_npz`` at ``depth`` (None: Lpix) to PNGs named after the encoded images
    (same relative paths, .png); returns ``out_dir``."""
    from PIL import Image

    data = np.load(codes_npz, allow_pickle=False)
    if "codes" not in data:
        raise ValueError(f"{codes_npz} has no 'codes' array (write it with encode_folder / `evotok encode`)")
    model = load_tokenizer(run, device=device)
    cfg: Config = model.config  # type: ignore[attr-defined]
    for key, have in (("lpix", cfg.model.lpix), ("lsem", cfg.model.lsem), ("preset", cfg.model.preset)):
        if key in data and str(data[key]) != str(have):
            raise TokenizerLoadError(f"{codes_npz} was encoded with model.{key}={data[key]} but the run has model.{key}={have}")
    codes = torch.from_numpy(data["codes"].astype(np.int64))
    names: Sequence[str] = [str(n) for n in data["names"]] if "names" in data else [f"{i:06d}.png" for i in range(len(codes))]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(0, len(codes), batch_size):
        imgs = model.decode_pixels(codes[i:i + batch_size].to(device), depth).clamp(0, 1)
        arr = (imgs.permute(0, 2, 3, 1).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
        for a, name in zip(arr, names[i:i + batch_size]):
            p = out / Path(name).with_suffix(".png")
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(a).save(p)
    return out


def export_safetensors(run: str | Path, out_path: str | Path) -> Path:
    """The tokenizer's weights (EvoTok state dict: encoder, codebooks, decoders) as safetensors; the
    metadata carries the resolved config (YAML) and the teacher width / grid needed to rebuild it."""
    from safetensors.torch import save_file

    cfg, ckpt, _ = read_checkpoint(run)
    hp = ckpt["hyper_parameters"]
    state = {k[len("model."):]: v.contiguous() for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"config": json.dumps(hp["config"]), "teacher_width": str(hp["teacher_width"]),
            "teacher_grid": json.dumps(list(hp["teacher_grid"])), "format": "evotok-tokenizer-v1"}
    save_file(state, str(out), metadata=meta)
    return out


def load_safetensors(path: str | Path, device: str | torch.device = "cpu") -> EvoTok:
    """Rebuild an EvoTok from :func:`export_safetensors` output."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "evotok-tokenizer-v1":
        raise TokenizerLoadError(f"{path} is not an EvoTok tokenizer export")
    cfg = from_dict(json.loads(meta["config"]))
    cfg.model.encoder_weights = ""
    model = build_tokenizer(cfg, int(meta["teacher_width"]), json.loads(meta["teacher_grid"]))
    model.load_state_dict(load_file(str(path)), strict=True)
    model.config = cfg  # type: ignore[attr-defined]
    return model.to(device).eval()
