"""A live dashboard of a run, read from its run directory: rounds, clients, plans, traffic, rejections.

``pollinate dashboard RUN_DIR`` serves a finished or running run; ``--dashboard [HOST:]PORT`` on ``simulate``
and ``coordinator`` serves the run they are writing, for as long as it runs. Read-only: the dashboard opens the
run's files for reading and never talks to clients. Loopback by default; elsewhere TLS and a token.
"""
