"""The commands of `logit-extract` (lib/cli.py): each module has `add_arguments(parser)` and
`run(args) -> int`, and leaves its errors to lib/cli.py."""
