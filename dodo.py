"""doit entry point. Declares only: tasks come from `enclaver_rules.rules` (see its docstring).

    doit list            # every task
    doit                 # check and explain every enclave (the default tasks)
    doit check:hello     # one enclave
"""

import os

from enclaver_rules.rules import DOIT_CONFIG, tasks

globals().update(tasks(os.path.dirname(os.path.abspath(__file__))))

__all__ = ["DOIT_CONFIG"]
