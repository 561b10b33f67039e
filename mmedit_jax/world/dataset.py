"""The built-in world as MMEdit data: E-VQA and E-IC splits in the released JSON schema, and a pretraining stream.

Per record (E-VQA): a scene and a question about one attribute (colour, shape or count) in one phrasing (`src`)
and another (`rephrase`); `pred` is the true answer and `alt` a different value of the same attribute (the
counterfactual edit); `image` and `image_rephrase` are the scene drawn with two layouts; `loc`/`loc_ans` an
encyclopaedia fact (text only); `m_loc`/`m_loc_q`/`m_loc_a` another scene with a true question/answer.
E-IC is the same with captions ("two red circles") prompted by "a photo of" / "an image of".

Edit and locality scenes are fresh draws per split and seed, so eval images are never seen in pretraining
(which renders its own scenes); the facts are shared by every split, as world knowledge is.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator

import numpy as np

from mmedit_jax.editors.ike import demo, fact_line
from mmedit_jax.world import scenes as S
from mmedit_jax.world.facts import encyclopaedia, word

QUESTIONS = {
    "color": ("What color are the shapes?", "Which color do the objects have?",
              "What is the color of the shapes in the picture?"),
    "shape": ("What shape are the objects?", "Which shape is shown in the image?",
              "What kind of shape appears in the picture?"),
    "count": ("How many shapes are there?", "How many objects are in the image?",
              "What is the number of shapes shown?"),
}
CAPTION_PROMPTS = ("a photo of", "a picture of", "an image of")
VQA_TEMPLATE = "Question: {} Short answer:"  # as data/cases.py templates E-VQA prompts


def answer(scene: S.Scene, attribute: str) -> str:
    return {"color": scene.color, "shape": scene.shape, "count": scene.count_word}[attribute]


def counterfactual(scene: S.Scene, attribute: str, rng: np.random.Generator) -> S.Scene:
    """The scene with `attribute` changed to another value (what the edit claims)."""
    if attribute == "color":
        others = [c for c in S.COLORS if c != scene.color]
        return dataclasses.replace(scene, color=others[rng.integers(len(others))])
    if attribute == "shape":
        others = [s for s in S.SHAPES if s != scene.shape]
        return dataclasses.replace(scene, shape=others[rng.integers(len(others))])
    others = [n for n in range(1, len(S.COUNTS) + 1) if n != scene.count]
    return dataclasses.replace(scene, count=others[rng.integers(len(others))])


def _two_phrasings(rng, options):
    i, j = rng.choice(len(options), 2, replace=False)
    return options[int(i)], options[int(j)]


@dataclasses.dataclass(frozen=True)
class WorldPaths:
    root: str  # image root (and rephrase image root)
    files: dict  # "vqa_train" -> path, ...


def _draw(rng, scene: S.Scene, size: int) -> np.ndarray:
    return S.render(scene, S.random_layout(rng, scene.count), size, rng)


def make_records(task: str, split: str, n: int, rng: np.random.Generator, root: str, image_size: int) -> list[dict]:
    """`n` records of `task` ("vqa" | "caption"), writing their PNGs under `root/images/{task}_{split}/`."""
    facts = encyclopaedia()
    rel_dir = f"images/{task}_{split}"
    os.makedirs(os.path.join(root, rel_dir), exist_ok=True)
    records = []
    for i in range(n):
        scene = S.random_scene(rng)
        attribute = list(QUESTIONS)[rng.integers(len(QUESTIONS))]
        if task == "vqa":
            src, rephrase = _two_phrasings(rng, QUESTIONS[attribute])
            pred, alt = answer(scene, attribute), answer(counterfactual(scene, attribute, rng), attribute)
        else:
            src, rephrase = _two_phrasings(rng, CAPTION_PROMPTS)
            pred, alt = scene.caption(), counterfactual(scene, attribute, rng).caption()
        fact = facts[rng.integers(len(facts))]
        other = S.random_scene(rng)
        m_attr = list(QUESTIONS)[rng.integers(len(QUESTIONS))]
        m_q = QUESTIONS[m_attr][rng.integers(len(QUESTIONS[m_attr]))]
        names = {k: f"{rel_dir}/{i:05d}{suffix}.png" for k, suffix in
                 (("image", ""), ("image_rephrase", "_rephrase"), ("m_loc", "_mloc"))}
        S.save_png(_draw(rng, scene, image_size), os.path.join(root, names["image"]))
        S.save_png(_draw(rng, scene, image_size), os.path.join(root, names["image_rephrase"]))
        S.save_png(_draw(rng, other, image_size), os.path.join(root, names["m_loc"]))
        records.append({
            "src": src, "pred": pred, "rephrase": rephrase, "alt": alt,
            "image": names["image"], "image_rephrase": names["image_rephrase"],
            "loc": fact.question, "loc_ans": fact.answer,
            "m_loc": names["m_loc"], "m_loc_q": m_q, "m_loc_a": answer(other, m_attr),
        })
    return records


FILE_NAMES = {("vqa", "train"): "vqa_train.json", ("vqa", "eval"): "vqa_eval.json",
              ("caption", "train"): "caption_train_edit.json", ("caption", "eval"): "caption_eval_edit.json"}


def write_world(out_dir: str, seed: int = 0, n_train: int = 512, n_eval: int = 128, image_size: int = 32,
                tasks=("vqa", "caption")) -> WorldPaths:
    """Writes every split's JSON (released schema) and PNGs under `out_dir`; deterministic given the arguments."""
    os.makedirs(out_dir, exist_ok=True)
    files = {}
    for t_i, task in enumerate(tasks):
        for s_i, (split, n) in enumerate((("train", n_train), ("eval", n_eval))):
            rng = np.random.default_rng([seed, t_i, s_i])
            records = make_records(task, split, n, rng, out_dir, image_size)
            path = os.path.join(out_dir, FILE_NAMES[(task, split)])
            with open(path, "w", encoding="utf-8") as f:
                json.dump(records, f, indent=1)
            files[f"{task}_{split}"] = path
    return WorldPaths(out_dir, files)


