"""One module per `planner` sub-command: add_parser(subparsers) and run(args) -> exit code."""
