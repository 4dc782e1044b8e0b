"""The chat node: the web UI and chat API (service, web/), conversations in SQLite (store), context upkeep
(context) and the fallbacks that answer when the model cannot (fallbacks)."""
