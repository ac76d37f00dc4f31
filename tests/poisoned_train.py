"""`preftune train CONFIG` with the log-probs of two pairs broken, for tests/test_deepspeed.py: the pair
BAD_LOSS gets a NaN log-prob, BAD_GRAD an infinite gradient (tests/test_nonfinite.py's poison), on every
process of a launch. Usage: poisoned_train.py BAD_LOSS BAD_GRAD CONFIG"""

import sys

from preftune import train as train_module
from preftune.cli import main
from tests.test_nonfinite import poisoned

bad_loss, bad_grad, cfg_path = sys.argv[1:4]
for name in ("batch_logps", "sequence_logps"):
    real = getattr(train_module, name)
    setattr(train_module, name, poisoned(poisoned(real, {bad_loss}, "loss"), {bad_grad}, "grad"))
sys.exit(main(["train", cfg_path]))
