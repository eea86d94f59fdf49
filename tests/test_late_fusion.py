"""The core model on every tiny architecture: exactness, reference computations, caches, checkpoints."""
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from models.checkpoints.weights import CheckpointMismatchError, load_trainable, save_trainable
from models.fusion.blocks import build_fusion_layer, positions_from_mask
from models.fusion.factory import load_late_fusion_model
from models.fusion.mixing import mix_logprobs
from models.tiny_models import ARCHS

N_V, D_CLIP = 5, 48


def make_model(lm_dir, seed=0, scale=1.0):
    torch.manual_seed(seed)
    model = load_late_fusion_model(lm_dir, vision_dim=D_CLIP)
    with torch.no_grad():  # make the visual path matter: random fusion weights barely move the residual
        for p in model.mm_proj.parameters():
            p.mul_(scale)
        if scale != 1.0:
            g = torch.Generator().manual_seed(seed)
            for p in model.fusion_layer.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def batch(seed=0, b=2, t=7, pad_left=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50000, (b, t), generator=g)
    mask = torch.ones_like(ids)
    if pad_left:
        mask[1, :3] = 0
    else:
        mask[1, t - 3:] = 0
    return ids, mask


@pytest.mark.parametrize("arch", ARCHS)
def test_no_images_is_exactly_the_base_lm(arch, lm_dirs):
    model = make_model(lm_dirs[arch])
    lm = AutoModelForCausalLM.from_pretrained(lm_dirs[arch]).eval()
    ids, mask = batch()
    ref = lm(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    assert torch.equal(model.text_logits(ids, mask)[valid], ref[valid])
    for patches in (None, torch.zeros(2, 0, N_V, D_CLIP)):
        got = model.mixed_logprobs(ids, mask, patches, None)
        assert torch.equal(got[valid], torch.log_softmax(ref.float(), -1)[valid])


def reference_fused_logits(model, ids, mask, patches):
    """Written out: LM hidden states -> projector -> one block over [V; H] -> frozen LM head."""
    hidden = model.lm.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    proj = model.mm_proj
    visual = F.linear(F.gelu(F.linear(patches, proj.linear1.weight, proj.linear1.bias)),
                      proj.linear2.weight, proj.linear2.bias)
    seq = torch.cat([visual, hidden], 1) * model.fusion_input_scale
    full_mask = torch.cat([torch.ones(ids.shape[0], patches.shape[1], dtype=mask.dtype), mask], 1)
    pos = torch.arange(seq.shape[1]).expand(ids.shape[0], -1)
    out = model.fusion_layer(inputs_embeds=seq, attention_mask=full_mask, position_ids=pos).last_hidden_state
    logits = model.lm.get_output_embeddings()(out[:, patches.shape[1]:])
    return logits


@pytest.mark.parametrize("arch", ARCHS)
def test_one_image_matches_reference(arch, lm_dirs):
    model = make_model(lm_dirs[arch], scale=5.0)
    ids, mask = batch()
    patches = torch.randn(2, N_V, D_CLIP, generator=torch.Generator().manual_seed(1))
    ref = reference_fused_logits(model, ids, mask, patches)
    valid = mask.bool()
    got = model(ids, mask, patches).logits
    torch.testing.assert_close(got[valid], ref[valid], rtol=1e-5, atol=1e-5)
    # through the inference path: k = 1, weight 1, logits mode -> log_softmax(L_img)
    mixed = model.mixed_logprobs(ids, mask, patches[:, None], torch.ones(2, 1))
    torch.testing.assert_close(mixed[valid], torch.log_softmax(ref, -1)[valid], rtol=1e-5, atol=1e-5)
    # the visual path matters
    assert not torch.allclose(got[valid], model.text_logits(ids, mask)[valid], atol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_logit_mixing_runs_the_head_once_and_equals_mixing_the_logits(arch, lm_dirs):
    """With a linear head, (1/k) sum s_i L_i + (1 - mean s) L0 is the head of the same mix of hidden states."""
    model = make_model(lm_dirs[arch], scale=5.0)
    ids, mask = batch()
    patches = torch.randn(2, 3, N_V, D_CLIP, generator=torch.Generator().manual_seed(3))
    weights = torch.tensor([[1.0, 0.5, 0.0], [0.2, 1.3, 0.7]])
    pos = torch.tensor([[3, 5], [1, 4]])
    hidden, _ = model.text_hidden(ids, mask)
    fused, _, _ = model.fuse(model.project(patches.flatten(0, 1)), hidden.repeat_interleave(3, 0),
                             mask.repeat_interleave(3, 0))
    sel = pos.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    l0 = model.lm_head(hidden.gather(1, sel))
    li = model.lm_head(fused.gather(1, sel.repeat_interleave(3, 0))).unflatten(0, (2, 3))
    calls = []
    head = model.lm.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    got = model.mixed_logprobs(ids, mask, patches, weights, "logits", positions=pos)
    handle.remove()
    assert model._linear_head and calls == [2]  # one head pass over the 2 texts, not 2 x (1 + k)
    torch.testing.assert_close(got, mix_logprobs(l0, li, weights, "logits"), rtol=1e-5, atol=1e-5)
    # probs mode, and a head that is not a plain Linear, keep mixing the k + 1 logits
    torch.testing.assert_close(model.mixed_logprobs(ids, mask, patches, weights, "probs", positions=pos),
                               mix_logprobs(l0, li, weights, "probs"), rtol=1e-5, atol=1e-5)
    model._linear_head = False
    torch.testing.assert_close(model.mixed_logprobs(ids, mask, patches, weights, "logits", positions=pos),
                               mix_logprobs(l0, li, weights, "logits"), rtol=1e-6, atol=1e-6)


def test_gemma_fusion_scales_inputs_by_sqrt_d(lm_dirs):
    model = make_model(lm_dirs["gemma"])
    assert model.fusion_input_scale == pytest.approx(32 ** 0.5)


def test_loss_is_next_token_cross_entropy_on_text_positions(lm_dirs):
    model = make_model(lm_dirs["llama"], scale=3.0)
    ids, mask = batch()
    labels = ids.masked_fill(mask == 0, -100)
    patches = torch.randn(2, N_V, D_CLIP)
    out = model(ids, mask, patches, labels=labels)
    assert out.logits is None  # the head ran on labelled positions only
    logits = model(ids, mask, patches).logits
    terms = [-torch.log_softmax(logits[b, t], -1)[ids[b, t + 1]]
             for b in range(2) for t in range(6) if labels[b, t + 1] != -100]
    assert out.loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)


def test_mixing_by_hand():
    l0 = torch.tensor([[1.0, 0.0, 0.0]])
    li = torch.tensor([[[0.0, 2.0, 0.0], [0.0, 0.0, 4.0]]])
    w = torch.tensor([[0.0, 1.0]])
    # logits: z = 0.5*(0*L1 + 1*L0) + 0.5*(1*L2 + 0*L0) = [0.5, 0, 2]
    z = torch.tensor([[0.5, 0.0, 2.0]])
    torch.testing.assert_close(mix_logprobs(l0, li, w, "logits"), torch.log_softmax(z, -1))
    # probs: p = 0.5*softmax(L0) + 0.5*softmax(L2)
    p = 0.5 * torch.softmax(l0, -1) + 0.5 * torch.softmax(li[:, 1], -1)
    torch.testing.assert_close(mix_logprobs(l0, li, w, "probs"), torch.log(p))
    # uniform weights 0.5: p = 0.5*0.5*(sm(L1)+sm(L2)) + 0.5*sm(L0)
    u = torch.full((1, 2), 0.5)
    p = 0.25 * (torch.softmax(li[:, 0], -1) + torch.softmax(li[:, 1], -1)) + 0.5 * torch.softmax(l0, -1)
    torch.testing.assert_close(mix_logprobs(l0, li, u, "probs"), torch.log(p))
    z = 0.5 * (0.5 * li[:, 0] + 0.5 * l0) + 0.5 * (0.5 * li[:, 1] + 0.5 * l0)
    torch.testing.assert_close(mix_logprobs(l0, li, u, "logits"), torch.log_softmax(z, -1))
    # weight 2 (tau=2, cos=1): logits extrapolate, probs clip to 1
    two = torch.full((1, 2), 2.0)
    z = 0.5 * (2 * li[:, 0] - l0) + 0.5 * (2 * li[:, 1] - l0)
    torch.testing.assert_close(mix_logprobs(l0, li, two, "logits"), torch.log_softmax(z, -1))
    p = 0.5 * (torch.softmax(li[:, 0], -1) + torch.softmax(li[:, 1], -1))
    torch.testing.assert_close(mix_logprobs(l0, li, two, "probs"), torch.log(p))
    # all weights 0 -> text only, in both modes
    for mode in ("logits", "probs"):
        torch.testing.assert_close(mix_logprobs(l0, li, torch.zeros(1, 2), mode), torch.log_softmax(l0, -1))
    with pytest.raises(ValueError, match="unknown mix mode"):
        mix_logprobs(l0, li, w, "average")


def test_clip_weights():
    from models.fusion.mixing import clip_weights
    cos = torch.tensor([[-0.3, 0.0, 0.25, 0.5]])
    torch.testing.assert_close(clip_weights(cos), torch.tensor([[0.0, 0.0, 0.5, 1.0]]))
    torch.testing.assert_close(clip_weights(cos, tau=1.0), torch.tensor([[0.0, 0.0, 0.25, 0.5]]))
    torch.testing.assert_close(clip_weights(cos, uniform=True), torch.full((1, 4), 0.5))


def greedy_from_scratch(model, ids, mask, patches, weights, mode, n):
    out = []
    for _ in range(n):
        pos = torch.full((ids.shape[0], 1), ids.shape[1] - 1)
        logp = model.mixed_logprobs(ids, mask, patches, weights, mode, positions=pos)[:, -1]
        nxt = logp.argmax(-1)
        out.append(nxt)
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(out, 1)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["logits", "probs"])
def test_cached_fused_generation_equals_recomputation(arch, mode, lm_dirs):
    model = make_model(lm_dirs[arch], scale=20.0)
    ids, mask = batch(pad_left=True)
    patches = torch.randn(2, 3, N_V, D_CLIP, generator=torch.Generator().manual_seed(2))
    weights = torch.tensor([[1.0, 0.5, 0.8], [0.9, 1.0, 0.7]])
    got = model.generate(ids, mask, patches, weights, mode, max_new_tokens=6)
    assert torch.equal(got, greedy_from_scratch(model, ids, mask, patches, weights, mode, 6))
    text_only = model.generate(ids, mask, None, None, mode, max_new_tokens=6)
    assert torch.equal(text_only, greedy_from_scratch(model, ids, mask, None, None, mode, 6))
    assert not torch.equal(got, text_only)


