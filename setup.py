"""Not used: pip builds pycnn with scikit-build-core from pyproject.toml and CMakeLists.txt
(`pip install -e ".[test]"`; after editing csrc/, `pip install --no-build-isolation -e .`).
Kept only because the project's layout (DESIGN.md) names a top-level setup.py."""
