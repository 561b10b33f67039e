"""BLIP-2 end to end against transformers' `Blip2ForConditionalGeneration`: random tiny checkpoints saved with
`save_pretrained`, converted (in memory and with the CLI), loaded with `from_pretrained`, then logits, greedy
generation, bfloat16, patches and taps, and the errors of a broken checkpoint."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mmedit_jax import patch as P  # noqa: E402
from mmedit_jax.convert import __main__ as cli  # noqa: E402
from mmedit_jax.convert.blip2 import opt_rules  # noqa: E402
from mmedit_jax.convert.engine import ConversionError  # noqa: E402
from mmedit_jax.loading import from_pretrained  # noqa: E402
from mmedit_jax.models.config import OPTConfig  # noqa: E402
from mmedit_jax.models.opt import OPTDecoder  # noqa: E402
from mmedit_jax.sites import easyedit_site, kernel_of  # noqa: E402

IMAGE_TOKEN, PAD, EOS, NQ = 63, 1, 2, 3


def hf_config(*, cross_every=2, ln_before=True, layers=2, image_size=16):
    text = dict(model_type="opt", vocab_size=64, hidden_size=16, num_hidden_layers=layers, ffn_dim=24,
                num_attention_heads=2, max_position_embeddings=40, word_embed_proj_dim=16,
                do_layer_norm_before=ln_before, pad_token_id=PAD, bos_token_id=EOS, eos_token_id=EOS)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=8)
    qformer = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                   cross_attention_frequency=cross_every, encoder_hidden_size=16)
    return transformers.Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text,
                                    num_query_tokens=NQ, image_token_index=IMAGE_TOKEN)


def randomise(model, seed, std):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


def hf_model(tmp_path, seed=0, std=0.3, **kw):
    model = transformers.Blip2ForConditionalGeneration._from_config(hf_config(**kw), attn_implementation="eager")
    model = randomise(model.eval(), seed, std)
    path = tmp_path / "hf"
    model.save_pretrained(path)
    return model, path


def batch(seed=0, size=16):
    """Two left-padded prompts of different lengths, each with NQ image tokens."""
    rng = np.random.default_rng(seed)
    text = rng.integers(3, 60, size=(2, 6))
    ids = np.full((2, NQ + 6), PAD)
    ids[0, 2:2 + NQ], ids[0, 2 + NQ:] = IMAGE_TOKEN, text[0, :4]
    ids[1, :NQ], ids[1, NQ:] = IMAGE_TOKEN, text[1]
    mask = (ids != PAD).astype(np.int64)
    pixels = rng.standard_normal((2, 3, size, size)).astype(np.float32)
    return pixels, ids, mask


def hf_logits(model, pixels, ids, mask):
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(pixels), input_ids=torch.from_numpy(ids),
                    attention_mask=torch.from_numpy(mask))
    return out.logits.numpy()


@pytest.mark.parametrize("cross_every,ln_before", [(1, True), (2, True), (2, False)])
def test_logits_match_transformers(tmp_path, cross_every, ln_before):
    ref_model, path = hf_model(tmp_path, cross_every=cross_every, ln_before=ln_before)
    model = from_pretrained(path)
    pixels, ids, mask = batch()
    got = np.asarray(model(pixels, ids, mask))
    want = hf_logits(ref_model, pixels, ids, mask)
    assert got.shape == want.shape
    keep = mask.astype(bool)
    assert np.abs(got - want)[keep].max() <= 1e-4


def test_opt_project_in_out_matches_transformers():
    """`word_embed_proj_dim != hidden_size` (project_in/project_out, OPT-350m style), OPT alone; BLIP-2 itself is
    not defined for it (transformers' masked_scatter would spread each query row over several tokens)."""
    cfg = transformers.OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, ffn_dim=24, num_attention_heads=2,
                                 max_position_embeddings=30, word_embed_proj_dim=8, pad_token_id=PAD)
    ref = randomise(transformers.OPTForCausalLM._from_config(cfg, attn_implementation="eager").eval(), 1, 0.3)
    state = {f"language_model.{k}": v.numpy() for k, v in ref.state_dict().items()}
    ours_cfg = OPTConfig.from_hf(cfg.to_dict())
    rules, ignored = opt_rules(ours_cfg)
    params = {}
    for rule in rules:
        vals = [state.pop(s) for s in rule.sources]
        vals = [v.T if rule.transform == "linear" else v for v in vals]
        value = np.stack(vals) if rule.stacked else vals[0]
        node = params
        *head, leaf = rule.target.split("/")[1:]
        for h in head:
            node = node.setdefault(h, {})
        node[leaf] = value
    assert set(state) <= set(ignored)
    ids = np.array([[1, 1, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask = (ids != PAD).astype(np.int64)
    module = OPTDecoder(ours_cfg)
    embeds = module.apply({"params": params}, jnp.asarray(ids), method="embed")
    got, _ = module.apply({"params": params}, embeds, jnp.asarray(mask))
    with torch.no_grad():
        want = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    assert np.abs(np.asarray(got) - want)[mask.astype(bool)].max() <= 1e-4


def test_greedy_generation_matches_transformers(tmp_path):
    ref_model, path = hf_model(tmp_path, std=0.05, seed=1)
    model = from_pretrained(path)
    pixels, ids, mask = batch(seed=1)
    with torch.no_grad():
        want = ref_model.generate(pixel_values=torch.from_numpy(pixels), input_ids=torch.from_numpy(ids),
                                  attention_mask=torch.from_numpy(mask), max_new_tokens=10, do_sample=False,
                                  num_beams=1, pad_token_id=PAD, eos_token_id=None).numpy()[:, ids.shape[1]:]
    got = model.generate(pixels, ids, mask, max_new_tokens=10, eos_token_id=-1)
    assert len(set(want.ravel().tolist())) > 2, "degenerate reference: pick another seed"
    np.testing.assert_array_equal(got, want)
    # eos stops a row and pads the rest of it, as transformers does.
    eos = int(want[0, 3])
    with torch.no_grad():
        want_eos = ref_model.generate(pixel_values=torch.from_numpy(pixels), input_ids=torch.from_numpy(ids),
                                      attention_mask=torch.from_numpy(mask), max_new_tokens=10, do_sample=False,
                                      num_beams=1, pad_token_id=PAD, eos_token_id=eos).numpy()[:, ids.shape[1]:]
    got_eos = model.generate(pixels, ids, mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=PAD)
    np.testing.assert_array_equal(got_eos[:, : want_eos.shape[1]], want_eos)
    assert (got_eos[:, want_eos.shape[1]:] == PAD).all()


def test_bfloat16_within_tolerance(tmp_path):
    _, path = hf_model(tmp_path, std=0.3)
    f32, bf16 = from_pretrained(path), from_pretrained(path, dtype=jnp.bfloat16)
    assert jax.tree.leaves(bf16.params)[0].dtype == jnp.bfloat16
    pixels, ids, mask = batch()
    a, b = np.asarray(f32(pixels, ids, mask)), np.asarray(bf16(pixels, ids, mask), np.float32)
    keep = mask.astype(bool)
    # bf16 keeps ~3 significant digits; relative to the logits' spread the error stays within 5%.
    assert np.abs(a - b)[keep].max() <= 0.05 * np.abs(a[keep]).max()
    assert (a.argmax(-1) == b.argmax(-1))[keep].mean() >= 0.8


def test_convert_cli_round_trip(tmp_path):
    ref_model, path = hf_model(tmp_path)
    (path / "tokenizer_config.json").write_text("{}")
    out = tmp_path / "converted"
    assert cli.main(["--hf-dir", str(path), "--out", str(out)]) == 0
    assert (out / "tokenizer_config.json").exists()
    a, b = from_pretrained(path), from_pretrained(out)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    pixels, ids, mask = batch()
    keep = mask.astype(bool)
    assert np.abs(np.asarray(b(pixels, ids, mask)) - hf_logits(ref_model, pixels, ids, mask))[keep].max() <= 1e-4


def test_broken_checkpoints_name_the_tensor(tmp_path):
    from safetensors.numpy import load_file, save_file

    _, path = hf_model(tmp_path)
    tensors = load_file(path / "model.safetensors")
    key = "language_model.model.decoder.layers.1.fc1.weight"
    bad = dict(tensors)
    bad[key] = np.zeros((3, 3), np.float32)
    save_file(bad, path / "model.safetensors")
    with pytest.raises(ConversionError, match=r"fc1\.weight.*\(3, 3\)"):
        from_pretrained(path)
    missing = dict(tensors)
    del missing[key]
    save_file(missing, path / "model.safetensors")
    with pytest.raises(ConversionError, match="fc1"):
        from_pretrained(path)
    extra = dict(tensors, **{"language_model.surprise.weight": np.zeros(2, np.float32)})
    save_file(extra, path / "model.safetensors")
    with pytest.raises(ConversionError, match="surprise"):
        from_pretrained(path)
    (path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(Exception, match="safetensors|header"):
        from_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "blip-2"


def test_patches_and_taps_reach_every_stack(tmp_path):
    """A low-rank patch on one OPT, one Q-Former and one ViT layer equals the dense edit of those kernels; taps
    record each layer's input and give the output gradient (the MEND factors) without a dense weight gradient."""
    _, path = hf_model(tmp_path, layers=3)
    model = from_pretrained(path)
    pixels, ids, mask = batch()
    rng = np.random.default_rng(0)
    sites = {"language_model/layers/2/fc1": (16, 24), "qformer/layers/1/output_query/dense": (32, 16),
             "vision_model/layers/0/mlp/fc2": (32, 16), "language_projection": (16, 16)}
    patch = {s: P.LowRank(jnp.asarray(rng.standard_normal((2, i)), jnp.float32),
                          jnp.asarray(rng.standard_normal((2, o)), jnp.float32), 0.1) for s, (i, o) in sites.items()}
    got = np.asarray(model(pixels, ids, mask, patch=patch))
    want = np.asarray(model(pixels, ids, mask, params=P.apply_patch(model.params, patch, model.stacks)))
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.abs(got - np.asarray(model(pixels, ids, mask))).max() > 1e-2

    site = "language_model/layers/1/fc2"
    kernel = kernel_of(model.params, site, model.stacks)
    x_pix = jnp.transpose(jnp.asarray(pixels), (0, 2, 3, 1))

    def loss_eps(eps):
        logits, cap = model.module.apply({"params": model.params}, jnp.asarray(ids), jnp.asarray(mask),
                                         pixel_values=x_pix, taps={site: eps})
        return logits[..., 5].sum(), cap[site]

    eps = jnp.zeros((2, ids.shape[1], kernel.shape[1]))
    delta, u = jax.jit(jax.grad(loss_eps, has_aux=True))(eps)

    def loss_w(w):
        params = P.apply_patch(model.params, {site: P.Dense(w - kernel)}, model.stacks)
        return model.module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask), pixel_values=x_pix)[0][
            ..., 5].sum()

    dense_grad = jax.jit(jax.grad(loss_w))(kernel)
    np.testing.assert_allclose(jnp.einsum("bli,blo->io", u, delta), dense_grad, rtol=1e-4, atol=1e-5)


def test_easyedit_site_names():
    assert easyedit_site("opt_model.model.decoder.layers.31.fc1.weight") == "language_model/layers/31/fc1"
    assert easyedit_site("language_model.model.decoder.layers.3.self_attn.q_proj.weight") == \
        "language_model/layers/3/self_attn/q_proj"
    assert easyedit_site("Qformer.bert.encoder.layer.10.output_query.dense.weight") == \
        "qformer/layers/10/output_query/dense"
    assert easyedit_site("visual_encoder.blocks.38.attn.qkv.weight") == "vision_model/layers/38/self_attn/qkv"
    assert easyedit_site("opt_proj.weight") == "language_projection"
    # EasyEdit's MiniGPT-4 names (models/minigpt4.py) translate too; an unknown name is refused, named.
    assert easyedit_site("llama_model.model.layers.1.mlp.down_proj.weight") == "language_model/layers/1/mlp/down_proj"
    with pytest.raises(ValueError, match="t5_model"):
        easyedit_site("t5_model.encoder.block.1.layer.1.DenseReluDense.wi.weight")


def test_every_parameter_has_a_partition_rule(tmp_path):
    from mmedit_jax import sharding

    _, path = hf_model(tmp_path)
    params = from_pretrained(path).params
    specs = jax.tree.leaves(sharding.param_specs(params), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert len(specs) == len(jax.tree.leaves(params))
