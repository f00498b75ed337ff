"""The code's shape, checked with ast so that it cannot drift back: which modules may import which.

The model, masking and losses are pure torch (../shared/design/product.md, "Dependencies point one way"): they
import nothing of the engine, the CLI, data, the nnU-Net integration, submission or the checkpoint format, and no
file-format or nnU-Net package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mim_nnunet"

# The pure-torch core: these modules may import only each other (and torch, numpy, the standard library).
CORE = ("model", "masking", "losses")
FORBIDDEN_EXTERNAL = ("nnunetv2", "SimpleITK", "blosc2", "safetensors", "batchgenerators", "acvl_utils")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, name: str, is_package: bool = False) -> list[tuple[int, str]]:
    """Absolute names of every module the code of module ``name`` imports (relative imports resolved), with
    line numbers. ``from pkg import x`` counts as importing ``pkg`` (and so ``from .. import x`` as the root)."""
    package = name if is_package else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = package.split(".")
                mod = ".".join(base[: len(base) - (node.level - 1)] + ([mod] if mod else []))
            found.append((node.lineno, mod))
    return found


def core_files() -> list[Path]:
    return sorted((PACKAGE / "model").rglob("*.py")) + [PACKAGE / "masking.py", PACKAGE / "losses.py"]


def _is_core(mod: str) -> bool:
    return any(mod == f"mim_nnunet.{c}" or mod.startswith(f"mim_nnunet.{c}.") for c in CORE)


def core_violations(source: str, name: str, is_package: bool = False) -> list[str]:
    """One line per import of module ``name`` that leaves the pure-torch core."""
    bad = []
    for line, mod in imported_modules(source, name, is_package):
        top = mod.split(".")[0]
        if (top == "mim_nnunet" and not _is_core(mod)) or top in FORBIDDEN_EXTERNAL:
            bad.append(f"{name}:{line} imports {mod}")
    return bad


@pytest.mark.parametrize("path", core_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_model_masking_and_losses_import_only_each_other(path: Path):
    assert core_violations(path.read_text(), module_name(path), path.name == "__init__.py") == []


def test_the_import_check_sees_a_violation():
    """The checker itself: relative levels are resolved, engine, checkpoint and root imports are reported."""
    source = (
        "from ..pretrain.monitor import collapse_signal\nfrom ..checkpoint import load_checkpoint\n"
        "from .. import build_pretraining_model\nimport nnunetv2\nfrom .encoder import HybridEncoder\n"
        "from ..losses import alignment_loss\n"
    )
    found = core_violations(source, "mim_nnunet.model.mim")
    assert found == [
        "mim_nnunet.model.mim:1 imports mim_nnunet.pretrain.monitor",
        "mim_nnunet.model.mim:2 imports mim_nnunet.checkpoint",
        "mim_nnunet.model.mim:3 imports mim_nnunet",
        "mim_nnunet.model.mim:4 imports nnunetv2",
    ]


# ------------------------------------------------------------------------------ who names which file


def string_constants(path: Path) -> list[tuple[int, str]]:
    """Every string literal of ``path`` (f-string pieces included; docstrings are plain statements, skipped)."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {
        id(n.body[0].value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Module | ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef)
        and n.body
        and isinstance(n.body[0], ast.Expr)
        and isinstance(n.body[0].value, ast.Constant)
    }
    return [
        (n.lineno, n.value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings
    ]


def test_only_the_cache_names_the_cache_files():
    from mim_nnunet.data import cache

    names = {cache.SETTINGS, cache.INDEX, cache.FINGERPRINT, cache.SKIPPED_TXT, cache.SKIPPED_JSON}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "data" / "cache.py":
            continue
        for line, text in string_constants(path):
            if text in names or any(text.endswith(("/" + n, "/" + n.split(".")[0])) for n in names):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{line} {text!r}")
    assert found == []


def test_checkpoint_and_cache_share_one_atomic_write():
    for name in ("checkpoint.py", "data/cache.py"):
        tree = ast.parse((PACKAGE / name).read_text())
        calls = {
            f"{n.value.id}.{n.attr}"
            for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
        }
        assert not calls & {"os.replace", "os.rename", "tempfile.mkstemp", "tempfile.NamedTemporaryFile"}, (
            name
        )
        assert any(isinstance(n, ast.Name) and n.id.startswith("atomic_write") for n in ast.walk(tree)), name


def test_container_entry_calls_the_submission_api(monkeypatch):
    from mim_nnunet.submission import pipeline
    from mim_nnunet.submission.container import entry

    path = PACKAGE / "submission" / "container" / "entry.py"
    imported = {
        (node.module, a.name)
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom)
        for a in node.names
    }
    assert ("mim_nnunet.cli.submit", "main") not in imported
    assert entry.submit is pipeline.submit
    literals = {text for _, text in string_constants(path)}
    assert not literals & {pipeline.PREDICTIONS, pipeline.MANIFEST, pipeline.ZIP, pipeline.VALIDATION}


