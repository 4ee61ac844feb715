"""Sizes of a tokenizer configuration without building it for real: sub-module parameter counts, the weights
files it reads, the resolved input normalisation and an estimate of training memory per device, all from
modules built on the meta device (nothing allocated, no weights read). ``evotok train tokenizer --dry-run``
prints :func:`describe_tokenizer`.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn

from evotok.config import Config


class Count(NamedTuple):
    params: int
    trainable: int


def _count(module: nn.Module) -> Count:
    ps = list(module.parameters())
    return Count(sum(p.numel() for p in ps), sum(p.numel() for p in ps if p.requires_grad))


def submodule_counts(model: nn.Module, disc: nn.Module) -> dict[str, Count]:
    """Parameter counts of a tokenizer's parts, named as in :data:`evotok.models.reference.PAPER_REFERENCE`."""
    enc = model.encoder
    out: dict[str, Count] = {}
    if hasattr(enc, "visual"):
        out["encoder tower"] = _count(enc.visual)
        out["encoder head"] = _count(enc.head)
    else:
        out["encoder"] = _count(enc)
    out["pixel decoder"] = _count(model.pixel_decoder)
    out["semantic decoder"] = _count(model.semantic_decoder)
    out["discriminator"] = _count(disc)
    cb = model.quantizer.codebooks_LKd.numel()
    out["quantizer codebooks"] = Count(cb, 0)
    return out


def weights_files(cfg: Config) -> list[tuple[str, str]]:
    """(config key, path) of every local weights file a tokenizer run of ``cfg`` reads."""
    files = []
    t = cfg.teacher
    if not t.random_init:
        files.append(("teacher.run", t.run) if t.run else ("teacher.weights", t.weights))
    from evotok.models.presets import get_arch

    if get_arch(cfg.model.preset).encoder == "vit" and cfg.model.encoder_weights:
        files.append(("model.encoder_weights", cfg.model.encoder_weights))
    if cfg.loss.lpips_weight > 0:
        files.append(("loss.lpips_weights", cfg.loss.lpips_weights))
    return files


def _saved_elements(module: nn.Module, *inputs: torch.Tensor) -> tuple[int, torch.Tensor | tuple]:
    """Elements of every leaf module's output in one forward (what autograd keeps for the backward, roughly)."""
    total = 0

    def hook(_m, _i, out):
        nonlocal total
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                total += t.numel()

    handles = [m.register_forward_hook(hook) for m in module.modules() if not any(True for _ in m.children())]
    try:
        out = module(*inputs)
    finally:
        for h in handles:
            h.remove()
    return total, out


def activation_elements(cfg: Config, model: nn.Module, disc: nn.Module) -> int:
    """Leaf-module outputs of one training step for ONE image (meta device): encoder, both decoders, the
    discriminator (three passes: fake in the generator step, real and fake in its own) and LPIPS's VGG16."""
    r = cfg.data.resolution
    with torch.device("meta"):
        images = torch.zeros(1, 3, r, r)
        n_enc, z = _saved_elements(model.encoder, images)
        n_pix, _ = _saved_elements(model.pixel_decoder, z)
        n_sem, _ = _saved_elements(model.semantic_decoder, z)
        n_disc, _ = _saved_elements(disc, images)
        total = n_enc + n_pix + n_sem + 3 * n_disc + model.depth * z.numel() * 3  # z_cum, residuals, straight-through
        if cfg.loss.lpips_weight > 0:
            from torchvision.models import vgg16

            n_vgg, _ = _saved_elements(vgg16(weights=None).features, images)
            total += 2 * n_vgg  # reconstruction and target
    return total