# --------------------------------------------------------------------------------------------------
# Pretraining: what the base model must know, as (image or None, prompt, target) in the harness's format.


@dataclasses.dataclass(frozen=True)
class Example:
    image: np.ndarray | None  # [S, S, 3] uint8
    prompt: str
    target: str  # with its leading space, as data/cases.py builds targets
    context: str = ""  # IKE's demonstrations and "New Fact" line, placed after the image slots (in-context examples)


def world_texts(in_context: bool = False) -> list[str]:
    """Every string the world can produce (for the tokenizer); with `in_context`, IKE's demonstration format too
    (so "New Fact:" and "Prompt:" are a few tokens, not a dozen bytes)."""
    texts = [VQA_TEMPLATE.format(q) for qs in QUESTIONS.values() for q in qs]
    texts += list(CAPTION_PROMPTS)
    texts += [" " + s.caption() for s in S.all_scenes()]
    texts += [" " + w for w in (*S.SHAPES, *S.COLORS, *S.COUNTS)]
    for f in encyclopaedia():
        texts += [f.question, " " + f.answer]
    if in_context:
        stream = in_context_stream(0, image_size=8, max_demos=1)
        texts += [next(stream).context for _ in range(64)]
    return texts


def pretraining_stream(seed: int, image_size: int, p_fact: float = 0.25,
                       p_caption: float = 0.25) -> Iterator[Example]:
    """Endless examples: a fresh scene per example (so no image is seen twice), asked in any phrasing, or a fact."""
    rng = np.random.default_rng([seed, 99])
    facts = encyclopaedia()
    while True:
        r = rng.random()
        if r < p_fact:
            f = facts[rng.integers(len(facts))]
            yield Example(None, f.question, " " + f.answer)
            continue
        scene = S.random_scene(rng)
        image = _draw(rng, scene, image_size)
        if r < p_fact + p_caption:
            yield Example(image, CAPTION_PROMPTS[rng.integers(len(CAPTION_PROMPTS))], " " + scene.caption())
        else:
            attribute = list(QUESTIONS)[rng.integers(len(QUESTIONS))]
            q = QUESTIONS[attribute][rng.integers(len(QUESTIONS[attribute]))]
            yield Example(image, VQA_TEMPLATE.format(q), " " + answer(scene, attribute))


