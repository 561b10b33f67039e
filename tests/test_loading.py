"""from_pretrained's directory detection, the conversion CLI, and (with the model) end-to-end parity."""

import json
import subprocess
import sys
import types

import pytest

import mmedit_jax
from mmedit_jax import checkpoint, loading
from mmedit_jax.convert import __main__ as cli


def test_import_is_lazy():
    code = "import sys, mmedit_jax; print('orbax.checkpoint' in sys.modules, 'jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
    from mmedit_jax import api

    assert mmedit_jax.from_pretrained is api.from_pretrained  # loading.from_pretrained + tokenizer, answer()
    with pytest.raises(AttributeError, match="no_such_thing"):
        mmedit_jax.no_such_thing  # noqa: B018


def test_detect(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model directory"):
        loading.detect(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="neither a converted checkpoint"):
        loading.detect(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "blip-2"}))
    assert loading.detect(tmp_path) == "hf"
    (tmp_path / checkpoint.CONFIG_FILE).write_text("{}")
    assert loading.detect(tmp_path) == "converted"


def test_read_hf_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        loading.read_hf_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ValueError, match="model_type is 'llava'"):
        loading.read_hf_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "blip-2", "num_query_tokens": 4}))
    assert loading.read_hf_config(tmp_path).num_query_tokens == 4


def test_copy_side_files(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    for name in ["config.json", "tokenizer.json", "tokenizer_config.json", "merges.txt", "model.safetensors",
                 "model.safetensors.index.json", "pytorch_model.bin"]:
        (src / name).write_text(name)
    assert cli.copy_side_files(str(src), str(out)) == ["config.json", "merges.txt", "tokenizer.json",
                                                       "tokenizer_config.json"]


def test_subcommand_dispatch(monkeypatch, capsys):
    calls = []
    fake = types.ModuleType("mmedit_jax.convert.mend_easyedit")
    fake.main = lambda argv: calls.append(argv) or 0
    monkeypatch.setitem(sys.modules, "mmedit_jax.convert.mend_easyedit", fake)
    assert cli.main(["mend-easyedit", "--ckpt", "x.pt", "--out", "y"]) == 0
    assert calls == [["--ckpt", "x.pt", "--out", "y"]]


def test_subcommand_absent_module_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(cli.SUBCOMMANDS, "mend-easyedit", "mmedit_jax.convert.no_such_module")
    assert cli.main(["mend-easyedit", "a"]) == 2
    assert "mmedit_jax.convert.no_such_module" in capsys.readouterr().err


def test_cli_arguments(tmp_path):
    with pytest.raises(SystemExit):
        cli.main(["--out", str(tmp_path)])  # --hf-dir is required
    with pytest.raises(SystemExit):
        cli.main(["--hf-dir", str(tmp_path / "absent"), "--out", str(tmp_path / "o")])
