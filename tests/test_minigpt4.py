"""MiniGPT-4 against a PyTorch reference assembled from transformers modules with random weights, as EasyEdit's
`MiniGPT4` runs it: `Blip2VisionModel` (its `post_layernorm` as `ln_vision`, eps 1e-5) -> `Blip2QFormerModel` over
`query_tokens` -> `torch.nn.Linear` (`llama_proj`) -> `LlamaForCausalLM` fed `emb(before) ‖ img ‖ emb(after) ‖
emb(text)`. The JAX model is assembled by `convert/minigpt4.py` from the three saved checkpoints (a BLIP-2
directory, the `{'model': {'llama_proj.*'}}` .pth file, a LLaMA directory)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mmedit_jax.convert.engine import ConversionError  # noqa: E402
from mmedit_jax.convert.minigpt4 import convert_minigpt4  # noqa: E402
from mmedit_jax.forward import Blip2Fns  # noqa: E402
from mmedit_jax.models.minigpt4 import MiniGPT4Model, image_block  # noqa: E402

NQ, VOCAB, D, PAD, EOS = 3, 100, 32, 2, 2
BEFORE, AFTER = [5, 6, 7], [8, 9]  # stand-ins for tok('###Human: <Img>') and tok('</Img> ')


def randomise(model, seed, std=0.3):
    """Every tensor ~ N(0, std); LLaMA's RMSNorm weights 1 + N(0, std)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, std)
            if name.endswith("norm.weight") and "layernorm" not in name.lower().replace("_", ""):
                p.add_(1.0)
    return model.eval()


def save_projection(path, proj, extra=None, entry="model"):
    sd = {f"llama_proj.{k}": v for k, v in proj.state_dict().items()}
    sd.update(extra or {})
    torch.save({entry: sd}, path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """`(reference parts, paths, converted MiniGPT4Model)`."""
    root = tmp_path_factory.mktemp("minigpt4")
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16,
                  patch_size=8)
    qformer = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                   cross_attention_frequency=2, encoder_hidden_size=16)
    text = dict(model_type="opt", vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=24,
                num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=16)
    bcfg = transformers.Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text,
                                    num_query_tokens=NQ, image_token_index=63)
    blip = randomise(transformers.Blip2ForConditionalGeneration._from_config(bcfg, attn_implementation="eager"), 0)
    blip.save_pretrained(root / "blip2")
    lcfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=48, num_hidden_layers=3,
                                    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                    rms_norm_eps=1e-6, pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS)
    llama = randomise(transformers.LlamaForCausalLM._from_config(lcfg, attn_implementation="eager"), 1, 0.2)
    llama.save_pretrained(root / "llama")
    torch.manual_seed(2)
    proj = torch.nn.Linear(16, D)
    randomise(proj, 2)
    save_projection(root / "proj.pth", proj)
    config, params = convert_minigpt4(root / "llama", root / "proj.pth", root / "blip2")
    model = MiniGPT4Model(config, jax.tree.map(jnp.asarray, params))
    paths = dict(llama=root / "llama", proj=root / "proj.pth", blip2=root / "blip2", root=root)
    return (blip, proj, llama), paths, model


def reference_image(parts, pixels):
    blip, proj, _ = parts
    vision = blip.vision_model
    vision.post_layernorm.eps = 1e-5  # LAVIS's ln_vision
    with torch.no_grad():
        feats = vision(pixel_values=torch.from_numpy(pixels).to(proj.weight.dtype)).last_hidden_state
        queries = blip.query_tokens.expand(feats.shape[0], -1, -1)
        q = blip.qformer(query_embeds=queries, encoder_hidden_states=feats,
                         encoder_attention_mask=torch.ones(feats.shape[:2], dtype=torch.long)).last_hidden_state
        return proj(q)


