"""Ray Data / Ray Train pipelines and the ``dynamix`` command line."""