def test_generation_stops_at_eos_and_stop_callback(lm_dirs):
    model = make_model(lm_dirs["gpt2"])
    ids, mask = batch(pad_left=True)
    free = model.generate(ids, mask, max_new_tokens=4)
    first = int(free[0, 0])
    got = model.generate(ids, mask, max_new_tokens=4, eos_token_id=first, pad_token_id=-1)
    assert got[0, 0] == first and (got[0, 1:] == -1).all()
    got = model.generate(ids, mask, max_new_tokens=4, stop=lambda toks: len(toks) >= 2)
    assert got.shape[1] == 2


def test_cache_is_not_module_state(lm_dirs):
    model = make_model(lm_dirs["llama"], scale=5.0)
    ids, mask = batch(pad_left=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attrs = set(vars(model))
    model.generate(ids, mask, torch.randn(2, 2, N_V, D_CLIP), torch.ones(2, 2), max_new_tokens=3)
    assert set(vars(model)) == attrs
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("arch", ARCHS)
def test_released_layout_loads_with_and_without_module_prefix(arch, lm_dirs, tmp_path):
    src = make_model(lm_dirs[arch], seed=1, scale=4.0)
    ids, mask = batch()
    patches = torch.randn(2, 2, N_V, D_CLIP)
    w = torch.full((2, 2), 0.7)
    want = src.mixed_logprobs(ids, mask, patches, w)
    whole = src.state_dict()  # the released files hold the whole model, frozen LM included
    torch.save({"module." + k: v for k, v in whole.items()}, tmp_path / "ddp.bin")
    torch.save(whole, tmp_path / "plain.bin")
    for path in (tmp_path / "ddp.bin", tmp_path / "plain"):  # the second without its suffix
        dst = make_model(lm_dirs[arch], seed=2)
        load_trainable(dst, path)
        assert torch.equal(dst.mixed_logprobs(ids, mask, patches, w), want)


def test_mismatched_checkpoint_is_one_clear_error(lm_dirs, tmp_path):
    gpt2 = make_model(lm_dirs["gpt2"])
    torch.save(gpt2.state_dict(), tmp_path / "gpt2.bin")
    llama = make_model(lm_dirs["llama"])
    with pytest.raises(CheckpointMismatchError) as err:
        load_trainable(llama, tmp_path / "gpt2.bin")
    msg = str(err.value)
    assert "\n" not in msg and "missing" in msg and "unexpected" in msg and "GPT-2" in msg
    save_trainable(gpt2, tmp_path / "ours", base_model="tiny-gpt2", vision_encoder="x")
    with pytest.raises(CheckpointMismatchError, match="made for 'tiny-gpt2'"):
        load_trainable(llama, tmp_path / "ours")
    torch.save({"unrelated.weight": torch.zeros(1)}, tmp_path / "empty.bin")
    with pytest.raises(CheckpointMismatchError, match="no mm_proj/fusion_layer"):
        load_trainable(llama, tmp_path / "empty.bin")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_trainable(llama, tmp_path / "nothing-here")


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip(arch, lm_dirs, tmp_path):
    src = make_model(lm_dirs[arch], seed=3, scale=2.0)
    out = save_trainable(src, tmp_path / "ckpt", base_model=lm_dirs[arch], vision_encoder="tiny")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    dst = make_model(lm_dirs[arch], seed=4)
    cfg = load_trainable(dst, out)
    assert cfg["base_model"] == lm_dirs[arch] and cfg["vision_dim"] == D_CLIP
    for k, v in src.trainable_state_dict().items():
        assert torch.equal(v, dst.trainable_state_dict()[k])
    assert set(src.trainable_state_dict()) == {k for k in src.state_dict() if not k.startswith("lm.")}


@pytest.mark.parametrize("arch", ARCHS)
def test_only_projector_and_fusion_train(arch, lm_dirs):
    model = make_model(lm_dirs[arch])
    names = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"mm_proj", "fusion_layer"}
    model.train()
    assert not model.lm.training and all(not m.training for m in model.lm.modules())
    assert model.fusion_layer.training and model.mm_proj.training