def reference_logits(parts, pixels, texts):
    """EasyEdit's `MiniGPT4.forward`: wrapped image ‖ right-padded text, mask ones over the image block,
    positions arange. Logits float32 (whatever the parts' dtype)."""
    llama = parts[2]
    emb = llama.get_input_embeddings()
    length = max(len(t) for t in texts)
    ids = torch.tensor([t + [PAD] * (length - len(t)) for t in texts])
    mask = torch.tensor([[1] * len(t) + [0] * (length - len(t)) for t in texts])
    with torch.no_grad():
        img = reference_image(parts, pixels)
        b = len(texts)
        wrap = lambda x: emb(torch.tensor([x] * b))  # noqa: E731
        embeds = torch.cat([wrap(BEFORE), img, wrap(AFTER), emb(ids)], dim=1)
        full_mask = torch.cat([torch.ones(b, len(BEFORE) + NQ + len(AFTER), dtype=torch.long), mask], dim=1)
        return llama(inputs_embeds=embeds, attention_mask=full_mask).logits.float().numpy(), full_mask.numpy()


def our_batch(config, texts):
    block = image_block(config, BEFORE, AFTER)
    length = max(len(t) for t in texts)
    ids = np.asarray([block + t + [PAD] * (length - len(t)) for t in texts], np.int32)
    mask = np.asarray([[1] * (len(block) + len(t)) + [0] * (length - len(t)) for t in texts], np.int32)
    return ids, mask


def close(got, want, rel=1e-4):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < rel, err
    return err


TEXTS = [[11, 12, 13, 14, 15, 16], [21, 22, 23, 24]]


def pixels_of(seed=0, n=2):
    return np.random.default_rng(seed).standard_normal((n, 3, 16, 16)).astype(np.float32)


def test_logits_match_the_easyedit_splice(world):
    parts, _, model = world
    pixels = pixels_of()
    want, want_mask = reference_logits(parts, pixels, TEXTS)
    ids, mask = our_batch(model.config, TEXTS)
    np.testing.assert_array_equal(mask, want_mask)
    got = model(pixels, ids, mask)
    # Every position, the image and wrapper slots and the right padding included (EasyEdit's locality uses all).
    close(got, want)
    np.testing.assert_array_equal(np.argmax(got, -1), np.argmax(want, -1))
    close(model.encode_image(pixels), reference_image(parts, pixels).numpy())


def test_bfloat16_within_tolerance(world):
    """bfloat16 parameters and compute against the same reference in bfloat16 and in float32 (tolerances as
    `test_llama`'s bfloat16 test), at every real position."""
    import copy

    parts, _, model = world
    bf16 = MiniGPT4Model(model.config, jax.tree.map(lambda x: x.astype(jnp.bfloat16), model.params),
                         dtype=jnp.bfloat16)
    pixels = pixels_of()
    ids, mask = our_batch(model.config, TEXTS)
    got = np.asarray(bf16(pixels, ids, mask)).astype(np.float32)
    want32, _ = reference_logits(parts, pixels, TEXTS)
    want16, _ = reference_logits([copy.deepcopy(p).to(torch.bfloat16) for p in parts], pixels, TEXTS)
    keep = mask.astype(bool)
    close(got[keep], want16[keep], rel=0.03)
    close(got[keep], want32[keep], rel=0.05)
    assert (got.argmax(-1)[keep] == want32.argmax(-1)[keep]).mean() >= 0.85
    assert (got.argmax(-1)[keep] == want16.argmax(-1)[keep]).mean() >= 0.85


