"""utdsl bench: the VTAB-1k / FGVC research protocol, on Ray.

One module a job: :mod:`.suites` (tasks, groups, protocol splits, grids: ``suites.toml``),
:mod:`.plan` (the trials and the choice of the best setting), :mod:`.trials` (one trial: its run
directory's state, running it, what it measured), :mod:`.execute` (Ray or inline executors),
:mod:`.run` (the driver, :func:`~.run.run_bench`), :mod:`.results` (means and the written tables),
:mod:`.published` (published rows, ``published_<suite>.toml``) and :mod:`.report` (the terminal).
Nothing is imported here, so that ``import utdsl`` does not import Ray.
"""
