"""EvoTok model, losses and configs: shapes, gradients, attach points, round trips, the paper preset on meta."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from evotok.config import load_config
from evotok.models.discriminator import PatchDiscriminator
from evotok.models.losses import TokenizerLoss, cosine_fold_loss, hinge_d_loss
from evotok.models.tokenizer import PRESETS, build_tokenizer, resize_token_grid

CPU_PRESETS = ["tiny", "tiny_vit"]  # presets small enough to run on a CPU in a test; the others are traced on meta
TINY_YAMLS = {"tokenizer/evotok_tiny": (4, 16), "tokenizer/entangled_tiny": (4, 4), "tokenizer/sem2pix_tiny": (16, 4)}
TEACHER_WIDTH, TEACHER_GRID = 128, (4, 4)


def small_cfg(preset: str = "tiny", lpix: int = 4, lsem: int = 16, *extra: str):
    return load_config(None, [f"model.preset={preset}", f"model.lpix={lpix}", f"model.lsem={lsem}",
                              "model.quantizer.codebook_size=64", *extra])


def test_every_preset_is_covered():
    assert set(PRESETS) == set(CPU_PRESETS) | {"paper"}


@pytest.mark.parametrize("preset", CPU_PRESETS)
def test_preset_forward_backward_every_parameter_gets_a_gradient(preset):
    torch.manual_seed(0)
    cfg = small_cfg(preset)
    model = build_tokenizer(cfg, TEACHER_WIDTH, TEACHER_GRID).train()
    x = torch.rand(4, 3, cfg.data.resolution, cfg.data.resolution)
    out = model(x)
    h, w = model.grid
    assert out.recon.shape == x.shape
    assert out.semantic.shape == (4, h * w, TEACHER_WIDTH)
    assert out.quant.z_cum.shape == (cfg.depth, 4, cfg.model.quantizer.dim, h, w)
    assert out.quant.codes.shape == (4, h, w, cfg.depth) and out.quant.codes.dtype == torch.int64
    target = torch.randn(4, h * w, TEACHER_WIDTH)
    loss = F.mse_loss(out.recon, x) + out.quant.commit_loss + cosine_fold_loss(out.semantic, target, 4)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
            assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_lpix_lsem_change_only_attach_points_and_depth():
    a = build_tokenizer(small_cfg("tiny", 4, 16), TEACHER_WIDTH, TEACHER_GRID)
    b = build_tokenizer(small_cfg("tiny", 16, 4), TEACHER_WIDTH, TEACHER_GRID)
    c = build_tokenizer(small_cfg("tiny", 4, 4), TEACHER_WIDTH, TEACHER_GRID)
    pa = {k: v.shape for k, v in a.named_parameters()}
    assert pa == {k: v.shape for k, v in b.named_parameters()} == {k: v.shape for k, v in c.named_parameters()}
    ba, bb, bc = (dict((k, v.shape) for k, v in m.named_buffers()) for m in (a, b, c))
    assert ba.keys() == bb.keys() == bc.keys()
    for k in ba:
        if k.startswith("quantizer.") and len(ba[k]) > 0:  # depth is the leading dim of the codebook buffers
            assert ba[k] == bb[k] and ba[k][0] == 16 and bc[k][0] == 4 and ba[k][1:] == bc[k][1:], k
        else:
            assert ba[k] == bb[k] == bc[k], k
    assert (a.lpix, a.lsem, a.depth) == (4, 16, 16) and (b.lpix, b.lsem, b.depth) == (16, 4, 16)
    assert (c.lpix, c.lsem, c.depth) == (4, 4, 4)


@pytest.fixture
def trained_tiny():
    """A tiny model after a few training-mode forwards (codebooks initialised), in eval mode."""
    torch.manual_seed(0)
    cfg = small_cfg("tiny", 4, 16)
    model = build_tokenizer(cfg, TEACHER_WIDTH, TEACHER_GRID).train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(8, 3, 32, 32))
    return model.eval()


def test_encode_decode_round_trip(trained_tiny):
    m = trained_tiny
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        codes = m.encode(x)
        z = m.cumulative(x)
        assert torch.equal(m.as_latent(codes, m.lpix), z[m.lpix - 1])
        torch.testing.assert_close(m.decode_pixels(codes), m.decode_pixels(z[m.lpix - 1]), rtol=0, atol=1e-6)
        torch.testing.assert_close(m.decode_semantic(codes), m.decode_semantic(z[m.lsem - 1]), rtol=0, atol=1e-6)
        out = m(x)
        torch.testing.assert_close(out.recon, m.decode_pixels(codes), rtol=0, atol=1e-6)
        # every depth decodes; codes truncated to the first l depths decode the same z_l
        for l in range(1, m.depth + 1):
            img = m.decode_pixels(codes, depth=l)
            assert img.shape == x.shape and torch.isfinite(img).all()
            assert torch.equal(m.as_latent(codes[..., :l], l), z[l - 1])
            assert m.decode_semantic(codes, depth=l).shape == (3, 64, TEACHER_WIDTH)
    for bad in (0, m.depth + 1):
        with pytest.raises(ValueError, match="depth"):
            m.decode_pixels(codes, depth=bad)


def test_wrong_resolution_names_data_resolution(trained_tiny):
    with pytest.raises(ValueError, match=r"data\.resolution=32"):
        trained_tiny.encode(torch.rand(2, 3, 64, 64))


def test_resize_token_grid_is_area():
    t = torch.arange(2 * 64 * 3, dtype=torch.float32).reshape(2, 64, 3)
    down = resize_token_grid(t, (8, 8), (4, 4))
    grid = t.reshape(2, 8, 8, 3)
    assert torch.allclose(down.reshape(2, 4, 4, 3)[:, 1, 2], grid[:, 2:4, 4:6].mean((1, 2)))
    up = resize_token_grid(down, (4, 4), (8, 8)).reshape(2, 8, 8, 3)
    assert torch.equal(up[:, 2, 5], down.reshape(2, 4, 4, 3)[:, 1, 2]) and torch.equal(up[:, 3, 4], up[:, 2, 5])
    assert resize_token_grid(t, (8, 8), (8, 8)) is t


def test_cosine_fold_loss_formula():
    torch.manual_seed(0)
    p, t = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    whole = 1 - F.cosine_similarity(p, t, dim=-1).mean()
    chunks = torch.stack([1 - F.cosine_similarity(p[..., i:i + 2], t[..., i:i + 2], dim=-1).mean() for i in range(0, 8, 2)])
    torch.testing.assert_close(cosine_fold_loss(p, t, 4), whole + chunks.mean())
    assert cosine_fold_loss(t, t * 3.0, 4).abs() < 1e-5  # scale-invariant, zero at the target
    with pytest.raises(ValueError, match="loss.sem_folds"):
        cosine_fold_loss(p, t, 3)


def test_discriminator_and_hinge():
    d = PatchDiscriminator(3, 16)
    logits = d(torch.rand(2, 3, 32, 32))
    assert logits.shape[:2] == (2, 1) and logits.ndim == 4
    assert hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)) == 0


def test_lpips_missing_weights_file_names_key_and_path(tmp_path):
    missing = tmp_path / "vgg16.pth"
    cfg = small_cfg("tiny", 4, 16, "loss.lpips_weight=1.0", f"loss.lpips_weights={missing}")
    with pytest.raises(FileNotFoundError, match="loss.lpips_weights") as e:
        TokenizerLoss(cfg.loss)
    assert str(missing) in str(e.value)


def test_lpips_loads_local_backbone(tmp_path):
    lpips = pytest.importorskip("lpips")
    from evotok.models.losses import LPIPSLoss

    torch.manual_seed(0)
    ref = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    # a torchvision-style vgg16 'features.N' state dict (what a real local VGG16 file holds)
    sd = {f"features.{k.split('.', 1)[1]}": v for k, v in ref.net.state_dict().items()}
    path = tmp_path / "vgg16.pth"
    torch.save(sd, path)
    loss = LPIPSLoss(str(path))
    for (k, v), (k2, v2) in zip(loss.net.net.state_dict().items(), ref.net.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    x = torch.rand(2, 3, 32, 32)
    assert loss(x, x).abs() < 1e-6 and loss(x, torch.rand(2, 3, 32, 32)) > 0
    assert not any(p.requires_grad for p in loss.parameters())


@pytest.mark.parametrize("name", sorted(TINY_YAMLS))
def test_tiny_yamls_build(name):
    cfg = load_config(name, ["model.quantizer.codebook_size=64"])
    lpix, lsem = TINY_YAMLS[name]
    m = build_tokenizer(cfg, TEACHER_WIDTH, TEACHER_GRID)
    assert (m.lpix, m.lsem, m.depth, cfg.model.preset) == (lpix, lsem, max(lpix, lsem), "tiny")
    assert cfg.trainer.max_steps == 5600 and cfg.optim.schedule == "linear"  # a step budget, not a clock


def test_tiny_yamls_differ_only_in_attach_points():
    """The Lpix/Lsem sweep compares like with like: every other key of the three tiny configs agrees."""
    from evotok.config import to_dict

    def rest(name):
        tree = to_dict(load_config(name))
        del tree["model"]["lpix"], tree["model"]["lsem"]
        return tree

    trees = [rest(name) for name in sorted(TINY_YAMLS)]
    assert trees[0] == trees[1] == trees[2]


def test_paper_config_matches_design():
    c = load_config("tokenizer/evotok_paper")
    q = c.model.quantizer
    assert (c.model.preset, c.model.lpix, c.model.lsem, c.depth) == ("paper", 4, 16, 16)
    assert (q.codebook_size, q.dim, q.ema_decay, q.ema_warmup, q.restart_threshold) == (32768, 32, 0.99, 2000, 1.0)
    lo = c.loss
    assert (lo.recon, lo.recon_weight, lo.lpips_weight, lo.gan_weight, lo.gan_start) == ("l2", 1.0, 1.0, 0.5, 20000)
    assert (lo.disc_layers, lo.disc_channels, lo.commit_weight, lo.sem_weight, lo.sem_folds) == (3, 64, 1.0, 1.0, 4)
    o = c.optim
    assert (o.lr, list(o.betas), o.weight_decay, o.grad_clip) == (1e-4, [0.9, 0.95], 0.0, 1.0)
    assert (c.data.resolution, c.data.augment, c.trainer.precision) == (256, True, "bf16-mixed")
    assert (c.trainer.global_batch_size, c.trainer.max_steps) == (256, 500000)
    assert c.model.encoder_weights and c.model.encoder_weights == c.teacher.weights  # encoder init = the teacher


def test_paper_preset_shapes_on_meta():
    cfg = load_config("tokenizer/evotok_paper", ["model.encoder_weights="])
    with torch.device("meta"):
        m = build_tokenizer(cfg, 1024, (16, 16))
        x = torch.empty(2, 3, 256, 256)
        z = m.latent(x)
        assert z.shape == (2, 32, 16, 16)
        assert m.pixel_decoder(z).shape == (2, 3, 256, 256)
        assert m.semantic_decoder(z).shape == (2, 256, 1024)
    assert m.grid == (16, 16) and m.depth == 16
    assert m.quantizer.codebooks_LKd.shape == (16, 32768, 32)
    enc = m.encoder
    assert enc.width == 1024 and [type(l).__name__ for l in enc.head] == ["Linear", "Tanh", "Linear"]
    assert (enc.head[0].in_features, enc.head[0].out_features, enc.head[2].out_features) == (1024, 1024, 32)
    trunk = enc.visual.trunk
    assert not any(p.requires_grad for p in trunk.blocks[-1].parameters())
    assert not any(p.requires_grad for p in trunk.norm.parameters())
    assert all(p.requires_grad for p in trunk.blocks[-2].parameters())
    pd = m.pixel_decoder
    assert (pd.post_quant.in_channels, pd.post_quant.out_channels, pd.upsample) == (32, 256, 16)
    sd = m.semantic_decoder
    assert (len(sd.blocks), sd.embed.out_features, sd.head[2].out_features) == (3, 1024, 1024)


def test_vit_encoder_inits_from_teacher_weights_and_freezes_its_tail(tmp_path):
    """tiny_vit: the paper's encoder structure (open_clip tower, penultimate state, frozen tail) on CPU."""
    from evotok.models.teacher import export_weights, load_teacher

    torch.manual_seed(0)
    teacher = load_teacher(load_config(None, ["teacher.random_init=true"]))
    path = export_weights(teacher, tmp_path / "teacher.pt")
    cfg = small_cfg("tiny_vit", 4, 16, f"model.encoder_weights={path}")
    m = build_tokenizer(cfg, teacher.width, teacher.token_grid)
    assert m.grid == tuple(teacher.token_grid) == (4, 4)
    for k, v in m.encoder.visual.state_dict().items():
        assert torch.equal(v, teacher.clip.visual.state_dict()[k]), k
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():  # the encoder's tokens are the teacher's penultimate tokens
        torch.testing.assert_close(m.encoder.tokens(x), teacher.image_features(x), rtol=1e-4, atol=1e-4)
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("encoder.visual.transformer.resblocks.3.", "encoder.visual.ln_post",
                                        "encoder.visual.proj")) for n in frozen), sorted(frozen)
    m.train()
    out = m(x)
    (F.mse_loss(out.recon, x) + out.quant.commit_loss + out.semantic.pow(2).mean()).backward()
    assert all(p.grad is not None for n, p in m.named_parameters() if p.requires_grad)
    with pytest.raises(FileNotFoundError, match="model.encoder_weights"):
        build_tokenizer(small_cfg("tiny_vit", 4, 16, f"model.encoder_weights={tmp_path / 'nope.pt'}"), 128, (4, 4))
