"""One module per `capaserve` subcommand; each exposes `register(subparsers)`."""
