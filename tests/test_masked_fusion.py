"""Late fusion around masked LMs (BERT, RoBERTa, DistilBERT, ALBERT): exactness, a written-out reference,
the released BERT key layout, clear errors, and the MLM masking."""
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForMaskedLM, AutoTokenizer

from data.masking import MLMMasker, batch_seed
from models.checkpoints.weights import CheckpointMismatchError, load_trainable
from models.fusion.factory import load_late_fusion_model
from models.fusion.kinds import model_kind
from models.fusion.masked import MaskedLateFusionLM
from models.fusion.mixing import mix_logprobs
from tests.zoo import boost_fusion
from tests.zoo_masked import MLM_ARCHS

pytestmark = pytest.mark.usefixtures("one_thread")
N_V, D_CLIP = 5, 48
TEXTS = ["Q: What is the color of a banana? A: It is [MASK].", "The [MASK] of the ocean is blue."]


def make_model(path, seed=0, boost=False) -> MaskedLateFusionLM:
    torch.manual_seed(seed)
    model = load_late_fusion_model(path, vision_dim=D_CLIP)
    return (boost_fusion(model, seed) if boost else model).eval()


def text_batch(path):
    """The two texts, right-padded, with the tokenizer's own mask token; and the mask positions."""
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok([t.replace("[MASK]", tok.mask_token) for t in TEXTS], padding=True, return_tensors="pt")
    where = enc["input_ids"] == tok.mask_token_id
    assert where.sum(1).tolist() == [1, 1] and enc["attention_mask"][1].sum() < enc["attention_mask"][0].sum()
    return enc["input_ids"], enc["attention_mask"], where


@pytest.mark.parametrize("arch", MLM_ARCHS)
def test_no_images_is_exactly_the_base_masked_lm(arch, mlm_dirs):
    model = make_model(mlm_dirs[arch])
    assert isinstance(model, MaskedLateFusionLM) and model.kind == "masked"
    lm = AutoModelForMaskedLM.from_pretrained(mlm_dirs[arch]).eval()
    ids, mask, at_mask = text_batch(mlm_dirs[arch])
    with torch.no_grad():
        ref = lm(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(model.text_logits(ids, mask)[at_mask], ref[at_mask])  # bit for bit, fp32
    for patches in (None, torch.zeros(2, 0, N_V, D_CLIP)):
        got = model.mixed_logprobs(ids, mask, patches, None)
        assert torch.equal(got[at_mask], torch.log_softmax(ref, -1)[at_mask])
    # at the mask positions only (the head runs on those rows alone: same values, other matmul shapes)
    positions = at_mask.float().argmax(1, keepdim=True)
    picked = model.mixed_logprobs(ids, mask, positions=positions)[:, 0]
    torch.testing.assert_close(picked, torch.log_softmax(ref, -1)[at_mask], rtol=0, atol=1e-5)


def reference_fused_logits(model, arch, ids, mask, patches):
    """Written out for BERT and RoBERTa: encoder states -> projector -> embeddings of the fusion block over
    [V; H] (positions from 0 for BERT, from pad id + 1 for RoBERTa; token type 0; LayerNorm) -> its one
    layer attending both ways, padded text masked -> the LM's own MLM head at the text positions."""
    lm, block = model.lm, model.fusion_layer
    hidden = lm.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    proj = model.mm_proj
    visual = F.linear(F.gelu(F.linear(patches, proj.linear1.weight, proj.linear1.bias)),
                      proj.linear2.weight, proj.linear2.bias)
    seq = torch.cat([visual, hidden], 1)
    n = seq.shape[1]
    first = {"bert": 0, "roberta": lm.config.pad_token_id + 1}[arch]
    emb = block.embeddings
    x = seq + emb.token_type_embeddings(torch.zeros(n, dtype=torch.long)) + \
        emb.position_embeddings(torch.arange(first, first + n))
    x = emb.LayerNorm(x)
    full_mask = torch.cat([torch.ones(ids.shape[0], N_V, dtype=mask.dtype), mask], 1)
    additive = (1.0 - full_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    x = block.encoder(x, attention_mask=additive).last_hidden_state
    head = {"bert": lambda h: lm.cls(h), "roberta": lambda h: lm.lm_head(h)}[arch]
    return head(x[:, N_V:])


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_one_image_matches_reference(arch, mlm_dirs):
    model = make_model(mlm_dirs[arch], boost=True)
    ids, mask, at_mask = text_batch(mlm_dirs[arch])
    patches = torch.randn(2, N_V, D_CLIP, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = reference_fused_logits(model, arch, ids, mask, patches)
        got = model(ids, mask, patches).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], ref[valid], rtol=1e-5, atol=1e-5)
    # through the inference path: k = 1, weight 1, logits mode -> log_softmax(L_img)
    mixed = model.mixed_logprobs(ids, mask, patches[:, None], torch.ones(2, 1))
    torch.testing.assert_close(mixed[valid], torch.log_softmax(ref, -1)[valid], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[at_mask], model.text_logits(ids, mask)[at_mask], atol=1e-3)  # images matter


@pytest.mark.parametrize("mode", ["logits", "probs"])
def test_k_images_mix_each_fused_prediction_and_run_the_encoder_once(mode, mlm_dirs):
    model = make_model(mlm_dirs["bert"], boost=True)
    ids, mask, at_mask = text_batch(mlm_dirs["bert"])
    patches = torch.randn(2, 3, N_V, D_CLIP, generator=torch.Generator().manual_seed(2))
    weights = torch.tensor([[0.2, 0.9, 1.4], [0.5, 0.0, 0.7]])
    model.calls.update(lm=0, fusion=0)
    got = model.mixed_logprobs(ids, mask, patches, weights, mode)
    assert model.calls == {"lm": 1, "fusion": 1, "prefix": 0}  # one encoder pass per text; the 2 x 3 images in one batch; no prefix cache
    with torch.no_grad():
        each = torch.stack([model(ids, mask, patches[:, i]).logits for i in range(3)], 1)
    expected = mix_logprobs(model.text_logits(ids, mask), each, weights, mode)
    torch.testing.assert_close(got[at_mask], expected[at_mask], rtol=1e-5, atol=1e-5)


def test_loss_is_cross_entropy_at_the_masked_positions(mlm_dirs):
    model = make_model(mlm_dirs["bert"], boost=True)
    ids, mask, at_mask = text_batch(mlm_dirs["bert"])
    labels = torch.full_like(ids, -100)
    labels[0, 3], labels[1, 2] = ids[0, 3], 7
    patches = torch.randn(2, N_V, D_CLIP)
    out = model(ids, mask, patches, labels=labels)
    assert out.logits is None  # the head ran on the labelled positions only
    logits = model(ids, mask, patches).logits
    terms = [-torch.log_softmax(logits[0, 3], -1)[ids[0, 3]], -torch.log_softmax(logits[1, 2], -1)[7]]  # no shift
    assert out.loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)


