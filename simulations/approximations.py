#!/usr/bin/env python
"""Thin driver: `dslm approximations` (exact ReLU / FFN correlation maps vs their approximations).
Usage: python simulations/approximations.py [--out DIR]  (see --help)."""
import sys

from dslm.cli import main

sys.exit(main(["approximations", *sys.argv[1:]]))
