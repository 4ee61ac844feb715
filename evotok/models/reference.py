"""Facts about the paper's public reference code (VisionXLab/EvoTok), for the ``paper`` preset to be checked
against: parameter counts of each sub-module and where they come from.

The counts were taken by instantiating the reference's own classes (unmodified, torch 2.14.1, CPU; the SigLIP2
tower on the meta device) with the arguments of its paper run, ``evotok/scripts/train_evotok_siglip256.sh``
(``--vq-model EvoTok --vqgan-depth 4 --vqkd-depth 16 --image-size 256 --codebook-size 32768
--codebook-embed-dim 32 --teacher siglip_256``; everything else the argparse defaults of
``evotok/tokenizer/rq_train.py``). No torch import here.
"""

from __future__ import annotations

from typing import NamedTuple

REFERENCE_REPO = "VisionXLab/EvoTok"
REFERENCE_COMMIT = "147b1b2aaac32bb28c5eb246e2a4a04c3e80041c"


class ReferenceCount(NamedTuple):
    params: int  # parameters (trainable ones where ``trainable`` is given separately)
    trainable: int
    source: str  # the reference module(s), file:line at REFERENCE_COMMIT (paths under evotok/tokenizer/)


# Keys are this suite's sub-modules of the paper preset (see evotok.lit.tokenizer_module.submodule_counts).
PAPER_REFERENCE: dict[str, ReferenceCount] = {
    # HF SiglipVisionModel('google/siglip2-large-patch16-256'): embeddings 1,049,600 + 24 layers x 12,596,224 +
    # post_layernorm 2,048 + MAP head 12,595,200; frozen: the head, layer 23 and post_layernorm
    "encoder tower": ReferenceCount(315_956_224, 290_762_752, "encoder_vqkd, vq_model/evotok.py:117-124"),
    "encoder head": ReferenceCount(1_082_400, 1_082_400, "encode_task_layer Linear-Tanh-Linear, vq_model/evotok.py:132-136"),
    # pixel_model.Decoder(ch_mult=[1,1,2,2,4], z_channels=256) 42,449,795 + post_quant_conv Conv2d(32, 256, 1) 8,448
    "pixel decoder": ReferenceCount(42_458_243, 42_458_243, "post_quant_conv + decoder, vq_model/evotok.py:77-78, pixel_model.py:114-179"),
    # vqkd_model.VisionTransformer (depth 3, width 1024, 12 heads) 38,036,456 + decode_task_layer 2,099,200
    "semantic decoder": ReferenceCount(40_135_656, 40_135_656, "decoder_vqkd + decode_task_layer, vq_model/evotok.py:87-141, vqkd_model.py:267"),
    "discriminator": ReferenceCount(2_765_633, 2_765_633, "NLayerDiscriminator(ndf=64, n_layers=3), modules/discriminator_patchgan.py:8"),
    # 16 x nn.Embedding(32768 + 1, 32) (a zero padding row each); updated by EMA, not by gradients
    "quantizer codebooks": ReferenceCount(16 * 32_769 * 32, 0, "SharedResidualQuantizer, quantizer/shared_rq_quantizer.py:19-36, 178-184"),
}
