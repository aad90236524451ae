"""Packaging and the 'light import' rule from DESIGN.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENDOR = ["torch", "llama_cpp", "onnxruntime", "openvino", "torch_npu", "deepspeed", "peft", "textual", "fastapi", "transformers", "numpy", "jinja2"]


def python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_import_hanlin_imports_no_vendor_library():
    code = f"""
import sys, json, hanlin
hanlin.GenerationConfig; hanlin.Device  # touching the lazy names must stay light too
import hanlin.backends, hanlin.devices, hanlin.catalog, hanlin.backends.gguf
print(json.dumps(sorted(m for m in {VENDOR!r} if m in sys.modules)))
"""
    assert json.loads(python(code)) == []


def test_engine_discovery_and_cli_parser_stay_light():
    code = f"""
import sys, json
from hanlin.backends.base import registered_engines
from hanlin.apps.cli import build_parser
build_parser()
names = sorted(registered_engines())
print(json.dumps([names, sorted(m for m in {VENDOR!r} if m in sys.modules)]))
"""
    names, loaded = json.loads(python(code))
    assert "gguf" in names
    assert loaded == []


def test_folders_map_to_the_promised_import_names():
    code = """
import hanlin, hanlin.backends, hanlin.devices, hanlin.apps, hanlin.backends.gguf, json, os
print(json.dumps({m.__name__: os.path.dirname(os.path.abspath(m.__file__)) for m in
    (hanlin, hanlin.backends, hanlin.devices, hanlin.apps, hanlin.backends.gguf)}))
"""
    where = json.loads(python(code))
    assert where["hanlin"] == os.path.join(ROOT, "sdk")
    assert where["hanlin.backends"] == os.path.join(ROOT, "backends")
    assert where["hanlin.devices"] == os.path.join(ROOT, "devices")
    assert where["hanlin.apps"] == os.path.join(ROOT, "apps")
    assert where["hanlin.backends.gguf"] == os.path.join(ROOT, "backends", "gguf")


def test_dependency_direction():
    """devices <- backends <- sdk <- apps: no module imports a layer above its own."""
    import ast

    layers = {"devices": 0, "backends": 1, "sdk": 2, "apps": 3}
    top_of = {"hanlin.devices": "devices", "hanlin.backends": "backends", "hanlin.apps": "apps"}

    def layer_of(module: str) -> str:
        for prefix, layer in top_of.items():
            if module == prefix or module.startswith(prefix + "."):
                return layer
        return "sdk"

    bad = []
    for folder, level in layers.items():
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in files:
                if not f.endswith(".py"):
                    continue
                path = os.path.join(dirpath, f)
                for node in ast.walk(ast.parse(open(path).read())):
                    mods = []
                    if isinstance(node, ast.Import):
                        mods = [a.name for a in node.names]
                    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                        mods = [node.module]
                    for m in mods:
                        if m == "hanlin" or m.startswith("hanlin."):
                            if layers[layer_of(m)] > level:
                                bad.append(f"{os.path.relpath(path, ROOT)} imports {m}")
    assert bad == []


def test_extras_are_the_designed_ones():
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        proj = tomllib.load(f)
    extras = set(proj["project"]["optional-dependencies"])
    assert {"gguf", "torch", "cpu", "nvidia", "ascend", "train", "serve", "tui", "all", "dev"} <= extras
    assert proj["project"]["scripts"]["hanlin"] == "hanlin.apps.cli:main"
    # every install command pins torch through the constraints file
    readme = open(os.path.join(ROOT, "README.md")).read()
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    installs = [l for l in (readme + ci).splitlines() if "pip install" in l and " -e " in l]
    assert installs
    for line in installs:
        assert "-c constraints.txt" in line, line
    assert "torch==2.13.0" in open(os.path.join(ROOT, "constraints.txt")).read()


def test_ci_runs_the_readme_test_command_verbatim():
    readme = open(os.path.join(ROOT, "README.md")).read()
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = [l.strip() for l in quick.split("```")[1].splitlines() if l.strip() and not l.strip().startswith("#")]
    assert len(commands) == 2, commands
    assert commands[1] in ci