def _edit_fact(task: str, rng: np.random.Generator):
    """A fresh scene and a counterfactual edit of it, as a record of `task` states it: (scene, attribute, fact
    prompt p, rephrased prompt, new answer t without its leading space)."""
    scene = S.random_scene(rng)
    attribute = list(QUESTIONS)[rng.integers(len(QUESTIONS))]
    new = counterfactual(scene, attribute, rng)
    if task == "vqa":
        src, rephrase = _two_phrasings(rng, QUESTIONS[attribute])
        return scene, attribute, VQA_TEMPLATE.format(src), VQA_TEMPLATE.format(rephrase), answer(new, attribute)
    src, rephrase = _two_phrasings(rng, CAPTION_PROMPTS)
    return scene, attribute, src, rephrase, new.caption()


def random_answer(rng: np.random.Generator, facts, task: str = "vqa") -> str:
    """A new answer that nothing but its statement implies (so an in-context fact stating it can only be copied,
    not guessed from the question's attribute or the image): for E-VQA any world word, an encyclopaedia answer or
    a made-up word; for E-IC a caption's shape, a random scene's caption or three such words."""
    if task == "caption":
        if rng.random() < 0.5:
            return S.random_scene(rng).caption()
        return " ".join(random_answer(rng, facts) for _ in range(3))
    kind = rng.integers(3)
    if kind == 0:
        words = (*S.SHAPES, *S.COLORS, *S.COUNTS)
        return words[rng.integers(len(words))]
    if kind == 1:
        return facts[rng.integers(len(facts))].answer
    return word(rng, 1)


def in_context_stream(seed: int, image_size: int, max_demos: int = 2, p_caption: float = 0.25,
                      p_random_target: float = 0.0) -> Iterator[Example]:
    """Endless IKE-shaped examples, so that the world model learns to use a demonstrated new fact.

    Each is what IKE feeds one post-edit input (`editors.ike`): `0..max_demos` demonstrations of other edits of
    the same task (copy, update or retain, EasyEdit's three kinds, chosen at random where IKE retrieves), the
    edit's own copy demonstration, the "New Fact" line, then, as likely, an in-scope or an out-of-scope input: the
    edit prompt or its rephrasing on a fresh drawing of the scene (answer: the new fact; the edit's own image is
    never in the context, so the first drawing and a re-rendered one read alike), or a world fact or another
    scene's question (answer: the truth; for E-VQA on another attribute than the edit's, since a question on the
    same attribute of an unseen image reads as the edited one). Fresh scenes throughout, as `pretraining_stream`.
    With probability `p_random_target` per fact (demos' and the edit's), the new answer is `random_answer`, not
    another value of the attribute: a model that learned a copy per answer word (or per attribute) pays for it.
    """
    rng = np.random.default_rng([seed, 98])
    facts = encyclopaedia()
    while True:
        task = "caption" if rng.random() < p_caption else "vqa"
        demos = []
        for _ in range(rng.integers(max_demos + 1)):
            _, _, p, rephrase, t = _edit_fact(task, rng)
            t = random_answer(rng, facts, task) if p_random_target and rng.random() < p_random_target else t
            kind = rng.integers(3)
            if kind == 2:
                f = facts[rng.integers(len(facts))]
                demos.append(demo(p, t, f.question, f.answer))
            else:
                demos.append(demo(p, t, rephrase if kind else p, t))
        scene, attribute, p, rephrase, t = _edit_fact(task, rng)
        t = random_answer(rng, facts, task) if p_random_target and rng.random() < p_random_target else t
        context = "".join(demos) + demo(p, t, p, t) + fact_line(p, t)
        kind = rng.integers(4)
        if kind < 2:  # the edit prompt or its rephrasing: the new fact
            yield Example(_draw(rng, scene, image_size), rephrase if kind else p, " " + t, context)
        elif kind == 2:
            f = facts[rng.integers(len(facts))]
            yield Example(None, f.question, " " + f.answer, context)
        else:
            other = S.random_scene(rng)
            others = [a for a in QUESTIONS if task == "caption" or a != attribute]
            m_attr = others[rng.integers(len(others))]
            q = QUESTIONS[m_attr][rng.integers(len(QUESTIONS[m_attr]))]
            yield Example(_draw(rng, other, image_size), VQA_TEMPLATE.format(q), " " + answer(other, m_attr), context)
