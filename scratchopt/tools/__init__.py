"""The tools built on the library: the ``scratchopt`` command (:mod:`~scratchopt.tools.cli`) with its
``demo``, ``report`` and ``bench``, and the ZeRO memory plan (:mod:`~scratchopt.tools.memory_plan`).

They read what they need about each algorithm from the registry (:mod:`~scratchopt.tools.catalog`); the
command needs the ``report`` extra (numpy, matplotlib, scikit-learn, tqdm). The library never imports them:
``import scratchopt`` loads no module of this package.
"""
