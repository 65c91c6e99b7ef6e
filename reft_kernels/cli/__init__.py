"""The ``reft-kernels`` command: :mod:`.main` (the subcommands) and :mod:`.args` (their flags)."""
