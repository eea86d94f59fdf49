"""train.py on a masked LM (tiny BERT): the MLM objective overfits a few captions, resumes exactly and
touches no frozen weight; bad input is one line."""
import pytest

import train
from models.checkpoints.weights import load_trainable, read_checkpoint_config
from models.fusion.factory import load_late_fusion_model
from tests.test_train import assert_same_weights, flags, make_vg_dir, trainable
from tests.zoo import reset_accelerate
from tests.zoo_masked import save_tiny_mlm

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")


@pytest.fixture(scope="module")
def vg_dir(tmp_path_factory):
    return make_vg_dir(tmp_path_factory.mktemp("vg") / "vg")


@pytest.fixture(scope="module")
def fit_bert(tmp_path_factory, wordpiece_dir):
    """A tiny BERT whose frozen MLM head has a realistic logit scale (initializer_range 0.2, d=64); the
    d=32 zoo models' 0.02-scale head cannot reach confident predictions whatever the fusion block does."""
    return save_tiny_mlm(tmp_path_factory.mktemp("fit-bert"), "bert", wordpiece_dir, d=64, init=0.2)


def test_mlm_overfits_a_few_captions_and_touches_no_frozen_weight(tmp_path, fit_bert, tiny_clip_spec, vg_dir):
    out = tmp_path / "out"
    # 4 captions in one batch, masked anew at every step (half their tokens, so that few steps see a lot)
    result = train.main(flags(out, fit_bert, tiny_clip_spec, vg_dir, max_train_samples=4,
                              per_device_train_batch_size=4, max_train_steps=120, learning_rate=3e-3,
                              lr_scheduler_type="constant", mlm_probability=0.5, run_name="fit"))
    losses = result["losses"]
    assert len(losses) == 120 and result["completed_steps"] == 120
    assert sum(losses[-10:]) <= 0.55 * sum(losses[:10]), losses  # about 8.0 -> 3.5 (ln 3000 = 8.0)
    config = read_checkpoint_config(out / "fit_119")
    assert config["model_type"] == "bert" and config["proj_hidden"] == 4 * 64
    assert config["run_args"]["mlm_probability"] == 0.5

    model = result["model"]
    assert model.kind == "masked" and not model.lm.training and model.fusion_layer.training
    fresh = load_late_fusion_model(fit_bert, vision_dim=48)
    assert_same_weights(fresh.lm.state_dict(), model.lm.state_dict())  # the frozen BERT and its head untouched
    load_trainable(fresh, out / "fit_119")
    assert_same_weights(trainable(fresh), trainable(model))


def test_mlm_resume_after_interruption_is_exact(tmp_path, wordpiece_dir, tiny_clip_spec, vg_dir):
    """Dropout on (BERT's fusion block), shuffled data, accumulation 2 over 4 batches per epoch: a crash at
    step 7 resumes from checkpoint-5 (mid-epoch) with the same masks, losses and final weights."""
    lm = save_tiny_mlm(tmp_path / "bert", "bert", wordpiece_dir)
    common = dict(max_train_samples=8, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                  max_train_steps=10, learning_rate=3e-3, num_warmup_steps=2, shuffle_data=True,
                  checkpointing_steps=5, mlm_probability=0.3)
    full = train.main(flags(tmp_path / "full", lm, tiny_clip_spec, vg_dir, **common))
    assert full["completed_steps"] == 10

    class Crash(Exception):
        pass

    def crash_at_7(step):
        if step == 7:
            raise Crash

    out = tmp_path / "resumed"
    with pytest.raises(Crash):
        train.main(flags(out, lm, tiny_clip_spec, vg_dir, **common), step_callback=crash_at_7)
    reset_accelerate()
    resumed = train.main(flags(out, lm, tiny_clip_spec, vg_dir, resume_from_checkpoint="latest", **common))
    assert resumed["completed_steps"] == 10
    assert resumed["losses"] == full["losses"][5:]
    assert_same_weights(trainable(resumed["model"]), trainable(full["model"]))


def test_mlm_probability_must_be_a_probability(capsys):
    for bad in ("0", "1.5"):
        with pytest.raises(SystemExit) as exc:
            train.parse_args(["--output_dir", "o", "--model_name_or_path", "m", "--mlm_probability", bad])
        assert exc.value.code == 2
    assert train.parse_args(["--output_dir", "o", "--model_name_or_path", "m"]).mlm_probability == 0.15


def test_an_encoder_without_mlm_head_is_one_line_and_writes_nothing(tmp_path, wordpiece_dir, tiny_clip_spec, vg_dir,
                                                                   capsys):
    import transformers as tf

    encoder = tmp_path / "encoder"
    tf.BertModel(tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                               intermediate_size=64)).save_pretrained(encoder)
    tf.AutoTokenizer.from_pretrained(wordpiece_dir).save_pretrained(encoder)
    out = tmp_path / "out"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        train.main(flags(out, str(encoder), tiny_clip_spec, vg_dir, max_train_steps=1))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "AutoModelForMaskedLM" in err[0], err
    assert not out.exists()
