"""The README's commands are the ones CI runs, and the docs it links exist."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(*parts):
    with open(os.path.join(ROOT, *parts)) as f:
        return f.read()


def test_ci_runs_the_readme_test_command():
    readme = read("README.md")
    commands = re.findall(r"```bash\n(.+?)\n```", readme)
    assert len(commands) == 2, "the README has exactly two set-up commands"
    assert "examples/demo.py" in commands[0] and "pytest" in commands[1]
    assert commands[1] in read(".ci", "run")


def test_linked_docs_exist():
    for link in re.findall(r"\]\((docs/[^)]+)\)", read("README.md")):
        path, _, anchor = link.partition("#")
        assert os.path.exists(os.path.join(ROOT, path)), link
        if anchor:  # GitHub's heading anchors: lower case, spaces to hyphens, punctuation dropped
            headings = re.findall(r"^#+ (.+)$", read(path), re.M)
            slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}
            assert anchor in slugs, link


def test_passes_and_codegen_install_inside_the_package():
    import importlib.util

    import sixbit_compiler.codegen
    import sixbit_compiler.passes

    import site
    import sysconfig

    site_dirs = {os.path.realpath(p) for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]]}
    for top in ("passes", "codegen"):
        spec = importlib.util.find_spec(top)  # found only via the repo root on sys.path, if at all
        if spec is not None and spec.origin:
            assert not any(os.path.realpath(spec.origin).startswith(d) for d in site_dirs), spec.origin
        for d in site_dirs:
            assert not os.path.exists(os.path.join(d, top)), f"{top} installed at the top of {d}"
    assert os.path.realpath(sixbit_compiler.passes.__file__).startswith(os.path.join(ROOT, "passes"))


def test_every_subpackage_is_packaged():
    """pyproject lists packages explicitly (passes/ and codegen/ are remapped): none may be missing."""
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    found = set()
    for dirpath, _, files in os.walk(os.path.join(ROOT, "sixbit_compiler")):
        if "__init__.py" in files:
            found.add(os.path.relpath(dirpath, ROOT).replace(os.sep, "."))
    found |= {"sixbit_compiler.passes", "sixbit_compiler.codegen"}
    assert found == listed


def test_the_inspect_example_runs(tmp_path):
    """examples/inspect_passes.py: dumps, generated kernels and a hand-run pass test."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("inspect_passes", os.path.join(ROOT, "examples", "inspect_passes.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(["--out", str(tmp_path / "dump")])
    assert out["quantized"] == 20 and len(out["kernels"]) == 11
    assert (out["dump"] / "04_lower_regions.py").exists()


def test_every_option_is_documented():
    import dataclasses

    from sixbit_compiler.options import SixbitOptions

    table = read("docs", "options.md")
    missing = [f.name for f in dataclasses.fields(SixbitOptions) if f"`{f.name}`" not in table]
    assert not missing, f"options missing from docs/options.md: {missing}"
