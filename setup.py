"""pycnn is built by scikit-build-core from pyproject.toml and CMakeLists.txt; pip never runs
this file (it is kept because the project's layout names it).

    pip install -e ".[test]"                 # first install (README)
    pip install --no-build-isolation -e .    # rebuild after editing csrc/ (incremental, build/)

The second needs the build requirements in the environment once:
``pip install scikit-build-core pybind11``.
"""
import sys

if __name__ == "__main__":
    sys.exit(__doc__.replace("pip never runs\nthis file", "this file builds\nnothing")
             + "\n`python setup.py ...` is gone: use the commands above.")
