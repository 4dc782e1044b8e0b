"""Node-side pyinfra deploys, one concern each. deploy.py adds one per-host deploy, `roles.site.converge`, which
runs the roles in this order, driven by the node's plan (clawbot.control.planning.NodePlan):

hosts -> hugepages (model nodes) -> agent's system user -> hugetlbfs mount (model nodes) -> pki -> agent
-> model (model nodes) -> chat (chat nodes); services.py holds the service (systemd unit or supervisor program)
both model and chat use, content.py the stock file operations wrapped for what `deploy.py --diff` shows (unified
diffs of blocks and lines pyinfra shows none for; one line instead of the content of secrets and binaries).

Written the way pyinfra's own operations are: a public `@deploy` or `@operation` named for what it ensures,
with a one-line docstring and `+ arg:` lines; node state is read through facts (pyinfra's stock facts, or
clawbot.control.facts) and a custom operation yields commands only on a difference, else says why it is a
noop. Each custom operation has fixture tests (tests/fixtures/operations/<module>.<op>/*.json: facts in,
commands or noop out). Each role module documents its settings (inventory variables, see docs/inventory.md)
at the top.

Nothing here runs on the control machine's behalf: the CA and node certificates, the agent wheelhouse, the
engine build, the model file and the node plans are made by clawbot.control before any host is touched, and
deploy-side checks that change nothing (preflight from the NodeMemory fact, health after the run) live in
clawbot.control.rollout. A role only compares and copies. clawbot.control never imports
roles/ (the per-host deploy is handed to it).
"""