def test_projector_width_follows_vlmig(lm_dirs):
    assert make_model(lm_dirs["gpt2"]).proj_hidden == 4 * 32
    assert make_model(lm_dirs["llama"]).proj_hidden == 32
    m = load_late_fusion_model(lm_dirs["gpt2"], vision_dim=D_CLIP, proj_hidden=7)
    assert m.mm_proj.linear1.out_features == 7


def test_llama3_8b_fusion_layer_has_no_vocab_embedding():
    from transformers import LlamaConfig
    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, pad_token_id=128001)
    with torch.device("meta"):
        layer, scale = build_fusion_layer(cfg)
    d, kv, ff = 4096, 1024, 14336
    one_block = 2 * d * d + 2 * d * kv + 3 * d * ff + 2 * d  # q,o + k,v + mlp + two norms
    assert sum(p.numel() for p in layer.parameters()) == one_block + d  # + the final norm
    assert all(128256 not in p.shape for p in layer.parameters())
    assert sorted({k.split(".")[0] for k in layer.state_dict()}) == ["layers", "norm"]


@pytest.mark.parametrize("arch,keys", [("gpt2", {"wpe", "h", "ln_f"}), ("llama", {"layers", "norm"}),
                                       ("gemma", {"layers", "norm"}), ("opt", {"decoder"})])
