"""doit entry point. Declares only: tasks come from `enclaver_rules.rules` (see its docstring).

    doit list            # every task
    doit                 # check and explain every enclave; in this repository also build the hello example
    doit build           # build every enclave (build:<name> for one); here no-fly-list and vault need mmdebstrap
    doit check:hello     # one enclave
"""

import importlib.util
import os

from enclaver_rules.rules import tasks

ROOT = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.join(ROOT, "examples", "images.py")

if os.path.isfile(EXAMPLES):
    # This repository: the examples' app images and blob set are made here (examples/images.py), and
    # a bare `doit` builds the hello example end to end (README command (a)).
    spec = importlib.util.spec_from_file_location("enclaver_examples", EXAMPLES)
    assert spec is not None and spec.loader is not None
    examples = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(examples)
    task_examples = examples.task_examples
    made_here = {name: [f"examples:{name}", "examples:blobs"] for name in ("hello", "no-fly-list", "vault")}
    globals().update(tasks(ROOT, extra_deps=made_here))
    DOIT_CONFIG = {**globals()["DOIT_CONFIG"], "default_tasks": ["check", "explain", "trust:hello", "show:hello"]}
else:
    globals().update(tasks(ROOT))  # the task creators and DOIT_CONFIG (doit's state inside the cache)
