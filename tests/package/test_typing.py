"""Type information: fused_xent/_core.pyi matches the compiled module's signatures, and the
package ships it with py.typed (the files are looked for where fused_xent was imported from:
in CI the installed wheel)."""

import ast
import re
from pathlib import Path

import pytest

import fused_xent
from fused_xent import _core

PACKAGE = Path(fused_xent.__file__).parent
STUB = Path(_core.__file__).with_name("_core.pyi")
CUDA_ONLY = "cuda_"  # bound only in CUDA builds (cc/py/cuda_bindings.cc)


def _split_top_level(text):
    """Splits at the commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char in "[(":
            depth += 1
        elif char in "])":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    tail = text[start:].strip()
    return parts + [tail] if tail else parts


def _outer_name(annotation):
    """`dict[str, Any]` -> "dict", `None` -> "None", `numpy.ndarray` -> "ndarray"."""
    return re.split(r"[\[|]", annotation.strip())[0].strip().split(".")[-1]


def runtime_signatures(module):
    """name -> (parameters, return type) from pybind11's signature line in each function's __doc__;
    a parameter is (name, has a default, accepts None), or "*" / "/" for pybind's markers."""
    signatures = {}
    for name in dir(module):
        function = getattr(module, name)
        if name.startswith("_") or not callable(function):
            continue
        line = function.__doc__.strip().splitlines()[0]
        match = re.fullmatch(rf"{name}\((.*)\) -> (.+)", line)
        assert match, f"no pybind11 signature in {name}.__doc__: {line!r}"
        parameters = []
        for part in _split_top_level(match.group(1)):
            if part in ("*", "/"):
                parameters.append(part)
                continue
            declared, _, default = part.partition("=")
            parameter, _, annotation = declared.partition(":")
            accepts_none = re.search(r"\bNone\b", annotation) is not None
            parameters.append((parameter.strip(), bool(default.strip()), accepts_none))
        signatures[name] = (parameters, _outer_name(match.group(2)))
    return signatures


def stub_signatures(source):
    """The same, from the .pyi's function definitions."""
    signatures = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
            continue
        args = node.args
        positional = args.posonlyargs + args.args
        first_default = len(positional) - len(args.defaults)
        parameters = []
        for i, arg in enumerate(positional):
            parameters.append((arg.arg, i >= first_default, "None" in ast.unparse(arg.annotation)))
            if args.posonlyargs and i == len(args.posonlyargs) - 1:
                parameters.append("/")
        if args.kwonlyargs:
            parameters.append("*")
        for arg, default in zip(args.kwonlyargs, args.kw_defaults):
            parameters.append((arg.arg, default is not None, "None" in ast.unparse(arg.annotation)))
        signatures[node.name] = (parameters, _outer_name(ast.unparse(node.returns)))
    return signatures


def stub_differences(runtime, stub, cuda_build):
    """What differs, as sentences (empty when the stub matches)."""
    differences = []
    for name in sorted(set(runtime) | set(stub)):
        if name not in stub:
            differences.append(f"{name} is in the module but not in the stub")
        elif name not in runtime:
            if cuda_build or not name.startswith(CUDA_ONLY):
                differences.append(f"{name} is in the stub but not in the module")
        elif runtime[name] != stub[name]:
            differences.append(f"{name}: the module has {runtime[name]}, the stub {stub[name]}")
    return differences


def test_stub_matches_the_compiled_module():
    runtime = runtime_signatures(_core)
    assert {"sparse", "dense", "build_info", "ffi_targets"} <= set(runtime)
    assert runtime["sparse"][0][8] == ("ignore_index", False, True)  # the parser reads what it should
    differences = stub_differences(runtime, stub_signatures(STUB.read_text()), _core.build_info()["cuda"])
    assert differences == []


@pytest.mark.parametrize(
    "old, new, expected",
    [
        (
            "    ignore_index: _Int | None,\n    class_weights: numpy",
            "    ignore_idx: _Int | None,\n    class_weights: numpy",
            "sparse: the module has",
        ),
        ("def ffi_targets() -> dict[str, dict[str, Any]]: ...\n", "", "ffi_targets is in the module but not"),
        (
            "    grad_logits: numpy.ndarray | None,\n    softcap: _Float = 0.0,\n) -> None: ...\ndef dense",
            "    grad_logits: numpy.ndarray,\n    softcap: _Float = 0.0,\n) -> None: ...\ndef dense",
            "sparse: the module has",
        ),
        (
            "    grad_logits: numpy.ndarray | None,\n    softcap: _Float = 0.0,\n) -> None: ...\n\n# CUDA",
            "    grad_logits: numpy.ndarray | None = None,\n    softcap: _Float = 0.0,\n) -> None: ...\n\n# CUDA",
            "dense: the module has",
        ),
        ("def build_info() -> dict[str, Any]: ...", "def build_info() -> str: ...", "build_info: the module has"),
        (
            "def cuda_device_count() -> int: ...\n",
            "def cuda_device_count() -> int: ...\ndef extra() -> int: ...\n",
            "extra is in the stub but not",
        ),
    ],
    ids=["renamed-parameter", "missing-function", "not-optional", "default", "return-type", "extra-function"],
)
def test_stub_comparison_rejects_planted_errors(old, new, expected):
    source = STUB.read_text()
    assert source.count(old) == 1, old
    differences = stub_differences(
        runtime_signatures(_core), stub_signatures(source.replace(old, new)), _core.build_info()["cuda"]
    )
    assert len(differences) == 1 and differences[0].startswith(expected), differences


def test_cuda_functions_may_be_missing_only_from_builds_without_cuda():
    runtime = {"sparse": ([], "None")}
    stub = {"sparse": ([], "None"), "cuda_device_count": ([], "int")}
    assert stub_differences(runtime, stub, cuda_build=False) == []
    assert stub_differences(runtime, stub, cuda_build=True) == [
        "cuda_device_count is in the stub but not in the module"
    ]


def test_package_ships_type_information():
    assert (PACKAGE / "py.typed").is_file()
    assert STUB.is_file() and STUB.parent == PACKAGE
    ast.parse(STUB.read_text())  # valid Python syntax, as type checkers need
