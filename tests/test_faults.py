"""Hostile and damaged inputs, each with the clear outcome it must have.

1. Pickle payloads in every pickle a torch file holds, in every format torch reads (zip `data.pkl`; legacy:
   magic number, protocol version, sys info, main object, storage keys; the old tar format's storages,
   storage views, tensors and object members): the tensors-only loader of EasyEdit MEND checkpoints must never
   run them (the file loads with the payload inert, or is refused naming the file and `--trust-pickle`).
2. `pytorch_model.bin` files the weights-only reader refuses: holding code/objects (said so, with how to
   convert) versus damaged (one line naming the file).
3. Converted checkpoints (`checksums.json` beside `params/`): flipped bytes, truncation, a missing file, a
   damaged checksums file, no checksums file (older saves: warning, loads), verification skipped.
4. Saved editors: the same damage, a truncated `params.npz` read unverified, NaN in the weights.
5. Runs: a resume into another run's directory, or into rows nothing proves are this run's; duplicated case ids.
6. Inputs: NaN/inf pixels, an edit whose patch is not finite (flagged and counted, never a silent number), a
   10,000-token question (dropped and reported, not run past the position table), `--plot` without matplotlib
   (refused before the work starts).
"""

import io
import json
import os
import pickle
import pickletools
import tarfile
import warnings

import jax
import numpy as np
import pytest
import torch
from safetensors.torch import save_file as st_save

from mmedit_jax import checkpoint, forward, integrity, pipeline
from mmedit_jax.case import take
from mmedit_jax.checkpoint import CheckpointError
from mmedit_jax.convert import engine
from mmedit_jax.convert import mend_easyedit as me
from mmedit_jax.editors import ft
from mmedit_jax.editors import io as editor_io
from mmedit_jax.eval import harness, records
from mmedit_jax.models.config import Blip2Config, OPTConfig
from mmedit_jax.world import assets

# --------------------------------------------------------------------------------------------------
# 1. Pickle payloads.


class Payload:
    """Unpickled by a plain unpickler, this creates the directory `marker`: proof that the file ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _state_dict():
    g = torch.Generator().manual_seed(0)
    return {"mend.a.u_mean": torch.randn(3, generator=g), "edit_lrs": torch.randn(2, generator=g)}


def _pickles(data: bytes, count: int) -> list[bytes]:
    """Split the first `count` concatenated pickles off `data` (read as opcodes, nothing is run); the rest of
    the bytes last."""
    f, out, start = io.BytesIO(data), [], 0
    for _ in range(count):
        for _op in pickletools.genops(f):
            pass
        out.append(data[start:f.tell()])
        start = f.tell()
    return [*out, data[start:]]


LEGACY_POSITIONS = ("magic_number", "protocol_version", "sys_info", "object", "storage_keys")


def legacy_file(path, marker, position):
    """A legacy-format (`_use_new_zipfile_serialization=False`) checkpoint with the payload at `position`: the
    object position by torch.save itself, the other four by replacing that pickle with the payload's."""
    sd = _state_dict()
    if position == "object":
        torch.save({"model": sd, "val_stats": Payload(marker)}, path, _use_new_zipfile_serialization=False)
        return
    buf = io.BytesIO()
    torch.save({"model": sd}, buf, _use_new_zipfile_serialization=False)
    parts = _pickles(buf.getvalue(), 5)
    parts[LEGACY_POSITIONS.index(position)] = pickle.dumps(Payload(marker), protocol=2)
    path.write_bytes(b"".join(parts))


TAR_POSITIONS = ("storages", "storage_views", "tensors", "pickle")


def tar_file(path, marker, position):
    """The pre-1.0 tar format (member `storages`: the storage count then the storage views; `tensors`: the
    tensor count; `pickle`: the object), with the payload in one of those four pickles."""
    pickles = {"storages": 0, "storage_views": [], "tensors": 0, "pickle": {"model": {}}}
    pickles[position] = {"model": {}, "x": Payload(marker)} if position == "pickle" else Payload(marker)
    data = {k: pickle.dumps(v, 2) for k, v in pickles.items()}
    members = {"storages": data["storages"] + data["storage_views"], "tensors": data["tensors"],
               "pickle": data["pickle"]}
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def zip_file(path, marker, position):
    torch.save({"model": _state_dict(), "val_stats": Payload(marker), "model_config": Payload(marker)}, path)


