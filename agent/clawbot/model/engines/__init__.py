"""Model-server engines: building them (build) and running them (one adapter per engine)."""
