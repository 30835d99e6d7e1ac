"""Build backend: scikit-build-core, compiling against the TensorFlow the user already has.

pip builds in an isolated environment, so a plain ``tensorflow`` build requirement would
compile the op library against the newest TensorFlow while the user's environment keeps
another one, with another C++ ABI. So this module is:

- the PEP 517 backend: ``get_requires_for_build_wheel`` pins the TensorFlow installed where
  pip installs to (read from its dist-info, never imported) when it is in the window, and asks
  for the newest of the window otherwise;
- scikit-build-core's metadata provider for the requirements: the wheel's ``tensorflow`` and
  ``tf_keras`` (whose minor follows TensorFlow's) are narrowed to the minor version compiled
  against, so pip never moves TensorFlow away from the op library's ABI.

The window is the ``tensorflow`` requirement of ``[tool.scikit-build.metadata.dependencies]``.
"""

import importlib.metadata
import site
import sys

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ImportError:  # Python 3.10: scikit-build-core depends on tomli there
    import tomli as tomllib

TENSORFLOW_DISTRIBUTIONS = ("tensorflow", "tensorflow-cpu")
FOLLOWS_TENSORFLOW = ("tensorflow", "tf-keras")  # requirements narrowed to the minor compiled against
_TENSORFLOW_SETTING = "cmake.define.FUSED_XENT_TENSORFLOW"


def __getattr__(name):
    """The other PEP 517 hooks: scikit-build-core's, unchanged (imported when asked for, so
    the tests can import this module without scikit-build-core)."""
    from scikit_build_core import build

    return getattr(build, name)


def pyproject_tool(path="pyproject.toml"):
    """pyproject.toml's [tool] table (hooks run in the source tree)."""
    with open(path, "rb") as file:
        return tomllib.load(file)["tool"]


def tensorflow_window(tool):
    """The SpecifierSet of the TensorFlow versions the project builds against."""
    for text in tool["scikit-build"]["metadata"]["dependencies"]["requires"]:
        requirement = Requirement(text)
        if canonicalize_name(requirement.name) == "tensorflow":
            return requirement.specifier
    raise ValueError("pyproject.toml lists no tensorflow requirement")


def installed_tensorflow(paths):
    """(distribution name, version) of the first TensorFlow found in paths, or None."""
    for path in paths:
        for distribution in importlib.metadata.distributions(path=[path]):
            name = canonicalize_name(distribution.metadata["Name"] or "")
            if name in TENSORFLOW_DISTRIBUTIONS:
                return name, distribution.version
    return None


# --- PEP 517: which TensorFlow to compile against ------------------------------------------


def target_site_packages():
    """The site-packages of the environment pip installs into, which its isolated build hides
    from sys.path (the interpreter is that environment's)."""
    paths = list(site.getsitepackages())
    if sys.prefix == sys.base_prefix:  # no virtual environment: `pip install --user` comes first
        paths.insert(0, site.getusersitepackages())
    return paths


def build_requirement(window, installed):
    """The installed TensorFlow when it is in the window (its public version: a local build's
    headers are the release's), else the newest of the window."""
    if installed is not None:
        name, text = installed
        version = Version(text)
        if window.contains(version, prereleases=True):
            return f"{name}=={version.public}"
    return f"tensorflow{window}"


def _tensorflow_requirements(config_settings):
    if str((config_settings or {}).get(_TENSORFLOW_SETTING, "")).upper() == "OFF":
        return []
    return [build_requirement(tensorflow_window(pyproject_tool()), installed_tensorflow(target_site_packages()))]


def get_requires_for_build_wheel(config_settings=None):
    from scikit_build_core import build

    return build.get_requires_for_build_wheel(config_settings) + _tensorflow_requirements(config_settings)


def get_requires_for_build_editable(config_settings=None):
    from scikit_build_core import build

    return build.get_requires_for_build_editable(config_settings) + _tensorflow_requirements(config_settings)


# --- scikit-build-core metadata provider: the wheel's requirements -------------------------


def narrowed(requirements, window, built):
    """requirements with TensorFlow's and tf_keras's limited to the minor version of `built`
    (the TensorFlow compiled against) when it is in the window; unchanged otherwise."""
    if built is None or not window.contains(Version(built), prereleases=True):
        return list(requirements)
    major, minor = Version(built).release[:2]
    same_minor = SpecifierSet(f">={major}.{minor},<{major}.{minor + 1}")
    result = []
    for text in requirements:
        requirement = Requirement(text)
        if canonicalize_name(requirement.name) in FOLLOWS_TENSORFLOW:
            requirement.specifier = same_minor
            text = str(requirement)
        result.append(text)
    return result


def installable_beside(requirements, oldest_tensorflow, built):
    """requirements less those that cannot be installed beside TensorFlow `built`:
    oldest_tensorflow maps a requirement's name to the oldest TensorFlow it goes with."""
    if built is None:
        return list(requirements)
    oldest = {canonicalize_name(name): Version(version) for name, version in oldest_tensorflow.items()}
    return [
        text
        for text in requirements
        if Version(built) >= oldest.get(canonicalize_name(Requirement(text).name), Version("0"))
    ]


_building_sdist = False  # an sdist states the window: a wheel built from it narrows it


def build_sdist(sdist_directory, config_settings=None):
    from scikit_build_core import build

    global _building_sdist
    _building_sdist = True
    try:
        return build.build_sdist(sdist_directory, config_settings)
    finally:
        _building_sdist = False


def _built_tensorflow_version():
    """The TensorFlow CMake compiles against: the build environment's, on sys.path."""
    found = None if _building_sdist else installed_tensorflow(sys.path)
    return None if found is None else found[1]


def dynamic_metadata(field, settings):
    """The hook for `dependencies` (settings: {"requires": [...]}) and `optional-dependencies`
    (settings: {extra: [...]})."""
    tool = pyproject_tool()
    window, built = tensorflow_window(tool), _built_tensorflow_version()
    if field == "dependencies":
        return narrowed(settings["requires"], window, built)
    if field == "optional-dependencies":
        extras = {extra: narrowed(requirements, window, built) for extra, requirements in settings.items()}
        test_needs = tool["fused-xent"]["test-needs-tensorflow"]
        extras["test"] = installable_beside(extras["test"], test_needs, built)
        return extras
    raise ValueError(f"{__name__} provides dependencies and optional-dependencies, not {field}")
