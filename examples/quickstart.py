"""Edit facts of the built-in world model in a few lines, and print the answers before and after.

    python examples/quickstart.py            # about 35 s on 2 CPU cores, mostly compiling

The world model (shipped with the package) answers questions about rendered scenes of coloured shapes; the
shipped MEND editor turns one (image, question, new answer) into a patch, which `model.answer(..., patch=...)`
applies without ever changing the model.
"""

from __future__ import annotations

import json
import os
import tempfile

import mmedit_jax as mj
from mmedit_jax.world import assets

EDITS = [  # (eval record, new answer): the question is the record's; images are the world's rendered scenes
    (1, "purple"),
    (0, "circle"),
    (3, "three"),
]


def main(model=None, editor=None, edits=EDITS, out=print) -> list[dict]:
    """Runs the edits; returns `{question, before, target, after}` per edit (`model`, `editor`: reuse loaded
    ones, e.g. from a test; by default the world model and its shipped MEND)."""
    world = assets.ensure()  # the world's image files (generated on first use, ~2 s)
    with open(world.eval_json) as f:
        records = json.load(f)
    model = model or mj.from_pretrained("world")
    editor = editor or mj.load_editor("mend", model)

    rows = []
    for index, target in edits:
        image = os.path.join(world.image_root, records[index]["image"])
        question = records[index]["src"]
        before = model.answer(image, question)
        patch = editor.edit(image, question, target)
        after = model.answer(image, question, patch=patch)
        rows.append(dict(question=question, before=before, target=target, after=after))
        out(f"{question!r:50} {before!r:>10} -> {after!r:10} (asked for {target!r})")

    # Several independent edits in one compiled call; each answered under its own edit.
    images = [os.path.join(world.image_root, records[i]["image"]) for i, _ in edits]
    questions = [records[i]["src"] for i, _ in edits]
    patches = editor.edit_batch(images, questions, [t for _, t in edits])
    out(f"edit_batch: {model.answer(images, questions, patch=patches)}")

    # A patch is a value: save it, load it, apply it.
    with tempfile.TemporaryDirectory() as tmp:
        path = mj.save_patch(patches[0], os.path.join(tmp, "edit.safetensors"))
        loaded = mj.load_patch(path, model)
        out(f"from {os.path.basename(path)}: {model.answer(images[0], questions[0], patch=loaded)!r} "
            f"({loaded.editor}, {len(loaded)} edited layers)")
    return rows


if __name__ == "__main__":
    main()
