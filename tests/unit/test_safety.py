"""Nothing raydistill reads can run code: no pickle-family loaders, no full ``torch.load``, no pickled numpy,
no remote model code unless a config turns it on. Checked by reading the package's source (ast)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pydantic
import pytest

import raydistill.config.jobs as jobs
import raydistill.config.sections as sections

PACKAGE = Path(__file__).resolve().parents[2] / "raydistill"
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "cloudpickle", "shelve", "marshal"}


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def unsafe_uses(source: str) -> list[str]:
    """What in ``source`` could unpickle or run remote code, one short description per finding."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            keywords = {k.arg: k.value for k in node.keywords if k.arg}
            if name.endswith("torch.load") and not _is_true(keywords.get("weights_only")):
                found.append(f"{name}( without weights_only=True")
            if name in ("np.load", "numpy.load") and _is_true(keywords.get("allow_pickle")):
                found.append(f"{name}(allow_pickle=True)")
            if name.endswith(("read_pickle", "jit.load")):
                found.append(f"{name}(")
            if _is_true(keywords.get("trust_remote_code")):
                found.append(f"{name}(trust_remote_code=True)")
            weights_only = keywords.get("weights_only")
            if isinstance(weights_only, ast.Constant) and weights_only.value is False:
                found.append(f"{name}(weights_only=False)")
        elif isinstance(node, ast.Dict):
            found += ["{'trust_remote_code': True}" for k, v in zip(node.keys, node.values, strict=True)
                      if isinstance(k, ast.Constant) and k.value == "trust_remote_code" and _is_true(v)]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            positional = args.posonlyargs + args.args
            pairs = list(zip(positional[len(positional) - len(args.defaults):], args.defaults, strict=True))
            pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d is not None]
            found += [f"def {node.name}(trust_remote_code=True)" for a, d in pairs
                      if a.arg == "trust_remote_code" and not (isinstance(d, ast.Constant) and d.value is False)]
    return found


@pytest.mark.parametrize(("source", "finding"), [
    ("import pickle", "import pickle"),
    ("from joblib import load", "from joblib import ..."),
    ("import dill.settings", "import dill.settings"),
    ("torch.load(path)", "torch.load( without weights_only=True"),
    ("torch.load(path, weights_only=False)", "torch.load( without weights_only=True"),
    ("np.load(f, allow_pickle=True)", "np.load(allow_pickle=True)"),
    ("pd.read_pickle(f)", "pd.read_pickle("),
    ("AutoModel.from_pretrained(p, trust_remote_code=True)", "AutoModel.from_pretrained(trust_remote_code=True)"),
    ("kwargs = {'trust_remote_code': True}", "{'trust_remote_code': True}"),
    ("def load(p, *, trust_remote_code=True): ...", "def load(trust_remote_code=True)"),
    ("def load(p, trust_remote_code=None): ...", "def load(trust_remote_code=True)"),
])
def test_the_scan_finds_each_unsafe_form(source, finding):
    assert finding in unsafe_uses(source)


def test_the_scan_passes_the_safe_forms():
    assert unsafe_uses("torch.load(p, weights_only=True)\nnp.load(f)\nnp.load(f, allow_pickle=False)\n"
                       "AutoModel.from_pretrained(p, trust_remote_code=cfg.trust_remote_code)\n"
                       "def load(p, *, trust_remote_code=False): ...") == []


def test_no_read_path_in_the_package_can_unpickle_or_run_remote_code():
    found = {str(path.relative_to(PACKAGE.parent)): uses for path in sorted(PACKAGE.rglob("*.py"))
             if (uses := unsafe_uses(path.read_text()))}
    assert found == {}


def test_every_config_leaves_remote_code_off_unless_it_is_turned_on():
    models = {obj for module in (jobs, sections) for _, obj in inspect.getmembers(module, inspect.isclass)
              if issubclass(obj, pydantic.BaseModel) and obj.__module__.startswith("raydistill.")}
    with_field = [m for m in models if "trust_remote_code" in m.model_fields]
    assert {m.__name__ for m in with_field} >= {"CaptureConfig", "SelectConfig", "EvalConfig"}
    for model in with_field:
        assert model.model_fields["trust_remote_code"].default is False, model.__name__