# (format, position, builder, outcome): "loads" = the state dict comes back with the payload inert; "refused"
# = ValueError naming the file and --trust-pickle. Either way the payload never runs.
PICKLE_FAULTS = [
    ("zip", "data.pkl", zip_file, "loads"),
    # torch checks the magic number and protocol version, ignores the sys info, iterates the storage keys.
    *[("legacy", p, legacy_file, "loads" if p in ("sys_info", "object") else "refused") for p in LEGACY_POSITIONS],
    *[("tar", p, tar_file, "loads" if p == "pickle" else "refused") for p in TAR_POSITIONS],
]


@pytest.mark.parametrize("fmt,position,build,outcome", PICKLE_FAULTS, ids=[f"{f[0]}-{f[1]}" for f in PICKLE_FAULTS])
def test_pickle_payload_never_runs_without_trust(tmp_path, fmt, position, build, outcome):
    marker, ckpt = tmp_path / "PAYLOAD_RAN", tmp_path / "editor.pt"
    build(ckpt, marker, position)
    if outcome == "loads":
        sd = me.load_checkpoint(str(ckpt))
        if fmt != "tar":
            want = _state_dict()
            assert sorted(sd) == sorted(want)
            for k, v in want.items():
                np.testing.assert_array_equal(sd[k], v.numpy())
    else:
        with pytest.raises(ValueError, match=r"editor\.pt.*--trust-pickle"):
            me.load_checkpoint(str(ckpt))
    assert not marker.exists(), f"the {fmt} {position} payload ran"


def test_payload_positions_are_live(tmp_path):
    """The files above really carry a runnable payload where torch's plain loader unpickles it: trusted loading
    runs it (so the test above would catch a loader that did)."""
    for fmt, position, build, _ in PICKLE_FAULTS:
        marker, ckpt = tmp_path / f"ran-{fmt}-{position}", tmp_path / f"{fmt}-{position}.pt"
        build(ckpt, marker, position)
        try:
            me.load_checkpoint(str(ckpt), trust_pickle=True)
        except Exception:  # noqa: BLE001 - a payload in a header position breaks the load after running
            pass
        assert marker.exists(), f"{fmt} {position}: the payload did not run even when trusted"


