"""Safe loading: no unpickling, no remote code unless asked, no config value ever run as code or shell."""

from __future__ import annotations

import ast
import builtins
import json
import pickle
from pathlib import Path

import pytest
import torch

from helpers.runs import make_config, write_instruction_data
import tuneforge
from tuneforge.cli import main
from tuneforge.config import load_config
from tuneforge.errors import AuditError, ConfigError, DataError, ModelLoadError
from tuneforge.safety import import_callable

SOURCE = Path(tuneforge.__file__).parent


# ------------------------------------------------------------------------------------- functions named by configs

def test_import_callable_returns_the_named_function():
    assert import_callable("json:dumps", key="eval.reward_fn") is json.dumps
    from helpers import runs
    assert import_callable("helpers.runs:write_instruction_data", key="k") is runs.write_instruction_data


@pytest.mark.parametrize("spec", [
    "json.dumps", "json:dumps()", "__import__('os').system('true')", "os:system; rm -rf /", "json: dumps",
    "json:dumps\n", "", ":dumps", "json:", ".relative:fn", "json:loads.__globals__", "json:__class__",
    "json:dumps:x", "lambda: 0", 42, None,
])
def test_import_callable_refuses_anything_but_module_colon_name(spec, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("evaluated")
    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    with pytest.raises(ConfigError, match="key eval.reward_fn"):
        import_callable(spec, key="eval.reward_fn")


@pytest.mark.parametrize("spec, words", [("no_such_module_xyz:fn", "cannot import module 'no_such_module_xyz'"),
                                         ("json:no_such_fn", "has no attribute 'no_such_fn'"),
                                         ("math:pi", "is a float, not a function")])
def test_import_callable_errors_name_the_key(spec, words):
    with pytest.raises(ConfigError, match=f"key eval.reward_fn: .*{words}"):
        import_callable(spec, key="eval.reward_fn")


# -------------------------------------------------------------------------------- YAML and values are only data

UNSAFE_YAML = ["model: {name: !!python/object/apply:os.system [\"touch {marker}\"]}",
               "model:\n  name: !!python/name:os.system\n",
               "train: !!python/object/new:subprocess.Popen [[\"touch\", \"{marker}\"]]"]


@pytest.mark.parametrize("text", UNSAFE_YAML)
def test_yaml_python_tags_are_refused_naming_the_file(tmp_path, text, capsys):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.yaml"
    path.write_text(text.replace("{marker}", str(marker)))
    with pytest.raises(ConfigError, match="evil.yaml: invalid YAML.*python"):
        load_config(str(path))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "evil.yaml" in err and "Traceback" not in err
    assert not marker.exists()


def test_python_tag_in_a_command_line_override_is_refused(tmp_path):
    marker = tmp_path / "ran"
    with pytest.raises(ConfigError, match="command line, key model.name"):
        load_config(None, [f"model.name=!!python/object/apply:os.system [\"touch {marker}\"]"])
    assert not marker.exists()


@pytest.mark.parametrize("value", ["$(touch {marker})", "name`touch {marker}`", "x; touch {marker}",
                                   "__import__('os').system('touch {marker}')"])
def test_config_values_that_look_like_code_stay_text(tmp_path, value):
    marker = tmp_path / "ran"
    text = value.replace("{marker}", str(marker))
    cfg = load_config(None, [f"model.name={text}", f"data.train={text}"])
    assert cfg.model.name == text and cfg.data.train == text
    from tuneforge.run import load_model_and_tokenizer
    with pytest.raises(ModelLoadError, match="no such file or folder"):
        load_model_and_tokenizer(cfg)
    from tuneforge.data.readers import read_records
    with pytest.raises(DataError, match="no such file"):
        read_records(cfg.data.train)
    assert not marker.exists()


def test_chat_template_from_a_config_runs_sandboxed():
    """A Jinja template may not reach Python internals: transformers renders it in a sandbox, and the
    refusal is a clear error, not a traceback."""
    from tuneforge.data.chat import tokenize_chat
    from tuneforge.data.records import ChatRecord, Message
    from tuneforge.models.tiny import make_tiny_tokenizer
    tok = make_tiny_tokenizer()
    tok.chat_template = "{{ cycler.__init__.__globals__.os.system('true') }}"
    record = ChatRecord([Message("user", "hi"), Message("assistant", "yo")])
    with pytest.raises(AuditError, match="chat template .* failed: SecurityError"):
        tokenize_chat(tok, record)


# ------------------------------------------------------------------------------------------------- remote code

def _spy_trust_remote_code(monkeypatch) -> list:
    import transformers
    seen = []
    for cls in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        real = cls.from_pretrained.__func__

        def spy(klass, *args, _real=real, _name=cls.__name__, **kwargs):
            seen.append((_name, kwargs.get("trust_remote_code")))
            return _real(klass, *args, **kwargs)
        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    return seen


@pytest.mark.parametrize("override, expected", [([], False), (["model.trust_remote_code=true"], True)])
def test_trust_remote_code_is_off_unless_the_config_turns_it_on(tiny_model_dir, monkeypatch, override, expected):
    from tuneforge.models.load import load_tokenizer
    from tuneforge.run import load_model_and_tokenizer
    cfg = load_config(None, [f"model.name={tiny_model_dir}", *override])
    assert cfg.model.trust_remote_code is expected
    seen = _spy_trust_remote_code(monkeypatch)
    load_model_and_tokenizer(cfg)
    load_tokenizer(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)  # the `data inspect` path
    assert {name for name, _ in seen} == {"AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"}
    assert all(value is expected for _, value in seen), seen


# ----------------------------------------------------------------------------------------------- no unpickling

def _forbid_unpickling(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    class Refused(pickle.Unpickler):
        def __init__(self, *args, **kwargs):
            refuse()
    for module, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)
    monkeypatch.setattr(pickle, "Unpickler", Refused)


def test_resume_and_adapter_loading_never_unpickle(tiny_model_dir, tmp_path, monkeypatch):
    from tuneforge.adapters.lora import load_adapter
    from tuneforge.run import load_model_and_tokenizer, train
    data = write_instruction_data(tmp_path / "d.jsonl", n=16)
    cfg = make_config(tiny_model_dir, data, tmp_path / "run", lora=True, max_steps=3, save_every=2)
    train(cfg)
    # a resume from checkpoint 2: base model, checkpoint (weights, optimizer, RNG, state), one step, final save
    _forbid_unpickling(monkeypatch)
    assert train(cfg, resume=True)["train"]["steps"] == 3
    model, _ = load_model_and_tokenizer(cfg)
    tuned = load_adapter(model, tmp_path / "run" / "final")
    assert sum("lora_" in name for name, _ in tuned.named_parameters()) > 0


# -------------------------------------------------------------------------------------- the source, statically

_FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}
_FORBIDDEN_ATTRS = {("torch", "load"), ("yaml", "load"), ("yaml", "unsafe_load"), ("yaml", "full_load"),
                    ("os", "system"), ("os", "popen"), ("np", "load"), ("numpy", "load")}
