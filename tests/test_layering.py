"""The package's layers import only downwards: theory is the ground floor, the model draws its init
from theory, the probe measures models, the training engine runs them, the jobs (pretraining,
finetuning, study, figures) sit on top and the CLI above all. Function-local imports count too."""
import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "dslm"

# each layer may import itself and the layers listed before it
LAYERS = [
    {"errors", "files", "records", "plotting", "runtime"},
    {"theory"},
    {"sim"},
    {"model"},
    {"probe"},
    {"data"},
    {"train"},
    {"finetune", "figures", "pretrain", "study"},
    {"cli", "__main__"},
]


def _layer_of(name: str) -> int:
    for i, layer in enumerate(LAYERS):
        if name in layer:
            return i
    raise AssertionError(f"dslm.{name} is not placed in a layer of tests/test_layering.py")


def _imports(path: Path, src: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dslm":
            parts = node.module.split(".")
            if len(parts) > 1:
                yield parts[1], node.lineno
            else:   # from dslm import x
                for alias in node.names:
                    if (src / alias.name).is_dir() or (src / f"{alias.name}.py").is_file():
                        yield alias.name, node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "dslm" and len(parts) > 1:
                    yield parts[1], node.lineno


def upward_imports(src: Path = SRC) -> list[str]:
    bad = []
    for path in sorted(src.rglob("*.py")):
        rel = path.relative_to(src)
        if rel.name == "__init__.py" and len(rel.parts) == 1:
            continue
        own = rel.parts[0].removesuffix(".py")
        for target, line in _imports(path, src):
            if target != own and _layer_of(target) > _layer_of(own):
                bad.append(f"{rel}:{line} imports dslm.{target}")
    return bad


def test_no_upward_imports():
    assert upward_imports() == []


def test_the_check_sees_function_local_imports(tmp_path):
    pkg = tmp_path / "dslm"
    (pkg / "theory").mkdir(parents=True)
    (pkg / "model").mkdir()
    (pkg / "theory" / "x.py").write_text("def f():\n    from dslm.model.init import scheme_stds\n")
    (pkg / "model" / "y.py").write_text("from dslm import theory\n")
    assert upward_imports(pkg) == ["theory/x.py:2 imports dslm.model"]
