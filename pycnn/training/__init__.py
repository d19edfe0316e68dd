"""Training: the run configuration, the training loop, the ``pycnn`` command line, sanity
checks, diagnostics and figures, reports, fine-tuning, and the tools built on them (search,
ensembles, class imbalance: ``pycnn.training.tools``).

    from pycnn.training import config, runs
    runs.run(config.Config(dataset="cifar10", epochs=10), "runs/a")
"""
