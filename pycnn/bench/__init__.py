"""The harness behind ``pycnn bench``: every op of the registry timed per backend and
algorithm against the NumPy reference and the machine's limits (``pycnn.bench.harness``)."""
