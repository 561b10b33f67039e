"""The five MMEdit metrics and the trainer losses: hand-made logits with known answers, and an independent
NumPy re-derivation on random logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmedit_jax import losses
from mmedit_jax.eval import metrics

V = 16


def _onehot_logits(pred_ids, v=V, hi=5.0):
    """Logits [B, L, V] whose argmax at each position is pred_ids[b, t], with distinct non-tied values."""
    pred_ids = np.asarray(pred_ids)
    base = np.linspace(-1.0, 0.0, v, dtype=np.float32)  # strictly ordered, no ties
    logits = np.broadcast_to(base, pred_ids.shape + (v,)).copy()
    np.put_along_axis(logits, pred_ids[..., None], hi, axis=-1)
    return logits


# ---------- NumPy references (written independently of the jnp code) ----------

def np_token_acc_and_em(logits, labels):
    acc, em = [], []
    for lg, lab in zip(logits, labels):
        hits, total = 0, 0
        for t in range(1, len(lab)):
            if lab[t] == -100:
                continue
            total += 1
            hits += int(np.argmax(lg[t - 1]) == lab[t])
        acc.append(hits / total)
        em.append(float(hits == total))
    return np.array(acc), np.array(em)


def np_topk_agreement(pre, post, mask, k):
    out = []
    for a, b, m in zip(pre, post, mask):
        num, den = 0.0, 0
        for t in range(len(m)):
            if not m[t]:
                continue
            top_a = np.argsort(-a[t], kind="stable")[:k]
            top_b = np.argsort(-b[t], kind="stable")[:k]
            num += np.mean(top_a == top_b)
            den += 1
        out.append(num / den)
    return np.array(out)


def np_log_softmax(x):
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ---------- hand-made cases ----------

def test_accuracy_and_exact_match_disagree_on_partial_answer():
    # Sequence of 6: positions 3,4,5 are answer tokens (ids 7, 8, 9); the rest prompt / image slots.
    labels = np.array([[-100, -100, -100, 7, 8, 9],
                       [-100, -100, -100, 7, 8, 9],
                       [-100, -100, -100, 7, 8, -100]])  # third: 2-token answer, last position is padding
    # Predictions at t-1 should be labels[t].
    preds = np.array([[0, 0, 7, 8, 9, 0],   # all three right
                      [0, 0, 7, 1, 9, 0],   # 2 of 3 right
                      [0, 0, 7, 8, 3, 3]])  # both right; garbage at padding must not count
    logits = _onehot_logits(preds)
    acc = np.asarray(metrics.token_accuracy(jnp.asarray(logits), jnp.asarray(labels)))
    em = np.asarray(metrics.exact_match(jnp.asarray(logits), jnp.asarray(labels)))
    np.testing.assert_allclose(acc, [1.0, 2 / 3, 1.0], rtol=1e-6)
    np.testing.assert_array_equal(em, [1.0, 0.0, 1.0])
    np.testing.assert_array_equal(metrics.edit_accuracy(logits, labels, use_exact_match=True), em)
    np.testing.assert_allclose(metrics.edit_accuracy(logits, labels), acc, rtol=1e-6)


def test_accuracy_is_shifted_not_aligned():
    # Predicting the label at its own position (no shift) must score 0.
    labels = np.array([[-100, -100, 5, 6]])
    logits = _onehot_logits([[0, 0, 5, 6]])
    assert float(metrics.token_accuracy(logits, labels)[0]) == 0.0
    assert float(metrics.token_accuracy(_onehot_logits([[0, 5, 6, 0]]), labels)[0]) == 1.0


def test_text_locality_counts_all_unpadded_positions():
    pre_ids = np.array([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 0, 0]])
    post_ids = pre_ids.copy()
    post_ids[0, 0] = 9  # a prompt position differs: it counts (MultimodalTrainer: all positions)
    post_ids[1, 4:] = 9  # differences only at padding: ignored
    mask = np.array([[1] * 6, [1, 1, 1, 1, 0, 0]])
    tl = np.asarray(metrics.text_locality(_onehot_logits(pre_ids), _onehot_logits(post_ids), mask))
    np.testing.assert_allclose(tl, [5 / 6, 1.0], rtol=1e-6)


def test_image_locality_is_rank_ordered_top10():
    rng = np.random.default_rng(0)
    pre = rng.permutation(V).astype(np.float32)[None, None].repeat(4, axis=1)  # [1, 4, V], distinct values
    post = pre.copy()
    order = np.argsort(-pre[0, 0])
    # Position 0: swap ranks 9 and 10 (0-based 8, 9): same top-10 *set*, 2 of 10 ranks differ.
    post[0, 0, order[8]], post[0, 0, order[9]] = pre[0, 0, order[9]], pre[0, 0, order[8]]
    # Position 1: swap ranks 10 and 11: only rank 10 differs.
    post[0, 1, order[9]], post[0, 1, order[10]] = pre[0, 1, order[10]], pre[0, 1, order[9]]
    # Position 2: swap ranks 12 and 13 (outside top 10): no difference.
    post[0, 2, order[11]], post[0, 2, order[12]] = pre[0, 2, order[12]], pre[0, 2, order[11]]
    mask = np.ones((1, 4))
    ml = float(metrics.image_locality(pre, post, mask)[0])
    assert ml == pytest.approx((0.8 + 0.9 + 1.0 + 1.0) / 4)
    # The top-1 view sees no change at all.
    assert float(metrics.text_locality(pre, post, mask)[0]) == 1.0


def test_answer_position_locality_variant():
    labels = np.array([[-100, -100, 4, 5]])
    pre_ids = np.array([[9, 9, 9, 9]])
    post_ids = np.array([[1, 9, 3, 9]])  # shifted answer positions are logits 1 and 2: 9 vs 9 and 9 vs 3
    pre, post = _onehot_logits(pre_ids), _onehot_logits(post_ids)
    mask = np.ones((1, 4))
    assert float(metrics.locality(pre, post, mask, labels, 1, positions="answer")[0]) == pytest.approx(0.5)
    assert float(metrics.locality(pre, post, mask, labels, 1, positions="all")[0]) == pytest.approx(0.5)
    post2 = _onehot_logits(np.array([[1, 9, 9, 3]]))  # differ at 0 (prompt) and 3 (last, unused by shift)
    assert float(metrics.locality(pre, post2, mask, labels, 1, positions="answer")[0]) == 1.0
    assert float(metrics.locality(pre, post2, mask, labels, 1, positions="all")[0]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="positions"):
        metrics.locality(pre, post, mask, labels, 1, positions="bad")


# ---------- random logits vs NumPy ----------

@pytest.fixture(scope="module")
def random_case():
    rng = np.random.default_rng(42)
    b, l = 5, 12
    logits = rng.normal(size=(b, l, V)).astype(np.float32)
    labels = np.full((b, l), -100)
    mask = np.zeros((b, l), np.int32)
    for i in range(b):
        n = rng.integers(7, l + 1)  # unpadded length
        mask[i, :n] = 1
        n_ans = rng.integers(1, 4)
        labels[i, n - n_ans : n] = rng.integers(0, V, n_ans)
        # Make some answers right so accuracies are not all zero.
        for t in range(n - n_ans, n):
            if rng.random() < 0.5:
                labels[i, t] = np.argmax(logits[i, t - 1])
    post = logits + rng.normal(scale=0.3, size=logits.shape).astype(np.float32)
    return logits, post, labels, mask


def test_edit_metrics_match_numpy(random_case):
    logits, _, labels, _ = random_case
    acc, em = np_token_acc_and_em(logits, labels)
    assert 0 < acc.mean() < 1
    np.testing.assert_allclose(metrics.token_accuracy(logits, labels), acc, rtol=1e-6)
    np.testing.assert_array_equal(metrics.exact_match(logits, labels), em)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_topk_agreement_matches_numpy(random_case, k):
    pre, post, _, mask = random_case
    expected = np_topk_agreement(pre, post, mask, k)
    assert 0 < expected.mean() < 1
    np.testing.assert_allclose(metrics.topk_agreement(pre, post, mask, k), expected, rtol=1e-6)


def test_losses_match_numpy(random_case):
    logits, post, labels, mask = random_case
    lp = np_log_softmax(logits)
    per_ex, tot_lp, tot_n = [], 0.0, 0
    for i in range(len(labels)):
        vals = [lp[i, t - 1, labels[i, t]] for t in range(1, labels.shape[1]) if labels[i, t] != -100]
        per_ex.append(-np.mean(vals))
        tot_lp += sum(vals)
        tot_n += len(vals)
    np.testing.assert_allclose(losses.masked_nll_per_example(logits, labels), per_ex, rtol=1e-5)
    np.testing.assert_allclose(losses.masked_nll(logits, labels), -tot_lp / tot_n, rtol=1e-5)

    lpost = np_log_softmax(post)
    kl = (np.exp(lp) * (lp - lpost)).sum(-1)  # [B, L]
    np.testing.assert_allclose(losses.kl_loc_loss(logits, post, mask), (kl * mask).sum() / mask.sum(),
                               rtol=1e-5)
    np.testing.assert_allclose(losses.kl_loc_loss_per_example(logits, post, mask),
                               (kl * mask).sum(-1) / mask.sum(-1), rtol=1e-5)
    assert float(losses.kl_loc_loss(logits, logits, mask)) == pytest.approx(0.0, abs=1e-6)


def test_kl_ignores_padding_and_is_differentiable(random_case):
    logits, post, _, mask = random_case
    garbage = np.where(mask[..., None] == 0, 100.0, post).astype(np.float32)
    np.testing.assert_allclose(losses.kl_loc_loss(logits, garbage, mask),
                               losses.kl_loc_loss(logits, post, mask), rtol=1e-6)
    g = jax.grad(lambda p: losses.kl_loc_loss(jax.lax.stop_gradient(logits), p, mask))(jnp.asarray(post))
    assert np.all(np.asarray(g)[mask == 0] == 0)
    assert np.any(np.asarray(g)[mask == 1] != 0)


def test_topk_rank_loss_sees_reorderings_not_shifts(random_case):
    logits, post, _, mask = random_case
    k = 5
    # A shift common to every token changes no rank: zero loss.
    assert float(losses.topk_rank_loss(logits, logits + 3.0, mask, k)) == pytest.approx(0.0, abs=1e-6)
    # By hand: centred squared logit changes at the unedited top-k, averaged, masked mean over positions.
    idx = np.argsort(-logits, axis=-1, kind="stable")[..., :k]
    d = np.take_along_axis(post - logits, idx, axis=-1)
    per_pos = ((d - d.mean(-1, keepdims=True)) ** 2).mean(-1)
    np.testing.assert_allclose(losses.topk_rank_loss(logits, post, mask, k), (per_pos * mask).sum() / mask.sum(),
                               rtol=1e-5)
    # Changes outside the unedited top-k, or at padding, cost nothing; inside they do.
    outside = post.copy()
    outside[...] = logits
    low = np.argsort(-logits, axis=-1)[..., -1]
    np.put_along_axis(outside, low[..., None], 50.0, axis=-1)
    assert float(losses.topk_rank_loss(logits, outside, mask, k)) == pytest.approx(0.0, abs=1e-6)
    garbage = np.where(mask[..., None] == 0, 100.0 * np.random.default_rng(0).normal(size=post.shape), post)
    np.testing.assert_allclose(losses.topk_rank_loss(logits, garbage.astype(np.float32), mask, k),
                               losses.topk_rank_loss(logits, post, mask, k), rtol=1e-6)
    g = jax.grad(lambda p: losses.topk_rank_loss(jnp.asarray(logits), p, mask, k))(jnp.asarray(post))
    assert np.all(np.asarray(g)[mask == 0] == 0) and np.any(np.asarray(g)[mask == 1] != 0)


def test_mmedit_metrics_jit_and_vmap(random_case):
    from types import SimpleNamespace

    logits, post, labels, mask = random_case
    names = ("edit", "rephrase", "image_rephrase", "loc", "loc_image")

    @jax.jit
    def score(post_logits, pre_logits, labels, mask):
        tb = SimpleNamespace(labels=labels, attention_mask=mask)
        b = SimpleNamespace(**{n: tb for n in names})
        return metrics.mmedit_metrics({n: post_logits for n in names}, pre_logits, pre_logits, b,
                                      use_exact_match=True)

    out = score(jnp.asarray(post), jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
    _, em = np_token_acc_and_em(post, labels)
    np.testing.assert_array_equal(out["reliability"], em)
    np.testing.assert_allclose(out["t_locality"], np_topk_agreement(logits, post, mask, 1), rtol=1e-6)
    np.testing.assert_allclose(out["m_locality"], np_topk_agreement(logits, post, mask, 10), rtol=1e-6)
    # A leading edit axis: vmap over edits, each seen as a batch of 1.
    per_edit = jax.vmap(score)(jnp.asarray(post)[:, None], jnp.asarray(logits)[:, None],
                               jnp.asarray(labels)[:, None], jnp.asarray(mask)[:, None])
    for k in out:
        np.testing.assert_allclose(per_edit[k][:, 0], out[k], rtol=1e-6)
