"""The LLaMA decoder against transformers' `LlamaForCausalLM`: tiny random checkpoints (grouped-query attention)
saved with `save_pretrained`, converted with `from_pretrained` (and the CLI), then logits with right and left
padding, bfloat16, `inputs_embeds`, answer rows, the prefix/resume split, greedy generation, patches and taps."""

from __future__ import annotations

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mmedit_jax import patch as P  # noqa: E402
from mmedit_jax import sharding  # noqa: E402
from mmedit_jax.convert import __main__ as cli  # noqa: E402
from mmedit_jax.convert.engine import ConversionError  # noqa: E402
from mmedit_jax.loading import from_pretrained  # noqa: E402
from mmedit_jax.models.config import LlamaConfig  # noqa: E402
from mmedit_jax.models.llama import LlamaModel, position_ids  # noqa: E402

PAD, EOS, VOCAB, D = 0, 2, 100, 64
TINY = dict(vocab_size=VOCAB, hidden_size=D, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0,
            pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS)


def randomise(model, seed: int, std: float):
    """Every parameter random: linears and embeddings N(0, std), RMSNorm weights 1 + N(0, std)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, std)
            if name.endswith("norm.weight"):
                p.add_(1.0)
    return model.eval()


def hf_checkpoint(path, seed=0, std=0.2, **overrides):
    cfg = transformers.LlamaConfig(**{**TINY, **overrides})
    ref = randomise(transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="eager"), seed, std)
    ref.save_pretrained(path)
    return ref


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """`(reference model, its save_pretrained directory)`."""
    path = tmp_path_factory.mktemp("llama") / "hf"
    return hf_checkpoint(path), path


@pytest.fixture(scope="module")
def model(hf):
    return from_pretrained(hf[1])


def tokens(seed=0):
    return np.random.default_rng(seed).integers(3, VOCAB, size=(2, 8))


def right_padded(seed=0):
    ids = tokens(seed)
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    return np.where(mask > 0, ids, PAD), mask


def left_padded(seed=0):
    ids = tokens(seed)
    mask = np.ones_like(ids)
    mask[0, :3] = 0
    return np.where(mask > 0, ids, PAD), mask


def hf_logits(ref, ids=None, mask=None, positions=None, embeds=None):
    t = lambda a: None if a is None else torch.from_numpy(np.array(a))  # noqa: E731 (a writable copy)
    with torch.no_grad():
        out = ref(input_ids=t(ids), attention_mask=t(mask), position_ids=t(positions), inputs_embeds=t(embeds))
    return out.logits.float().numpy()


def close(got, want, rel=1e-4):
    """Max abs error within `rel` of the reference logits' largest magnitude (what "1e-4 relative" means here)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    err, scale = np.abs(got - want).max(), np.abs(want).max()
    assert err <= rel * scale, f"max error {err:.3g} > {rel} * {scale:.3g}"


def test_config_from_and_to_hf():
    hf_cfg = transformers.LlamaConfig(**TINY)
    cfg = LlamaConfig.from_hf(hf_cfg.to_dict())  # transformers 5: rope_theta inside rope_parameters
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.rope_theta, cfg.tie_word_embeddings) == (2, 16, 1e4, False)
    again = transformers.LlamaConfig(**cfg.to_hf())
    assert LlamaConfig.from_hf(again.to_dict()) == cfg
    assert again.rope_parameters["rope_theta"] == cfg.rope_theta
    legacy = dict(TINY, model_type="llama", num_key_value_heads=None, rope_theta=500.0, eos_token_id=[2, 7])
    cfg = LlamaConfig.from_hf(legacy)  # transformers 4's config.json
    assert (cfg.num_key_value_heads, cfg.rope_theta, cfg.eos_token_id) == (4, 500.0, 2)
    assert LlamaConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="RoPE scaling"):
        LlamaConfig.from_hf(dict(TINY, rope_scaling={"rope_type": "linear", "factor": 2.0}))
    with pytest.raises(ValueError, match="num_key_value_heads"):
        LlamaConfig(num_attention_heads=4, num_key_value_heads=3, hidden_size=64)


def test_logits_right_padding_every_position(hf, model):
    """Default positions `arange(L)` as transformers' forward (and EasyEdit's MiniGPT-4): every position matches,
    the padded ones included (locality compares them all)."""
    ref, _ = hf
    ids, mask = right_padded()
    close(model(ids, mask), hf_logits(ref, ids, mask))


def test_logits_left_padding_positions_from_mask(hf, model):
    ref, _ = hf
    ids, mask = left_padded()
    pos = np.asarray(position_ids(jnp.asarray(mask)))
    assert pos[0].tolist() == [1, 1, 1, 0, 1, 2, 3, 4]
    got, want = np.asarray(model(ids, mask, positions=pos)), hf_logits(ref, ids, mask, positions=pos)
    keep = mask.astype(bool)
    close(got[keep], want[keep])
    # Rotary attention sees position differences only: default positions agree at every real token.
    close(np.asarray(model(ids, mask))[keep], want[keep])