def test_legacy_format_editor_loads_through_the_restricted_unpickler(tmp_path):
    sd = _state_dict()
    torch.save({"model": sd, "step": 3}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    got = me.load_checkpoint(str(tmp_path / "legacy.pt"))
    assert sorted(got) == sorted(sd)
    np.testing.assert_array_equal(got["edit_lrs"], sd["edit_lrs"].numpy())


def test_torchscript_archive_is_refused_without_trust(tmp_path):
    class M(torch.nn.Module):
        def forward(self, x):
            return x + 1

    torch.jit.save(torch.jit.script(M()), tmp_path / "scripted.pt")
    with pytest.raises(ValueError, match=r"scripted\.pt is a TorchScript archive.*--trust-pickle"):
        me.load_checkpoint(str(tmp_path / "scripted.pt"))


# --------------------------------------------------------------------------------------------------
# 2. pytorch_model.bin refused by the weights-only reader: code/objects versus damage.


def _bin_dir(tmp_path, obj, legacy=False):
    d = tmp_path / "hf"
    d.mkdir(exist_ok=True)
    torch.save(obj, d / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
    return d


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_bin_holding_code_is_refused_as_such(tmp_path, legacy):
    d = _bin_dir(tmp_path, {"w": torch.ones(2), "x": Payload(tmp_path / "ran")}, legacy)
    with pytest.raises(engine.ConversionError) as e:
        engine.open_checkpoint(d)
    msg = str(e.value)
    assert "pytorch_model.bin was refused" in msg and "holds code or objects" in msg and "posix.mkdir" in msg
    assert "save_file" in msg and "safe_serialization=True" in msg and "corrupt" not in msg
    assert len(msg.splitlines()) == 1
    assert not (tmp_path / "ran").exists()


def test_legacy_bin_of_tensors_loads(tmp_path):
    d = _bin_dir(tmp_path, {"w": torch.arange(3.0)}, legacy=True)
    np.testing.assert_array_equal(engine.open_checkpoint(d).read("w"), [0, 1, 2])


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip_header", "truncate_legacy"])
def test_damaged_bin_is_one_line_naming_the_file(tmp_path, damage):
    d = _bin_dir(tmp_path, {"w": torch.ones(4000)}, legacy=damage.endswith("legacy"))
    f = d / "pytorch_model.bin"
    data = bytearray(f.read_bytes())
    if damage.startswith("truncate"):
        data = data[: len(data) // 2 if damage == "truncate" else len(data) - 5]
    elif damage == "garbage":
        data = bytearray(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    else:
        data[100:500] = bytes(400)
    f.write_bytes(bytes(data))
    with pytest.raises(engine.ConversionError) as e:
        engine.open_checkpoint(d).read("w")
    msg = str(e.value)
    assert msg.startswith(f"corrupt or truncated PyTorch checkpoint {f}") and len(msg.splitlines()) == 1, msg
    assert "refused" not in msg


def test_safetensors_is_untouched(tmp_path):
    """Sanity: a safetensors file next to the faults above still converts (the fixes do not reach it)."""
    st_save({"w": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    np.testing.assert_array_equal(engine.open_checkpoint(tmp_path).read("w"), [1, 1])


# --------------------------------------------------------------------------------------------------
# 3. Converted checkpoints.

CONFIG = Blip2Config(text=OPTConfig(vocab_size=50, hidden_size=8), num_query_tokens=2, image_token_index=49)


def _tree(seed=0):
    rng = np.random.default_rng(seed)
    return {"query_tokens": rng.standard_normal((1, 2, 4)).astype(np.float32),
            "language_model": {"fc1": {"kernel": rng.standard_normal((64, 256)).astype(np.float32)}}}


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


@pytest.fixture
def saved(tmp_path):
    checkpoint.save_model(tmp_path / "m", CONFIG, _tree())
    return tmp_path / "m"


def _largest_data_file(path):
    files = [os.path.join(path, f) for f in integrity.list_files(path, checkpoint.PARAMS_DIR)]
    return max(files, key=os.path.getsize)


def _flip(file, n=400):
    data = bytearray(open(file, "rb").read())
    start = len(data) // 3
    data[start:start + n] = bytes(b ^ 0xFF for b in data[start:start + n])
    open(file, "wb").write(bytes(data))


def _truncate(file):
    data = open(file, "rb").read()
    open(file, "wb").write(data[: len(data) // 2])


def _delete(file):
    os.remove(file)


# (fault, what is done to the largest data file under params/, expected message)
CHECKPOINT_FAULTS = [
    ("flip 400 bytes", _flip, r"is corrupt \(sha256 differs.*re-convert"),
    ("truncate", _truncate, r"is truncated \(\d+ bytes, \d+ when saved\).*re-convert"),
    ("delete", _delete, r"is missing \(listed in checksums.json\).*re-convert"),
]


@pytest.mark.parametrize("fault,damage,message", CHECKPOINT_FAULTS, ids=[f[0] for f in CHECKPOINT_FAULTS])
def test_damaged_converted_checkpoint_names_the_file(saved, fault, damage, message):
    target = _largest_data_file(saved)
    damage(target)
    with pytest.raises(CheckpointError, match=message) as e:
        checkpoint.restore_params(saved, _abstract(_tree()))
    msg = str(e.value)
    assert target in msg and len(msg.splitlines()) == 1, msg
    assert e.value.__cause__ is None and e.value.__suppress_context__


def test_checksums_written_at_save_cover_every_params_file(saved):
    table = json.loads((saved / integrity.CHECKSUMS_FILE).read_text())
    assert table["algorithm"] == "sha256"
    assert sorted(table["files"]) == integrity.list_files(saved, checkpoint.PARAMS_DIR) != []
    assert checkpoint.verify_params(saved) == len(table["files"])


def test_truncated_file_without_verification_is_one_line(saved, monkeypatch):
    """Verification skipped (or an old checkpoint): the restore error itself is one line naming the part."""
    _truncate(_largest_data_file(saved))
    with pytest.raises(CheckpointError) as e:
        checkpoint.restore_params(saved, _abstract(_tree()), verify=False)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and os.path.join(str(saved), "params", "part_00000") in msg, msg
    assert "truncated or corrupt" in msg and "re-convert" in msg


def test_checkpoint_without_checksums_loads_with_one_warning(saved):
    os.remove(saved / integrity.CHECKSUMS_FILE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = checkpoint.restore_params(saved, _abstract(_tree()))
    unverified = [w for w in caught if issubclass(w.category, integrity.UnverifiedWarning)]
    assert len(unverified) == 1 and len(str(unverified[0].message).splitlines()) == 1
    assert str(saved) in str(unverified[0].message)
    np.testing.assert_array_equal(np.asarray(got["query_tokens"]), _tree()["query_tokens"])


@pytest.mark.parametrize("how", ["keyword", "env"])
def test_skip_switch_does_no_verification(saved, monkeypatch, how):
    _flip(saved / integrity.CHECKSUMS_FILE, 1)  # would fail verification at once

    def no_hashing(*a, **k):
        raise AssertionError("verified although asked not to")

    monkeypatch.setattr(integrity, "verify_checksums", no_hashing)
    monkeypatch.setattr(integrity, "file_digest", no_hashing)
    if how == "env":
        monkeypatch.setenv(integrity.SKIP_ENV, "1")
        got = checkpoint.restore_params(saved, _abstract(_tree()))
    else:
        got = checkpoint.restore_params(saved, _abstract(_tree()), verify=False)
    np.testing.assert_array_equal(np.asarray(got["query_tokens"]), _tree()["query_tokens"])


def test_verify_true_overrides_the_env_switch(saved, monkeypatch):
    monkeypatch.setenv(integrity.SKIP_ENV, "1")
    _flip(_largest_data_file(saved))
    with pytest.raises(CheckpointError, match="is corrupt"):
        checkpoint.restore_params(saved, _abstract(_tree()), verify=True)


@pytest.mark.parametrize("content", [b"{not json", b'{"format": 99, "files": {}}',
                                     b'{"format": 1, "algorithm": "sha256", "files": {"../../x": {}}}'],
                         ids=["bad-json", "unknown-format", "path-escape"])
def test_damaged_checksums_file_is_an_error(saved, content):
    (saved / integrity.CHECKSUMS_FILE).write_bytes(content)
    with pytest.raises(CheckpointError, match="checksums.json") as e:
        checkpoint.restore_params(saved, _abstract(_tree()))
    assert len(str(e.value).splitlines()) == 1


def test_overwrite_rewrites_checksums(saved):
    checkpoint.save_model(saved, CONFIG, _tree(1), overwrite=True)
    got = checkpoint.restore_params(saved, _abstract(_tree()), verify=True)
    np.testing.assert_array_equal(np.asarray(got["query_tokens"]), _tree(1)["query_tokens"])


def test_world_model_is_verified_and_a_flip_is_caught(tmp_path):
    """The shipped world model carries checksums; a flipped byte in a copy fails from_pretrained naming it."""
    import shutil

    from mmedit_jax.loading import from_pretrained
    from mmedit_jax.world.assets import ASSETS

    src = os.path.join(ASSETS, "model")
    assert checkpoint.verify_params(src) == len(integrity.list_files(src, checkpoint.PARAMS_DIR))
    shutil.copytree(src, tmp_path / "model")
    target = _largest_data_file(tmp_path / "model")
    _flip(target)
    with pytest.raises(CheckpointError, match="is corrupt") as e:
        from_pretrained(tmp_path / "model")
    assert target in str(e.value)


def test_integrity_helpers_round_trip(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.bin").write_bytes(os.urandom(3 << 20))
    (tmp_path / "b.txt").write_text("hello")
    out = integrity.write_checksums(tmp_path)
    assert out == str(tmp_path / integrity.CHECKSUMS_FILE)
    assert integrity.verify_checksums(tmp_path) == 2
    assert integrity.file_digest(tmp_path / "b.txt") == (
        "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824")
    _flip(tmp_path / "a" / "x.bin", 1)
    with pytest.raises(integrity.IntegrityError, match=r"x\.bin is corrupt.*rebuild it") as e:
        integrity.verify_checksums(tmp_path, remedy="rebuild it")
    assert e.value.path == str(tmp_path / "a" / "x.bin")


# --------------------------------------------------------------------------------------------------
# 4. Saved editors: checksums written with them, damaged files named, non-finite weights refused.

@pytest.fixture
def saved_ke(tmp_path):
    import shutil

    src = os.path.join(assets.ASSETS, "ke_vqa")
    dst = tmp_path / "ke"
    shutil.copytree(src, dst)
    return str(dst)


def test_shipped_editors_carry_checksums_and_verify():
    for name in ("mend_vqa", "ke_vqa", "serac_vqa"):
        assert integrity.verify_checksums(os.path.join(assets.ASSETS, name)) >= 2


def test_saved_editor_round_trip_writes_checksums(tmp_path, saved_ke):
    spec, params = editor_io.load_ke(saved_ke)
    editor_io.save_ke(str(tmp_path / "again"), spec, params)
    assert integrity.verify_checksums(str(tmp_path / "again")) == 2  # spec.json and params.npz


EDITOR_FAULTS = [  # (what, damage, expected message)
    ("flipped bytes", lambda f: _flip(f), "is corrupt"),
    ("truncated", lambda f: _truncate(f), "is truncated"),
    ("deleted", lambda f: _delete(f), "is missing"),
]


@pytest.mark.parametrize("fault,damage,message", EDITOR_FAULTS, ids=[f[0] for f in EDITOR_FAULTS])
def test_damaged_editor_file_is_named(saved_ke, fault, damage, message):
    damage(os.path.join(saved_ke, "params.npz"))
    with pytest.raises(integrity.IntegrityError, match=message) as e:
        editor_io.load_ke(saved_ke)
    assert "params.npz" in str(e.value) and "train the editor again" in str(e.value)


def test_truncated_editor_without_verification_names_the_file(saved_ke):
    _truncate(os.path.join(saved_ke, "params.npz"))
    with pytest.raises(ValueError, match=r"params\.npz is truncated or corrupt"):
        editor_io.load_ke(saved_ke, verify=False)


def test_editor_without_checksums_loads_with_a_warning(saved_ke):
    os.remove(os.path.join(saved_ke, integrity.CHECKSUMS_FILE))
    with pytest.warns(integrity.UnverifiedWarning):
        editor_io.load_ke(saved_ke)


def test_non_finite_editor_weights_are_refused(tmp_path, saved_ke):
    spec, params = editor_io.load_ke(saved_ke)
    leaves, treedef = jax.tree.flatten(params)
    leaves[0] = np.asarray(leaves[0]).copy()
    leaves[0].flat[0] = np.nan
    editor_io.save_ke(str(tmp_path / "nan"), spec, jax.tree.unflatten(treedef, leaves))
    with pytest.raises(ValueError, match="holds NaN or inf"):
        editor_io.load_ke(str(tmp_path / "nan"))


# --------------------------------------------------------------------------------------------------
# 5. Runs: a resume continues only the run that wrote the directory.


def _ft(world, **kw):
    sites = ft.ft_l_sites(world.model.config.text.num_hidden_layers)
    fns = forward.fns_for(world.model, sites)
    return ft.make_ft("ft-l", fns, ft.FTConfig(inner_params=sites, **kw), world.model.params, world.model.stacks)


@pytest.fixture(scope="module")
def small_run(demo_world):
    editor = _ft(demo_world, num_steps=1)
    cases = take(pipeline.cases_for(editor.fns, demo_world.model.params, demo_world.prepared), np.arange(2))
    return editor, cases, demo_world.prepared.meta[:2]


def test_resume_into_another_runs_directory_is_refused(tmp_path, demo_world, small_run):
    editor, cases, meta = small_run
    out = str(tmp_path / "run")
    harness.run(editor, demo_world.model.params, cases, meta, out, batch_size=2, progress=False)
    again = harness.run(editor, demo_world.model.params, cases, meta, out, batch_size=2, progress=False)
    assert again.summary["resumed_cases"] == 2 and again.summary["batches"] == 0  # its own run: resumed
    other = _ft(demo_world, num_steps=2)
    with pytest.raises(records.RunMismatch, match="editor_hparams") as e:
        harness.run(other, demo_world.model.params, cases, meta, out, batch_size=2, progress=False)
    assert "--no-resume" in str(e.value)
    with pytest.raises(records.RunMismatch, match="data"):  # what the caller adds is checked too
        harness.run(editor, demo_world.model.params, cases, meta, out, batch_size=2, progress=False,
                    fingerprint={"data": "another file"})
    fresh = harness.run(other, demo_world.model.params, cases, meta, out, batch_size=2, progress=False,
                        resume=False)
    assert fresh.summary["resumed_cases"] == 0 and fresh.summary["batches"] == 1


def test_a_row_written_for_other_inputs_is_not_resumed(tmp_path, demo_world, small_run):
    editor, cases, meta = small_run
    out = str(tmp_path / "run")
    harness.run(editor, demo_world.model.params, cases, meta, out, batch_size=2, progress=False)
    ids = np.asarray(cases.edit.input_ids).copy()
    ids[0, np.nonzero(np.asarray(cases.edit.attention_mask)[0])[0][-1]] += 1  # another answer token in case 0
    changed = cases.replace(edit=cases.edit.replace(input_ids=ids))
    with pytest.raises(records.RunMismatch, match=f"record {meta[0]['index']} was written for other inputs"):
        harness.run(editor, demo_world.model.params, changed, meta, out, batch_size=2, progress=False)


def test_rows_without_a_fingerprint_are_not_resumed_into(tmp_path, demo_world, small_run):
    editor, cases, meta = small_run
    out = tmp_path / "old"
    out.mkdir()
    (out / "cases.jsonl").write_text(json.dumps({"index": meta[0]["index"], "reliability": 0.9}) + "\n")
    with pytest.raises(records.RunMismatch, match="run.json is missing"):
        harness.run(editor, demo_world.model.params, cases, meta, str(out), batch_size=2, progress=False)


def test_duplicated_case_ids_are_refused(demo_world, small_run):
    editor, cases, meta = small_run
    with pytest.raises(ValueError, match="duplicated case indices"):
        harness.run(editor, demo_world.model.params, cases, [meta[0], meta[0]], None, batch_size=2, progress=False)


# --------------------------------------------------------------------------------------------------
# 6. Inputs: non-finite pixels and patches, over-long questions, a missing optional dependency.


def test_nan_pixels_are_named(demo_world):
    pixels = demo_world.prepared.pixels.copy()
    pixels[1, 0, 0, 0] = np.inf
    fns = pipeline.build_editor("ft-l", demo_world.model).fns
    with pytest.raises(ValueError, match=r"images \[1\] .* NaN or inf"):
        fns.image_table(demo_world.model.params, pixels)


def test_non_finite_patch_is_flagged_and_counted(demo_world, small_run):
    _, cases, meta = small_run
    broken = _ft(demo_world, num_steps=1, edit_lr=float("inf"))
    result = harness.run(broken, demo_world.model.params, cases, meta, None, batch_size=2, progress=False)
    assert [r["finite"] for r in result.rows] == [False, False]
    assert result.summary["nonfinite_edits"] == 2
    out = io.StringIO()
    records.print_table(dict(result.summary, editor="ft-l"), file=out)
    assert "2 of 2 edits produced a non-finite patch" in out.getvalue()
    fine = harness.run(_ft(demo_world, num_steps=1), demo_world.model.params, cases, meta, None, batch_size=2,
                       progress=False)
    assert fine.summary["nonfinite_edits"] == 0


def test_a_10000_token_question_is_dropped_and_reported(demo_world):
    import dataclasses

    long = dataclasses.replace(demo_world.records[0], src=" ".join(["shape"] * 10000))
    prepared = pipeline.prepare_data([long, *demo_world.records[1:3]], demo_world.tok, demo_world.model, "vqa")
    assert [d["index"] for d in prepared.dropped] == [long.index]
    assert "more than the model's 256 positions" in prepared.dropped[0]["reason"]
    assert [m["index"] for m in prepared.meta] == [r.index for r in demo_world.records[1:3]]
    with pytest.raises(SystemExit, match="no record fits"):
        pipeline.prepare_data([long], demo_world.tok, demo_world.model, "vqa")


def test_plot_without_matplotlib_fails_before_any_work(monkeypatch, capsys):
    import importlib.util

    from mmedit_jax import bench

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    monkeypatch.setattr(pipeline, "world_inputs", lambda *a, **k: pytest.fail("work started before the check"))
    with pytest.raises(SystemExit):
        bench.main(["--plot", "x.png"])
    assert "pip install -e '.[plot]'" in capsys.readouterr().err
