import sys

from featurelt.cli import main

sys.exit(main())
