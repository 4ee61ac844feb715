"""The paper preset against the paper's reference code (VisionXLab/EvoTok): input normalisation, parameter
counts of every sub-module, the pixel decoder's block structure, loss terms on the reference's scale, the
dry run without weights files, and two real training steps of the paper-sized model on the CPU."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from evotok.config import load_config

PAPER = "tokenizer/evotok_paper"


# ------------------------------------------------------------------------------------- normalisation


def test_paper_teacher_and_encoder_normalise_with_siglip_half():
    from evotok.models.teacher import teacher_normalization
    from evotok.models.tokenizer import encoder_normalization

    cfg = load_config(PAPER)
    for norm in (teacher_normalization(cfg), encoder_normalization(cfg)):
        assert norm.mean == (0.5, 0.5, 0.5) and norm.std == (0.5, 0.5, 0.5), norm
    assert "webli" in teacher_normalization(cfg).source
    # without the tag, the arch's only pretrained config (webli) still decides, not open_clip's OpenAI default
    no_tag = load_config(PAPER, ["teacher.pretrained_tag="])
    assert teacher_normalization(no_tag).mean == (0.5, 0.5, 0.5)


def test_user_mean_std_win_and_bad_values_are_named():
    from evotok.config import ConfigError
    from evotok.models.teacher import TeacherError, teacher_normalization
    from evotok.models.tokenizer import encoder_normalization

    cfg = load_config(PAPER, ["teacher.mean=[0.1,0.2,0.3]", "teacher.std=[0.4,0.5,0.6]"])
    assert teacher_normalization(cfg)[:2] == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert encoder_normalization(cfg)[:2] == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))  # the tower is the teacher's
    cfg = load_config(PAPER, ["model.encoder_mean=[0.2,0.2,0.2]", "model.encoder_std=[0.3,0.3,0.3]"])
    assert encoder_normalization(cfg)[:2] == ((0.2,) * 3, (0.3,) * 3)
    assert teacher_normalization(cfg).mean == (0.5, 0.5, 0.5)
    with pytest.raises(ConfigError, match="'teacher.mean' and 'teacher.std' go together"):
        load_config(PAPER, ["teacher.mean=[0.1,0.2,0.3]"])
    with pytest.raises(ConfigError, match="3 numbers each"):
        load_config(PAPER, ["model.encoder_mean=[0.1]", "model.encoder_std=[0.1]"])
    with pytest.raises(TeacherError, match="'openai' is not an open_clip pretrained tag .* its tags: webli"):
        teacher_normalization(load_config(PAPER, ["teacher.pretrained_tag=openai"]))


def test_embedded_teacher_keeps_the_normalisation_it_was_trained_with(random_teacher):
    from evotok.models.teacher import teacher_normalization

    openai_mean = (0.48145466, 0.4578275, 0.40821073)
    assert teacher_normalization(load_config(None)).mean == openai_mean
    assert tuple(random_teacher.mean.flatten().tolist()) == pytest.approx(openai_mean)


def test_tokenizer_stage_keeps_only_the_teachers_image_tower(random_teacher):
    from evotok.models.teacher import TeacherError, load_teacher

    teacher = load_teacher(load_config(None, ["teacher.random_init=true"]))
    images = torch.rand(2, 3, 32, 32)
    before = teacher.image_features(images)
    n_visual = sum(p.numel() for p in teacher.visual.parameters())
    teacher.drop_text()
    assert torch.equal(teacher.image_features(images), before)
    assert sum(p.numel() for p in teacher.parameters()) == n_visual + 1  # + the logit scale
    with pytest.raises(TeacherError, match="text tower was dropped"):
        teacher.encode_text(["a red circle"])
    assert random_teacher.encode_text(["a red circle"]).shape[0] == 1  # the shared fixture is untouched


# ------------------------------------------------------------------------------------- architecture


@pytest.fixture(scope="module")
def paper_meta():
    """The paper tokenizer and discriminator on the meta device (no weights read)."""
    from evotok.models.discriminator import PatchDiscriminator
    from evotok.models.tokenizer import build_tokenizer

    cfg = load_config(PAPER, ["model.encoder_weights="])
    with torch.device("meta"):
        return build_tokenizer(cfg, 1024, (16, 16)), PatchDiscriminator(cfg.loss.disc_layers, cfg.loss.disc_channels)


# Counted by instantiating the reference's own classes (VisionXLab/EvoTok @ 147b1b2, evotok/tokenizer/vq_model/
# evotok.py, pixel_model.py, vqkd_model.py, modules/discriminator_patchgan.py) with the arguments of
# evotok/scripts/train_evotok_siglip256.sh; kept here as facts, apart from evotok.models.reference.
REFERENCE_FACTS = {
    "encoder tower": (315_956_224, 290_762_752),  # HF SiglipVisionModel siglip2-large-patch16-256; layer 23, head, post-LN frozen
    "encoder head": (1_082_400, 1_082_400),  # encode_task_layer: Linear(1024,1024)-Tanh-Linear(1024,32)
    "pixel decoder": (8_448 + 42_449_795,) * 2,  # post_quant_conv + Decoder(ch_mult=[1,1,2,2,4], z_channels=256)
    "semantic decoder": (38_036_456 + 2_099_200,) * 2,  # decoder_vqkd (BEiT ViT 3 x 1024, 12 heads) + decode_task_layer
    "discriminator": (2_765_633,) * 2,  # NLayerDiscriminator(ndf=64, n_layers=3), BatchNorm
}


def test_paper_submodules_have_the_reference_parameter_counts(paper_meta):
    from evotok.models.reference import PAPER_REFERENCE
    from evotok.models.sizes import submodule_counts

    counts = submodule_counts(*paper_meta)
    for name, (total, trainable) in REFERENCE_FACTS.items():
        assert (counts[name].params, counts[name].trainable) == (total, trainable), name
        assert PAPER_REFERENCE[name][:2] == (total, trainable), name
    # 16 codebooks of 32768 x 32 (the reference's nn.Embedding has one extra zero padding row per depth)
    assert counts["quantizer codebooks"].params == 16 * 32768 * 32 == PAPER_REFERENCE["quantizer codebooks"].params - 16 * 32


def test_paper_pixel_decoder_block_structure(paper_meta):
    """The reference Decoder: mid Res-Attn-Res; num_res_blocks + 1 = 3 ResBlocks per up level, attention after each
    at 16 x 16 only; the upsample conv keeps channels (the next level's first ResBlock changes them)."""
    lines = paper_meta[0].pixel_decoder.structure()
    assert lines[0] == "post_quant 1x1 32->256, conv_in 256->512"
    assert lines[1] == "mid: Res 512->512, Attn, Res 512->512"
    assert lines[2] == "level: Res 512->512, Attn, Res 512->512, Attn, Res 512->512, Attn, Up x2, Conv 512->512"
    assert lines[3] == "level: Res 512->256, Res 256->256, Res 256->256, Up x2, Conv 256->256"
    assert lines[-1] == "level: Res 128->128, Res 128->128, Res 128->128, GN, SiLU, Conv 128->3"
    assert sum(line.count("Res ") for line in lines[2:]) == 15 and sum(line.count("Attn") for line in lines[2:]) == 3


def test_beit_semantic_block_has_the_reference_attention_shape():
    from evotok.models.decoders import Block, SemanticDecoder

    blk = Block(1024, 12, style="beit")
    assert blk.head_dim == 85 and blk.qkv.weight.shape == (3060, 1024) and blk.qkv.bias is None
    assert blk.q_bias.shape == blk.v_bias.shape == (1020,) and blk.proj.weight.shape == (1024, 1020)
    torch.manual_seed(0)
    dec = SemanticDecoder(8, (2, 2), 24, 2, 5, 16, style="beit").eval()
    z = torch.randn(3, 8, 2, 2)
    out = dec(z)
    assert out.shape == (3, 4, 16)
    # the CLS token takes part in attention: changing it changes the patch outputs
    with torch.no_grad():
        dec.cls.copy_(torch.randn_like(dec.cls))  # (a constant shift would vanish in the LayerNorm)
    assert (dec(z) - out).abs().max() > 1e-6
    # k has no bias: a bias on k would add the same term to every score of a query, which softmax ignores,
    # so the reference drops it; q and v biases do change the output
    with torch.no_grad():
        dec.blocks[0].v_bias.add_(0.5)
    assert (dec(z) - out).abs().max() > 1e-6


# ------------------------------------------------------------------------------------- losses


def test_loss_terms_on_the_reference_scale_by_hand():
    from evotok.models.losses import TokenizerLoss, cosine_fold_loss, hinge_d_loss, hinge_g_loss, reconstruction_loss

    images = torch.tensor([0.0, 0.5, 1.0, 0.25]).view(1, 1, 2, 2)
    recon = torch.tensor([0.5, 0.5, 0.5, 0.75]).view(1, 1, 2, 2)
    # on [-1, 1]: errors 1, 0, -1, 1 -> mean squared 3/4, mean absolute 3/4
    assert reconstruction_loss(recon, images, "l2").item() == pytest.approx(0.75)
    assert reconstruction_loss(recon, images, "l1").item() == pytest.approx(0.75)
    assert reconstruction_loss(recon, images, "l2").item() == pytest.approx(4 * F.mse_loss(recon, images).item())
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-3.0, 0.0, 1.0])
    # 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))) = 0.5 * ((0 + 0.5 + 2) / 3 + (0 + 1 + 2) / 3)
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 3 / 3))
    assert hinge_g_loss(fake).item() == pytest.approx(2 / 3)
    # cosine + fold 2 on 4-d tokens: p=(1,0,1,0), t=(1,0,0,1): whole cos 1/2; folds (1,0)v(1,0)=1, (1,0)v(0,1)=0
    p, t = torch.tensor([[[1.0, 0.0, 1.0, 0.0]]]), torch.tensor([[[1.0, 0.0, 0.0, 1.0]]])
    assert cosine_fold_loss(p, t, folds=2).item() == pytest.approx((1 - 0.5) + ((1 - 1) + (1 - 0)) / 2)

    cfg = load_config(PAPER, ["loss.lpips_weight=0", "loss.gan_start=0"]).loss
    assert (cfg.recon_weight, cfg.gan_weight, cfg.commit_weight, cfg.sem_weight, cfg.sem_folds) == (1.0, 0.5, 1.0, 1.0, 4)
    loss = TokenizerLoss(cfg)

    class ConstDisc(torch.nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 1, 1, 1), -0.8)

    sem_p = sem_t = torch.tensor([[[1.0, -2.0, 3.0, 4.0]]])  # identical tokens: every (fold) cosine is 1
    terms = loss(images, recon, sem_p, sem_t, torch.tensor(0.2), step=0, disc=ConstDisc())
    assert terms.gan_g.item() == pytest.approx(0.8) and terms.sem.item() == pytest.approx(0.0, abs=1e-6)
    # total = 1.0 * 0.75 + 0.5 * 0.8 + 1.0 * 0.2 + 1.0 * 0
    assert terms.total.item() == pytest.approx(0.75 + 0.4 + 0.2)
    # the discriminator's side carries gan_weight too (the reference's disc_weight on both sides)
    assert loss.disc_loss(real, fake).item() == pytest.approx(0.5 * hinge_d_loss(real, fake).item())
    assert loss(images, recon, sem_p, sem_t, torch.tensor(0.2), step=0, disc=None).gan_g.item() == 0.0