def test_text_only_is_the_bare_llama(world):
    parts, _, model = world
    ids = np.asarray([TEXTS[0]], np.int32)
    with torch.no_grad():
        want = parts[2](input_ids=torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    close(model(None, ids), want)


def test_forward_protocol_and_prefix(world):
    """`forward.Blip2Fns` runs MiniGPT-4 unchanged: one example, cached embeddings or pixels, prefix/resume."""
    from mmedit_jax.case import Seq

    _, _, model = world
    pixels = pixels_of(1, 1)
    ids, mask = our_batch(model.config, TEXTS[:1])
    want = np.asarray(model(pixels, ids, mask))[0]
    seq = Seq(jnp.asarray(ids[0]), jnp.asarray(mask[0]), jnp.full(ids.shape[1:], -100))
    cached = Blip2Fns(model.module)
    table = cached.image_table(model.params, pixels, batch_size=1)
    # (`logits` itself runs in the editor test's scoring.)
    run = jax.jit(lambda p, s, img: cached.resume_logits(p, {}, s, cached.prefix(p, s, img, 2), 2))
    close(run(model.params, seq, table[0]), want)


def test_greedy_generation_matches_transformers(world):
    parts, _, model = world
    llama = parts[2]
    pixels = pixels_of(2)
    # Left-padded prompts (generation): the second row is 2 tokens shorter.
    block = image_block(model.config, BEFORE, AFTER)
    ids = np.asarray([block + TEXTS[0], [PAD, PAD] + block + TEXTS[0][:4]], np.int32)
    mask = (np.arange(ids.shape[1])[None] >= np.asarray([[0], [2]])).astype(np.int32)
    got = model.generate(pixels, ids, mask, max_new_tokens=6, eos_token_id=None, pad_token_id=PAD)
    emb = llama.get_input_embeddings()
    with torch.no_grad():
        img = reference_image(parts, pixels)
        rows = []
        for r in range(2):
            e = [torch.zeros(2, D)] if r else []  # the left padding
            text = TEXTS[0] if r == 0 else TEXTS[0][:4]
            e += [emb(torch.tensor(BEFORE)), img[r], emb(torch.tensor(AFTER)), emb(torch.tensor(text))]
            rows.append(torch.cat([x.reshape(-1, D) for x in e]))
        out = llama.generate(inputs_embeds=torch.stack(rows), attention_mask=torch.from_numpy(mask.astype(np.int64)),
                             max_new_tokens=6, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    np.testing.assert_array_equal(got, out.numpy()[:, -6:])


# --------------------------------------------------------------------------------------------------
# Conversion: every tensor checked, pickles with code refused.


def test_projection_file_problems_are_named(world, tmp_path):
    parts, paths, _ = world
    proj = parts[1]
    run = lambda p: convert_minigpt4(paths["llama"], p, paths["blip2"])  # noqa: E731

    torch.save({"model": {"llama_proj.weight": proj.weight.detach()}}, tmp_path / "missing.pth")
    with pytest.raises(ConversionError, match=r"minigpt4:llama_proj\.bias"):
        run(tmp_path / "missing.pth")
    save_projection(tmp_path / "extra.pth", proj, extra={"llama_proj.scale": torch.ones(3)})
    with pytest.raises(ConversionError, match=r"minigpt4:llama_proj\.scale"):
        run(tmp_path / "extra.pth")
    torch.save({"model": {"llama_proj.weight": torch.zeros(D, 8), "llama_proj.bias": torch.zeros(D)}},
               tmp_path / "shape.pth")
    with pytest.raises(ConversionError, match=r"llama_proj\.weight.*\(32, 8\)"):
        run(tmp_path / "shape.pth")
    save_projection(tmp_path / "flat.pth", proj, entry="state_dict")
    with pytest.raises(ConversionError, match="no 'model' state dict"):
        run(tmp_path / "flat.pth")


class _Payload:
    def __reduce__(self):  # would run code on unpickling
        import os

        return (os.system, ("touch PWNED_MINIGPT4",))


def test_a_pickle_with_code_is_refused(world, tmp_path, monkeypatch):
    parts, paths, _ = world
    monkeypatch.chdir(tmp_path)
    sd = {f"llama_proj.{k}": v for k, v in parts[1].state_dict().items()}
    torch.save({"model": sd, "evil": _Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ConversionError, match="refused"):
        convert_minigpt4(paths["llama"], tmp_path / "evil.pth", paths["blip2"])
    assert not (tmp_path / "PWNED_MINIGPT4").exists()


def test_missing_llama_and_blip2_tensors_are_named(world, tmp_path):
    from safetensors.numpy import load_file, save_file

    _, paths, _ = world
    import shutil

    for name, key in (("llama", "model.norm.weight"), ("blip2", "qformer.layernorm.bias")):
        broken = tmp_path / name
        shutil.copytree(paths[name], broken)
        sd = load_file(broken / "model.safetensors")
        del sd[key]
        save_file(sd, broken / "model.safetensors", metadata={"format": "pt"})
        dirs = {**paths, name: broken}
        with pytest.raises(ConversionError, match=f"{name}:{key}"):
            convert_minigpt4(dirs["llama"], dirs["proj"], dirs["blip2"])


# --------------------------------------------------------------------------------------------------
# Editors and scoring through the unchanged forward protocol, on EasyEdit's MiniGPT-4 names.

LLAMA_MLP = ["llama_model.model.layers.2.mlp.down_proj.weight", "llama_model.model.layers.2.mlp.up_proj.weight"]


def tiny_case(model, fns, seed=3):
    """One `Case`: the three image inputs wrapped as EasyEdit does, answers the last 2 text tokens."""
    from mmedit_jax.case import Case, Seq, answer_rows

    rng = np.random.default_rng(seed)
    block = image_block(model.config, BEFORE, AFTER)

    def seq(with_image, scored=True):
        text = rng.integers(10, VOCAB, 6).tolist()
        ids = np.asarray((block if with_image else []) + text, np.int32)
        labels = np.full(ids.shape, -100, np.int32)
        labels[-2:] = ids[-2:]
        return Seq(jnp.asarray(ids), jnp.ones_like(jnp.asarray(ids)), jnp.asarray(labels),
                   jnp.asarray(answer_rows(labels[None])[0]) if scored else None)

    table = fns.image_table(model.params, pixels_of(seed, 2), batch_size=2)
    images = {"edit": table[0], "image_rephrase": table[1], "loc_image": table[1]}
    return Case(seq(True), seq(True), seq(True), seq(False, False), seq(True, False), images,
                jnp.zeros(4, jnp.int32), jnp.ones(4, jnp.int32))


def test_ft_l_ft_v_mend_and_ke_edit_and_score(world):
    """Every weight editor runs on MiniGPT-4 as on BLIP-2: FT-L, MEND and KE on the LLaMA MLP projections
    EasyEdit's minigpt4 hparams name, FT-V on the Q-Former (cached image embeddings for the LLaMA sites, pixels
    for the vision side); each patch is finite and non-zero, and one program scores them all."""
    from mmedit_jax import pipeline
    from mmedit_jax.editors import mend_net as MN
    from mmedit_jax.eval.scoring import post_scores, pre_outputs
    from mmedit_jax.sites import easyedit_site, resolve_sites
    from mmedit_jax.training.config import TrainConfig
    from mmedit_jax.training.trainables import build_trainable

    _, _, model = world
    sites = resolve_sites(LLAMA_MLP, model.params, model.stacks)
    assert sites == ("language_model/layers/2/mlp/down_proj", "language_model/layers/2/mlp/up_proj")
    assert easyedit_site("llama_proj.weight") == "llama_proj"
    ft = pipeline.build_editor("ft-l", model, {"inner_params": LLAMA_MLP, "num_steps": 2, "edit_lr": 0.05})
    ft_v = pipeline.build_editor("ft-v", model, {"inner_params": ["Qformer"], "num_steps": 2, "edit_lr": 0.05})
    assert ft_v.uses_pixels and all(s.startswith("qformer/layers/") for s in ft_v.hparams.inner_params)
    ke = build_trainable("ke", model, {"lstm_hidden": 8, "condition_dim": 8, "hidden_dim": 8},
                         TrainConfig(inner_params=tuple(LLAMA_MLP)))
    ke_editor = ke.editor(ke.init(jax.random.PRNGKey(1))[0], {})
    mend = build_trainable("mend", model, {"rank": 4}, TrainConfig(inner_params=tuple(LLAMA_MLP)))
    mend_params, _ = mend.init(jax.random.PRNGKey(0))
    stats = MN.random_stats(mend.spec)  # like a trained MEND's input statistics (a fresh one's are empty)
    mend_editor = mend.editor(mend_params, stats)
    assert not ft.uses_pixels and not mend_editor.uses_pixels  # LLaMA sites: cached image embeddings
    case = tiny_case(model, ft.fns)

    pixel_case = tiny_case(model, ft_v.fns)

    @jax.jit
    def run(editor_params, params, case, pixel_case):
        patches = {"ft": ft.edit(None, params, case, {}), "mend": mend_editor.edit(editor_params[0], params, case, {}),
                   "ke": ke_editor.edit(editor_params[1], params, case, {}),
                   "ft-v": ft_v.edit(None, params, pixel_case, {})}
        scores = {"ft": post_scores(ft.fns, params, patches["ft"], case, pre_outputs(ft.fns, params, case)),
                  "ft-v": post_scores(ft_v.fns, params, patches["ft-v"], pixel_case,
                                      pre_outputs(ft_v.fns, params, pixel_case))}
        return patches, scores

    patches, scores = run((mend_editor.editor_params, ke_editor.editor_params), model.params, case, pixel_case)
    for name, patch in patches.items():
        assert set(patch) == set(ft_v.hparams.inner_params if name == "ft-v" else sites), name
        for site, p in patch.items():
            dense = np.asarray(p.dense())
            assert dense.shape == kernel_shape(model, site) and np.isfinite(dense).all(), (name, site)
        assert max(np.abs(np.asarray(p.dense())).max() for p in patch.values()) > 0, name
    for name in scores:
        for key in ("reliability", "t_generality", "m_generality", "t_locality", "m_locality"):
            assert 0.0 <= float(scores[name][key]) <= 1.0, (name, key)
    # FT-V edits the vision side only: text-only locality is untouched
    assert float(scores["ft-v"]["t_locality"]) == 1.0


def kernel_shape(model, site):
    from mmedit_jax.sites import kernel_of

    return tuple(kernel_of(model.params, site, model.stacks).shape)


def test_cli_round_trip_and_from_pretrained(world, tmp_path):
    from mmedit_jax.convert import __main__ as cli
    from mmedit_jax.loading import from_pretrained

    _, paths, model = world
    out = tmp_path / "converted"
    assert cli.main(["minigpt4", "--llama-dir", str(paths["llama"]), "--projection", str(paths["proj"]),
                     "--blip2-dir", str(paths["blip2"]), "--out", str(out)]) == 0
    loaded = from_pretrained(out)
    assert isinstance(loaded, MiniGPT4Model) and loaded.config == model.config
    assert loaded.config.vision.post_layernorm_eps == 1e-5
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(model.params)):
        np.testing.assert_array_equal(a, b)
    wide = from_pretrained(out, image_size=24)  # EasyEdit runs 364 px: position embeddings resampled
    assert wide.config.vision.image_size == 24
    assert wide.params["vision_model"]["embeddings"]["position_embedding"].shape[1] == 1 + 3 * 3


class WordTokenizer:
    """A stand-in for the slow LLaMA tokenizer: one id per whitespace-separated word (its leading space kept)."""

    pad_token_id, bos_token_id = PAD, 1

    def __init__(self):
        self.vocab = {}

    def _ids(self, text):
        import re

        return [self.vocab.setdefault(w, 10 + len(self.vocab)) for w in re.findall(r"\s*\S+", text)]

    def __call__(self, texts, add_special_tokens=True):
        assert not add_special_tokens
        return {"input_ids": self._ids(texts) if isinstance(texts, str) else [self._ids(t) for t in texts]}


def test_cases_wrap_the_image_as_easyedit(world):
    """`pipeline.prepare_data`'s `CaseConfig` for MiniGPT-4: `before ‖ slots ‖ after ‖ text`, the block and the
    prompt masked in the labels; the text-only input bare. FT-L's default sites are LLaMA's MLP."""
    from mmedit_jax import pipeline
    from mmedit_jax.data.cases import CaseConfig, ImageTable, TextInput, encode_inputs

    _, _, model = world
    tok = WordTokenizer()
    wrap = pipeline.image_wrapper(model.config, tok)
    assert wrap == {"image_before": tuple(tok("###Human: <Img>", add_special_tokens=False)["input_ids"]),
                    "image_after": tuple(tok("</Img> ", add_special_tokens=False)["input_ids"])}
    cfg = CaseConfig(task="vqa", num_query_tokens=NQ, image_token_id=model.config.image_token_index, **wrap)
    inputs = [TextInput("what is it?", " a cat", "x.png"), TextInput("nearby?", " no", None)]
    batch = encode_inputs(inputs, tok, ImageTable(lambda p: None), cfg)
    block = [*wrap["image_before"], *[model.config.image_token_index] * NQ, *wrap["image_after"]]
    text = tok("what is it? a cat", add_special_tokens=False)["input_ids"]
    n = len(block) + len(text)
    assert batch.input_ids[0, :n].tolist() == block + text
    assert batch.labels[0, :n].tolist() == [-100] * (n - 2) + text[-2:]
    assert batch.input_ids[1, :2].tolist() == tok("nearby? no", add_special_tokens=False)["input_ids"]
    assert pipeline.build_editor("ft-l", model).hparams.inner_params == (
        "language_model/layers/2/mlp/up_proj", "language_model/layers/2/mlp/down_proj")


def test_api_from_pretrained_takes_minigpt4_and_refuses_a_bare_llama(world, tmp_path):
    import mmedit_jax
    from mmedit_jax import checkpoint

    _, paths, model = world
    checkpoint.save_model(tmp_path / "m", model.config, model.params)
    loaded = mmedit_jax.from_pretrained(tmp_path / "m", tokenizer=WordTokenizer())
    assert isinstance(loaded, mmedit_jax.MiniGPT4ApiModel) and loaded.config == model.config
    with pytest.raises(ValueError, match="llama model.*loading.from_pretrained"):
        mmedit_jax.from_pretrained(paths["llama"])


def test_the_vision_side_of_a_flan_t5_blip2(world, tmp_path):
    """MiniGPT-4's Q-Former is BLIP-2 FlanT5-XXL's: a BLIP-2 directory with a T5 language model converts too (its
    T5 tensors unused), to the same parameters."""
    parts, paths, model = world
    blip = parts[0]
    t5 = dict(model_type="t5", vocab_size=64, d_model=16, d_kv=8, d_ff=24, num_layers=1, num_decoder_layers=1,
              num_heads=2)
    cfg = transformers.Blip2Config(vision_config=blip.config.vision_config.to_dict(),
                                   qformer_config=blip.config.qformer_config.to_dict(), text_config=t5,
                                   num_query_tokens=NQ)
    other = transformers.Blip2ForConditionalGeneration._from_config(cfg)
    own = {k: v for k, v in blip.state_dict().items() if not k.startswith(("language_model.", "language_projection."))}
    missing, _ = other.load_state_dict(own, strict=False)
    assert not [k for k in missing if not k.startswith(("language_model.", "language_projection."))]
    other.save_pretrained(tmp_path / "t5")
    config, params = convert_minigpt4(paths["llama"], paths["proj"], tmp_path / "t5")
    assert config == model.config
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(model.params)):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------------------------------
# The notebook API (`mmedit_jax.from_pretrained`, `load_editor`, `answer`) on a converted MiniGPT-4.


@pytest.fixture(scope="module")
def api_model(tmp_path_factory):
    """A tiny random MiniGPT-4 saved as a converted checkpoint (the world model's tokenizer, its vocabulary),
    loaded by `mmedit_jax.from_pretrained`."""
    import mmedit_jax as mj
    from mmedit_jax import checkpoint, pipeline
    from mmedit_jax.models.config import LlamaConfig, MiniGPT4Config, QFormerConfig, VisionConfig
    from mmedit_jax.world import assets

    tok = pipeline.load_tokenizer(os.path.join(assets.ASSETS, "model"))
    config = MiniGPT4Config(
        vision=VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                            image_size=16, patch_size=8, post_layernorm_eps=1e-5),
        qformer=QFormerConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                              encoder_hidden_size=16),
        text=LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        num_query_tokens=4)
    path = tmp_path_factory.mktemp("minigpt4_api") / "model"
    checkpoint.save_model(path, config, MiniGPT4Model.init(config, jax.random.PRNGKey(0)).params)
    return mj.from_pretrained(path, tokenizer=tok)


