"""``scratchopt report``: an HTML page of figures and tables that checks scratchopt against the seed
articles and against ``torch.optim``, with every number it shows in ``results.json``.

One module per section (``toy``, ``regression``, ``torch_parity``, ``speed``, ``memory``), each with a
``run`` that measures and returns JSON-ready results and a ``render`` that turns those results into
HTML; :func:`scratchopt.tools.report.build.build_report` runs them and writes the files. This package
imports nothing heavy itself, so that ``scratchopt --help`` stays fast.
"""
