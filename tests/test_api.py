"""evotok.api: encode an image folder to codes, decode codes to a folder, export / reload safetensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from evotok.api import (
    TokenizerLoadError, decode_to_folder, encode_folder, export_safetensors, load_image, load_safetensors,
    load_tokenizer,
)
from evotok.config import load_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from evotok.lit.train import train

    tmp = tmp_path_factory.mktemp("api")
    cfg = load_config("tokenizer/entangled_tiny", [
        f"run.dir={tmp / 'runs'}", "run.name=api", "teacher.run=", "teacher.random_init=true", f"data.cache_dir={tmp / 'cache'}",
        "data.train_size=64", "data.val_size=16", "data.test_size=16", "data.batch_size=16",
        "model.quantizer.codebook_size=32", "trainer.max_steps=3", "trainer.val_every_n_steps=3",
        "trainer.progress_bar=false", "trainer.image_log_every_n_steps=0", "trainer.threads=1",
    ])
    return train(cfg, "tokenizer")


@pytest.fixture
def images_dir(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"im{i}.png")
    Image.fromarray(rng.integers(0, 256, (40, 64, 3), dtype=np.uint8)).save(d / "sub" / "wide.jpg")  # resized + cropped
    return d


def test_encode_folder_then_decode_to_folder(run, images_dir, tmp_path):
    npz = encode_folder(run.path, images_dir, tmp_path / "codes.npz")
    data = np.load(npz)
    assert data["codes"].shape == (4, 8, 8, 4) and data["codes"].dtype == np.int32
    assert list(data["names"]) == ["im0.png", "im1.png", "im2.png", "sub/wide.jpg"]
    assert (int(data["lpix"]), int(data["lsem"]), str(data["preset"]), int(data["resolution"])) == (4, 4, "tiny", 32)
    model = load_tokenizer(run.path)
    x = torch.stack([load_image(images_dir / n, 32) for n in data["names"]])
    with torch.no_grad():
        assert np.array_equal(model.encode(x).numpy(), data["codes"])
        expect = model.decode_pixels(torch.from_numpy(data["codes"]).long(), 2).clamp(0, 1)
    assert decode_to_folder(run.path, npz, 2, tmp_path / "out") == tmp_path / "out"
    out = sorted((tmp_path / "out").rglob("*.png"))
    assert [p.relative_to(tmp_path / "out").as_posix() for p in out] == ["im0.png", "im1.png", "im2.png", "sub/wide.png"]
    got = torch.from_numpy(np.asarray(Image.open(out[0]), dtype=np.float32) / 255.0).permute(2, 0, 1)
    assert (got - expect[0]).abs().max() <= 1 / 255 + 1e-6
    assert len(list(decode_to_folder(run.path, npz, None, tmp_path / "out_lpix").rglob("*.png"))) == 4


def test_export_safetensors_round_trip(run, tmp_path):
    path = export_safetensors(run.path, tmp_path / "tok.safetensors")
    a, b = load_tokenizer(run.path), load_safetensors(path)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(a.encode(x), b.encode(x))
        assert torch.equal(a.decode_semantic(a.encode(x)), b.decode_semantic(a.encode(x)))
    assert (b.lpix, b.lsem) == (4, 4)


def test_not_a_tokenizer_checkpoint(tmp_path):
    ckpt = tmp_path / "x.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}}, ckpt)
    with pytest.raises(TokenizerLoadError, match="not a tokenizer checkpoint"):
        load_tokenizer(ckpt)


def test_encode_follows_the_data_layers_bad_file_policy(run, images_dir, tmp_path, capsys):
    from evotok.cli import main

    (images_dir / "broken.png").write_bytes(b"this is not a png")
    (images_dir / "notes.txt").write_text("not an image, not an image suffix either")
    with pytest.warns(UserWarning, match="broken.png"):
        npz = encode_folder(run.path, images_dir, tmp_path / "codes.npz")
    data = np.load(npz)
    assert list(data["names"]) == ["im0.png", "im1.png", "im2.png", "sub/wide.jpg"]  # names stay aligned with codes
    assert data["codes"].shape[0] == 4 and [p.rsplit("/", 1)[-1] for p in data["skipped"]] == ["broken.png"]
    # data.on_bad_file=error: one line naming the file, no traceback
    assert main(["encode", "--run", str(run.path), "--images", str(images_dir), "--out", str(tmp_path / "c.npz"),
                 "data.on_bad_file=error"]) == 1
    err = capsys.readouterr().err
    assert "broken.png" in err and "data.on_bad_file" in err and "Traceback" not in err


def test_a_run_path_that_is_not_a_checkpoint_gets_one_line(tmp_path, capsys):
    from evotok.cli import main

    for name, data in (("notes.txt", b"hello"), ("weights.ckpt", b"\x00\x01 garbage")):
        (tmp_path / name).write_bytes(data)
        assert main(["export", "--run", str(tmp_path / name), "--out", str(tmp_path / "o.safetensors")]) == 1
        err = capsys.readouterr().err.strip()
        assert name in err and "is not a checkpoint file" in err and "Traceback" not in err and len(err.splitlines()) == 1
