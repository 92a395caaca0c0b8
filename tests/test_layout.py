"""The seams between modules: no module reaches into another's private names."""
import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def private_uses(path: str) -> list[str]:
    """`from kdjax.x import _name` and `module._name` on an imported kdjax module, in one file."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    modules, found = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kdjax"):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{path}:{node.lineno}: from {node.module} import {alias.name}")
                else:
                    modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("kdjax"):
                    modules.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in modules:
                found.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_private_name_crosses_a_module():
    files = [p for d in ("kdjax", "bench") for p in glob.glob(os.path.join(ROOT, d, "**", "*.py"), recursive=True)]
    assert len(files) > 20
    bad = [u for f in files for u in private_uses(f)]
    assert not bad, "\n".join(bad)


def test_the_check_finds_what_it_looks_for(tmp_path):
    path = tmp_path / "x.py"
    path.write_text("from kdjax.data import _encode_all\nfrom kdjax import train\ntrain._forward(1)\n")
    assert len(private_uses(str(path))) == 2