def test_bfloat16_within_tolerance(hf, model):
    ref, path = hf
    bf16 = from_pretrained(path, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(bf16.params)} == {jnp.dtype(jnp.bfloat16)}
    ids, mask = right_padded()
    got = np.asarray(bf16(ids, mask))
    want32 = hf_logits(ref, ids, mask)
    want16 = hf_logits(copy.deepcopy(ref).to(torch.bfloat16), ids, mask)
    close(got, want16, rel=0.03)
    close(got, want32, rel=0.05)
    assert (got.argmax(-1) == want32.argmax(-1)).mean() >= 0.85
    assert (got.argmax(-1) == want16.argmax(-1)).mean() >= 0.85


def test_greedy_generation_left_padding(hf, model):
    """Greedy tokens as transformers' `generate` (positions from the mask, a KV cache); an eos token ends its row,
    the rest padded. One compiled program for prompts as ids and as embeddings."""
    ref, _ = hf
    ids, mask = left_padded(seed=3)

    def hf_generate(eos):
        with torch.no_grad():
            out = ref.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                               max_new_tokens=10, do_sample=False, num_beams=1, pad_token_id=PAD, eos_token_id=eos)
        return out.numpy()[:, ids.shape[1]:]

    free = hf_generate(None)
    assert len(set(free.ravel().tolist())) > 3, "degenerate reference: pick another seed"
    eos = int(free[0, 3])  # row 0 stops after 4 tokens; row 1 runs on (it never emits this one)
    assert eos not in free[1].tolist()
    want = hf_generate(eos)
    got = model.generate(ids, mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=PAD)
    np.testing.assert_array_equal(got[:, : want.shape[1]], want)
    np.testing.assert_array_equal(got[1], free[1])
    assert (got[0, 4:] == PAD).all()
    embeds = np.asarray(model.module.apply({"params": model.params}, jnp.asarray(ids), method="embed_inputs"))
    np.testing.assert_array_equal(model.generate(None, mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=PAD,
                                                 inputs_embeds=embeds), got)


def random_patch(seed=0):
    """Low-rank deltas on the MLP and a grouped K projection, a dense one on an output projection."""
    rng = np.random.default_rng(seed)
    low = lambda i, o: P.LowRank(jnp.asarray(rng.standard_normal((2, i)), jnp.float32),  # noqa: E731
                                 jnp.asarray(rng.standard_normal((2, o)), jnp.float32), jnp.asarray(0.05))
    return {
        "language_model/layers/1/mlp/down_proj": low(96, D),
        "language_model/layers/2/mlp/up_proj": low(D, 96),
        "language_model/layers/2/self_attn/k_proj": low(D, 32),
        "language_model/layers/0/self_attn/o_proj": P.Dense(jnp.asarray(0.05 * rng.standard_normal((D, D)),
                                                                        jnp.float32)),
    }


def test_patch_equals_the_edited_weights(hf, model):
    """A patch changes the output exactly as adding its delta to the weights: ours materialised, and transformers'
    `nn.Linear.weight += delta.T`."""
    ref, _ = hf
    ids, mask = right_padded()
    patch = random_patch()
    got = np.asarray(model(ids, mask, patch=patch))
    close(got, np.asarray(model(ids, mask, params=P.apply_patch(model.params, patch, model.stacks))), rel=1e-5)
    edited = copy.deepcopy(ref)
    with torch.no_grad():
        for site, delta in patch.items():
            i, rest = site.removeprefix("language_model/layers/").split("/", 1)
            linear = edited.model.layers[int(i)].get_submodule(rest.replace("/", "."))
            linear.weight += torch.from_numpy(np.asarray(delta.dense()).T.copy())
    close(got, hf_logits(edited, ids, mask))
    assert np.abs(got - hf_logits(ref, ids, mask)).max() > 1e-2


