"""Train a GPT preset under a named plan; see `python scripts/train.py --help`."""
import sys

from jaxpar.runtime.train import main

sys.exit(main())
