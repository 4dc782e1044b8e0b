"""clawbot: the node agent package (config, supervisor, gateway, chat, web) and its CLI."""

__version__ = "0.1.0"
