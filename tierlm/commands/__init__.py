"""The ``tierlm`` subcommands, one module each, every one a ``run(args) -> exit status``.

tierlm.cli parses and validates the arguments without importing torch; a command module is imported
only when its command runs, and imports the engine then.
"""