def test_embedded_default_keeps_its_calibrated_reconstruction_weight():
    """The tiny runs were tuned with the [0, 1]-scale MSE at weight 1: the [-1, 1] MSE at 0.25 is the same loss."""
    from evotok.models.losses import TokenizerLoss

    cfg = load_config("tokenizer/evotok_tiny", ["teacher.run="]).loss
    assert cfg.recon_weight == 0.25
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 3, 4, 4, generator=g), torch.rand(2, 3, 4, 4, generator=g)
    terms = TokenizerLoss(cfg)(a, b, torch.ones(1, 1, 4), torch.ones(1, 1, 4), torch.tensor(0.0), step=0)
    assert terms.total.item() == pytest.approx(F.mse_loss(b, a).item(), rel=1e-6)


# ------------------------------------------------------------------------------------- dry run


@pytest.mark.slow  # part of make test, not of make test-fast
def test_paper_dry_run_as_written_lists_missing_weights_and_reference_counts(capsys, tmp_path, monkeypatch):
    from evotok.cli import main

    monkeypatch.chdir(tmp_path)  # no weights/ folder here
    assert main(["train", "tokenizer", "--config", PAPER, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "normalisation, teacher: mean (0.5, 0.5, 0.5) std (0.5, 0.5, 0.5)" in out
    assert "normalisation, encoder: mean (0.5, 0.5, 0.5) std (0.5, 0.5, 0.5)" in out
    assert "weights files read (3, 3 missing)" in out
    for key in ("teacher.weights", "model.encoder_weights", "loss.lpips_weights"):
        assert any(line.split()[1:2] == [key] and line.endswith("MISSING") for line in out.splitlines()), key
    rows = {re.split(r"\s{2,}", line[4:])[0]: line for line in out.splitlines() if line.startswith("#   ")}
    for name in REFERENCE_FACTS:
        assert rows[name].endswith("yes"), rows[name]
    assert "mid: Res 512->512, Attn, Res 512->512" in out
    assert "estimated memory per device at data.batch_size=32 (bf16-mixed)" in out


# ------------------------------------------------------------------------------------- paper-sized steps


@pytest.mark.slow  # part of make test, not of make test-fast
def test_two_training_steps_of_the_paper_model_on_cpu(tmp_path):
    """The real-scale code paths with real numbers: the timm SigLIP2 tower, LPIPS (a random VGG16 file written
    here), the GAN from step 0, 16 depths of K = 32768 at 256 px, batch 1."""
    import lightning as L
    from torchvision.models import vgg16

    from evotok.lit.tokenizer_module import TokenizerModule

    torch.set_num_threads(2)  # the autouse fixture restores its own setting afterwards
    vgg = tmp_path / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in vgg16(weights=None).features.state_dict().items()}, vgg)
    cfg = load_config(PAPER, [
        "teacher.random_init=true", "model.encoder_weights=", f"loss.lpips_weights={vgg}", "loss.gan_start=0",
        "model.quantizer.ema_warmup=1", "data.batch_size=1", "trainer.global_batch_size=0", "trainer.devices=1",
        "trainer.accelerator=cpu", "trainer.strategy=auto", "trainer.precision=32-true",
    ])
    module = TokenizerModule(cfg)
    # the teacher is a vision tower here, as in the reference (its text tower is dropped: 566 M parameters)
    assert sum(p.numel() for p in module.teacher.parameters()) == 315_956_224 + 2  # + logit scale and bias
    torch.manual_seed(0)
    images = torch.rand(2, 1, 3, 256, 256)
    loader = [{"image": images[i], "index": torch.tensor([i])} for i in range(2)]
    before = {n: p.detach().clone() for n, p in module.named_parameters()
              if n in ("model.encoder.head.2.weight", "model.pixel_decoder.conv_out.weight", "disc.main.0.weight")}
    cb0 = module.model.quantizer.codebooks_LKd.clone()
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(loader, batch_size=None))
    assert trainer.global_step == 2 and module.batches_seen == 2
    logged = module.logged_scalars
    for key in ("train/loss", "train/recon", "train/lpips", "train/gan_g", "train/commit", "train/sem", "train/disc"):
        assert math.isfinite(logged[key]), key
    assert logged["train/lpips"] > 0 and logged["train/sem"] > 0
    for name, p in before.items():
        assert not torch.equal(dict(module.named_parameters())[name], p), f"{name} did not train"
    assert module.model.quantizer.codebooks_LKd.shape == (16, 32768, 32)
    assert not torch.equal(module.model.quantizer.codebooks_LKd, cb0) and bool(module.model.quantizer.initialized)
    with torch.no_grad():
        out = module.model.eval()(images[0])
    assert out.recon.shape == (1, 3, 256, 256) and out.semantic.shape == (1, 256, 1024)
    assert out.quant.codes.shape == (1, 16, 16, 16) and int(out.quant.codes.max()) < 32768