def describe_tokenizer(cfg: Config) -> str:
    """The ``--dry-run`` description: model, normalisation, weights files, counts beside the reference (paper
    preset), the pixel decoder's blocks and the memory estimate per device at data.batch_size."""
    import dataclasses

    from evotok.models.discriminator import PatchDiscriminator
    from evotok.models.presets import get_arch
    from evotok.models.reference import PAPER_REFERENCE, REFERENCE_COMMIT, REFERENCE_REPO
    from evotok.models.teacher import build_clip, teacher_normalization
    from evotok.models.tokenizer import build_tokenizer, encoder_normalization

    arch = get_arch(cfg.model.preset)
    clip = build_clip(cfg.teacher.arch, device="meta")
    from evotok.models.teacher import Teacher

    with torch.device("meta"):
        teacher = Teacher(clip, cfg.teacher.arch)
        grid = teacher.token_grid if getattr(clip.visual, "grid_size", None) is not None else None
    if grid is None:  # timm towers (SigLIP2): ask the trunk
        grid = tuple(int(g) for g in clip.visual.trunk.patch_embed.grid_size)
    width = int(getattr(getattr(clip.visual, "trunk", None), "embed_dim", 0) or teacher.width)
    meta_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, encoder_weights=""))  # read no weights
    with torch.device("meta"):
        model = build_tokenizer(meta_cfg, width, grid)
        disc = PatchDiscriminator(cfg.loss.disc_layers, cfg.loss.disc_channels)
    t_norm = teacher_normalization(cfg) if not (cfg.teacher.run and not (cfg.teacher.mean or cfg.teacher.pretrained_tag)) \
        else teacher.normalization._replace(source="the teacher run's open_clip model preprocessing")
    lines = [
        f"# tokenizer preset {cfg.model.preset!r}: latent grid {model.grid}, depth L={model.depth} "
        f"(Lpix={model.lpix}, Lsem={model.lsem}), K={cfg.model.quantizer.codebook_size}, d={cfg.model.quantizer.dim}",
        f"# teacher {cfg.teacher.arch} (frozen; width {width}, grid {tuple(grid)}): "
        f"{sum(p.numel() for p in clip.parameters()) / 1e6:.2f} M parameters, image tower "
        f"{sum(p.numel() for p in clip.visual.parameters()) / 1e6:.2f} M",
        f"# normalisation, teacher: mean {_fmt(t_norm.mean)} std {_fmt(t_norm.std)} ({t_norm.source})",
    ]
    e_norm = encoder_normalization(cfg)
    if e_norm is not None:
        lines.append(f"# normalisation, encoder: mean {_fmt(e_norm.mean)} std {_fmt(e_norm.std)} ({e_norm.source})")
    else:
        lines.append("# normalisation, encoder: CNN encoder, [0, 1] images mapped to [-1, 1]")
    files = weights_files(cfg)
    missing = [(k, p) for k, p in files if not p or not Path(p).exists()]
    lines.append(f"# weights files read ({len(files)}, {len(missing)} missing):" if files else "# weights files read: none")
    for key, path in files:
        state = "present" if path and Path(path).exists() else "MISSING"
        lines.append(f"#   {key:<22} {path or '(empty)':<48} {state}")
    counts = submodule_counts(model, disc)
    ref = PAPER_REFERENCE if cfg.model.preset == "paper" else {}
    head = f"# parameters (M){', beside the reference code ' + REFERENCE_REPO + ' @ ' + REFERENCE_COMMIT[:7] if ref else ''}:"
    lines.append(head)
    lines.append(f"#   {'part':<20} {'total':>9} {'trainable':>10}" + (f" {'reference':>10} {'ref train.':>10}  match" if ref else ""))
    for name, c in counts.items():
        row = f"#   {name:<20} {c.params / 1e6:>9.3f} {c.trainable / 1e6:>10.3f}"
        if name in ref:
            r = ref[name]
            same = (c.params, c.trainable) == (r.params, r.trainable)
            note = "yes" if same else "NO"
            if name == "quantizer codebooks" and not same and c.params == r.params - model.depth * cfg.model.quantizer.dim:
                note = "yes, but for the reference's zero padding row per depth"
            row += f" {r.params / 1e6:>10.3f} {r.trainable / 1e6:>10.3f}  {note}"
        lines.append(row)
    lines.append("# pixel decoder blocks (deepest first):")
    lines += [f"#   {line}" for line in model.pixel_decoder.structure()]
    trainable = sum(c.trainable for c in counts.values())
    weights = sum(c.params for c in counts.values()) + sum(p.numel() for p in clip.parameters())
    buffers = sum(b.numel() for b in model.buffers())
    if cfg.loss.lpips_weight > 0:
        weights += 14_716_160  # LPIPS: VGG16 features + the linear calibration layers
    per_image = activation_elements(cfg, model, disc)
    act_bytes = 2 if "16" in cfg.trainer.precision else 4
    B = cfg.data.batch_size
    state = (4 * weights + 12 * trainable + 4 * buffers) / 2**30  # fp32 weights; grads + two Adam moments
    act = per_image * act_bytes * B / 2**30
    lines.append(
        f"# estimated memory per device at data.batch_size={B} ({cfg.trainer.precision}): weights, gradients and Adam "
        f"state {state:.1f} GiB + activations {act:.1f} GiB ({per_image * act_bytes / 2**20:.0f} MiB per image: "
        f"leaf-module outputs of one step, a rough bound) = {state + act:.1f} GiB"
    )
    return "\n".join(lines)


def _fmt(v) -> str:
    return "(" + ", ".join(f"{x:.4g}" for x in v) + ")"
