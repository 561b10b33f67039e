"""End to end on a tiny randomised transformers BLIP-2 (OPT): our arrays feed the torch model as they are, the
HF loss agrees with our masked NLL (so labels are aligned the HF/EasyEdit way), and the metrics agree with the
reference formulas written in torch (`topk(softmax(...))`, batch 1, unpadded) and with NumPy."""

import copy

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mmedit_jax import losses  # noqa: E402
from mmedit_jax.case import INPUT_NAMES  # noqa: E402
from mmedit_jax.data import cases as C  # noqa: E402
from mmedit_jax.data.mmedit import load_mmedit  # noqa: E402
from mmedit_jax.data.synthetic import write_synthetic_mmedit  # noqa: E402
from mmedit_jax.data.tokenizer import image_token_id, train_bpe_tokenizer  # noqa: E402
from mmedit_jax.eval import metrics  # noqa: E402

NQ, IMG = 4, 30


def _preprocess(path):
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB").resize((IMG, IMG), Image.BICUBIC), np.float32) / 255.0
    return (arr.transpose(2, 0, 1) - 0.5) / 0.25


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    paths = write_synthetic_mmedit(tmp_path_factory.mktemp("d"), "vqa", n_records=4, seed=3)
    records = load_mmedit(paths.json_path, "vqa", paths.image_root).records
    texts = [x.text for r in records for x in C.case_inputs(r, "vqa").values()] + [r.cond for r in records]
    tok = train_bpe_tokenizer(texts, vocab_size=320)
    config = transformers.Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                           image_size=IMG, patch_size=15),
        qformer_config=dict(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                            intermediate_size=37, encoder_hidden_size=32, max_position_embeddings=64,
                            cross_attention_frequency=1),
        text_config=dict(model_type="opt", vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                         ffn_dim=37, num_attention_heads=4, max_position_embeddings=128,
                         word_embed_proj_dim=32, pad_token_id=tok.pad_token_id,
                         bos_token_id=1, eos_token_id=1),
        num_query_tokens=NQ, image_token_index=image_token_id(tok))
    torch.manual_seed(0)
    pre = transformers.Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in pre.parameters():
            p.normal_(0, 0.3)
    post = copy.deepcopy(pre)
    with torch.no_grad():  # a "language-side edit": perturb the last OPT layer's fc2
        fc2 = post.language_model.model.decoder.layers[-1].fc2.weight
        fc2.add_(0.5 * torch.randn_like(fc2))

    table = C.ImageTable(_preprocess)
    cfg = C.CaseConfig("vqa", num_query_tokens=NQ, image_token_id=image_token_id(tok), buckets=(32, 48, 64))
    batch = C.build_edit_batch(records, tok, table, cfg)
    pixels = torch.from_numpy(table.stack())

    def run(model, sub):
        ids, mask = torch.from_numpy(sub.input_ids).long(), torch.from_numpy(sub.attention_mask).long()
        labels = torch.from_numpy(sub.labels).long()
        with torch.no_grad():
            if (sub.image_ids < 0).all():
                out = model.language_model(input_ids=ids, attention_mask=mask, labels=labels)
            else:
                out = model(input_ids=ids, attention_mask=mask, labels=labels,
                            pixel_values=pixels[torch.from_numpy(sub.image_ids).long()])
        return out.logits.float().numpy(), float(out.loss)

    outs = {name: {"pre": run(pre, batch.sub(name)), "post": run(post, batch.sub(name))}
            for name in INPUT_NAMES}
    return batch, outs, pre, pixels


def test_hf_loss_equals_masked_nll(setup):
    batch, outs, _, _ = setup
    for name in INPUT_NAMES:
        logits, hf_loss = outs[name]["post"]
        ours = float(losses.masked_nll(logits, batch.sub(name).labels))
        assert ours == pytest.approx(hf_loss, rel=1e-5), name


def test_padding_does_not_change_valid_logits(setup):
    batch, outs, pre, pixels = setup
    sub = batch.edit
    n = int(sub.attention_mask[1].sum())
    with torch.no_grad():
        alone = pre(input_ids=torch.from_numpy(sub.input_ids[1:2, :n]).long(),
                    pixel_values=pixels[int(sub.image_ids[1])][None]).logits.numpy()
    np.testing.assert_allclose(outs["edit"]["pre"][0][1, :n], alone[0], atol=1e-4)


def _reference_locality(pre_logits, post_logits, k):
    """MultimodalTrainer.edit_step's loc/acc and image_loc/acc for one unpadded sequence [1, S, V]."""
    pre_t, post_t = torch.from_numpy(pre_logits), torch.from_numpy(post_logits)
    post_top = torch.topk(torch.nn.functional.softmax(post_t, dim=-1), k=k, dim=-1).indices
    pre_top = torch.topk(torch.nn.functional.softmax(pre_t, dim=-1), k=k, dim=-1).indices
    return float(sum(post_top.view(-1) == pre_top.view(-1)) / post_top.view(-1).shape[0])


def test_metrics_match_reference_formulas(setup):
    batch, outs, _, _ = setup
    for name in ("loc", "loc_image"):
        pre_logits, post_logits = outs[name]["pre"][0], outs[name]["post"][0]
        mask = batch.sub(name).attention_mask
        k = 1 if name == "loc" else 10
        ours = np.asarray(metrics.text_locality(pre_logits, post_logits, mask) if k == 1
                          else metrics.image_locality(pre_logits, post_logits, mask))
        ref = []
        for i in range(len(mask)):
            n = mask[i].sum()
            ref.append(_reference_locality(pre_logits[i : i + 1, :n], post_logits[i : i + 1, :n], k))
        np.testing.assert_allclose(ours, ref, rtol=1e-6)
        assert 0 < np.mean(ours) < 1, (name, ours)  # the edit moved some but not all predictions
    for name in ("edit", "rephrase", "image_rephrase"):
        logits = outs[name]["post"][0]
        labels = batch.sub(name).labels
        acc, em = [], []
        for lg, lab in zip(logits, labels):
            t = np.nonzero(lab != -100)[0]
            hits = np.argmax(lg[t - 1], axis=-1) == lab[t]
            acc.append(hits.mean())
            em.append(float(hits.all()))
        np.testing.assert_allclose(metrics.token_accuracy(logits, labels), acc, rtol=1e-6)
        np.testing.assert_array_equal(metrics.exact_match(logits, labels), em)
