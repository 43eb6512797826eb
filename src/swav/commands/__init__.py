"""Sub-commands of ``swav`` beyond ``pretrain``: each module has ``register(subparsers)`` that adds
its parsers with ``set_defaults(func=...)``; the functions only build arguments and call the library."""

COMMAND_MODULES = ("swav.commands.evaluate", "swav.commands.report", "swav.commands.bench")
