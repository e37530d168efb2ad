"""The repository's own module names must not shadow installed packages.

`python -m pytest`, a REPL started at the repository root and `python benchmarks/x.py` put the
root (or the script's folder) first on sys.path, so a top-level folder or script named like a
dependency is imported in its place — `kernels/` did that to transformers >= 5.25, which imports
the `kernels` distribution at start-up.
"""
import importlib.metadata
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _repo_module_names() -> dict[str, Path]:
    """Module names that the repository root, benchmarks/ and examples/ make importable."""
    names = {p.name: p for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    for folder in ("benchmarks", "examples"):
        names.update({p.stem: p for p in (ROOT / folder).glob("*.py")})
    return names


def test_no_repository_module_shadows_an_installed_package():
    installed = set(importlib.metadata.packages_distributions()) | set(sys.stdlib_module_names)
    installed.discard("memformer")  # the project itself, installed in editable mode
    names = _repo_module_names()
    assert "memformer" in names and "index" in names  # the scan sees the layout
    clashes = {n: str(p.relative_to(ROOT)) for n, p in names.items() if n in installed}
    assert not clashes, f"rename these; they hide installed modules of the same name: {clashes}"


def test_constraints_satisfy_the_declared_requirements():
    """constraints.txt (what `make test` installs) pins versions setup.py accepts, so the tested
    set is one a plain `pip install memformer` could also pick."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    assert "torch" in pins and "transformers" in pins
    declared = [Requirement(r) for r in importlib.metadata.requires("memformer")]
    checked = 0
    for req in declared:
        if req.marker is not None and not req.marker.evaluate({"extra": "dev"}):
            continue                                     # train / gpu extras are not installed by make test
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is required but constraints.txt does not pin it"
        assert req.specifier.contains(pins[name], prereleases=True), f"constraints.txt pins {name}=={pins[name]}, outside {req}"
        checked += 1
    assert checked >= 10


# private members of third-party objects the code must reach (transformers' attention choice,
# torch FSDP's lazy initialisation)
THIRD_PARTY_PRIVATE = {"_attn_implementation", "_get_fsdp_state", "_lazy_init"}


def test_no_private_member_is_used_across_modules():
    """memformer/ and training/ use no other module's or object's private member (`x._name`,
    `from m import _name`): what another module needs is public (issue 40)."""
    import ast
    found = []
    for path in sorted([*(ROOT / "memformer").rglob("*.py"), *(ROOT / "training").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")) \
                    and node.attr not in THIRD_PARTY_PRIVATE:
                found.append(f"{where} .{node.attr}")
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("memformer"):
                found += [f"{where} import {a.name}" for a in node.names if a.name.startswith("_")]
    assert not found, f"private members used across modules: {found}"
