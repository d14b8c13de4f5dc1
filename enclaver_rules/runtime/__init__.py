"""The host side of an enclave: the parent-instance halves of egress and ingress, and (later) run."""
