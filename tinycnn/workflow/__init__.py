"""The course project's workflow, built on the core and never imported by it.

checks (split sizes, class balance, initial loss, overfitting a small subset), lr_finder (the learning-rate
range test), grid (the hyperparameter search, one run folder per point) and report (a Markdown report of a
whole workflow). The recipes of the same names are their command lines.
"""