def test_fusion_key_layout_matches_released(arch, keys, lm_dirs):
    model = make_model(lm_dirs[arch])
    sd = model.fusion_layer.state_dict()
    assert {k.split(".")[0] for k in sd} == keys
    if arch == "opt":
        assert {k.split(".")[1] for k in sd} == {"embed_positions", "layers", "final_layer_norm"}
    assert all(".0." in k for k in sd if k.split(".")[0] in ("h", "layers") or ".layers." in k)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_lm_runs_once_per_text_whatever_k(k, lm_dirs):
    model = make_model(lm_dirs["qwen2"])
    calls = []
    model.lm.base_model.register_forward_hook(lambda *a: calls.append("lm"))
    model.fusion_layer.register_forward_hook(lambda *a: calls.append("fusion"))
    ids, mask = batch(b=3)
    model.mixed_logprobs(ids, mask, torch.randn(3, k, N_V, D_CLIP), torch.ones(3, k))
    assert calls == ["lm", "fusion"]


def test_positions_skip_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]


def test_real_smollm2_wraps(smollm2_path):
    from transformers import AutoTokenizer
    model = load_late_fusion_model(smollm2_path, vision_dim=D_CLIP)
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    assert model.model_type == "llama" and model.hidden_size == 576 and model.proj_hidden == 576
    enc = tok(["The sky is", "Grass is green and the sky is"], return_tensors="pt", padding=True)
    ref = model.lm(**enc).logits
    valid = enc["attention_mask"].bool()
    assert torch.equal(model.text_logits(enc["input_ids"], enc["attention_mask"])[valid], ref[valid])
    out = model.mixed_logprobs(enc["input_ids"], enc["attention_mask"], torch.randn(2, 2, N_V, D_CLIP),
                               torch.full((2, 2), 0.5))
    assert out.shape == (2, enc["input_ids"].shape[1], model.lm.config.vocab_size)
    assert torch.isfinite(out).all()


