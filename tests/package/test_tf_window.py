"""The TensorFlow window (2.16 to 2.21): which TensorFlow a build compiles against, what the
wheel then requires, and the error a TensorFlow other than the one built against gives.

The build backend (build_backend/tensorflow_matched.py) is tested as functions; installing
into environments with TensorFlow 2.16 and 2.21 is .ci/run's (docs/install.md).
"""

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

from tests._support.runners import run_fresh

packaging = pytest.importorskip("packaging")
from packaging.requirements import Requirement  # noqa: E402
from packaging.specifiers import SpecifierSet  # noqa: E402

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[2]
WINDOW = SpecifierSet(">=2.16,<2.22")


def _load_backend():
    spec = importlib.util.spec_from_file_location(
        "tensorflow_matched", REPO / "build_backend" / "tensorflow_matched.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


backend = _load_backend()
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


# ---------------------------------------------------------------- pyproject's declared window


def test_the_window_is_tensorflow_2_16_to_2_21():
    assert backend.tensorflow_window(PYPROJECT["tool"]) == WINDOW


def test_the_build_does_not_pin_a_tensorflow_of_its_own():
    """The backend adds the TensorFlow to compile against; a static one would be pip's newest."""
    build_system = PYPROJECT["build-system"]
    assert not [text for text in build_system["requires"] if Requirement(text).name.startswith("tensorflow")]
    assert build_system["build-backend"] == "tensorflow_matched" and build_system["backend-path"] == ["build_backend"]


def test_extras_follow_the_window_and_the_requirements_are_the_providers():
    """tf_keras's window is TensorFlow's (its minor follows TensorFlow's), so no extra asks for a
    TensorFlow the window lacks; and the requirements come from the in-tree provider."""
    assert set(PYPROJECT["project"]["dynamic"]) == {"dependencies", "optional-dependencies"}
    metadata = PYPROJECT["tool"]["scikit-build"]["metadata"]
    for field in ("dependencies", "optional-dependencies"):
        assert metadata[field]["provider"] == "tensorflow_matched", field
        assert metadata[field]["provider-path"] == "build_backend", field
    extras = {name: value for name, value in metadata["optional-dependencies"].items() if isinstance(value, list)}
    tf_keras = [
        Requirement(text) for texts in extras.values() for text in texts if Requirement(text).name == "tf_keras"
    ]
    assert tf_keras and all(requirement.specifier == WINDOW for requirement in tf_keras)
    for version in PYPROJECT["tool"]["fused-xent"]["test-needs-tensorflow"].values():
        assert WINDOW.contains(version), version


# The oldest Keras each TensorFlow of the window accepts: its wheels' `Requires-Dist: keras>=...`.
OLDEST_KERAS_OF_TENSORFLOW = {
    "2.16": "3.0.0",
    "2.17": "3.2.0",
    "2.18": "3.5.0",
    "2.19": "3.5.0",
    "2.20": "3.10.0",
    "2.21": "3.12.0",
}


def test_the_keras_requirement_keeps_the_oldest_keras_each_tensorflow_accepts():
    """So installing the package upgrades no Keras that the user's TensorFlow accepts (.ci/run
    installs it beside TensorFlow 2.16 and Keras 3.0.0, and checks that both stay)."""
    assert {f"2.{minor}" for minor in range(16, 22)} == set(OLDEST_KERAS_OF_TENSORFLOW)  # the window
    requires = PYPROJECT["tool"]["scikit-build"]["metadata"]["dependencies"]["requires"]
    [keras] = [Requirement(text) for text in requires if Requirement(text).name == "keras"]
    assert keras.specifier == SpecifierSet(">=3.0")
    for tensorflow, oldest in OLDEST_KERAS_OF_TENSORFLOW.items():
        assert keras.specifier.contains(oldest), tensorflow


def test_readme_and_install_doc_state_the_window():
    for doc in ("README.md", "docs/install.md"):
        assert "TensorFlow 2.16 to 2.21" in (REPO / doc).read_text(), doc


# ---------------------------------------------------------------- which TensorFlow to compile against


@pytest.mark.parametrize(
    "installed, expected",
    [
        (("tensorflow", "2.16.2"), "tensorflow==2.16.2"),
        (("tensorflow", "2.21.0"), "tensorflow==2.21.0"),
        (("tensorflow-cpu", "2.19.1"), "tensorflow-cpu==2.19.1"),
        (("tensorflow", "2.18.0+local"), "tensorflow==2.18.0"),  # a local build: the release's headers
        (("tensorflow", "2.21.0rc1"), "tensorflow==2.21.0rc1"),
        (("tensorflow", "2.15.1"), None),  # below the window: pip installs the newest of it
        (("tensorflow", "2.22.0"), None),
        (None, None),
    ],
)
def test_build_requirement_pins_the_installed_tensorflow_inside_the_window(installed, expected):
    requirement = backend.build_requirement(WINDOW, installed)
    if expected is None:
        parsed = Requirement(requirement)
        assert parsed.name == "tensorflow" and parsed.specifier == WINDOW, requirement
    else:
        assert requirement == expected


def _fake_distribution(folder, name, version):
    info = folder / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def test_installed_tensorflow_reads_dist_info_in_path_order(tmp_path):
    first, second, empty = tmp_path / "user", tmp_path / "site", tmp_path / "empty"
    empty.mkdir()
    _fake_distribution(first, "tensorflow-cpu", "2.17.1")
    _fake_distribution(second, "tensorflow", "2.20.0")
    _fake_distribution(second, "tf_keras", "2.20.1")
    assert backend.installed_tensorflow([str(empty)]) is None
    assert backend.installed_tensorflow([str(empty), str(second)]) == ("tensorflow", "2.20.0")
    assert backend.installed_tensorflow([str(first), str(second)]) == ("tensorflow-cpu", "2.17.1")


def test_target_site_packages_are_this_interpreters():
    """What pip's isolated build hides: the site-packages where pip installs."""
    import sysconfig

    assert sysconfig.get_paths()["purelib"] in backend.target_site_packages()


def test_a_build_without_tensorflow_asks_for_none(monkeypatch):
    monkeypatch.chdir(REPO)
    assert backend._tensorflow_requirements({"cmake.define.FUSED_XENT_TENSORFLOW": "OFF"}) == []
    [requirement] = backend._tensorflow_requirements({})
    assert Requirement(requirement).name.startswith("tensorflow")


# ---------------------------------------------------------------- what the wheel requires


def test_requirements_narrow_to_the_minor_compiled_against():
    requirements = ["numpy>=1.23", "tensorflow>=2.16,<2.22", "tf_keras>=2.16,<2.22", "jax>=0.10"]
    narrowed = [Requirement(text) for text in backend.narrowed(requirements, WINDOW, "2.16.2")]
    specifiers = {requirement.name: requirement.specifier for requirement in narrowed}
    assert specifiers == {
        "numpy": SpecifierSet(">=1.23"),
        "tensorflow": SpecifierSet(">=2.16,<2.17"),
        "tf_keras": SpecifierSet(">=2.16,<2.17"),
        "jax": SpecifierSet(">=0.10"),
    }
    assert backend.narrowed(requirements, WINDOW, None) == requirements  # no TensorFlow built against
    assert backend.narrowed(requirements, WINDOW, "2.15.0") == requirements  # outside the window


def test_test_extra_leaves_out_what_an_older_tensorflow_cannot_sit_beside():
    test = ["pytest>=7", "jax>=0.10", "tf_keras>=2.16,<2.17"]
    assert backend.installable_beside(test, {"jax": "2.18"}, "2.16.2") == ["pytest>=7", "tf_keras>=2.16,<2.17"]
    assert backend.installable_beside(test, {"jax": "2.18"}, "2.18.0") == test
    assert backend.installable_beside(test, {"jax": "2.18"}, None) == test


def test_the_provider_gives_a_wheel_built_against_2_16_its_requirements(monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(backend, "_built_tensorflow_version", lambda: "2.16.2")
    metadata = PYPROJECT["tool"]["scikit-build"]["metadata"]
    settings = {key: value for key, value in metadata["optional-dependencies"].items() if "provider" not in key}
    extras = backend.dynamic_metadata("optional-dependencies", settings)
    dependencies = backend.dynamic_metadata("dependencies", {"requires": metadata["dependencies"]["requires"]})
    assert "tensorflow<2.17,>=2.16" in dependencies
    assert "keras>=3.0" in dependencies  # not narrowed: Keras is plain Python
    assert extras["tf_keras"] == ["tf_keras<2.17,>=2.16"]
    assert not [text for text in extras["test"] if text.startswith("jax")]
    assert extras["jax"] == ["jax>=0.10"]  # asked for by name, pip says why it cannot install


# ---------------------------------------------------------------- the running TensorFlow


def test_build_info_says_why_xla_has_no_custom_call():
    import fused_xent

    info = fused_xent.build_info()
    assert (info["xla"] == "custom_call") == (info["xla_reason"] is None), info
    if info["tensorflow_version"] is not None:
        assert WINDOW.contains(info["tensorflow_version"], prereleases=True), info


@pytest.mark.parametrize(
    "origin, expected",
    [
        ({"url": "file:///home/me/fused-xent", "dir_info": {}}, "/home/me/fused-xent"),
        ({"url": "file:///tmp/fused_xent-0.1.0.tar.gz", "archive_info": {}}, "/tmp/fused_xent-0.1.0.tar.gz"),
        (
            {"url": "https://example.org/fx.git", "vcs_info": {"vcs": "git", "commit_id": "abc"}},
            "git+https://example.org/fx.git",
        ),
        (None, None),
    ],
)
def test_rebuild_command_names_where_fused_xent_came_from(origin, expected, monkeypatch):
    from fused_xent._tf import loader

    class Distribution:
        def read_text(self, name):
            return None if origin is None else json.dumps(origin)

    monkeypatch.setattr(loader.importlib.metadata, "distribution", lambda name: Distribution())
    assert loader.installed_from() == expected
    command = loader.rebuild_command(loader.installed_from())
    assert command.startswith(f"{sys.executable} -m pip install --force-reinstall --no-deps --no-cache-dir ")
    assert command.endswith(expected or "<a clone or sdist of fused-xent>")


def test_another_tensorflow_raises_import_error_naming_both_and_the_command(tmp_path):
    """As if built against TensorFlow 2.15.0: the first use of the ops raises ImportError (never a
    crash or `undefined symbol`: the library is not loaded), and the NumPy front end still works."""
    pytest.importorskip("tensorflow")
    result = run_fresh(
        """
        import json, warnings
        import numpy as np
        import fused_xent
        from fused_xent._tf import loader

        loader.built_tensorflow_version = lambda: "2.15.0"
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            import tensorflow as tf
        try:
            fused_xent.sparse_softmax_cross_entropy_with_logits([0], [[1.0, 2.0]])
            message = None
        except ImportError as error:
            message = str(error)
        loss, _ = fused_xent.numpy.sparse_softmax_cross_entropy_with_logits(np.array([0]), np.array([[1.0, 2.0]], np.float32))
        print("RESULT " + json.dumps({"message": message, "running": tf.__version__, "numpy_loss": float(loss[0]),
                                      "command": loader.rebuild_command(loader.installed_from())}))
        """,
        tmp_path,
    )
    message = result["message"]
    assert message is not None, "no ImportError"
    assert f"built against TensorFlow 2.15.0, but TensorFlow {result['running']} is installed" in message
    assert "works only with TensorFlow 2.15.x" in message
    assert message.endswith(result["command"]) and re.search(r" -m pip install --force-reinstall --no-deps ", message)
    assert "undefined symbol" not in message
    assert result["numpy_loss"] == pytest.approx(1.3132616875182228, rel=1e-6)
