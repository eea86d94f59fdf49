"""Vision encoders: penultimate-block patches, one-pass embeddings, correct CLIP truncation."""
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from models.vision import load_vision_encoder

LONG = " ".join(["a red square next to a blue circle on a grey table"] * 20)  # far over 77 tokens


def images():
    return [Image.new("RGB", (40, 40), c) for c in ((255, 0, 0), (0, 0, 255), (10, 200, 10))]


def test_open_clip_patches_are_the_penultimate_block(tiny_clip_spec):
    enc = load_vision_encoder(tiny_clip_spec)
    px = enc.pixels(images())
    patches, embeds = enc.encode_images(px)
    v = enc.model.visual
    x = v.conv1(px).flatten(2).transpose(1, 2)                                   # [N, 16, 48]
    x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], 1) + v.positional_embedding
    x = v.ln_pre(x)
    for block in v.transformer.resblocks[:-1]:                                  # all but the last block
        x = block(x)
    assert patches.shape == (3, 16, 48) and enc.hidden_size == 48 and enc.n_patches == 16
    torch.testing.assert_close(patches, x[:, 1:])                              # CLS dropped, no final norm
    torch.testing.assert_close(embeds, F.normalize(enc.model.encode_image(px), dim=-1))


def test_open_clip_truncation_keeps_start_and_end(tiny_clip_spec):
    enc = load_vision_encoder(tiny_clip_spec)
    ids, mask = enc.tokenize([LONG, "a red square"])
    sot, eot = enc.tokenizer.sot_token_id, enc.tokenizer.eot_token_id
    assert ids.shape == (2, 77) and ids[0, 0] == sot and ids[0, -1] == eot and mask[0].all()
    assert ids[1, 0] == sot and int(mask[1].sum()) == 5 and ids[1, 4] == eot


def test_hf_clip_backend(hf_clip_dir):
    from transformers import CLIPModel

    enc = load_vision_encoder(f"hf-clip:{hf_clip_dir}")
    assert load_vision_encoder(hf_clip_dir).spec == enc.spec  # a local HF dir is recognised too
    px = enc.pixels(images())
    patches, embeds = enc.encode_images(px)
    ref = CLIPModel.from_pretrained(hf_clip_dir).eval()
    out = ref.vision_model(pixel_values=px, output_hidden_states=True)
    torch.testing.assert_close(patches, out.hidden_states[-2][:, 1:])
    torch.testing.assert_close(embeds, F.normalize(ref.visual_projection(out.pooler_output), dim=-1))
    assert enc.n_patches == patches.shape[1] == 16


def test_hf_clip_long_prompt_scores_as_its_truncated_form(hf_clip_dir):
    enc = load_vision_encoder(f"hf-clip:{hf_clip_dir}")
    tok = enc.text_tokenizer
    ids, mask = enc.tokenize([LONG])
    assert ids.shape[1] == 77 and ids[0, 0] == tok.bos_token_id and ids[0, -1] == tok.eos_token_id and mask.all()
    # the correctly truncated text: the first 75 content tokens between start and end
    content = tok(LONG, add_special_tokens=False)["input_ids"][:75]
    truncated = tok.decode(content)
    _, embeds = enc.encode_images(enc.pixels(images()[:1]))
    long_score = enc.image_text_similarity(embeds, [LONG])
    short_score = enc.image_text_similarity(embeds, [truncated])
    torch.testing.assert_close(long_score, short_score)
    # and the padding of a short prompt in the same batch does not change its score
    both = enc.encode_texts([LONG, "a red square"])
    torch.testing.assert_close(both[1], enc.encode_texts(["a red square"])[0], rtol=1e-5, atol=1e-6)


def test_open_clip_long_prompt_scores_as_its_truncated_form(tiny_clip_spec):
    enc = load_vision_encoder(tiny_clip_spec)
    ids, _ = enc.tokenize([LONG])
    _, embeds = enc.encode_images(enc.pixels(images()[:1]))
    text = enc.model.encode_text(ids, normalize=True)
    torch.testing.assert_close(enc.image_text_similarity(embeds, [LONG]), (embeds * text).sum(-1))


def test_bad_specs(tmp_path):
    with pytest.raises(ValueError, match="unknown vision encoder"):
        load_vision_encoder("NotAModel-XYZ")
    with pytest.raises(FileNotFoundError, match="directory not found"):
        load_vision_encoder(f"local-dir:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither"):
        load_vision_encoder(str(tmp_path / "empty"))


def test_frozen_and_eval(tiny_clip_spec):
    enc = load_vision_encoder(tiny_clip_spec)
    enc.train()
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
