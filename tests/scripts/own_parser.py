"""A script whose --optim choices are fixed by its own argparse, out of the launcher's reach (tests/test_launch.py)."""

import argparse

from transformers.training_args import OptimizerNames

parser = argparse.ArgumentParser()
parser.add_argument("--optim", choices=[name.value for name in OptimizerNames])
parser.parse_args()
