"""The parts of ``pycnn.torch`` (its docstring says which part does what)."""
