"""Repository rules that keep the README, CI and the layering honest."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYERS = ["kernels", "ops", "modules", "patching", "integrations"]


def _ci_command() -> str:
    lines = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln.startswith("pip install")]
    assert len(lines) == 1
    return lines[0]


def test_ci_runs_the_readme_test_command():
    assert _ci_command() in (ROOT / "README.md").read_text()


def test_imports_point_left_only():
    """kernels -> ops -> modules -> patching -> integrations: a layer never imports a layer to its right."""
    pkg = ROOT / "fastllm"
    for i, layer in enumerate(LAYERS):
        for path in (pkg / layer).glob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.level >= 1 and node.module:
                    top = node.module.split(".")[0] if node.level == 2 else layer
                    assert top not in LAYERS[i + 1:], f"{path.name} imports {node.module} (right of {layer})"


def test_no_private_names_imported_across_files():
    """A name with a leading underscore stays in its file: what another file needs is public (and named so)."""
    bad = []
    for path in (ROOT / "fastllm").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 1:
                bad += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    assert bad == []


def test_import_has_no_side_effects():
    """Importing fastllm prints nothing and patches no class."""
    import subprocess
    import sys

    code = ("import fastllm, transformers.models.llama.modeling_llama as m; "
            "print(m.LlamaMLP.forward.__module__, m.LlamaRMSNorm.forward.__module__, "
            "m.LlamaForCausalLM.forward.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["transformers.models.llama.modeling_llama"] * 3
    assert "fastllm" not in out.stderr