RELEASED_BERT_LAYER = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                       "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm"]
RELEASED_BERT_FUSION_KEYS = (
    {f"fusion_layer.embeddings.{m}.weight" for m in ("position_embeddings", "token_type_embeddings", "LayerNorm")}
    | {"fusion_layer.embeddings.LayerNorm.bias"}
    | {f"fusion_layer.encoder.layer.0.{m}.{p}" for m in RELEASED_BERT_LAYER for p in ("weight", "bias")}
    | {f"mm_proj.linear{i}.{p}" for i in (1, 2) for p in ("weight", "bias")})


def test_bert_fusion_block_has_the_released_layout(mlm_dirs):
    model = make_model(mlm_dirs["bert"])
    state = model.trainable_state_dict()
    assert set(state) == RELEASED_BERT_FUSION_KEYS  # no word embeddings, no pooler
    d, cfg = model.hidden_size, model.lm.config
    assert model.proj_hidden == 4 * d  # the release's BERT projector width
    assert tuple(state["mm_proj.linear1.weight"].shape) == (4 * d, D_CLIP)
    assert tuple(state["fusion_layer.embeddings.position_embeddings.weight"].shape) == (cfg.max_position_embeddings, d)
    assert tuple(state["fusion_layer.embeddings.token_type_embeddings.weight"].shape) == (cfg.type_vocab_size, d)


def released_bert_state(model) -> dict:
    """The first release's whole-model BERT state dict: bert.*, cls.*, the CLIP tower, mm_proj.*, fusion_layer.*."""
    state = {k: v.clone() for k, v in model.lm.state_dict().items()}  # bert.*, cls.*
    assert {k.split(".")[0] for k in state} == {"bert", "cls"}
    state["mm_model.vision_model.embeddings.patch_embedding.weight"] = torch.randn(8, 3, 4, 4)
    state["mm_model.vision_model.post_layernorm.weight"] = torch.ones(8)
    state.update({k: v.clone() for k, v in model.trainable_state_dict().items()})
    return state