def test_one_owner_for_the_run_folder_and_the_resume_rules():
    """The CLI and run.py use folder.py's names and resume.py's rules; neither defines its own."""
    from mim_nnunet.cli import pretrain as cli
    from mim_nnunet.pretrain import folder, resume, run

    assert cli.RESUMABLE is resume.RESUMABLE and run.CONFIG == folder.CONFIG
    assert run.ResumeError is resume.ResumeError and run.RunFolderError is folder.RunFolderError
    for path in (PACKAGE / "cli" / "pretrain.py", PACKAGE / "pretrain" / "run.py"):
        tree = ast.parse(path.read_text())
        assigned = {
            t.id
            for n in ast.walk(tree)
            if isinstance(n, ast.Assign)
            for t in n.targets
            if isinstance(t, ast.Name)
        }
        assert not assigned & {
            "RESUMABLE",
            "PER_INVOCATION",
            "CONFIG",
            "METRICS",
            "RUN_FILES",
            "RESUME_STATE",
        }, path
        texts = {text for _, text in string_constants(path)}
        assert not texts & set(folder.RUN_FILES), path


# ------------------------------------------------------------------------------ code short enough to read

MAX_FUNCTION_LINES = 80  # in pretrain/ and cli/ (the argparse table is data, not a function)
MAX_RUN_PRETRAINING_LINES = 60
MAX_PRETRAIN_CLI_LINES = 350


def function_lengths(source: str) -> dict[str, int]:
    """Lines of every function (methods as ``Class.name``), decorators and docstring included."""
    lengths = {}
    for node in ast.walk(ast.parse(source)):
        body = node.body if isinstance(node, ast.Module | ast.ClassDef) else []
        prefix = f"{node.name}." if isinstance(node, ast.ClassDef) else ""
        for f in body:
            if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef):
                start = min([f.lineno, *(d.lineno for d in f.decorator_list)])
                lengths[prefix + f.name] = f.end_lineno - start + 1
    return lengths


def nested_definitions(source: str) -> list[str]:
    """Functions or classes defined inside a function (a method of a module-level class is not nested)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            found += [
                f"{node.name}:{inner.lineno} defines {inner.name}"
                for inner in ast.walk(node)
                if inner is not node and isinstance(inner, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            ]
    return found


def _files(*folders: str) -> list[Path]:
    return [p for f in folders for p in sorted((PACKAGE / f).glob("*.py"))]


@pytest.mark.parametrize("path", _files("pretrain", "cli"), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_function_in_the_engine_or_the_commands_is_over_80_lines(path: Path):
    long = {k: n for k, n in function_lengths(path.read_text()).items() if n > MAX_FUNCTION_LINES}
    assert long == {}


@pytest.mark.parametrize("path", _files("pretrain"), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_engine_defines_no_function_inside_a_function(path: Path):
    assert nested_definitions(path.read_text()) == []


def test_run_pretraining_reads_on_one_screen_and_the_pretrain_command_is_thin():
    run = (PACKAGE / "pretrain" / "run.py").read_text()
    assert function_lengths(run)["run_pretraining"] < MAX_RUN_PRETRAINING_LINES
    cli = PACKAGE / "cli" / "pretrain.py"
    assert len(cli.read_text().splitlines()) < MAX_PRETRAIN_CLI_LINES
    # argparse plus one call: no signal, folder, cache, data or resume logic of its own
    imported = {mod for _, mod in imported_modules(cli.read_text(), "mim_nnunet.cli.pretrain")}
    assert imported <= {
        "__future__", "argparse", "sys", "mim_nnunet.model.config", "mim_nnunet.pretrain.run",
        "mim_nnunet.pretrain.resume", "mim_nnunet.pretrain.command",
    }, imported  # fmt: skip
    calls = {n.func.id for n in ast.walk(ast.parse(cli.read_text())) if isinstance(n, ast.Call)
             and isinstance(n.func, ast.Name)}  # fmt: skip
    assert "pretrain_command" in calls and not calls & {"resumed_arguments", "preprocess_corpus", "run_pretraining"}


def test_the_shape_checks_see_a_violation():
    source = (
        "def outer():\n    def inner():\n        pass\n    class Local:\n        pass\n"
        "class Top:\n    def method(self):\n" + "        x = 1\n" * 85
    )
    assert nested_definitions(source) == ["outer:2 defines inner", "outer:4 defines Local"]
    assert function_lengths(source) == {"outer": 5, "Top.method": 86}


def test_one_stop_mechanism_for_preprocessing_and_training():
    """Only mim_nnunet/interrupt.py installs signal handlers; preprocessing and training both use it."""
    from mim_nnunet import interrupt
    from mim_nnunet.data import preprocess
    from mim_nnunet.pretrain import command, run, sampler

    installers = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "interrupt.py":
            continue
        for n in ast.walk(ast.parse(path.read_text())):
            if isinstance(n, ast.Attribute) and n.attr == "signal" and isinstance(n.value, ast.Name):
                if n.value.id == "signal":
                    installers.append(f"{path.relative_to(PACKAGE.parent)}:{n.lineno}")
    assert installers == []
    assert run.StopRequest is command.StopRequest is interrupt.StopRequest
    assert sampler.ignore_stop_signals is interrupt.ignore_stop_signals
    assert preprocess._children_ignore_sigint is interrupt.children_ignore_sigint
