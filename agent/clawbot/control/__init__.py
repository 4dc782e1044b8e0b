"""The control machine (where deploy.py runs): the inventory via ansible-core, the state directory, node plans,
builds made here and `clawbot status`. Nodes never import this package (it pulls in GPL Ansible)."""
