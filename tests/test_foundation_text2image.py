"""The text-to-image path on a tiny random Stable Diffusion built from configs (no download)."""

from __future__ import annotations

import json

import pytest
import torch

from fmfl_flwr.foundation import TextToImageSource, load_fm

transformers = pytest.importorskip("transformers")


def tiny_tokenizer(folder):
    """A character-level CLIP BPE vocabulary: enough to tokenize any lowercase prompt."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["<|startoftext|>", "<|endoftext|>", *letters, *(f"{c}</w>" for c in letters)]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                     model_max_length=77)


def tiny_stable_diffusion(tmp_path):
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
        norm_num_groups=2, attention_head_dim=2,
    )
    vae = AutoencoderKL(
        block_out_channels=(4, 8), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=2,
    )
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=16, intermediate_size=16,
        num_attention_heads=2, num_hidden_layers=1, vocab_size=64, max_position_embeddings=77,
    ))
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tiny_tokenizer(tok_dir), unet=unet,
        scheduler=DDIMScheduler(clip_sample=False), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def test_text_to_image_folder_gives_task_shaped_seeded_images(tmp_path):
    folder = tmp_path / "sd"
    tiny_stable_diffusion(tmp_path).save_pretrained(folder)
    source = load_fm(str(folder), "fashion-mnist", steps=2, batch_size=4, progress=False)
    assert isinstance(source, TextToImageSource)
    assert source.prompts()[0] == "a photo of a t-shirt"
    images, labels = source.generate(2, seed=3)
    assert images.shape == (20, 1, 28, 28) and 0 <= images.min() and images.max() <= 1
    assert labels.tolist() == [c for c in range(10) for _ in range(2)]
    source.batch_size = 20
    again, _ = source.generate(2, seed=3)
    assert torch.allclose(images, again, atol=1e-4)
    cifar = load_fm(str(folder), "cifar10", steps=2, progress=False)
    assert cifar.generate(1, seed=0)[0].shape == (10, 3, 32, 32)
    assert cifar.identity() != source.identity()
