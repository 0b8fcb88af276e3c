"""One module per ``dynamix`` subcommand; each defines ``add_arguments(parser)`` and ``run(args) -> int``."""
