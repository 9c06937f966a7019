import sys

from kdkernels.train.cli import main

sys.exit(main())