def test_api_answers_and_edits_minigpt4(api_model, tmp_path):
    import mmedit_jax as mj
    from mmedit_jax import pipeline

    model = api_model
    assert isinstance(model, mj.MiniGPT4ApiModel) and isinstance(model, MiniGPT4Model)
    wrap = pipeline.image_wrapper(model.config, model.tokenizer)
    assert wrap["image_before"] and wrap["image_after"]
    q = "What color are the shapes?"
    ids = model.prompt_ids(q, True)  # EasyEdit's wrapper around the slots, then the templated question
    assert ids == [*wrap["image_before"], *[model.config.image_token_index] * 4, *wrap["image_after"],
                   *model.tokenizer("Question: " + q + " Short answer:", add_special_tokens=False)["input_ids"]]
    image = (np.random.default_rng(0).uniform(size=(20, 24, 3)) * 255).astype(np.uint8)
    before = model.answer(image, q, max_words=1)

    target = "purple" if before != "purple" else "green"
    editor = mj.load_editor("ft-l", model, hparams={"num_steps": 20, "edit_lr": 0.05})
    assert editor.editor.hparams.inner_params == ("language_model/layers/1/mlp/up_proj",
                                                  "language_model/layers/1/mlp/down_proj")
    patch = editor.edit(image, q, target)
    assert model.answer(image, q, patch=patch, max_words=1) == target
    assert model.answer(image, q, max_words=1) == before  # the model itself is unchanged
    path = mj.save_patch(patch, tmp_path / "p.safetensors")
    assert model.answer(image, q, patch=mj.load_patch(path, model), max_words=1) == target

    # Another MiniGPT-4 (other weights): the patch is refused, naming both models.
    other = mj.MiniGPT4ApiModel.wrap(MiniGPT4Model.init(model.config, jax.random.PRNGKey(1)), name="other",
                                     tokenizer=model.tokenizer)
    with pytest.raises(mj.PatchMismatch, match=r"model '.*model'.*'other'"):
        other.answer(image, q, patch=patch)