@pytest.mark.parametrize("prefix", ["", "module."])
def test_released_bert_checkpoint_loads_strictly_and_reproduces(prefix, mlm_dirs, tmp_path):
    trained = make_model(mlm_dirs["bert"], seed=3, boost=True)
    path = tmp_path / "ft_wiki_laion_220_2.bin"
    torch.save({prefix + k: v for k, v in released_bert_state(trained).items()}, path)
    fresh = make_model(mlm_dirs["bert"], seed=4)
    ids, mask, at_mask = text_batch(mlm_dirs["bert"])
    patches = torch.randn(2, 2, N_V, D_CLIP, generator=torch.Generator().manual_seed(5))
    weights = torch.tensor([[0.5, 1.0], [1.5, 0.3]])
    before = fresh.mixed_logprobs(ids, mask, patches, weights)
    load_trainable(fresh, tmp_path / "ft_wiki_laion_220_2")  # the suffix is optional
    expected = trained.mixed_logprobs(ids, mask, patches, weights)
    assert torch.equal(fresh.mixed_logprobs(ids, mask, patches, weights), expected)
    assert not torch.allclose(before[at_mask], expected[at_mask])


def test_a_checkpoint_for_another_model_is_a_clear_error(mlm_dirs, lm_dirs, tmp_path):
    bert = make_model(mlm_dirs["bert"])
    gpt2 = load_late_fusion_model(lm_dirs["gpt2"], vision_dim=D_CLIP)
    torch.save({f"module.{k}": v for k, v in gpt2.state_dict().items()}, tmp_path / "gpt2.bin")
    with pytest.raises(CheckpointMismatchError, match=r"does not match this bert model.*GPT-2"):
        load_trainable(bert, tmp_path / "gpt2.bin")
    roberta = make_model(mlm_dirs["roberta"])  # the same keys, other widths (projector, positions)
    torch.save(released_bert_state(bert), tmp_path / "bert.bin")
    with pytest.raises(CheckpointMismatchError, match=r"does not match this roberta model.*shape mismatch"):
        load_trainable(roberta, tmp_path / "bert.bin")
    torch.save({k: v for k, v in released_bert_state(bert).items() if not k.startswith("fusion_layer.")},
               tmp_path / "no_fusion.bin")
    with pytest.raises(CheckpointMismatchError, match=r"missing \d+ keys"):
        load_trainable(bert, tmp_path / "no_fusion.bin")


def test_model_kind():
    import transformers as tf

    assert model_kind(tf.GPT2Config()) == "causal"
    assert model_kind(tf.LlamaConfig(architectures=["LlamaForCausalLM"])) == "causal"
    assert model_kind(tf.BertConfig()) == "masked"
    assert model_kind(tf.BertConfig(architectures=["BertForMaskedLM"])) == "masked"
    assert model_kind(tf.BertConfig(architectures=["BertForPreTraining"])) == "masked"
    assert model_kind(tf.BertConfig(is_decoder=True)) == "causal"  # BertLMHeadModel
    assert model_kind(tf.BertConfig(architectures=["BertLMHeadModel"])) == "causal"
    assert model_kind(tf.DistilBertConfig()) == "masked"
    assert model_kind(tf.GPT2Config(architectures=["MyRemoteCodeForCausalLM"])) == "causal"
    assert model_kind(tf.GPT2Config(architectures=["GPT2Model"])) == "causal"  # its head: the causal side's concern
    for config, what in ((tf.BertConfig(architectures=["BertModel"]), "'bert' (BertModel)"),
                         (tf.RobertaConfig(architectures=["RobertaForSequenceClassification"]), "'roberta'"),
                         (tf.T5Config(), "encoder-decoder"), (tf.BartConfig(), "encoder-decoder")):
        with pytest.raises(ValueError, match="AutoModelForMaskedLM: BERT, RoBERTa") as err:
            model_kind(config)
        assert what in str(err.value)