def test_inputs_embeds_rows_and_prefix_resume(hf, model):
    """`inputs_embeds` (how MiniGPT-4 splices image embeddings in) against transformers'; answer rows and the
    prefix/resume split against the whole patched forward."""
    ref, _ = hf
    ids, mask = right_padded()
    embeds = (0.5 * np.random.default_rng(1).standard_normal((2, 8, D))).astype(np.float32)
    close(model(None, mask, inputs_embeds=embeds), hf_logits(ref, None, mask, embeds=embeds))

    rows = jnp.asarray([[1, 4, 7], [0, 2, 3]])
    patch = {k: v for k, v in random_patch(2).items() if "layers/0/" not in k}  # layers 1, 2: resumable from 1

    @jax.jit
    def run(params, ids, mask, rows, patch):
        apply = lambda *a, **k: model.module.apply({"params": params}, *a, **k)  # noqa: E731
        full, _ = apply(ids, mask, patch=patch)
        at_rows, _ = apply(ids, mask, patch=patch, rows=rows)
        h = apply(ids, mask, stop=1, method="text_prefix")
        resumed, _ = apply(h, mask, 1, patch=patch, method="text_resume")
        return full, at_rows, resumed

    full, at_rows, resumed = (np.asarray(x) for x in run(model.params, jnp.asarray(ids), jnp.asarray(mask), rows,
                                                         patch))
    close(at_rows, np.take_along_axis(full, np.asarray(rows)[..., None], axis=1), rel=1e-5)
    close(resumed, full, rel=1e-5)


def test_taps_give_the_weight_gradient(hf, model):
    """A tap on an MLP projection records its input and gives the output gradient: their outer product summed over
    positions is the weight gradient (the factors MEND and KE edit with), here transformers' autograd one."""
    ref, _ = hf
    ids, mask = right_padded()
    site = "language_model/layers/1/mlp/down_proj"

    def loss_eps(eps):
        logits, cap = model.module.apply({"params": model.params}, jnp.asarray(ids), jnp.asarray(mask),
                                         taps={site: eps})
        return logits[..., 5].sum(), cap[site]

    delta, u = jax.jit(jax.grad(loss_eps, has_aux=True))(jnp.zeros((2, 8, D)))
    assert u.shape == (2, 8, 96)
    weight = ref.model.layers[1].mlp.down_proj.weight
    ref.zero_grad()
    ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits[..., 5].sum().backward()
    want = weight.grad.numpy().T  # [out, in] -> our kernel's [in, out]
    ref.zero_grad()
    got = np.asarray(jnp.einsum("bli,blo->io", u, delta))
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_variant_tied_biases_explicit_head_dim(tmp_path):
    """Tied head, attention and MLP biases, `head_dim` apart from `hidden_size / heads`, one K/V head."""
    path = tmp_path / "hf"
    ref = hf_checkpoint(path, seed=4, num_key_value_heads=1, head_dim=8, tie_word_embeddings=True,
                        attention_bias=True, mlp_bias=True, rope_theta=500.0)
    keys = json.loads((path / "config.json").read_text())
    assert keys["tie_word_embeddings"] is True
    model = from_pretrained(path)
    assert "lm_head" not in model.params["language_model"]
    assert model.params["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"].shape == (3, D, 32)
    ids, mask = right_padded()
    close(model(ids, mask), hf_logits(ref, ids, mask))


def test_convert_cli_round_trip(hf, model, tmp_path):
    _, path = hf
    out = tmp_path / "converted"
    assert cli.main(["--hf-dir", str(path), "--out", str(out)]) == 0
    assert json.loads((out / "mmedit_config.json").read_text())["model_type"] == "llama"
    again = from_pretrained(out)
    assert isinstance(again, LlamaModel) and again.config == model.config
    for x, y in zip(jax.tree.leaves(model.params), jax.tree.leaves(again.params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_broken_checkpoints_name_the_tensor(hf, tmp_path):
    from safetensors.numpy import load_file, save_file

    _, src = hf
    path = tmp_path / "hf"
    path.mkdir()
    (path / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    key = "model.layers.1.mlp.gate_proj.weight"

    def write(d):
        save_file(d, path / "model.safetensors")

    write({**tensors, key: np.zeros((3, 3), np.float32)})
    with pytest.raises(ConversionError, match=r"gate_proj\.weight.*\(3, 3\)"):
        from_pretrained(path)
    write({k: v for k, v in tensors.items() if k != key})
    with pytest.raises(ConversionError, match="gate_proj"):
        from_pretrained(path)
    write({**tensors, "model.surprise.weight": np.zeros(2, np.float32)})
    with pytest.raises(ConversionError, match="surprise"):
        from_pretrained(path)
    # Legacy checkpoints' rotary buffers are recomputed, not read.
    write({**tensors, "model.layers.0.self_attn.rotary_emb.inv_freq": np.zeros(8, np.float32)})
    assert from_pretrained(path).config.num_hidden_layers == 3
    with pytest.raises(ValueError, match="no vision tower"):
        from_pretrained(path, image_size=224)


def test_every_parameter_has_a_partition_rule(model):
    specs = jax.tree.leaves(sharding.param_specs(model.params),
                            is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert len(specs) == len(jax.tree.leaves(model.params))
    layers = sharding.param_specs(model.params)["language_model"]["layers"]
    assert layers["mlp"]["down_proj"]["kernel"] == jax.sharding.PartitionSpec(None, "model", None)
