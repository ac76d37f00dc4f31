"""`preftune train CONFIG` with the log-probs of one pair broken on every process of a launch, for
tests/test_deepspeed.py: HOW is loss (a NaN log-prob) or grad (an infinite gradient), as in
tests/test_nonfinite.py. Usage: poisoned_train.py HOW SOURCE CONFIG"""

import sys

from preftune import train as train_module
from preftune.cli import main
from tests.test_nonfinite import poisoned

how, bad, cfg_path = sys.argv[1:4]
train_module.batch_logps = poisoned(train_module.batch_logps, {bad}, how)  # the loop's one log-prob entry
sys.exit(main(["train", cfg_path]))
