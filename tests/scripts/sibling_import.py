"""A script that imports a module next to it, as transformers' examples do
(run_qa.py: ``from utils_qa import ...``); ``python SCRIPT`` puts the script's
folder first on ``sys.path``, so a launcher that runs it must too."""

import sibling_helper

print(f"SIBLING {sibling_helper.VALUE}")