_FORBIDDEN_MODULES = {"pickle", "dill", "marshal", "shelve", "subprocess", "cloudpickle", "joblib"}


def _violations(path: Path, root: Path = SOURCE.parent) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        where = f"{path.relative_to(root)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{where}: imports {n}" for n in names if n.split(".")[0] in _FORBIDDEN_MODULES]
        elif isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id in _FORBIDDEN_CALLS:
                found.append(f"{where}: calls {f.id}")
            elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and \
                    (f.value.id, f.attr) in _FORBIDDEN_ATTRS:
                found.append(f"{where}: calls {f.value.id}.{f.attr}")
            for kw in node.keywords:
                if kw.arg in ("trust_remote_code", "shell") and isinstance(kw.value, ast.Constant) and kw.value.value:
                    found.append(f"{where}: {kw.arg}=True")
    return found


def test_source_has_no_eval_unpickling_shell_or_forced_remote_code():
    files = sorted(SOURCE.rglob("*.py"))
    assert len(files) > 20
    assert [v for f in files for v in _violations(f)] == []


def test_the_static_check_catches_what_it_looks_for(tmp_path):
    bad = tmp_path / "probe.py"
    bad.write_text("import pickle\nimport subprocess as sp\nx = eval('1')\nimport torch\ntorch.load('f')\n"
                   "f(trust_remote_code=True)\nsp.run('ls', shell=True)\nfrom dill import loads\n")
    kinds = sorted(v.split(": ", 1)[1] for v in _violations(bad, tmp_path))
    assert kinds == sorted(["imports pickle", "imports subprocess", "calls eval", "calls torch.load",
                            "trust_remote_code=True", "shell=True", "imports dill"])