def test_missing_lm_dir_is_one_line_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot load language model") as err:
        load_late_fusion_model(str(tmp_path / "nope"), vision_dim=D_CLIP)
    assert "\n" not in str(err.value)


def test_hidden_state_memo_runs_the_lm_once_per_distinct_row(lm_dirs):
    from models.fusion.memo import HiddenStateMemo
    model = make_model(lm_dirs["llama"])
    memo = HiddenStateMemo()
    ids, mask = batch(b=2)
    calls = []
    model.lm.base_model.register_forward_hook(lambda *a: calls.append(1))
    direct = model.lm.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    calls.clear()
    first = memo(model, ids, mask)
    again = memo(model, ids.flip(0), mask.flip(0))  # same rows, other order: no LM pass
    valid = mask.bool()
    assert len(calls) == 1 and len(memo.rows) == 2
    torch.testing.assert_close(first[valid], direct[valid], rtol=1e-5, atol=1e-5)
    assert torch.equal(again, first.flip(0))
    memo.limit_bytes = 0
    memo(model, ids[:1], mask[:1])
    assert len(memo.rows) == 1  # evicted down to the rows in use


def test_legacy_torch_save_format_loads(lm_dirs, tmp_path):
    src = make_model(lm_dirs["gpt2"], seed=5, scale=2.0)
    torch.save(src.state_dict(), tmp_path / "old.bin", _use_new_zipfile_serialization=False)
    dst = make_model(lm_dirs["gpt2"], seed=6)
    load_trainable(dst, tmp_path / "old.bin")
    assert all(torch.equal(v, dst.trainable_state_dict()[k]) for k, v in src.trainable_state_dict().items())
