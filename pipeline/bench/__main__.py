import sys

from pipeline.bench.driver import main

sys.exit(main())
