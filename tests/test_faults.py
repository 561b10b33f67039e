"""Hostile and damaged inputs, each with the clear outcome it must have.

1. Pickle payloads in every pickle a torch file holds, in every format torch reads (zip `data.pkl`; legacy:
   magic number, protocol version, sys info, main object, storage keys; the old tar format's storages,
   storage views, tensors and object members): the tensors-only loader of EasyEdit MEND checkpoints must never
   run them (the file loads with the payload inert, or is refused naming the file and `--trust-pickle`).
2. `pytorch_model.bin` files the weights-only reader refuses: holding code/objects (said so, with how to
   convert) versus damaged (one line naming the file).
3. Converted checkpoints (`checksums.json` beside `params/`): flipped bytes, truncation, a missing file, a
   damaged checksums file, no checksums file (older saves: warning, loads), verification skipped.
"""

import io
import os
import pickle
import pickletools
import tarfile

import numpy as np
import pytest
import torch
from safetensors.torch import save_file as st_save

from mmedit_jax.convert import engine
from mmedit_jax.convert import mend_easyedit as me

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