def test_unsupported_models_get_one_clear_error(tmp_path, wordpiece_dir):
    import transformers as tf

    encoder = tmp_path / "bert-encoder"  # saved without its MLM head
    tf.BertModel(tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                               intermediate_size=64)).save_pretrained(encoder)
    with pytest.raises(ValueError, match=r"'bert' \(BertModel\) is neither a causal LM nor a masked LM"):
        load_late_fusion_model(str(encoder), vision_dim=D_CLIP)
    t5 = tmp_path / "t5"
    tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=64, d_model=32, d_ff=64, num_layers=1, num_heads=4,
                                              d_kv=8)).save_pretrained(t5)
    with pytest.raises(ValueError, match="encoder-decoder model"):
        load_late_fusion_model(str(t5), vision_dim=D_CLIP)
    # an ELECTRA discriminator is a masked-LM type saved as ...ForPreTraining, but holds no MLM head
    electra = tmp_path / "electra-discriminator"
    tf.ElectraForPreTraining(tf.ElectraConfig(vocab_size=64, embedding_size=16, hidden_size=32, num_hidden_layers=1,
                                              num_attention_heads=4, intermediate_size=64)).save_pretrained(electra)
    with pytest.raises(ValueError, match="its checkpoint has no MLM head weights"):
        load_late_fusion_model(str(electra), vision_dim=D_CLIP)


def test_masked_lm_does_not_generate(mlm_dirs):
    model = make_model(mlm_dirs["bert"])
    ids, mask, _ = text_batch(mlm_dirs["bert"])
    with pytest.raises(ValueError, match="needs a causal LM"):
        model.generate(ids, mask)


def test_albert_fusion_block_reads_states_at_the_encoder_width(mlm_dirs):
    """ALBERT's token embeddings are narrower (16) than its encoder (32); [V; H] enters at 32."""
    model = make_model(mlm_dirs["albert"], boost=True)
    assert model.fusion_layer.config.embedding_size == model.hidden_size == 32
    ids, mask, at_mask = text_batch(mlm_dirs["albert"])
    fused = model.mixed_logprobs(ids, mask, torch.randn(2, 1, N_V, D_CLIP), torch.ones(2, 1))
    assert torch.isfinite(fused).all() and not torch.allclose(fused, model.mixed_logprobs(ids, mask))


# ----------------------------------------------------------------------------- MLM masking

def test_masking_never_touches_special_padding_or_context_tokens(wordpiece_dir):
    tok = AutoTokenizer.from_pretrained(wordpiece_dir)
    long = "a red apple and a green pear lie on a wooden table next to the window of the small kitchen"
    enc = tok([long] * 300 + ["blue"] * 100, padding=True, return_tensors="pt")
    ids, attn = enc["input_ids"], enc["attention_mask"]
    labels = ids.masked_fill(attn == 0, -100)
    labels[:50, :3] = -100  # a context prompt: never masked
    masker = MLMMasker(tok, 0.15)
    masked, mlm_labels = masker(ids, labels, seed=batch_seed(0, 0, 1, 0))
    chosen = mlm_labels != -100
    special = torch.isin(ids, torch.tensor(tok.all_special_ids))
    assert not (chosen & (special | (attn == 0))).any() and not chosen[:50, :3].any()
    assert torch.equal(mlm_labels[chosen], ids[chosen]) and torch.equal(masked[~chosen], ids[~chosen])
    maskable = (labels != -100) & ~special
    share = chosen[:300].sum().item() / maskable[:300].sum().item()
    assert 0.13 < share < 0.17
    assert (chosen[300:].sum(1) == 1).all()  # a one-word caption always gets its word chosen
    n = chosen.sum().item()
    as_mask = (masked[chosen] == tok.mask_token_id).sum().item() / n
    unchanged = (masked[chosen] == ids[chosen]).sum().item() / n
    assert 0.75 < as_mask < 0.85 and 0.06 < unchanged < 0.14  # 80% mask, 10% kept (10% random)
    # the same seed masks the same way; another batch index another way
    assert torch.equal(masker(ids, labels, seed=batch_seed(0, 0, 1, 0))[0], masked)
    assert not torch.equal(masker(ids, labels, seed=batch_seed(0, 0, 2, 0))[0], masked)


def test_masker_needs_a_mask_token_and_a_probability(gpt2_tokenizer, wordpiece_dir):
    with pytest.raises(ValueError, match="no mask token"):
        MLMMasker(gpt2_tokenizer)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        MLMMasker(AutoTokenizer.from_pretrained(wordpiece_dir), 1.0)


def test_seed_per_batch_is_stable():
    assert batch_seed(42, 0, 3, 1) == batch_seed(42, 0, 3, 1)
    assert len({batch_seed(42, e, b, r) for e in range(3) for b in range(5) for r in range(2)}) == 30

