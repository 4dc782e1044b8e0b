"""pyinfra deploys, one concern each, applied by deploy.py in this order:

hosts -> hugepages -> pki -> agent -> model -> chat

Each role module documents its public settings (inventory variables, see docs/inventory.md) at the top and
exposes one `@deploy` function named for what it ensures. Control-machine work a role needs (the CA, the
agent wheelhouse, the model file, the engine binary) is prepared by deploy.py before any host is touched,
so a role only compares and copies.
"""
