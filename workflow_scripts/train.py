"""One Horovod rank of the training rule (horovodrun starts this once per process)."""
import sys

from asrflow.train.run import main

sys.exit(main())
