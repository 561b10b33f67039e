"""IKE (`editors/ike.py`): EasyEdit's bank, query and prompt strings, retrieval against numpy, the position check,
the in-context forward against the base model on the joined input, vmap over cases, and a harness run."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmedit_jax import pipeline
from mmedit_jax.case import METRICS, Seq, take
from mmedit_jax.data.mmedit import MMEditRecord
from mmedit_jax.editors import ike
from mmedit_jax.eval import harness
from mmedit_jax.forward import Blip2Fns


def record(i=0, **kw):
    base = dict(index=i, src=f"What color is shape {i}?", pred="red", alt=f"blue{i}", rephrase=f"Which colour has {i}?",
                image="a.png", image_rephrase="b.png", loc=f"nq question: who wrote book {i}", loc_ans=f"author{i}",
                m_loc="c.png", m_loc_q="What is shown?", m_loc_a="a cat")
    return MMEditRecord(**{**base, **kw})


def test_bank_and_query_strings_follow_easyedit():
    r = record(3)
    p = "Question: What color is shape 3? Short answer:"
    fact = f"New Fact: {p} blue3\n"
    assert ike.bank_sentences([r], "vqa") == [
        fact + f"Prompt: {p} blue3\n\n",
        fact + "Prompt: Question: Which colour has 3? Short answer: blue3\n\n",
        fact + "Prompt: nq question: who wrote book 3 author3\n\n",
    ]
    assert ike.query_sentence(r, "vqa") == fact + f"Prompt: {p} blue3\n\n"
    # E-IC prompts are never templated.
    cap = record(1, src="a photo of", rephrase="an image of", alt="a dog on grass")
    assert ike.bank_sentences([cap], "caption")[1] == ("New Fact: a photo of a dog on grass\nPrompt: an image of "
                                                        "a dog on grass\n\n")


def test_prompt_is_easyedits_text():
    """context + input text == `''.join(icl_examples) + f'New Fact: {prompt} {target}\\nPrompt: {x}'` + ' ' +
    target (`icl_multimodal_lm_eval` / `prepare_multimodal_edit`), for the rewrite and the locality inputs."""
    r = record(2)
    demos = ["New Fact: a b\nPrompt: a b\n\n", "New Fact: c d\nPrompt: e d\n\n", ike.query_sentence(r, "vqa")]
    ctx = ike.context_string(demos, r, "vqa")
    p, t = "Question: What color is shape 2? Short answer:", "blue2"
    easyedit = lambda x, target: "".join(demos) + f"New Fact: {p} {t}\nPrompt: {x}" + " " + target  # noqa: E731
    from mmedit_jax.data.cases import case_inputs

    inputs = case_inputs(r, "vqa")
    assert ctx + inputs["edit"].text == easyedit(p, t)
    assert ctx + inputs["rephrase"].text == easyedit("Question: Which colour has 2? Short answer:", t)
    assert ctx + inputs["loc"].text == easyedit(r.loc, r.loc_ans)


def test_retrieval_matches_numpy_topk():
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(50, 16)).astype(np.float32) * rng.uniform(0.1, 5, size=(50, 1)).astype(np.float32)
    queries = rng.normal(size=(7, 16)).astype(np.float32)
    scores, ids = ike.retrieve(ike.normalize(jnp.asarray(bank)), jnp.asarray(queries), 5)
    b = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    want = np.argsort(-(q @ b.T), axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(np.asarray(ids), want)
    np.testing.assert_allclose(np.asarray(scores), np.take_along_axis(q @ b.T, want, 1), rtol=1e-5, atol=1e-6)
    assert ike.retrieve(ike.normalize(jnp.asarray(bank)), jnp.asarray(queries), 0)[1].shape == (7, 0)


def test_tfidf_ranks_shared_tokens_first(demo_world):
    tok, records = demo_world.tok, demo_world.records
    embed = ike.tfidf_embedder(tok, ike.bank_sentences(records, "vqa"))
    bank = ike.build_bank(records, "vqa", embed)
    _, top = ike.retrieve(bank.embeddings, jnp.asarray(embed([ike.query_sentence(records[2], "vqa")])), 3)
    assert int(top[0, 0]) == 6  # record 2's own copy sentence is the identical string


@pytest.fixture(scope="module")
def setup(demo_world):
    model, tok, records = demo_world.model, demo_world.tok, demo_world.records
    editor = pipeline.build_ike(model, tok, "vqa", records, {"k": 2}, log=lambda m: None)
    cases = pipeline.editor_cases(editor, model.params, demo_world.prepared)
    return model, tok, records, editor, cases


def test_seam_tokenisation(setup):
    """The context's ids then the input's decode to EasyEdit's joined string; a byte-level BPE tokenising the joined
    string differs only at the seam, where it merges the context's last space into the input's first word."""
    model, tok, records, editor, cases = setup
    nq = model.config.num_query_tokens
    for i, r in enumerate(records[:3]):
        ctx = np.asarray(cases.context_ids[i])[np.asarray(cases.context_mask[i]) > 0].tolist()
        seq = cases.edit
        text_ids = np.asarray(seq.input_ids[i])[nq:][np.asarray(seq.attention_mask[i])[nq:] > 0].tolist()
        joined = tok.decode(ctx) + tok.decode(text_ids)
        assert tok.decode(ctx + text_ids) == joined
        assert joined.startswith("New Fact: ") and joined.endswith(" " + r.alt)
        assert ctx == tok(joined[: len(tok.decode(ctx))], add_special_tokens=False)["input_ids"]
        want = tok(joined, add_special_tokens=False)["input_ids"]
        ctx_text = tok.decode(ctx)
        assert ctx_text.endswith("Prompt: ")
        assert want == (tok(ctx_text[:-1], add_special_tokens=False)["input_ids"]
                        + tok(" " + tok.decode(text_ids), add_special_tokens=False)["input_ids"])


def test_context_length_is_checked(demo_world):
    tok, records = demo_world.tok, demo_world.records[:2]
    embed = ike.tfidf_embedder(tok, ike.bank_sentences(demo_world.records, "vqa"))
    bank = ike.build_bank(demo_world.records, "vqa", embed)
    cfg = ike.IKEConfig(k=5)
    ids, mask, report, texts = ike.make_contexts(records, "vqa", tok, bank, embed, cfg, [10_000, 10_000], 10_000)
    assert report.kept.tolist() == [5, 5] and report.truncated == 0
    n_full = int(mask[0].sum())
    # A budget that holds the own demo and two retrieved ones: the three least similar go, and it is counted.
    demos = [s + "\n\n" for s in texts[0].split("\n\n")[:5]]  # the retrieved ones, most similar first
    two = ike.context_string(demos[:2] + [ike.query_sentence(records[0], "vqa")], records[0], "vqa")
    budget = len(tok(two, add_special_tokens=False)["input_ids"])
    ids2, mask2, report2, texts2 = ike.make_contexts(records[:1], "vqa", tok, bank, embed, cfg, [budget], 99)
    assert report2.kept.tolist() == [2] and report2.truncated == 1 and texts2[0] == two
    assert int(mask2[0].sum()) == budget < n_full and "lost demos" in report2.summary()
    with pytest.raises(ValueError, match="more than the"):
        ike.make_contexts(records[:1], "vqa", tok, bank, embed, dataclasses.replace(cfg, truncate=False), [budget],
                          99)
    with pytest.raises(ValueError, match="even without retrieved demos"):
        ike.make_contexts(records[:1], "vqa", tok, bank, embed, cfg, [5], 99)


def test_in_context_forward_equals_base_on_joined_input(setup):
    model, tok, records, editor, cases = setup
    base, fns = Blip2Fns(model.module), editor.fns
    case = jax.tree.map(lambda a: jnp.asarray(a[1]), cases)
    patch = editor.edit(None, model.params, case, {})
    nq = model.config.num_query_tokens
    ctx = np.asarray(case.context_ids)[np.asarray(case.context_mask) > 0]
    assert len(ctx) < case.context_ids.shape[0]  # padding inside the joined sequence is exercised

    @jax.jit  # one compiled program per input: the wrapper without and with the context, and the base model
    def run(params, patch, seq, image, full, rows):
        return (fns.logits(params, {}, seq, image), base.logits(params, {}, seq, image),
                fns.logits(params, patch, seq, image), base.logits(params, {}, full, image),
                fns.forward(params, patch, seq, image, rows=rows)[0])

    for name, image in (("edit", case.images["edit"]), ("loc", None)):
        seq = case.seq(name)
        n = nq if image is not None else 0
        real = int(np.asarray(seq.attention_mask).sum())
        ids = np.asarray(seq.input_ids)
        joined = np.concatenate([ids[:n], ctx, ids[n:real]])  # packed: no padding anywhere
        full = Seq(jnp.asarray(joined), jnp.ones(len(joined), jnp.int32), jnp.zeros(len(joined), jnp.int32))
        rows = jnp.asarray(np.nonzero(np.asarray(seq.labels)[1:] != -100)[0]) if name == "edit" else jnp.arange(3)
        plain, base_plain, got, want, at_rows = map(np.asarray, run(model.params, patch, seq, image, full, rows))
        np.testing.assert_array_equal(plain, base_plain)  # patch {} is the base model, bit for bit
        want = np.concatenate([want[:n], want[n + len(ctx):]])
        np.testing.assert_allclose(got[:real], want, rtol=2e-5, atol=2e-5)
        assert np.abs(got[n:real] - plain[n:real]).max() > 1e-3  # the context matters
        np.testing.assert_allclose(at_rows, got[np.asarray(rows)], rtol=2e-5, atol=2e-5)  # rows map too


def test_shared_context_runs_once_and_equals_separate_forwards(setup):
    """The edit input and its rephrase share `[image slots][context]`: `forward_group` runs it once (a KV prefix)
    and each input's text from it, with the logits of separate forwards (all positions, and at answer rows);
    the scores of a batch are those of the forwards one by one."""
    model, tok, records, editor, cases = setup
    fns = editor.fns
    case = jax.tree.map(lambda a: jnp.asarray(a[2]), cases)
    patch = editor.edit(None, model.params, case, {})
    seqs = [case.seq("edit"), case.seq("rephrase")]
    assert seqs[0].input_ids.shape != seqs[1].input_ids.shape or not np.array_equal(seqs[0].input_ids,
                                                                                     seqs[1].input_ids)
    rows = [jnp.where(s.answer_rows >= 0, s.answer_rows, 0) for s in seqs]

    @jax.jit
    def run(params, patch, image):
        apart = [fns.forward(params, patch, s, image)[0] for s in seqs]
        apart_rows = [fns.forward(params, patch, s, image, rows=r)[0] for s, r in zip(seqs, rows)]
        return apart, apart_rows, fns.forward_group(params, patch, seqs, image), \
            fns.forward_group(params, patch, seqs, image, rows=rows)

    apart, apart_rows, shared, shared_rows = run(model.params, patch, case.images["edit"])
    for s, a, b, ar, br in zip(seqs, apart, shared, apart_rows, shared_rows):
        real = np.asarray(s.attention_mask) > 0
        np.testing.assert_allclose(np.asarray(b)[real], np.asarray(a)[real], rtol=2e-5, atol=2e-5)
        scored = np.asarray(s.answer_rows) >= 0
        np.testing.assert_allclose(np.asarray(br)[scored], np.asarray(ar)[scored], rtol=2e-5, atol=2e-5)
    # Without a context (the pre-edit model) the group is the separate forwards.
    plain = jax.jit(lambda p, i: fns.forward_group(p, {}, seqs, i))(model.params, case.images["edit"])
    np.testing.assert_array_equal(np.asarray(plain[0]), np.asarray(fns.logits(model.params, {}, seqs[0],
                                                                                case.images["edit"])))


def test_vmap_over_cases_equals_one_by_one(setup):
    model, tok, records, editor, cases = setup
    batch = jax.tree.map(jnp.asarray, take(cases, np.arange(3)))

    def one(c):
        return editor.fns.logits(model.params, editor.edit(None, model.params, c, {}), c.edit, c.images["edit"])

    together = jax.jit(jax.vmap(one))(batch)
    f = jax.jit(one)
    for i in range(3):
        np.testing.assert_allclose(np.asarray(together[i]), np.asarray(f(take(batch, i))),
                                   rtol=1e-5, atol=1e-5)


def test_harness_runs_five_metrics(setup, tmp_path):
    model, tok, records, editor, cases = setup
    meta = [pipeline.record_meta(r) for r in records]
    res = harness.run(editor, model.params, cases, meta, str(tmp_path), batch_size=len(records), progress=False)
    for m in METRICS:
        assert 0.0 <= res.summary[m] <= 100.0
    assert res.summary["num_cases"] == len(records) and os.path.exists(tmp_path / "cases.jsonl")


def test_no_sequential_editing(setup):
    model, tok, records, editor, cases = setup
    with pytest.raises(ValueError, match="do not stack"):
        harness.run_sequential(editor, model.params, cases, [pipeline.record_meta(r) for r in records], None)
    with pytest.raises(ValueError, match="prior must be"):
        ike.ike_edit(None, model.params, take(cases, 0), {"x": 1})


def test_encoder_embedder_is_padding_free(demo_world):
    """The MiniLM path (`encoder_embedder`, here a tiny random BERT and the demo tokenizer): unit rows, each equal
    to the sentence encoded alone without padding, whatever its batch and padded width."""
    from mmedit_jax.models.bert import TextEncoder, sentence_embedding
    from mmedit_jax.models.config import BertConfig

    tok = demo_world.tok
    cfg = BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
    module = TextEncoder(cfg)
    params = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
    sentences = ike.bank_sentences(demo_world.records[:2], "vqa")[:5]
    got = ike.encoder_embedder(cfg, params, tok, max_length=64, batch_size=4, multiple=32)(sentences)
    assert got.shape == (5, 16)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    for i in (0, 4):
        ids = jnp.asarray([tok(sentences[i], truncation=True, max_length=64)["input_ids"]])
        hidden, _ = module.apply({"params": params}, ids, jnp.ones_like(ids))
        np.testing.assert_allclose(got[i], np.asarray(sentence_embedding(hidden, jnp.ones_like(ids)))[0],
                                   rtol=1e-4, atol=1e-5)


def test_context_report_summary_counts_what_was_kept():
    """The log line's figures: the mean and least number of retrieved demos kept, and the cases that lost any."""
    report = ike.ContextReport(2, np.array([2, 2, 1]), 80, 73, 192)
    assert "kept 1.67 on average (min 1); 1 cases lost demos" in report.summary()
    assert "(min 2); 0 cases lost demos" in ike.ContextReport(2, np.array([2, 2]), 80, 73, 192).summary()