def test_ike_context_follows_the_whole_image_block(api_model):
    """IKE on MiniGPT-4: the context goes after `'###Human: <Img>'` ‖ slots ‖ `'</Img> '`, where EasyEdit's prompt
    puts its text (not after the slots alone, inside the wrapper); the API's question ids and the benchmark's
    joined input are the same ids."""
    import mmedit_jax as mj
    from mmedit_jax.editors.ike import join_context
    from mmedit_jax.world import assets

    model = api_model
    w = assets.ensure()
    editor = mj.load_editor("ike", model, bank=w.train_json, hparams={"k": 1})
    block = list(model.case_config().image_block)
    assert editor.editor.fns.image_block == len(block) > model.config.num_query_tokens
    image = (np.random.default_rng(1).uniform(size=(16, 16, 3)) * 255).astype(np.uint8)
    q, t = "What shape are the objects?", "circle"
    patch = editor.edit(image, q, t)
    cases = editor.cases([image], [q], [t])
    case = jax.tree.map(lambda a: np.asarray(a[0]), cases)
    joined = join_context(case.edit, case.context_ids, case.context_mask, editor.editor.fns.image_block)
    real = np.asarray(joined.input_ids)[np.asarray(joined.attention_mask) > 0].tolist()
    asked = model.prompt_ids(q, True, context=patch.ids)
    assert real[:len(block)] == block and real[len(block):len(block) + len(patch.ids)] == list(patch.ids)
    assert real[:len(asked)] == asked and model.tokenizer.decode(real[len(asked):]).strip() == t
    # The edit input and its rephrase read the context from one run of `[image block][context]` (a KV prefix
    # through LLaMA's cache) with the logits of separate forwards; both count positions over real tokens, as the
    # packed string EasyEdit tokenises (LLaMA's default would count the context's padding slots too).
    fns, rephrase = editor.editor.fns, "Which shape do the objects have?"
    cases = editor.cases([image, image], [q, rephrase], [t, t])
    pair = [jax.tree.map(lambda a, i=i: jnp.asarray(a[i]), cases) for i in (0, 1)]
    seqs = [c.edit for c in pair]
    feats = jnp.asarray(fns.image_table(model.params, np.asarray(pair[0].images["edit"])[None])[0])  # as fns takes it

    @jax.jit
    def run(params, patch):
        return [fns.forward(params, patch, s, feats)[0] for s in seqs], fns.forward_group(params, patch, seqs, feats)

    apart, shared = run(model.params, editor.editor.edit(None, model.params, pair[0], {}))
    for s, a, b in zip(seqs, apart, shared):
        real = np.asarray(s.attention_mask) > 0
        np.testing.assert_allclose(np.asarray(b)[real], np.asarray(a)[real], rtol=1e-4, atol=1e-4)
