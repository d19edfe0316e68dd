"""Tools built on the training pipeline: what the lecture notes and the tips teach
about choosing settings and combining networks, each as one command.

* ``trial``: train one ``Config`` in a folder epoch by epoch, reporting after each epoch
  (to a search's successive-halving rule), resumable from its checkpoints;
  load a checkpoint back as a predictor.
* ``space``: the search space (distributions over settings) and its narrowing.
* ``search``: random search over any ``Config`` setting (log-uniform, uniform and choice
  distributions), coarse to fine, with early abort of diverging and hopeless trials
  (``pycnn search``).
* ``raytune``: the Ray side: a local Ray instance or an existing cluster; search trials,
  ensemble members and imbalance remedies as Ray tasks sized by the resources they ask for.
* ``ensemble``: ensembles of seeds, of a search's top trials and of one run's checkpoints
  (or cyclic-schedule snapshots), with test-time augmentation and calibration
  (``pycnn ensemble``).
* ``imbalance``: long-tailed versions of a dataset, class weights, balanced sampling and the
  two-stage fine-tune, with per-class accuracy and confusion matrices (``pycnn imbalance``).
* ``plots``: their figures.
* ``cli``: the argparse wiring of the three commands.
"""
