"""The host side of an enclave: the parent-instance halves of egress and ingress, and (later) run.

What it speaks with odyn (transport, tunnel handshake, relay, status and log streams) comes from
`enclaver_rules.link`: the host never imports the enclave's package, `odyn` (tests/test_imports.py).
"""
